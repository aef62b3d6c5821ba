// The graph's stream_weights: equal to the aggregation weights computed directly from the final
// hidden states (an independent JS reference of the model, itself checked against the PyTorch
// golden logits); every token's weights sum to 1 and are at least smoothing/P; run --streams
// and eval --streams show them.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, test} from 'node:test'

import {Checkpoint} from '../src/core/checkpoint/checkpoint.js'
import {convertCheckpoints} from '../src/core/package/convert.js'
import {ParScaleModel} from '../src/core/engine/model.js'
import {summarizeStreamWeights, weightEntropy} from '../src/core/run/stream-stats.js'
import {colorFor, renderStreamWeights, renderStreamSummary, TOKEN_ROW_LEGEND} from '../src/ui/stream-view.js'
import {REPO_ROOT, runCli} from './helpers/cli.js'
import {referenceForward} from './helpers/reference-parscale.js'
import {goldenDir, makeTempDir} from './helpers/safetensors-writer.js'

const work = makeTempDir()
after(() => fs.rmSync(work, {recursive: true, force: true}))

/** Per position, P weights: each sums to 1 (1e-5) and none is below smoothing/P. */
function assertWellFormedWeights(perToken: ArrayLike<number>[], parallel: number, smoothing: number): void {
  assert.ok(perToken.length > 0)
  for (const [t, weights] of perToken.entries()) {
    assert.equal(weights.length, parallel, `token ${t}`)
    let sum = 0
    for (let p = 0; p < parallel; p++) {
      sum += weights[p]!
      // float32 arithmetic: w·(1 − s) + s/P rounds to no less than s/P as float32 computes it
      assert.ok(weights[p]! >= Math.fround(Math.fround(smoothing) / parallel), `token ${t} stream ${p}: ${weights[p]} < ${smoothing}/${parallel}`)
    }
    assert.ok(Math.abs(sum - 1) <= 1e-5, `token ${t}: weights sum to ${sum}`)
  }
}

const rows = (flat: Float32Array, parallel: number) => Array.from({length: flat.length / parallel}, (_, i) => flat.subarray(i * parallel, (i + 1) * parallel))

interface Golden {
  logits: {prompt_ids: number[]; values: number[][]}
}

for (const name of ['tiny-p4', 'tiny-p2-tied', 'tiny-p1']) {
  describe(`stream weights on golden ${name}`, () => {
    const golden = JSON.parse(fs.readFileSync(path.join(goldenDir(name), 'golden.json'), 'utf8')) as Golden
    const ids = golden.logits.prompt_ids
    const config = Checkpoint.open(goldenDir(name)).config
    const parallel = config.modelType === 'qwen2_parscale' ? config.parallel : 1
    const reference = referenceForward(goldenDir(name), ids)

    test('the JS reference computes the golden (PyTorch) logits', () => {
      let max = 0
      golden.logits.values.forEach((row, t) => row.forEach((v, j) => (max = Math.max(max, Math.abs(v - reference.logits[t]![j]!)))))
      assert.ok(max < 1e-3, `reference logits differ by ${max}`)
    })

    for (const form of ['cpu', 'webgpu'] as const) {
      // The WebGPU form (device-resident cache) runs on the CPU provider here, as in webgpu.test.ts.
      test(`${form} form: the graph's stream_weights equal the weights computed from the hidden states`, async () => {
        const out = path.join(work, name)
        if (!fs.existsSync(out)) convertCheckpoints({sources: [goldenDir(name)], outDir: out, dtype: 'fp32'})
        const model = await ParScaleModel.open(out, {form})
        const cache = model.newCache(parallel)
        try {
          cache.reserve(1, ids.length)
          cache.reset(0)
          // Half the prompt at once (all positions kept), then one token at a time.
          const half = Math.floor(ids.length / 2)
          const whole = await model.forward(cache, 0, [ids.slice(0, half)], 0)
          const weights = rows(whole.streamWeights!, parallel)
          assert.equal(weights.length, half)
          for (let t = half; t < ids.length; t++) weights.push(rows((await model.forward(cache, 0, [[ids[t]!]], 1)).streamWeights!, parallel)[0]!)
          let max = 0
          weights.forEach((w, t) => w.forEach((v, p) => (max = Math.max(max, Math.abs(v - reference.streamWeights[t]![p]!)))))
          assert.ok(max < 1e-5, `graph vs reference: ${max}`)
          assertWellFormedWeights(weights, parallel, config.attnSmooth)
          if (parallel > 1) {
            // The weights do move from token to token (the check above is not of a constant).
            const spread = Math.max(...weights.map((w) => w[0]!)) - Math.min(...weights.map((w) => w[0]!))
            assert.ok(spread > 1e-3, `stream 0 weight spread ${spread}`)
          } else {
            assert.ok(weights.every((w) => w[0] === 1), 'P = 1: the one stream weighs 1')
          }
        } finally {
          cache.dispose()
          await model.release()
        }
      })
    }
  })
}

