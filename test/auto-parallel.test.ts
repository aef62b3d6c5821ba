// `--parallel auto`: the policy over a given profile (alone within the budget, lower P under
// load, higher again as load falls), the cost profile measured once on the default model and
// reused (a new one for other threads), serve choosing and reporting P (real HTTP, /metrics),
// and `run` saying why (one-shot and --batch), bad values as one line.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, before, describe, test} from 'node:test'

import {ParScaleModel} from '../src/core/engine/model.js'
import {resolveModel} from '../src/core/package/resolve.js'
import {cachedProfile, loadOrMeasureProfile, measureProfile, profileRows, PROFILE_FILE, stepMs, type StepCost} from '../src/core/parallel/cost-profile.js'
import type {DecoderOutput} from '../src/core/engine/decoder.js'
import {FakeCache, FakeDecoder} from './helpers/fake-decoder.js'
import {assignAutoParallel, AutoParallel, AutoParallelPolicy} from '../src/core/parallel/policy.js'
import {ServeEngine} from '../src/core/serve/engine.js'
import {RunningServer} from '../src/core/serve/server.js'
import {runCli} from './helpers/cli.js'
import {makeTempDir} from './helpers/safetensors-writer.js'
import {metricValue} from './helpers/serve.js'

/** A memory-bound machine: a step costs 10 ms plus 0.5 ms per row (P = 8 alone is 1.35× P = 1). */
function linearProfile(perRow = 0.5, base = 10): {decode: StepCost[]} {
  return {decode: [1, 2, 4, 8, 16, 32, 64].map((rows) => ({rows, parallel: 1, batch: rows, ms: base + perRow * rows}))}
}

