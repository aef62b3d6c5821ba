// The converted graph computes the same model as the reference PyTorch implementation.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, test} from 'node:test'

import {Checkpoint} from '../src/core/checkpoint/checkpoint.js'
import {convertCheckpoints} from '../src/core/package/convert.js'
import {ParScaleModel} from '../src/core/engine/model.js'
import {runCli} from './helpers/cli.js'
import {goldenDir, makeTempDir} from './helpers/safetensors-writer.js'

interface Golden {
  logits: {prompt_ids: number[]; values: number[][]}
  eval: {text: string; tokens: number; predicted: number; mean_nll: number; perplexity: number}
  greedy: {prompt: string; prompt_ids: number[]; new_ids: number[]}[]
}

const CASES = ['tiny-p1', 'tiny-p4', 'tiny-p2-tied']
const work = makeTempDir()
after(() => fs.rmSync(work, {recursive: true, force: true}))

function readGolden(name: string): Golden {
  return JSON.parse(fs.readFileSync(path.join(goldenDir(name), 'golden.json'), 'utf8')) as Golden
}

/** One sequence through a fresh cache: all of `ids` in one call. */
async function forwardWhole(model: ParScaleModel, ids: number[], keep: number) {
  const parallel = Math.max(...model.parallelValues)
  const cache = model.newCache(parallel)
  cache.reserve(1, ids.length)
  cache.reset(0)
  return {cache, ...(await model.forward(cache, 0, [ids], keep))}
}

function maxLogitDiff(golden: Golden, logits: Float32Array, vocab: number): number {
  let max = 0
  golden.logits.values.forEach((row, i) => row.forEach((v, j) => (max = Math.max(max, Math.abs(v - logits[i * vocab + j])))))
  return max
}

