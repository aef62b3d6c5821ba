// The converted graph computes the same model as the reference PyTorch implementation.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, test} from 'node:test'

import {Checkpoint} from '../src/core/checkpoint/checkpoint.js'
import {convertCheckpoints} from '../src/core/package/convert.js'
import {DecoderSession} from '../src/core/run/session.js'
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

function maxLogitDiff(golden: Golden, logits: Float32Array, vocab: number): number {
  let max = 0
  golden.logits.values.forEach((row, i) => row.forEach((v, j) => (max = Math.max(max, Math.abs(v - logits[i * vocab + j])))))
  return max
}

for (const name of CASES) {
  describe(`golden ${name}`, () => {
    const golden = readGolden(name)

    test('fp32 conversion: full-sequence logits within 2e-3', async () => {
      const out = path.join(work, `${name}-fp32`)
      convertCheckpoints({sources: [goldenDir(name)], outDir: out, dtype: 'fp32'})
      const session = await DecoderSession.open(out)
      const ids = golden.logits.prompt_ids
      const {logits, dims} = await session.forward([ids], [ids.map(() => 1)], session.emptyCache(1), 0)
      assert.deepEqual(dims, [1, ids.length, golden.logits.values[0].length])
      assert.ok(maxLogitDiff(golden, logits, dims[2]) < 2e-3)
      await session.release()
    })

    test('incremental decoding with the KV cache equals the full pass', async () => {
      const out = path.join(work, `${name}-fp32`)
      const session = await DecoderSession.open(out)
      const ids = golden.logits.prompt_ids
      const split = 7
      const first = await session.forward([ids.slice(0, split)], [Array(split).fill(1)], session.emptyCache(1), 1)
      let cache = first.present
      const vocab = first.dims[2]
      let max = 0
      for (let t = split; t < ids.length; t++) {
        const step = await session.forward([[ids[t]]], [Array(t + 1).fill(1)], cache, 1)
        cache = step.present
        golden.logits.values[t].forEach((v, j) => (max = Math.max(max, Math.abs(v - step.logits[j]))))
      }
      assert.equal(cache.pastLength, ids.length)
      assert.equal(first.dims[1], 1, 'num_logits_to_keep = 1 returns one position')
      assert.ok(max < 2e-3, `max diff ${max}`)
      void vocab
      await session.release()
    })

    test('left padding does not change a row (batched with a longer one)', async () => {
      const session = await DecoderSession.open(path.join(work, `${name}-fp32`))
      const short = golden.logits.prompt_ids.slice(0, 5)
      const long = golden.logits.prompt_ids
      const pad = long.length - short.length
      const {logits, dims} = await session.forward([[...Array(pad).fill(0), ...short], long], [[...Array(pad).fill(0), ...short.map(() => 1)], long.map(() => 1)], session.emptyCache(2), 1)
      const vocab = dims[2]
      const alone = await session.forward([short], [short.map(() => 1)], session.emptyCache(1), 1)
      let max = 0
      for (let j = 0; j < vocab; j++) max = Math.max(max, Math.abs(alone.logits[j] - logits[j]))
      assert.ok(max < 1e-4, `padded row differs by ${max}`)
      golden.logits.values[long.length - 1].forEach((v, j) => assert.ok(Math.abs(v - logits[vocab + j]) < 2e-3))
      await session.release()
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
      const session = await DecoderSession.open(out)
      const ids = golden.logits.prompt_ids
      const {logits, dims} = await session.forward([ids], [ids.map(() => 1)], session.emptyCache(1), 0)
      assert.ok(maxLogitDiff(golden, logits, dims[2]) < 5e-2)
      await session.release()
    })
  })
}