describe('auto P policy over a given profile', () => {
  test('alone: the largest P whose step fits the budget × P = 1\'s, with the reason', () => {
    const profile = linearProfile()
    const tight = new AutoParallelPolicy(profile, [1, 2, 4, 8], {maxBatch: 8})
    // P=4: 12 ms / 10.5 ms = 1.14× fits 1.25×; P=8: 14 / 10.5 = 1.33× does not.
    const alone = tight.choose([])
    assert.equal(alone.parallel, 4)
    assert.match(alone.reason, /^auto: P=4 because alone its step is 12\.0 ms, 1\.14× P=1's 10\.5 ms \(budget 1\.25×\); P=8 would be 1\.33×$/)
    assert.equal(new AutoParallelPolicy(profile, [1, 2, 4, 8], {maxBatch: 8, budget: 2}).choose([]).parallel, 8)
    assert.equal(new AutoParallelPolicy(profile, [1, 2, 4, 8], {maxBatch: 8, budget: 1}).choose([]).parallel, 1)
    // Only P values the package has.
    assert.equal(new AutoParallelPolicy(profile, [1, 8], {maxBatch: 8}).choose([]).parallel, 1)
  })

  test('under load new requests get smaller P; when load falls, larger again', () => {
    const policy = new AutoParallelPolicy(linearProfile(), [1, 2, 4, 8], {maxBatch: 8, budget: 2})
    const chosen: number[] = []
    const inFlight: number[] = []
    for (let i = 0; i < 24; i++) {
      const {parallel} = policy.choose(inFlight)
      chosen.push(parallel)
      inFlight.push(parallel)
    }
    assert.equal(chosen[0], 8)
    assert.ok(chosen.slice(1).every((p) => p < 8), `under load: ${chosen.join(',')}`)
    assert.ok(chosen.slice(12).every((p) => p === 1), `a full batch: P = 1 (${chosen.join(',')})`)
    // Everything in flight keeps ≥ 0.9× all-P = 1 throughput except what the first (lone) request cost.
    const mixed = policy.predict(inFlight.slice(1))
    const ones = policy.predict(inFlight.slice(1).map(() => 1))
    assert.ok(mixed.tokens / mixed.ms >= 0.9 * (ones.tokens / ones.ms), 'throughput kept')
    const loaded = policy.choose([1, 1, 1, 1, 1, 1, 1, 1])
    assert.equal(loaded.parallel, 1)
    assert.match(loaded.reason, /^auto: P=1 because with 8 other requests in flight \(8 rows\) it keeps throughput at [\d.]+× all-P=1's \(floor 0\.9×\); P=\d would give 0\.\d+×$/)
    // Each P is its own call per step (the weights read again), so beside P = 1 rows another P costs a whole step.
    assert.equal(policy.choose([1]).parallel, 1)
    // Where rows are nearly free (memory-bound steps), a new request joins the call of the P in flight.
    const flat = new AutoParallelPolicy(linearProfile(0.1), [1, 2, 4, 8], {maxBatch: 8, budget: 2})
    assert.equal(flat.choose([4]).parallel, 4)
    assert.equal(flat.choose([4, 4, 4, 4, 4, 4, 4, 4]).parallel, 1, 'its call is full: P = 1')
    assert.equal(policy.choose([]).parallel, 8, 'load gone: alone again')
  })

  test('requests of a burst that finds the server idle are chosen together, not the first alone', async () => {
    const auto = new AutoParallel(new AutoParallelPolicy(linearProfile(), [1, 2, 4, 8], {maxBatch: 8, budget: 2}), 250)
    // As the server does: a request counts as in flight from the moment its P is chosen.
    const choices = await Promise.all(Array.from({length: 6}, async () => {
      const choice = await auto.chooseGathered(20)
      auto.begin(choice.parallel)
      return choice
    }))
    assert.deepEqual(choices.map((c) => c.parallel), [1, 1, 1, 1, 1, 1])
    const lone = new AutoParallel(new AutoParallelPolicy(linearProfile(), [1, 2, 4, 8], {maxBatch: 8, budget: 2}), 250)
    assert.equal((await lone.chooseGathered(5)).parallel, 8, 'alone, after the wait')
  })

  test('a burst that just passed still counts for the window; then P rises', () => {
    let now = 0
    const auto = new AutoParallel(new AutoParallelPolicy(linearProfile(), [1, 2, 4, 8], {maxBatch: 8, budget: 2}), 250, () => now)
    const ends = Array.from({length: 12}, () => auto.begin(1))
    assert.equal(auto.choose().parallel, 1)
    for (const end of ends) end()
    now = 100
    assert.equal(auto.choose().parallel, 1, 'within the window the burst is still load')
    now = 400
    assert.equal(auto.choose().parallel, 8, 'after it, alone again')
  })

  test('a batch: every line is chosen against all the others; lines naming P keep it and count as load', () => {
    const policy = new AutoParallelPolicy(linearProfile(0.1), [1, 2, 4, 8], {maxBatch: 8, budget: 2})
    const requests = [{parallel: 4}, {parallel: 8}, {parallel: 8}, {parallel: 8}]
    const choices = assignAutoParallel(policy, requests, [false, true, true, true])
    assert.equal(choices[0], undefined)
    assert.equal(requests[0].parallel, 4)
    assert.deepEqual(choices.slice(1).map((c) => c?.parallel), requests.slice(1).map((r) => r.parallel))
    assert.match(choices[1]!.reason, /with 3 other requests in flight/)
    // The named P = 4 line is a call of its own beside the others whatever they choose; the choice
    // that stays best once it is done is P = 1 (no P keeps 0.9× all-P = 1's while it runs).
    assert.deepEqual(requests.map((r) => r.parallel), [4, 1, 1, 1])
    const alone = [{parallel: 8}]
    assert.equal(assignAutoParallel(policy, alone, [true])[0]!.parallel, 8, 'a one-line batch is a lone request')
  })

  test('measuring: a point caught in a burst of other work is measured again; more rows never read as cheaper', async () => {
    /** Steps cost 5 ms + 0.2 ms a row; the first measurement of 16 rows lands in a 150 ms burst, 4 rows read cheap once. */
    class TimedDecoder extends FakeDecoder {
      private burst = true
      private dip = true
      override async forward(cache: FakeCache, first: number, inputIds: number[][], keep: number): Promise<DecoderOutput> {
        const rows = inputIds.length * cache.parallel
        let ms = 5 + 0.2 * rows
        if (rows === 16 && inputIds[0].length === 1 && this.burst) ms += 150
        if (rows === 4 && inputIds[0].length === 1 && this.dip) ms = 1
        await new Promise((resolve) => setTimeout(resolve, ms))
        const out = await super.forward(cache, first, inputIds, keep)
        return out
      }
      endBurst(rows: number): void {
        if (rows === 16) this.burst = false
      }
    }
    const decoder = new TimedDecoder(50, () => undefined, [1, 2, 4, 8])
    const original = decoder.forward.bind(decoder)
    let sixteenRuns = 0
    decoder.forward = async (cache, first, ids, keep) => {
      if (ids.length * cache.parallel === 16 && ids[0].length > 1 && ++sixteenRuns > 1) decoder.endBurst(16)
      return original(cache, first, ids, keep)
    }
    const profile = await measureProfile(decoder, {device: 'cpu'}, 8)
    const at = (rows: number) => profile.decode.find((d) => d.rows === rows)!.ms
    assert.ok(sixteenRuns >= 2, 'the 16-row point was measured again')
    assert.ok(at(16) < 60, `16 rows: ${at(16)} ms`)
    assert.ok(at(4) >= at(2), 'the dip is lifted to its neighbour')
    assert.ok(profile.decode.every((d, i, all) => i === 0 || d.ms >= all[i - 1].ms))
  })

  test('rows to measure go up to max batch × largest P, each with a P the package has', () => {
    assert.deepEqual(profileRows([1, 2, 4, 8], 8).map((r) => [r.rows, r.parallel, r.batch]), [[1, 1, 1], [2, 2, 1], [4, 4, 1], [8, 8, 1], [16, 8, 2], [32, 8, 4], [64, 8, 8]])
    assert.deepEqual(profileRows([1], 3).map((r) => r.rows), [1, 2, 3])
    assert.equal(stepMs(linearProfile(), 12), 16)
    assert.equal(stepMs(linearProfile(), 128), 10 + 0.5 * 128)
  })
})

const cache = makeTempDir('parscale-auto-')
const env = {PARSCALE_CACHE: cache, HF_HUB_OFFLINE: '1'}

before(() => {
  process.env.PARSCALE_CACHE = cache
})

after(() => {
  delete process.env.PARSCALE_CACHE
  fs.rmSync(cache, {recursive: true, force: true})
})

describe('cost profile on the default model', () => {
  test('measured once (in seconds), then reused from the cache; other threads measure their own', async () => {
    const {packageDir} = resolveModel(undefined, {})
    fs.rmSync(path.join(packageDir, PROFILE_FILE), {force: true})
    const model = await ParScaleModel.open(packageDir, {threads: 1})
    try {
      let measured = 0
      const first = await loadOrMeasureProfile(packageDir, model, {threads: 1, device: 'cpu'}, 8, {onMeasuring: () => measured++})
      assert.equal(first.cached, false)
      assert.equal(measured, 1)
      assert.ok(first.profile.measureMs < 10_000, `measured in ${first.profile.measureMs} ms`)
      assert.deepEqual(first.profile.decode.map((d) => d.rows), [1, 2, 4, 8, 16, 32, 64])
      assert.ok(first.profile.decode.every((d, i, all) => d.ms > 0 && (i === 0 || d.ms >= all[i - 1].ms)))
      assert.deepEqual(first.profile.prefill.map((p) => p.parallel), [1, 2, 4, 8])
      assert.equal(first.file, path.join(packageDir, PROFILE_FILE))
      const again = await loadOrMeasureProfile(packageDir, model, {threads: 1, device: 'cpu'}, 8, {onMeasuring: () => measured++})
      assert.equal(again.cached, true)
      assert.equal(measured, 1)
      assert.deepEqual(again.profile, JSON.parse(JSON.stringify(first.profile)))
      // Another thread count is another entry: not found, measured, both kept.
      assert.equal(cachedProfile(packageDir, {threads: 2, device: 'cpu'}, 64), undefined)
      const two = await loadOrMeasureProfile(packageDir, model, {threads: 2, device: 'cpu'}, 8, {onMeasuring: () => measured++})
      assert.equal(two.cached, false)
      assert.equal(measured, 2)
      assert.match(two.profile.key, /· 2 threads · cpu$/)
      const file = JSON.parse(fs.readFileSync(first.file, 'utf8')) as {profiles: {key: string}[]}
      assert.equal(file.profiles.length, 2)
      // A profile measured for fewer rows than a larger batch needs is measured again.
      assert.equal(cachedProfile(packageDir, {threads: 1, device: 'cpu'}, 65), undefined)
    } finally {
      await model.release()
    }
  })
})

describe('serve --parallel auto (real HTTP on 127.0.0.1)', () => {
  let server: RunningServer
  let engine: ServeEngine
  const reasons: string[] = []

  before(async () => {
    engine = await ServeEngine.open(undefined, {parallel: 'auto', autoBudget: 2, threads: 1, maxBatch: 8, maxQueue: 64, onChoice: ({reason}) => reasons.push(reason)})
    server = await RunningServer.listen(engine, {host: '127.0.0.1', port: 0})
  })

  after(async () => {
    await server?.shutdown(10_000)
  })

  const complete = async (body: Record<string, unknown>) => {
    const response = await fetch(`${server.url}/v1/completions`, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify({prompt: 'def add(a, b):', max_tokens: 4, temperature: 0, ...body})})
    return {status: response.status, body: (await response.json()) as {parallel: number; choices: {text: string}[]}}
  }

  test('a request naming no P gets the policy\'s (alone: its lone choice) and reports it; a named P is kept', async () => {
    assert.ok(engine.profile, 'the profile is loaded at start')
    const alone = new AutoParallelPolicy(engine.profile.profile, [1, 2, 4, 8], {maxBatch: 8, budget: 2}).choose([]).parallel
    const chosen = await complete({})
    assert.equal(chosen.status, 200)
    assert.equal(chosen.body.parallel, alone)
    assert.match(reasons.at(-1) ?? '', new RegExp(`^auto: P=${alone} because alone`))
    const auto = await complete({parallel: 'auto'})
    assert.equal(auto.body.parallel, alone)
    const named = await complete({parallel: 2})
    assert.equal(named.body.parallel, 2)
    const models = (await (await fetch(`${server.url}/v1/models`)).json()) as {data: {default_parallel: unknown}[]}
    assert.equal(models.data[0].default_parallel, 'auto')
    const metrics = await (await fetch(`${server.url}/metrics`)).text()
    assert.equal(metricValue(metrics, 'parscale_parallel_chosen_total', {parallel: String(alone), by: 'auto'}), 2)
    assert.equal(metricValue(metrics, 'parscale_parallel_chosen_total', {parallel: '2', by: 'request'}), 1)
    const bad = await complete({parallel: 'autox'})
    assert.equal(bad.status, 400)
  })

  test('a streamed answer carries the chosen P in its chunks', async () => {
    const response = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({messages: [{role: 'user', content: 'hi'}], max_tokens: 3, stream: true}),
    })
    const text = await response.text()
    const chunks = text.split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)) as {parallel: number})
    assert.ok(chunks.length > 1)
    assert.ok(chunks.every((c) => Number.isInteger(c.parallel) && c.parallel === chunks[0].parallel && [1, 2, 4, 8].includes(c.parallel)))
  })
})