describe('stream weight statistics and views', () => {
  const even = [[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]
  const picky = [[0.97, 0.01, 0.01, 0.01], [0.01, 0.01, 0.97, 0.01], [0.01, 0.01, 0.97, 0.01], [0.7, 0.1, 0.1, 0.1]]

  test('mean weight, top share and entropy against ln P', () => {
    const s = summarizeStreamWeights(even, 4)
    assert.ok(Math.abs(s.mean_entropy - Math.log(4)) < 1e-12)
    assert.equal(s.max_entropy, Math.log(4))
    const p = summarizeStreamWeights(picky, 4)
    assert.deepEqual(p.top_share, [0.5, 0, 0.5, 0])
    assert.ok(Math.abs(p.mean_weight.reduce((a, b) => a + b, 0) - 1) < 1e-12)
    assert.ok(Math.abs(p.mean_weight[2]! - (0.01 + 0.97 + 0.97 + 0.1) / 4) < 1e-12)
    assert.ok(Math.abs(p.mean_entropy - picky.reduce((sum, w) => sum + weightEntropy(w), 0) / 4) < 1e-12)
    assert.ok(p.mean_entropy < 0.5 * p.max_entropy)
  })

  test('run view at P = 8 over 150 tokens fits 80 columns; colour only when asked', () => {
    const perToken = Array.from({length: 150}, (_, t) => {
      const raw = Array.from({length: 8}, (_, p) => Math.exp(Math.sin(t * 0.3 + p)))
      const sum = raw.reduce((a, b) => a + b, 0)
      return raw.map((v) => v / sum)
    })
    const texts = perToken.map((_, t) => (t % 7 === 0 ? '\n' : t % 3 === 0 ? ' x' : 'é'))
    const plain = renderStreamWeights(perToken, {color: false, tokenTexts: texts})
    assert.doesNotMatch(plain, /\x1b/)
    for (const line of plain.split('\n')) assert.ok([...line].length <= 80, `${[...line].length} columns: ${line}`)
    // Three blocks (60 + 60 + 30 tokens), each with 8 stream rows.
    assert.equal(plain.split('\n').filter((l) => /^ s\d ▕/.test(l)).length, 3 * 8)
    assert.match(plain, /^ s1 ▕[▁▂▃▄▅▆▇█]{60}▏ +0\.\d{3} +\d+%$/m)
    assert.match(plain, /↵/)
    const colored = renderStreamWeights(perToken, {color: true})
    assert.match(colored, /\x1b\[38;5;\d+m/)
    for (const line of colored.split('\n')) assert.ok([...line.replace(/\x1b\[[\d;]*m/g, '')].length <= 80)
    assert.equal(colorFor({isTTY: true}, {}), true)
    assert.equal(colorFor({isTTY: true}, {NO_COLOR: '1'}), false)
    assert.equal(colorFor({isTTY: false}, {}), false)
    assert.match(renderStreamWeights([[1], [1]], {color: false}), /P=1, one stream/)
  })

  test('position labels are never cut (token 61 alone in its block, 51 at a block\'s last column); the token row has a legend', () => {
    const even = (n: number) => Array.from({length: n}, () => [0.5, 0.5])
    const labels = (view: string) => view.split('\n').filter((l) => /^ {5}\d/.test(l)).map((l) => l.trim().split(/\s+/).filter((w) => /^\d+$/.test(w)))
    assert.deepEqual(labels(renderStreamWeights(even(61), {color: false})), [['1', '11', '21', '31', '41', '51'], ['61']])
    assert.deepEqual(labels(renderStreamWeights(even(51), {color: false})), [['1', '11', '21', '31', '41', '51']])
    assert.deepEqual(labels(renderStreamWeights(even(121), {color: false}))[2], ['121'])
    const withTexts = renderStreamWeights(even(3), {color: false, tokenTexts: [' a', '\n', '\tb']})
    assert.match(withTexts, /^ {5}·↵→$/m)
    assert.ok(withTexts.includes(TOKEN_ROW_LEGEND))
    assert.match(TOKEN_ROW_LEGEND, /· = space ↵ = newline → = tab/)
    assert.ok([...TOKEN_ROW_LEGEND].length <= 80)
    assert.ok(!renderStreamWeights(even(3), {color: false}).includes(TOKEN_ROW_LEGEND), 'no legend without the row')
  })

  test('eval summary: one row per stream and the entropy line', () => {
    const text = renderStreamSummary(summarizeStreamWeights(picky, 4))
    assert.equal(text.split('\n').filter((l) => /^s\d /.test(l)).length, 4)
    assert.match(text, /mean entropy [\d.]+ nats of ln 4 = 1\.386/)
  })
})

describe('run --streams and eval --streams on the default model', () => {
  const env = {PARSCALE_CACHE: path.join(work, 'cache'), HF_HUB_OFFLINE: '1'}
  const smoothing = 0.01 // parscale_attn_smooth of every P of the default model

  test('run --streams --json: one array of P weights per generated token', async () => {
    const r = await runCli(['run', '--prompt', 'def fibonacci(n):', '--max-new-tokens', '12', '--parallel', '4', '--streams', '--json'], {env})
    assert.equal(r.code, 0, r.stderr)
    const json = JSON.parse(r.stdout) as {generated_tokens: number; stream_weights: number[][]}
    assert.equal(json.stream_weights.length, json.generated_tokens)
    assertWellFormedWeights(json.stream_weights, 4, smoothing)
    const plain = await runCli(['run', '--prompt', 'def fibonacci(n):', '--max-new-tokens', '12', '--parallel', '4', '--json'], {env})
    assert.equal((JSON.parse(plain.stdout) as Record<string, unknown>).stream_weights, undefined, 'only with --streams')
  })

  test('run --streams at P = 8 prints the view after the answer, in 80 columns, without colour when piped', async () => {
    const r = await runCli(['run', '--prompt', 'import os', '--max-new-tokens', '70', '--parallel', '8', '--streams', '--quiet'], {env})
    assert.equal(r.code, 0, r.stderr)
    assert.doesNotMatch(r.stdout, /\x1b/)
    const view = r.stdout.slice(r.stdout.indexOf('P=8 · '))
    assert.match(view, /^P=8 · \d+ tokens · bar height = weight/)
    const streamRows = view.split('\n').filter((l) => /^ s\d ▕/.test(l)).length
    assert.ok(streamRows >= 8 && streamRows % 8 === 0, `${streamRows} stream rows`)
    for (const line of view.split('\n')) assert.ok([...line].length <= 80, line)
    assert.match(view, /mean entropy [\d.]+ nats of ln 8/)
    assert.ok(view.includes(TOKEN_ROW_LEGEND))
    // Past 60 tokens the second block's first label is 61, whole.
    if (Number(/· (\d+) tokens/.exec(view)![1]) > 60) assert.match(view, /^ {5}61/m)
  })

  test('eval --streams: per-stream means and top shares sum to 1, entropy at most ln P', async () => {
    const heldOut = path.join(REPO_ROOT, 'fixtures', 'default-model', 'heldout.py')
    const r = await runCli(['eval', '--text-file', heldOut, '--parallel', '2', '--streams', '--json'], {env})
    assert.equal(r.code, 0, r.stderr)
    const json = JSON.parse(r.stdout) as {predicted: number; streams: {tokens: number; mean_weight: number[]; top_share: number[]; mean_entropy: number; max_entropy: number; min_weight: number}}
    const s = json.streams
    assert.equal(s.tokens, json.predicted)
    assert.equal(s.mean_weight.length, 2)
    assert.ok(Math.abs(s.mean_weight[0]! + s.mean_weight[1]! - 1) < 1e-6)
    assert.ok(Math.abs(s.top_share[0]! + s.top_share[1]! - 1) < 1e-12)
    assert.ok(s.mean_entropy > 0 && s.mean_entropy <= s.max_entropy && Math.abs(s.max_entropy - Math.log(2)) < 1e-12)
    assert.ok(s.min_weight >= smoothing / 2 - 1e-7)
    const table = await runCli(['eval', '--text-file', heldOut, '--parallel', '2', '--streams'], {env})
    assert.equal(table.code, 0, table.stderr)
    assert.match(table.stdout, /stream weights over \d+ scored tokens, P=2/)
    assert.match(table.stdout, /^s2 +0\.\d{4} +\d+% +[\d.]+×$/m)
  })
})