for (const name of CASES) {
  describe(`golden ${name}`, () => {
    const golden = readGolden(name)

    // The brief's bar for exact conversion: 2e-5 (measured here 0.7e-5 to 1.1e-5).
    test('fp32 conversion: full-sequence logits within 2e-5', async () => {
      const out = path.join(work, `${name}-fp32`)
      convertCheckpoints({sources: [goldenDir(name)], outDir: out, dtype: 'fp32'})
      const model = await ParScaleModel.open(out)
      const ids = golden.logits.prompt_ids
      const {logits, dims} = await forwardWhole(model, ids, 0)
      assert.deepEqual(dims, [1, ids.length, golden.logits.values[0].length])
      const max = maxLogitDiff(golden, logits, dims[2])
      assert.ok(max < 2e-5, `max diff ${max}`)
      await model.release()
    })

    test('incremental decoding and chunked prefill over the KV cache equal the full pass', async () => {
      const model = await ParScaleModel.open(path.join(work, `${name}-fp32`))
      const parallel = Math.max(...model.parallelValues)
      const ids = golden.logits.prompt_ids
      const cache = model.newCache(parallel)
      cache.reserve(1, ids.length)
      cache.reset(0)
      // three chunks of the prompt, then one token at a time
      const first = await model.forward(cache, 0, [ids.slice(0, 3)], 1)
      assert.equal(first.dims[1], 1, 'num_logits_to_keep = 1 returns one position')
      const second = await model.forward(cache, 0, [ids.slice(3, 7)], 0)
      assert.equal(second.dims[1], 4)
      let max = 0
      const vocab = second.dims[2]
      for (let t = 3; t < 7; t++) golden.logits.values[t].forEach((v, j) => (max = Math.max(max, Math.abs(v - second.logits[(t - 3) * vocab + j]))))
      for (let t = 7; t < ids.length; t++) {
        const step = await model.forward(cache, 0, [[ids[t]]], 1)
        golden.logits.values[t].forEach((v, j) => (max = Math.max(max, Math.abs(v - step.logits[j]))))
      }
      assert.equal(cache.tokens(0), ids.length)
      assert.ok(max < 5e-5, `max diff ${max}`)
      await model.release()
    })

    test('a row decoding next to another is unchanged, whatever their lengths', async () => {
      const model = await ParScaleModel.open(path.join(work, `${name}-fp32`))
      const parallel = Math.max(...model.parallelValues)
      const short = golden.logits.prompt_ids.slice(0, 5)
      const long = golden.logits.prompt_ids.slice(0, -1)
      const last = golden.logits.prompt_ids.at(-1)!
      const cache = model.newCache(parallel)
      cache.reserve(2, long.length + 1)
      for (const [slot, ids] of [short, long].entries()) {
        cache.reset(slot)
        await model.forward(cache, slot, [ids], 1)
      }
      const {logits, dims} = await model.forward(cache, 0, [[7], [last]], 1)
      const vocab = dims[2]
      const alone = await forwardWhole(model, [...short, 7], 1)
      let max = 0
      for (let j = 0; j < vocab; j++) max = Math.max(max, Math.abs(alone.logits[j] - logits[j]))
      assert.ok(max < 1e-4, `batched row differs by ${max}`)
      golden.logits.values[long.length].forEach((v, j) => assert.ok(Math.abs(v - logits[vocab + j]) < 2e-3))
      // moving a slot (compaction) keeps its sequence
      cache.move(1, 0)
      const moved = await model.forward(cache, 0, [[5]], 1)
      const reference = await forwardWhole(model, [...long, last, 5], 1)
      max = 0
      for (let j = 0; j < vocab; j++) max = Math.max(max, Math.abs(reference.logits[j] - moved.logits[j]))
      assert.ok(max < 1e-4, `moved slot differs by ${max}`)
      await model.release()
    })

    test('parscale eval on golden.eval.text: mean_nll within 1e-3', async () => {
      const textFile = path.join(work, `${name}.txt`)
      fs.writeFileSync(textFile, golden.eval.text)
      const result = await runCli(['eval', goldenDir(name), '--text-file', textFile, '--json'], {env: {PARSCALE_CACHE: path.join(work, 'cache')}})
      assert.equal(result.code, 0, result.stderr)
      const json = JSON.parse(result.stdout) as {tokens: number; predicted: number; mean_nll: number; perplexity: number}
      assert.equal(json.tokens, golden.eval.tokens)
      assert.equal(json.predicted, golden.eval.predicted)
      assert.ok(Math.abs(json.mean_nll - golden.eval.mean_nll) < 1e-3, `${json.mean_nll} vs ${golden.eval.mean_nll}`)
      assert.ok(Math.abs(json.perplexity - golden.eval.perplexity) / golden.eval.perplexity < 1e-3)
    })

    test('fp16 weights: matrices stored in half the bytes, logits still close', async () => {
      const out = path.join(work, `${name}-fp16`)
      const manifest = convertCheckpoints({sources: [goldenDir(name)], outDir: out, dtype: 'fp16'})
      const fp32 = JSON.parse(fs.readFileSync(path.join(work, `${name}-fp32`, 'parscale.json'), 'utf8')) as {backbone: {bytes: number}}
      // Every matrix element of the backbone (the tied head's copy included) saves 2 bytes.
      const checkpoint = Checkpoint.open(goldenDir(name))
      const elements = (n: string) => checkpoint.get(n).shape.reduce((a, b) => a * b, 1)
      const matrices = [...checkpoint.tensors.keys()].filter((n) => checkpoint.get(n).shape.length === 2 && !n.includes('aggregate_layer'))
      const headCopy = checkpoint.config.tieWordEmbeddings ? elements('model.embed_tokens.weight') : 0
      const saved = fp32.backbone.bytes - manifest.backbone.bytes
      assert.ok(saved >= 2 * (matrices.reduce((sum, n) => sum + elements(n), 0) + headCopy) - 4096 * matrices.length, `saved ${saved} bytes`)
      const model = await ParScaleModel.open(out)
      const {logits, dims} = await forwardWhole(model, golden.logits.prompt_ids, 0)
      assert.ok(maxLogitDiff(golden, logits, dims[2]) < 5e-2)
      await model.release()
    })
  })
}
