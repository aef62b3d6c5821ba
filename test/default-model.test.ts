// The embedded default model works offline at every P, and more streams predict held-out
// Python better than one.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, test} from 'node:test'

import {runCli, REPO_ROOT} from './helpers/cli.js'
import {makeTempDir} from './helpers/safetensors-writer.js'

const cache = makeTempDir()
after(() => fs.rmSync(cache, {recursive: true, force: true}))
const env = {PARSCALE_CACHE: cache, HF_HUB_OFFLINE: '1'}
const heldOut = path.join(REPO_ROOT, 'fixtures', 'default-model', 'heldout.py')

describe('embedded default model', () => {
  for (const parallel of [1, 2, 4, 8]) {
    test(`run with no MODEL at --parallel ${parallel} completes Python`, async () => {
      const result = await runCli(['run', '--prompt', 'def fibonacci(n):', '--max-new-tokens', '24', '--parallel', String(parallel), '--json'], {env})
      assert.equal(result.code, 0, result.stderr)
      const json = JSON.parse(result.stdout) as {text: string; parallel: number; generated_tokens: number; prompt_tokens: number}
      assert.equal(json.parallel, parallel)
      assert.ok(json.generated_tokens > 0)
      assert.ok(json.prompt_tokens > 0 && json.prompt_tokens < 17, 'raw prompt: the base model has no chat template')
      assert.match(json.text, /\S/)
    })
  }

  test('held-out loss at P = 8 is lower than at P = 1', async () => {
    const loss = async (parallel: number) => {
      const result = await runCli(['eval', '--text-file', heldOut, '--parallel', String(parallel), '--json'], {env})
      assert.equal(result.code, 0, result.stderr)
      return (JSON.parse(result.stdout) as {mean_nll: number}).mean_nll
    }
    const [p1, p8] = [await loss(1), await loss(8)]
    assert.ok(p8 < p1, `P=8 ${p8} should be below P=1 ${p1}`)
  })

  test('eval --per-token: one NLL per scored token, averaging to mean_nll, and causal across windows', async () => {
    const score = async (file: string) => {
      const result = await runCli(['eval', '--text-file', file, '--parallel', '2', '--context', '64', '--json', '--per-token'], {env})
      assert.equal(result.code, 0, result.stderr)
      return JSON.parse(result.stdout) as {predicted: number; mean_nll: number; windows: number; token_nll: number[]}
    }
    const full = await score(heldOut)
    assert.ok(full.windows > 3, 'the text must cross several windows')
    assert.equal(full.token_nll.length, full.predicted)
    assert.ok(full.token_nll.every((v) => Number.isFinite(v) && v >= 0))
    const mean = full.token_nll.reduce((a, b) => a + b, 0) / full.token_nll.length
    assert.ok(Math.abs(mean - full.mean_nll) < 1e-9, `${mean} vs ${full.mean_nll}`)
    // A prefix of the text is scored in the same windows: its tokens get the same NLLs (the
    // last ones may tokenize differently at the cut).
    const prefixFile = path.join(cache, 'heldout-prefix.py')
    fs.writeFileSync(prefixFile, fs.readFileSync(heldOut, 'utf8').slice(0, 700))
    const prefix = await score(prefixFile)
    assert.ok(prefix.predicted > 100 && prefix.predicted < full.predicted)
    const same = prefix.token_nll.slice(0, -2)
    same.forEach((v, i) => assert.ok(Math.abs(v - full.token_nll[i]) < 1e-4, `token ${i + 1}: ${v} vs ${full.token_nll[i]}`))
    const plain = await runCli(['eval', '--text-file', heldOut, '--per-token'], {env})
    assert.notEqual(plain.code, 0)
    assert.match(plain.stderr, /--json/)
  })

  test('eval --parallel 1,2,4,8: one row per P, equal to single-P runs, and a step with its interval between each', async () => {
    const result = await runCli(['eval', '--text-file', heldOut, '--parallel', '8,1,2,4', '--json'], {env})
    assert.equal(result.code, 0, result.stderr)
    type Step = {from: number; to: number; gain: number; ci95: [number, number]; verdict: string}
    const json = JSON.parse(result.stdout) as {results: Array<{parallel: number; mean_nll: number; token_nll?: number[]}>; steps: Step[]}
    assert.deepEqual(json.results.map((r) => r.parallel), [1, 2, 4, 8])
    assert.ok(json.results.every((r) => r.token_nll === undefined), 'token_nll only with --per-token')
    for (const parallel of [1, 8]) {
      const single = await runCli(['eval', '--text-file', heldOut, '--parallel', String(parallel), '--json'], {env})
      const meanNll = (JSON.parse(single.stdout) as {mean_nll: number}).mean_nll
      assert.equal(json.results.find((r) => r.parallel === parallel)!.mean_nll, meanNll)
    }
    assert.deepEqual(json.steps.map((s) => [s.from, s.to]), [[1, 2], [2, 4], [4, 8]])
    json.steps.forEach((s, i) => {
      assert.ok(Math.abs(s.gain - (json.results[i].mean_nll - json.results[i + 1].mean_nll)) < 1e-9)
      assert.ok(s.ci95[0] < s.gain && s.gain < s.ci95[1])
      assert.equal(s.verdict, s.ci95[0] > 0 ? 'in order' : s.ci95[1] < 0 ? 'reversed' : 'within noise')
    })
    assert.equal(json.steps[0].verdict, 'in order', 'P = 2 beats P = 1 on held-out code by far more than the noise')
    const table = await runCli(['eval', '--text-file', heldOut, '--parallel', '1,8'], {env})
    assert.equal(table.code, 0, table.stderr)
    assert.match(table.stdout, /P1 → P8/)
    const twice = await runCli(['eval', '--text-file', heldOut, '--parallel', '2,2'], {env})
    assert.notEqual(twice.code, 0)
    assert.match(twice.stderr, /--parallel lists a P twice/)
  })

  test('works when the variant folders lost their links to the shared files (as npm packs it)', async () => {
    const copy = path.join(cache, 'packed', 'default-model')
    fs.cpSync(path.join(REPO_ROOT, 'fixtures', 'default-model'), copy, {recursive: true, verbatimSymlinks: true})
    for (const variant of ['p1', 'p2', 'p4', 'p8']) {
      for (const name of fs.readdirSync(path.join(copy, variant))) {
        if (fs.lstatSync(path.join(copy, variant, name)).isSymbolicLink()) fs.rmSync(path.join(copy, variant, name))
      }
    }
    const result = await runCli(['run', copy, '--prompt', 'def fibonacci(n):', '--max-new-tokens', '8', '--parallel', '2', '--json'], {env})
    assert.equal(result.code, 0, result.stderr)
    const fromRepo = await runCli(['run', '--prompt', 'def fibonacci(n):', '--max-new-tokens', '8', '--parallel', '2', '--json'], {env})
    const ids = (out: string) => (JSON.parse(out) as {token_ids: number[]}).token_ids
    assert.deepEqual(ids(result.stdout), ids(fromRepo.stdout))
  })

  test('a mixed-P batch gives exactly the greedy ids of single-P runs, for every P', async () => {
    const prompts = ['def fibonacci(n):', 'import os\n', 'class Parser:', 'for i in range(']
    const lines = [1, 2, 4, 8].flatMap((parallel) => prompts.map((prompt) => ({prompt, parallel})))
    const file = path.join(cache, 'mixed.jsonl')
    fs.writeFileSync(file, lines.map((l) => JSON.stringify(l)).join('\n') + '\n')
    const batch = await runCli(['run', '--batch', file, '--batch-size', '3', '--max-new-tokens', '12', '--json'], {env})
    assert.equal(batch.code, 0, batch.stderr)
    const results = batch.stdout.trim().split('\n').map((l) => JSON.parse(l) as {token_ids: number[]; parallel: number})
    assert.deepEqual(results.map((r) => r.parallel), lines.map((l) => l.parallel), 'in input order, each at its own P')
    for (const [i, line] of lines.entries()) {
      const single = await runCli(['run', '--prompt', line.prompt, '--parallel', String(line.parallel), '--max-new-tokens', '12', '--json'], {env})
      assert.equal(single.code, 0, single.stderr)
      assert.deepEqual(results[i].token_ids, (JSON.parse(single.stdout) as {token_ids: number[]}).token_ids, `line ${i + 1} at P=${line.parallel}`)
    }
    const bad = path.join(cache, 'bad-parallel.jsonl')
    fs.writeFileSync(bad, '{"prompt": "a"}\n{"prompt": "b", "parallel": 3}\n')
    const refused = await runCli(['run', '--batch', bad], {env})
    assert.equal(refused.code, 1)
    assert.equal(refused.stdout, '')
    assert.match(refused.stderr, /^parscale: .*bad-parallel\.jsonl:2: "parallel": 3 .*available: 1, 2, 4, 8\n$/)
  })

  test('chat switches P mid-conversation without reloading and keeps answering', async () => {
    const result = await runCli(['run', '--chat', '--json', '--max-new-tokens', '6'], {env, input: 'def add(a, b):\n/parallel 2\n    return\n/parallel 8\nclass A:\n'})
    assert.equal(result.code, 0, result.stderr)
    const turns = result.stdout.trim().split('\n').map((l) => JSON.parse(l) as {parallel: number; generated_tokens: number; reused_tokens: number})
    assert.deepEqual(turns.map((t) => t.parallel), [8, 2, 8])
    assert.ok(turns.every((t) => t.generated_tokens > 0))
    assert.ok(turns[1].reused_tokens > 0 && turns[2].reused_tokens > 0, 'the conversation was re-encoded at the new P, and reused')
    assert.match(result.stderr, /P=2 \(switched in \d+ ms; conversation re-encoded in \d+ ms\)/)
  })

  test('a P the model lacks lists the ones it has', async () => {
    const result = await runCli(['run', '--prompt', 'x', '--parallel', '3'], {env})
    assert.equal(result.code, 1)
    assert.match(result.stderr, /^parscale: .*--parallel 3.*1, 2, 4, 8/)
  })
})
