// `parscale batch submit/status/collect` and `parscale worker` against a real redis-server:
// validation as `run --batch`, resubmits, the package fingerprint, collect's refusals, SIGTERM,
// failing lines, refusing a model, a Redis restart, an unreachable Redis. The kill -9 target is
// in queue-fault.test.ts.
import assert from 'node:assert/strict'
import {spawn} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import {after, before, beforeEach, describe, test} from 'node:test'

import {Queue} from 'bullmq'
import {Redis} from 'ioredis'

import {BULL_PREFIX, lineJobId, type LineJob, modelQueueName} from '../src/core/queue/jobs.js'
import {REPO_ROOT, runCli, type CliResult} from './helpers/cli.js'
import {killWorkers, startWorker, status, statusNow, waitFor, waitForStatus} from './helpers/queue.js'
import {freePort, type RedisServer, startRedis} from './helpers/redis-server.js'
import {makeTempDir} from './helpers/safetensors-writer.js'

const tmp = makeTempDir('parscale-queue-')
const env = {PARSCALE_CACHE: path.join(tmp, 'cache'), HF_HUB_OFFLINE: '1'}
const PROMPTS = ['def fibonacci(n):', 'import os\n', 'class Stack:', 'for i in range(10):', 'with open(path) as f:', 'def __init__(self, items):', 'try:\n    import json', 'return sorted(']
let redis: RedisServer
let client: Redis

before(async () => {
  redis = await startRedis()
  client = new Redis(redis.url, {maxRetriesPerRequest: 1})
})
after(async () => {
  await killWorkers()
  client?.disconnect()
  await redis?.stop()
  fs.rmSync(tmp, {recursive: true, force: true})
})
beforeEach(async () => {
  await killWorkers()
  await client.flushall()
})

function jsonl(name: string, lines: unknown[]): string {
  const file = path.join(tmp, name)
  fs.writeFileSync(file, lines.map((l) => (typeof l === 'string' ? l : JSON.stringify(l))).join('\n') + '\n')
  return file
}

function prompts(name: string, count: number): string {
  return jsonl(name, Array.from({length: count}, (_, i) => ({prompt: PROMPTS[i % PROMPTS.length] + ' '.repeat(Math.floor(i / PROMPTS.length))})))
}

function cli(args: string[]): Promise<CliResult> {
  return runCli(args, {env})
}

/** One line on stderr, `parscale: …`, with each part; exit `code`. */
function oneLine(r: CliResult, code: number, ...parts: string[]): string {
  assert.equal(r.code, code, r.stderr)
  const lines = r.stderr.trim().split('\n')
  assert.equal(lines.length, 1, r.stderr)
  assert.match(lines[0], /^parscale: /)
  for (const p of parts) assert.ok(lines[0].includes(p), `"${lines[0]}" lacks "${p}"`)
  return lines[0]
}

// P = 2 and few tokens keep the suite quick; the 200-line target runs in queue-fault.test.ts.
const GEN = ['--max-new-tokens', '8', '--temperature', '0', '--parallel', '2']