describe('run --parallel auto', () => {
  test('one-shot: the P the cached profile says, and why under --verbose', async () => {
    const r = await runCli(['run', 'def add(a, b):', '--parallel', 'auto', '--verbose', '-n', '4', '--temperature', '0', '--json', '--threads', '1'], {env})
    assert.equal(r.code, 0, r.stderr)
    const result = JSON.parse(r.stdout) as {parallel: number}
    const [, cached] = /auto: cost profile (cached|measured now)/.exec(r.stderr) ?? []
    assert.equal(cached, 'cached', 'the profile the earlier test measured (1 thread) is reused')
    const why = /^auto: P=(\d+) because alone its step is [\d.]+ ms, [\d.]+× P=1's [\d.]+ ms \(budget 1\.25×\)/m.exec(r.stderr)
    assert.ok(why, r.stderr)
    assert.equal(result.parallel, Number(why[1]))
    const {packageDir} = resolveModel(undefined, {})
    const profile = cachedProfile(packageDir, {threads: 1, device: 'cpu'}, 8)!
    assert.equal(result.parallel, new AutoParallelPolicy(profile, [1, 2, 4, 8], {maxBatch: 8}).choose([]).parallel)
  })

  test('--batch: lines naming "parallel" keep it, the others are chosen (and said why)', async () => {
    const file = path.join(cache, 'auto.jsonl')
    const lines = [{prompt: 'a', parallel: 2}, {prompt: 'b'}, {prompt: 'c'}, {prompt: 'd', parallel: 8}]
    fs.writeFileSync(file, lines.map((l) => JSON.stringify(l)).join('\n') + '\n')
    const r = await runCli(['run', '--batch', file, '--parallel', 'auto', '--auto-budget', '3', '--verbose', '-n', '3', '--temperature', '0', '--json', '--threads', '1'], {env})
    assert.equal(r.code, 0, r.stderr)
    const results = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as {parallel: number})
    assert.equal(results[0].parallel, 2)
    assert.equal(results[3].parallel, 8)
    for (const line of [2, 3]) {
      const why = new RegExp(`^${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:${line}: auto: P=(\\d+) because with 3 other requests in flight`, 'm').exec(r.stderr)
      assert.ok(why, r.stderr)
      assert.equal(results[line - 1].parallel, Number(why[1]))
    }
    assert.doesNotMatch(r.stderr, new RegExp(`:(1|4): auto:`))
  })

  test('bad values: one line, exit 2', async () => {
    for (const [args, message] of [
      [['run', '--parallel', 'autox', 'hi'], '--parallel must be a whole number >= 1 or auto (got "autox")'],
      [['run', '--parallel', 'auto', '--auto-budget', '0', 'hi'], '--auto-budget must be a number > 0 (got "0")'],
      [['run', '--auto-budget', '2', 'hi'], '--auto-budget needs --parallel auto'],
      [['serve', '--parallel', 'autox'], '--parallel must be a whole number >= 1 or auto (got "autox")'],
      [['serve', '--parallel', 'auto', '--auto-budget', '-1'], '--auto-budget must be a number > 0 (got "-1")'],
      [['worker', '--queue', 'redis://127.0.0.1:1', '--auto-budget', '2'], '--auto-budget needs --parallel auto'],
    ] as const) {
      const r = await runCli([...args], {env})
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`)
      assert.equal(r.stderr, `parscale: ${message}\n`)
    }
  })
})