describe('parscale batch on a Redis queue', () => {
  test('submit checks the file with run --batch\'s rules and messages, and queues nothing', async () => {
    const file = jsonl('bad.jsonl', [{prompt: 'def f():'}, {prompt: 'x', top_k: 3}])
    const run = await cli(['run', '--batch', file, '--json'])
    const submit = await cli(['batch', 'submit', file, '--queue', redis.url])
    const line = oneLine(submit, 1, `${file}:2`, 'unknown field "top_k"')
    assert.equal(line, run.stderr.trim())
    oneLine(await cli(['batch', 'status', 'bad', '--queue', redis.url]), 1, 'no batch named "bad"')
    oneLine(await cli(['batch', 'submit', file, '--queue', 'http://localhost:6379']), 2, '--queue')
  })

  test('submitting again adds nothing; other lines under the same name are refused', async () => {
    const file = prompts('again.jsonl', 5)
    const first = await cli(['batch', 'submit', file, '--queue', redis.url, ...GEN])
    assert.equal(first.code, 0, first.stderr)
    assert.match(first.stdout, /batch again: queued 5 lines/)
    const second = await cli(['batch', 'submit', file, '--queue', redis.url, ...GEN])
    assert.equal(second.code, 0, second.stderr)
    assert.match(second.stdout, /all 5 lines already queued on redis:\/\/127\.0\.0\.1:\d+; nothing added/)
    assert.equal((await status(redis.url, 'again', env)).waiting, 5)
    oneLine(await cli(['batch', 'submit', file, '--queue', redis.url, '--max-new-tokens', '9']), 1, 'a batch named "again" already exists')
  })

  test('the same model converted elsewhere has the same package fingerprint (its file times differ)', async () => {
    const file = prompts('same.jsonl', 1)
    const copy = path.join(tmp, 'elsewhere', 'default-model')
    fs.cpSync(path.join(REPO_ROOT, 'fixtures', 'default-model'), copy, {recursive: true, verbatimSymlinks: true})
    const fingerprint = async (model: string[]) => {
      const r = await cli(['batch', 'submit', file, ...model, '--queue', redis.url, '--name', `same-${model.length}`, ...GEN])
      assert.equal(r.code, 0, r.stderr)
      return /fingerprint (\w+)/.exec(r.stdout)![1]
    }
    assert.equal(await fingerprint([copy]), await fingerprint([]))
    const converted = path.join(env.PARSCALE_CACHE, 'converted')
    const sources = fs.readdirSync(converted).map((dir) => (JSON.parse(fs.readFileSync(path.join(converted, dir, 'parscale.json'), 'utf8')) as {sourceFingerprint: string}).sourceFingerprint)
    assert.equal(new Set(sources).size, 2, 'two packages, whose sourceFingerprints differ')
  })

  test('a job records the model, its fingerprint, the sampling and the line\'s fields; collect writes run --batch --json\'s objects, mixed P, ids and all', async () => {
    const file = jsonl('mixed.jsonl', [
      {id: 'fib', prompt: 'def fibonacci(n):', temperature: 0},
      {prompt: 'import os\n', parallel: 1},
      {id: 3, prompt: 'class Stack:', parallel: 4, max_tokens: 5, temperature: 0},
      {prompt: 'for i in range(10):', temperature: 0.5},
      {prompt: 'with open(path) as f:', parallel: 1, max_new_tokens: 3},
      {prompt: 'return sorted(', parallel: 4},
    ])
    // Sampled lines too (a seed per line, so the same as run --batch); greedy where a line says 0.
    const gen = ['--max-new-tokens', '8', '--parallel', '2', '--temperature', '0.8', '--top-k', '20', '--repetition-penalty', '1.1', '--seed', '7']
    const submitted = await cli(['batch', 'submit', file, '--queue', redis.url, ...gen])
    assert.equal(submitted.code, 0, submitted.stderr)
    const fingerprint = /fingerprint (\w+)/.exec(submitted.stdout)![1]

    const queue = new Queue<LineJob>(modelQueueName(fingerprint), {connection: client, prefix: BULL_PREFIX})
    const third = (await queue.getJob(lineJobId('mixed', 3)))!
    const fourth = (await queue.getJob(lineJobId('mixed', 4)))!
    await queue.close()
    assert.deepEqual(third.data.model, {reference: null, label: 'the default model', fingerprint})
    assert.equal(third.data.line, 3)
    assert.deepEqual(third.data.fields, {input: {kind: 'prompt', text: 'class Stack:'}, max_new_tokens: 5, temperature: 0, parallel: 4, id: 3})
    assert.deepEqual([third.data.request.parallel, third.data.request.maxNewTokens], [4, 5])
    assert.deepEqual(third.data.request.sampling, {temperature: 0, topK: 20, repetitionPenalty: 1.1, seed: 7 + 2})
    assert.deepEqual(fourth.data.fields, {input: {kind: 'prompt', text: 'for i in range(10):'}, temperature: 0.5})
    assert.deepEqual(fourth.data.request.sampling, {temperature: 0.5, topK: 20, repetitionPenalty: 1.1, seed: 7 + 3})
    assert.equal(fourth.data.request.parallel, 2)

    const worker = startWorker(['--queue', redis.url, '--batch-size', '4'], env)
    await waitForStatus(redis.url, 'mixed', (s) => s.done === 6)
    // Its stderr is a pipe: one line for the batch once its share is done.
    await waitFor('the batch\'s log line', () => /\nbatch mixed: 6 lines done · \d+ tokens in [\d.]+ s \([\d.]+ tokens\/s\) · the default model\n$/.test(worker.stderr()))
    worker.child.kill('SIGTERM')
    assert.equal(await worker.exited, 0, worker.stderr())
    // The worker adds its tokens to the batch's counters every second, and as it exits.
    const done = await statusNow(redis.url, 'mixed')
    const collected = await cli(['batch', 'collect', 'mixed', '--queue', redis.url])
    assert.equal(collected.code, 0, collected.stderr)
    assert.match(collected.stderr, /^6 lines → stdout \(6 done\)\n$/)
    const reference = await cli(['run', '--batch', file, '--json', ...gen])
    assert.equal(reference.code, 0, reference.stderr)
    // Everything but the timings, which are the run's own.
    const untimed = (text: string) => text.trim().split('\n').map((l) => {
      const {ttft_ms: ttft, decode_tokens_per_s: rate, ...rest} = JSON.parse(l) as Record<string, unknown>
      assert.equal(typeof ttft, 'number')
      assert.equal(typeof rate, 'number')
      return rest
    })
    const results = untimed(collected.stdout)
    assert.deepEqual(results, untimed(reference.stdout))
    assert.deepEqual(results.map((r) => r.parallel), [2, 1, 4, 2, 1, 4])
    assert.deepEqual(results.map((r) => r.id), ['fib', undefined, 3, undefined, undefined, undefined], 'each line\'s id, where it has one')
    assert.equal(Object.keys(results[0])[0], 'id')
    const tokens = results.reduce((sum, r) => sum + (r.generated_tokens as number), 0)
    assert.equal(done.tokens, tokens, 'status counts the generated tokens')
    assert.ok(done.tokens_per_s !== null && done.tokens_per_s > 0, JSON.stringify(done))
  })

  test('--parallel auto: lines naming no P are left to the worker, which chooses from its own cost profile; a named P is kept', async () => {
    const file = jsonl('auto.jsonl', [{prompt: 'def add(a, b):'}, {prompt: 'import os\n', parallel: 2}, {prompt: 'class Stack:'}])
    const submitted = await cli(['batch', 'submit', file, '--queue', redis.url, '--parallel', 'auto', '--max-new-tokens', '3', '--temperature', '0'])
    assert.equal(submitted.code, 0, submitted.stderr)
    assert.match(submitted.stdout, /P=auto/)
    const fingerprint = /fingerprint (\w+)/.exec(submitted.stdout)![1]
    const queue = new Queue<LineJob>(modelQueueName(fingerprint), {connection: client, prefix: BULL_PREFIX})
    const jobs = await Promise.all([1, 2, 3].map(async (line) => (await queue.getJob(lineJobId('auto', line)))!.data))
    await queue.close()
    assert.deepEqual(jobs.map((j) => j.autoParallel), [true, undefined, true])
    const worker = startWorker(['--queue', redis.url, '--threads', '1'], env)
    await waitForStatus(redis.url, 'auto', (s) => s.done === 3)
    worker.child.kill('SIGTERM')
    assert.equal(await worker.exited, 0, worker.stderr())
    assert.match(worker.stderr(), /measuring the cost profile of the default model for --parallel auto/)
    const collected = await cli(['batch', 'collect', 'auto', '--queue', redis.url])
    assert.equal(collected.code, 0, collected.stderr)
    const parallels = collected.stdout.trim().split('\n').map((l) => (JSON.parse(l) as {parallel: number}).parallel)
    assert.equal(parallels[1], 2)
    for (const p of [parallels[0], parallels[2]]) assert.ok([1, 2, 4, 8].includes(p), `chosen P ${p}`)
    const profiles = fs.readdirSync(path.join(env.PARSCALE_CACHE, 'converted')).filter((dir) => fs.existsSync(path.join(env.PARSCALE_CACHE, 'converted', dir, 'cost-profile.json')))
    assert.equal(profiles.length, 1, 'the worker saved its profile beside the package')
  })

  test('--quant int8: the job records the scheme, a worker converts the model with it, and collect equals run --batch --quant int8', async () => {
    const file = prompts('quant.jsonl', 3)
    const gen = ['--max-new-tokens', '6', '--parallel', '1', '--quant', 'int8']
    const submitted = await cli(['batch', 'submit', file, '--queue', redis.url, ...gen])
    assert.equal(submitted.code, 0, submitted.stderr)
    const fingerprint = /fingerprint (\w+)/.exec(submitted.stdout)![1]
    const queue = new Queue<LineJob>(modelQueueName(fingerprint), {connection: client, prefix: BULL_PREFIX})
    const first = (await queue.getJob(lineJobId('quant', 1)))!
    await queue.close()
    assert.deepEqual(first.data.model.quant, {name: 'int8', bits: 8, blockSize: 32})

    // A worker with a cache of its own: it has to convert the default model with the job's scheme.
    const workerEnv = {...env, PARSCALE_CACHE: path.join(tmp, 'worker-cache')}
    const worker = startWorker(['--queue', redis.url], workerEnv)
    await waitForStatus(redis.url, 'quant', (s) => s.done === 3)
    worker.child.kill('SIGTERM')
    assert.equal(await worker.exited, 0, worker.stderr())
    assert.ok(fs.readdirSync(path.join(workerEnv.PARSCALE_CACHE, 'converted')).some((n) => n.includes('-int8-b32-')))
    const collected = await cli(['batch', 'collect', 'quant', '--queue', redis.url])
    assert.equal(collected.code, 0, collected.stderr)
    const reference = await cli(['run', '--batch', file, '--json', ...gen])
    assert.equal(reference.code, 0, reference.stderr)
    const ids = (text: string) => text.trim().split('\n').map((l) => (JSON.parse(l) as {token_ids: number[]}).token_ids)
    assert.deepEqual(ids(collected.stdout), ids(reference.stdout))
  })

  test('on a terminal the worker shows its progress; on a pipe, only its one-line messages', async () => {
    const file = prompts('shown.jsonl', 3)
    assert.equal((await cli(['batch', 'submit', file, '--queue', redis.url, ...GEN])).code, 0)
    // `script` gives the worker a pseudo-terminal; the pid file lets the test signal the worker itself.
    const pidFile = path.join(tmp, 'tty-worker.pid')
    const command = `stty cols 100 rows 30; echo $$ > '${pidFile}'; exec '${process.execPath}' bin/run.js worker --queue ${redis.url}`
    const {CI: _ci, ...parentEnv} = process.env
    const tty = spawn('script', ['-qfec', command, '/dev/null'], {cwd: REPO_ROOT, env: {...parentEnv, ...env, TERM: 'xterm', NODE_NO_WARNINGS: '1'}, stdio: ['pipe', 'pipe', 'pipe']})
    let screen = ''
    tty.stdout.on('data', (d: Buffer) => (screen += d.toString()))
    const exited = new Promise<number | null>((resolve) => tty.once('exit', (code) => resolve(code)))
    try {
      await waitFor('the progress line', () => /3 lines done · [\d.]+ tokens\/s · serving the default model/.test(screen.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '')))
      assert.match(screen, /serving the default model \(fingerprint \w+\)\r?\n/)
      process.kill(Number(fs.readFileSync(pidFile, 'utf8')), 'SIGTERM')
      assert.equal(await exited, 0, screen)
    } finally {
      // The worker runs in the terminal's own session: `script` going does not take it along.
      if (fs.existsSync(pidFile)) {
        try {
          process.kill(Number(fs.readFileSync(pidFile, 'utf8')), 'SIGKILL')
        } catch {
          // already gone
        }
      }
      tty.kill('SIGKILL')
    }
  })

  test('collect refuses while lines are unfinished; --partial keeps each line in its place', async () => {
    const file = prompts('early.jsonl', 3)
    assert.equal((await cli(['batch', 'submit', file, '--queue', redis.url, ...GEN])).code, 0)
    const out = path.join(tmp, 'early.out.jsonl')
    oneLine(await cli(['batch', 'collect', 'early', '--queue', redis.url, '--out', out]), 1, '3 of 3 lines are not finished', '--partial')
    assert.ok(!fs.existsSync(out))
    const partial = await cli(['batch', 'collect', 'early', '--queue', redis.url, '--out', out, '--partial'])
    assert.equal(partial.code, 0, partial.stderr)
    assert.deepEqual(fs.readFileSync(out, 'utf8').trim().split('\n').map((l) => JSON.parse(l)), [{error: 'not finished'}, {error: 'not finished'}, {error: 'not finished'}])
  })

  test('SIGTERM: a worker finishes the lines in hand, takes no more, and exits 0', async () => {
    const file = prompts('term.jsonl', 60)
    assert.equal((await cli(['batch', 'submit', file, '--queue', redis.url, '--max-new-tokens', '8', '--parallel', '1'])).code, 0)
    const worker = startWorker(['--queue', redis.url, '--batch-size', '4'], env)
    await waitForStatus(redis.url, 'term', (s) => s.active > 0)
    worker.child.kill('SIGTERM')
    assert.equal(await worker.exited, 0, worker.stderr())
    const after = await statusNow(redis.url, 'term')
    assert.equal(after.active, 0, 'nothing left in hand')
    assert.ok(after.done >= 4, 'the lines in hand were finished')
    assert.equal(after.done + after.waiting, 60)
    assert.ok(after.waiting > 0, 'it stopped taking lines')
    // The lines it finished are reported as it stops.
    assert.match(worker.stderr(), new RegExp(`^serving the default model \\(fingerprint ${after.fingerprint}\\)\\nbatch term: ${after.done} lines done · \\d+ tokens in [\\d.]+ s .* · the default model\\n$`))
  })

  test('a line that fails every attempt is marked failed with its reason; the others complete', async () => {
    const file = prompts('poison.jsonl', 5)
    const submitted = await cli(['batch', 'submit', file, '--queue', redis.url, '--attempts', '2', ...GEN])
    assert.equal(submitted.code, 0, submitted.stderr)
    // Line 3's job arrives broken (an empty prompt), as from another tool: it fails in the worker.
    const fingerprint = /fingerprint (\w+)/.exec(submitted.stdout)![1]
    const queue = new Queue<LineJob>(modelQueueName(fingerprint), {connection: client, prefix: BULL_PREFIX})
    const job = (await queue.getJob(lineJobId('poison', 3)))!
    await job.updateData({...job.data, request: {...job.data.request, promptIds: []}})
    await queue.close()

    const worker = startWorker(['--queue', redis.url], env)
    await waitForStatus(redis.url, 'poison', (s) => s.done + s.failed === 5)
    worker.child.kill('SIGTERM')
    assert.equal(await worker.exited, 0)
    const s = await statusNow(redis.url, 'poison')
    assert.deepEqual([s.done, s.failed], [4, 1])
    const out = path.join(tmp, 'poison.out.jsonl')
    const collected = await cli(['batch', 'collect', 'poison', '--queue', redis.url, '--out', out])
    assert.equal(collected.code, 1)
    const stderr = collected.stderr.trim().split('\n')
    assert.ok(stderr.includes(`${file}:3: failed after 2 attempts: the prompt is empty`), collected.stderr)
    assert.match(stderr.at(-1)!, /^parscale: 1 of 5 lines failed/)
    const lines = fs.readFileSync(out, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as {error?: string; token_ids?: number[]})
    assert.equal(lines.length, 5)
    assert.deepEqual(lines[2], {error: 'the prompt is empty'})
    const reference = (await cli(['run', '--batch', file, '--json', ...GEN])).stdout.trim().split('\n').map((l) => (JSON.parse(l) as {token_ids: number[]}).token_ids)
    assert.deepEqual(lines.map((l) => l.token_ids), reference.map((ids, i) => (i === 2 ? undefined : ids)), 'the other lines as run --batch generates them')
  })

  test('a worker whose copy of the model differs refuses it in one line; a worker with that package serves it', async () => {
    // The converted default model, copied to a folder of its own and submitted from there.
    const converted = path.join(env.PARSCALE_CACHE, 'converted')
    if (!fs.existsSync(converted)) assert.equal((await cli(['run', '--prompt', 'x', '-n', '1'])).code, 0)
    const original = path.join(converted, fs.readdirSync(converted)[0])
    const copy = path.join(tmp, 'model-copy')
    fs.cpSync(original, copy, {recursive: true})
    const file = prompts('moved.jsonl', 3)
    assert.equal((await cli(['batch', 'submit', file, copy, '--queue', redis.url, ...GEN])).code, 0)
    // Now the folder at that path holds another package (other generation settings).
    const config = path.join(copy, 'generation_config.json')
    fs.writeFileSync(config, JSON.stringify({...JSON.parse(fs.readFileSync(config, 'utf8')), repetition_penalty: 1.1}))

    const refusing = startWorker(['--queue', redis.url], env)
    await waitFor('the refusal', () => refusing.stderr().includes('\n'))
    await new Promise((r) => setTimeout(r, 2200)) // its next look at the models (every 2 s) changes nothing
    const lines = refusing.stderr().trim().split('\n')
    assert.equal(lines.length, 1, refusing.stderr())
    assert.match(lines[0], new RegExp(`^parscale: not serving ${copy} \\(fingerprint \\w+\\): here it is a different package .*; its lines stay queued for other workers$`))
    const s = await statusNow(redis.url, 'moved')
    assert.deepEqual([s.waiting, s.active, s.done], [3, 0, 0])

    const serving = startWorker(['--queue', redis.url, '--model', original], env)
    await waitForStatus(redis.url, 'moved', (st) => st.done === 3)
    for (const w of [refusing, serving]) w.child.kill('SIGTERM')
    assert.deepEqual(await Promise.all([refusing.exited, serving.exited]), [0, 0])
  })

  test('a worker waiting for jobs reconnects after Redis restarts', async () => {
    const worker = startWorker(['--queue', redis.url], env)
    const first = prompts('before.jsonl', 2)
    assert.equal((await cli(['batch', 'submit', first, '--queue', redis.url, ...GEN])).code, 0)
    await waitForStatus(redis.url, 'before', (s) => s.done === 2)
    client.disconnect()
    await redis.restart()
    client = new Redis(redis.url, {maxRetriesPerRequest: 1})
    await waitFor('the lost connection to be reported', () => worker.stderr().includes('lost Redis at'))
    const second = prompts('after.jsonl', 2)
    assert.equal((await cli(['batch', 'submit', second, '--queue', redis.url, ...GEN])).code, 0)
    await waitForStatus(redis.url, 'after', (s) => s.done === 2)
    assert.match(worker.stderr(), /reconnected to Redis at redis:\/\/127\.0\.0\.1:\d+/)
    worker.child.kill('SIGTERM')
    assert.equal(await worker.exited, 0, worker.stderr())
  })

  test('an unreachable Redis is one line naming the URL, exit 1', async () => {
    const url = `redis://127.0.0.1:${await freePort()}`
    const file = prompts('nowhere.jsonl', 1)
    for (const args of [['batch', 'submit', file], ['batch', 'status', 'nowhere'], ['batch', 'collect', 'nowhere'], ['worker']]) {
      oneLine(await cli([...args, '--queue', url]), 1, `cannot reach Redis at ${url}`)
    }
  })
})
