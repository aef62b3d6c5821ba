// The hand-written WebGPU decode step (src/core/wgsl/, issue 23) against the golden checkpoints'
// reference outputs: every prompt position's logits, one token a step, and the greedy
// continuations token for token, at P = 1, 2 (tied head, 6/6 heads) and 4 (bf16, 48 prefix
// tokens). Skips itself where Dawn's webgpu package is not installed or finds no adapter; runs
// on lavapipe with PARSCALE_DAWN=<a node_modules with webgpu@0.6.2>. The synthetic tensors it
// is timed on are checked here against the files a synthetic checkpoint holds (no GPU needed).
import assert from 'node:assert/strict'
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import {after, before, describe, test} from 'node:test'

import {Checkpoint, expectedTensorShapes} from '../src/core/checkpoint/checkpoint.js'
import {checkWebGpu} from '../src/core/engine/device.js'
import {ParScaleModel} from '../src/core/engine/model.js'
import {resolveModel} from '../src/core/package/resolve.js'
import {decodeToFloat32, encodeFloat16, readTensorFloat32} from '../src/core/checkpoint/dtype.js'
import {syntheticShape, syntheticTensors, writeSyntheticCheckpoint} from '../src/core/checkpoint/synthetic.js'
import {UserError} from '../src/core/errors.js'
import {dequantizeRows, quantizeRows} from '../src/core/quant/blockwise.js'
import {blockSizeFor} from '../src/core/quant/scheme.js'
import {checkpointSource} from '../src/core/wgsl/checkpoint-source.js'
import {packageSource} from '../src/core/wgsl/package-source.js'
import {openWgslDevice} from '../src/core/wgsl/dawn.js'
import {WgslDecoder, WgslModel, type WgslWeights} from '../src/core/wgsl/decoder.js'
import {inputStaging, matvecColumns, matvecWorkgroupBytes, mlpTileRows, stagedChunk, residualTileRows, subgroupReduction, TUNING_KNOBS} from '../src/core/wgsl/kernels.js'
import {REPO_ROOT} from './helpers/cli.js'

interface Golden {
  greedy: {prompt_ids: number[]; new_ids: number[]}[]
  logits: {prompt_ids: number[]; values: number[][]}
}

const goldenRoot = path.join('fixtures', 'golden')
const cases = ['tiny-p1', 'tiny-p2-tied', 'tiny-p4']
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-wgsl-'))
after(() => fs.rmSync(work, {recursive: true, force: true}))

let unavailable: string | undefined
// the kernels as they run (no bounds clamps, no workgroup zeroing) but with Dawn's validation on, so a
// binding or a command that WebGPU would refuse fails here instead of going unnoticed (dawn.ts skips it)
process.env.PARSCALE_DAWN_FLAGS ??= 'enable-dawn-features=disable_robustness,disable_workgroup_init disable-dawn-features=timestamp_quantization'
before(async () => {
  process.env.PARSCALE_CACHE ??= path.join(work, 'cache')
  const device = await openWgslDevice()
  if (typeof device === 'string') unavailable = device
})

const argmax = (xs: Float32Array) => xs.reduce((best, x, i) => (x > xs[best]! ? i : best), 0)

/**
 * A synthetic model's logits with `knobs` (PARSCALE_WGSL_* variables; undefined: unset) set while it
 * opens and runs: the prompt in calls of `promptTokens`, then a step for each id of `steps`.
 */
async function syntheticLogits(shape: ReturnType<typeof syntheticShape>, options: {parallel: number; seed: number; weights?: WgslWeights; knobs?: Record<string, string | undefined>; prompt?: number[]; steps?: number[]}): Promise<Float32Array[]> {
  const {prompt = [11, 48, 85], steps = [122, 159], knobs = {}} = options
  const saved = Object.fromEntries(Object.keys(knobs).map((key) => [key, process.env[key]]))
  const set = (values: Record<string, string | undefined>) => {
    for (const [key, value] of Object.entries(values)) if (value === undefined) delete process.env[key]
    else process.env[key] = value
  }
  set(knobs)
  try {
    const model = await WgslModel.open(syntheticTensors(shape, {parallel: options.parallel, prefixTokens: 5, seed: options.seed}), {weights: options.weights})
    const sequence = model.sequence()
    try {
      const out: Float32Array[] = []
      for (let at = 0; at < prompt.length; at += model.promptTokens) out.push((await model.run(sequence, prompt.slice(at, at + model.promptTokens), true))!.logits)
      for (const id of steps) out.push((await model.run(sequence, [id], true))!.logits)
      return out
    } finally {
      sequence.release()
      model.release()
    }
  } finally {
    set(saved)
  }
}

/** The largest |difference| between two runs' logits. */
function worstLogitDiff(a: Float32Array[], b: Float32Array[]): number {
  let worst = 0
  for (const [i, x] of a.entries()) for (let v = 0; v < x.length; v++) worst = Math.max(worst, Math.abs(x[v]! - b[i]![v]!))
  return worst
}

describe('hand-written WebGPU decode step: the golden checkpoints', () => {
  for (const name of cases) {
    test(`${name}: logits at every prompt position within 1e-4 (a token a step), greedy continuations after prompts in calls of several tokens equal`, async (t) => {
      if (unavailable) return t.skip(unavailable)
      const dir = path.join(goldenRoot, name)
      const golden = JSON.parse(fs.readFileSync(path.join(dir, 'golden.json'), 'utf8')) as Golden
      const longest = Math.max(golden.logits.prompt_ids.length, ...golden.greedy.map((g) => g.prompt_ids.length + g.new_ids.length))
      const decoder = await WgslDecoder.open(checkpointSource(dir), {positions: longest})
      try {
        const layers = decoder.config.numLayers
        assert.equal(decoder.dispatchCount, 5 * layers + (decoder.config.parallel > 1 ? 5 : 3)) // embedding, final norm, (aggregation, mixing,) head
        let worst = 0
        for (const [i, id] of golden.logits.prompt_ids.entries()) {
          const {logits} = (await decoder.step(id))!
          const want = golden.logits.values[i]!
          assert.equal(logits.length, decoder.config.vocabSize)
          for (let v = 0; v < want.length; v++) worst = Math.max(worst, Math.abs(logits[v]! - want[v]!))
        }
        assert.ok(worst < 1e-4, `worst |logit diff| ${worst}`)
        for (const g of golden.greedy) {
          decoder.reset()
          // the prompt in calls of several tokens (decoder.promptTokens rows of P streams)
          let logits = (await decoder.prompt(g.prompt_ids))!.logits
          const made: number[] = []
          while (made.length < g.new_ids.length) {
            const next = argmax(logits)
            made.push(next)
            if (made.length < g.new_ids.length) logits = (await decoder.step(next))!.logits
          }
          assert.deepEqual(made, g.new_ids)
        }
      } finally {
        decoder.release()
      }
    })
  }

  test('two sequences of one model, taking turns, one growing its cache mid-prompt, each equal to the reference', async (t) => {
    if (unavailable) return t.skip(unavailable)
    const dir = path.join(goldenRoot, 'tiny-p4')
    const golden = JSON.parse(fs.readFileSync(path.join(dir, 'golden.json'), 'utf8')) as Golden
    const model = await WgslModel.open(checkpointSource(dir))
    const small = model.sequence(3) // grows at its 4th token
    const other = model.sequence()
    try {
      const ids = golden.logits.prompt_ids
      let worst = 0
      for (const [i, id] of ids.entries()) {
        const a = (await model.run(small, [id], true))!
        if (i % 4 === 3) await model.run(other, ids.slice(i - 3, i + 1), false) // the other one in calls of 4 between
        for (let v = 0; v < a.logits.length; v++) worst = Math.max(worst, Math.abs(a.logits[v]! - golden.logits.values[i]![v]!))
      }
      assert.ok(small.room >= ids.length && small.room % 256 === 0, `grew to ${small.room}`)
      const rest = ids.slice(other.length)
      const last = rest.length > 0 ? (await model.run(other, rest, true))! : undefined
      if (last) for (let v = 0; v < last.logits.length; v++) worst = Math.max(worst, Math.abs(last.logits[v]! - golden.logits.values.at(-1)![v]!))
      assert.equal(other.length, ids.length)
      assert.ok(worst < 1e-4, `worst |logit diff| ${worst}`)
    } finally {
      small.release()
      other.release()
      model.release()
    }
  })

  test('half-precision weights: the float32 kernels\' logits for the same (half-representable) values, prompt calls and steps alike', async (t) => {
    if (unavailable) return t.skip(unavailable)
    const dir = path.join(goldenRoot, 'tiny-p4')
    const golden = JSON.parse(fs.readFileSync(path.join(dir, 'golden.json'), 'utf8')) as Golden
    const exact = checkpointSource(dir)
    const halved = {...exact, config: exact.config, read: (name: string) => decodeToFloat32('F16', new Uint8Array(encodeFloat16(exact.read(name)).buffer))}
    const ids = golden.logits.prompt_ids
    const logitsOf = async (weights: 'f32' | 'f16') => {
      const model = await WgslModel.open(halved, {weights})
      const sequence = model.sequence()
      try {
        assert.equal(model.weights, weights)
        const prompt = (await model.run(sequence, ids.slice(0, -1), true))!.logits
        const step = (await model.run(sequence, ids.slice(-1), true))!.logits
        return {prompt, step}
      } finally {
        sequence.release()
        model.release()
      }
    }
    const full = await logitsOf('f32')
    const half = await logitsOf('f16')
    let worst = 0
    for (const [a, b] of [[full.prompt, half.prompt], [full.step, half.step]] as const) for (let v = 0; v < a.length; v++) worst = Math.max(worst, Math.abs(a[v]! - b[v]!))
    assert.ok(worst < 1e-5, `worst |logit diff| f16 vs f32 kernels ${worst}`)
    let fromGolden = 0
    for (let v = 0; v < half.step.length; v++) fromGolden = Math.max(fromGolden, Math.abs(half.step[v]! - golden.logits.values.at(-1)![v]!))
    assert.ok(fromGolden > 0 && fromGolden < 0.05, `half-rounded weights move the last logits by ${fromGolden}`)
  })

  for (const weights of ['q4', 'q8'] as const) {
    test(`${weights} weights: the float32 kernels' logits for the values their codes stand for, prompt calls and steps alike`, async (t) => {
      if (unavailable) return t.skip(unavailable)
      const exact = checkpointSource(path.join(goldenRoot, 'tiny-p4'))
      const c = exact.config
      const bits = weights === 'q4' ? 4 : 8
      const requested = weights === 'q4' ? 256 : 32
      // every matrix the kernels quantize, quantized and widened back as the converter's rule does it; the
      // aggregation's first matrix rounded to half, as the kernels keep it beside codes
      const widths: Record<string, number> = {q_proj: c.hiddenSize, k_proj: c.hiddenSize, v_proj: c.hiddenSize, gate_proj: c.hiddenSize, up_proj: c.hiddenSize, o_proj: c.numHeads * c.headDim, down_proj: c.intermediateSize, embed_tokens: c.hiddenSize, lm_head: c.hiddenSize}
      const dequantized = {
        ...exact,
        config: c,
        read(name: string) {
          const values = exact.read(name)
          if (name === 'model.aggregate_layer.0.weight') return decodeToFloat32('F16', new Uint8Array(encodeFloat16(values).buffer))
          const kind = /(?:^|\.)(\w+)\.weight$/.exec(name)?.[1]
          const k = kind === undefined ? undefined : widths[kind]
          if (k === undefined) return values
          const layout = {bits: bits as 4 | 8, blockSize: blockSizeFor(k, requested, name), k}
          return dequantizeRows(quantizeRows(values, values.length / k, layout), values.length / k, layout)
        },
      }
      const ids = JSON.parse(fs.readFileSync(path.join(goldenRoot, 'tiny-p4', 'golden.json'), 'utf8')).logits.prompt_ids as number[]
      const logitsOf = async (model: WgslModel) => {
        const sequence = model.sequence()
        try {
          return [(await model.run(sequence, ids.slice(0, -1), true))!.logits, (await model.run(sequence, ids.slice(-1), true))!.logits]
        } finally {
          sequence.release()
          model.release()
        }
      }
      const codes = await logitsOf(await WgslModel.open(exact, {weights}))
      const floats = await logitsOf(await WgslModel.open(dequantized, {weights: 'f32'}))
      let worst = 0
      for (const [i, a] of codes.entries()) for (let v = 0; v < a.length; v++) worst = Math.max(worst, Math.abs(a[v]! - floats[i]![v]!))
      assert.ok(worst < 1e-4, `worst |logit diff| ${weights} codes vs their values in float32 ${worst}`)
    })
  }

  for (const parallel of [1, 3]) {
    test(`P = ${parallel}: a prompt in one call (matrix-matrix tiles, down split along K) gives the logits of one token a step (matrix-vector)`, async (t) => {
      if (unavailable) return t.skip(unavailable)
      // intermediate 1100 splits down_proj in two (gemmSplits), 70 tokens × P rows straddle the 64-row tiles, hidden 96 is not a multiple of 64 columns
      const shape = syntheticShape(undefined, {hiddenSize: 96, numHeads: 6, numKvHeads: 2, intermediateSize: 1100, vocabSize: 300})
      const source = syntheticTensors(shape, {parallel, prefixTokens: 5, seed: 3})
      const model = await WgslModel.open(source)
      const stepped = model.sequence()
      const called = model.sequence()
      try {
        const ids = Array.from({length: 70}, (_, i) => (i * 37 + 11) % 300)
        let last: Float32Array | undefined
        for (const id of ids) last = (await model.run(stepped, [id], true))!.logits
        const prompt = (await model.run(called, ids, true))!.logits
        let worst = 0
        for (let v = 0; v < prompt.length; v++) worst = Math.max(worst, Math.abs(prompt[v]! - last![v]!))
        assert.ok(worst < 1e-4, `worst |logit diff| prompt call vs steps ${worst}`)
        const next = [5, 6]
        const a = (await model.run(stepped, next.slice(0, 1), true))!.logits
        const b = (await model.run(called, next.slice(0, 1), true))!.logits
        for (let v = 0; v < a.length; v++) worst = Math.max(worst, Math.abs(a[v]! - b[v]!))
        assert.ok(worst < 1e-4, `worst |logit diff| after the prompt ${worst}`)
      } finally {
        stepped.release()
        called.release()
        model.release()
      }
    })
  }

  const decoderParallel = (name: string) => Number(/-p(\d+)/.exec(name)![1])
  for (const name of ['tiny-p1', 'tiny-p4']) {
    test(`${name}: greedy decoding chained on the GPU (argmax there, ids and stream weights read in chunks) gives the reference's tokens and the stepped run's weights; a stop takes back the steps sent past it`, async (t) => {
      if (unavailable) return t.skip(unavailable)
      const dir = path.join(goldenRoot, name)
      const golden = JSON.parse(fs.readFileSync(path.join(dir, 'golden.json'), 'utf8')) as Golden
      const model = await WgslModel.open(checkpointSource(dir))
      const sequence = model.sequence()
      try {
        for (const g of golden.greedy.filter((g) => g.new_ids.length >= 3)) {
          sequence.reset()
          const first = argmax((await model.run(sequence, g.prompt_ids, true))!.logits)
          assert.equal(first, g.new_ids[0])
          // chunks of 2: the second chunk is sent before the first is read
          const chainedWeights: number[][] = []
          const rest = await model.greedy(sequence, first, g.new_ids.length - 1, (_, w) => (chainedWeights.push(Array.from(w)), false), 2)
          assert.deepEqual([first, ...rest], g.new_ids)
          assert.equal(sequence.length, g.prompt_ids.length + g.new_ids.length - 1)
          // the stream weights of each chained step are those of the same step run with its logits read
          sequence.reset()
          await model.run(sequence, g.prompt_ids, false)
          for (const [i, id] of g.new_ids.slice(0, -1).entries()) {
            const {streamWeights} = (await model.run(sequence, [id], true))!
            assert.equal(streamWeights.length, decoderParallel(name))
            for (const [p, w] of streamWeights.entries()) assert.ok(Math.abs(w - chainedWeights[i]![p]!) < 1e-6, `step ${i} stream ${p}: ${w} vs ${chainedWeights[i]![p]}`)
          }
          // stop at the reference's third token: two tokens made, the sequence holds the inputs up to the stop, and going on from there is the reference again
          sequence.reset()
          await model.run(sequence, g.prompt_ids, false)
          const stopAt = g.new_ids[2]!
          const made = await model.greedy(sequence, first, g.new_ids.length - 1, (id) => id === stopAt, 2)
          assert.deepEqual(made, g.new_ids.slice(1, 1 + made.length))
          assert.equal(made.at(-1), stopAt)
          assert.equal(sequence.length, g.prompt_ids.length + made.length)
          if (g.new_ids.length > made.length + 1) {
            const next = argmax((await model.run(sequence, [stopAt], true))!.logits)
            assert.equal(next, g.new_ids[made.length + 1])
          }
          // a stop that throws: the error comes through, the chunk in flight is let go, and the model goes on
          const before = sequence.length
          await assert.rejects(model.greedy(sequence, first, 6, () => {
            throw new Error('listener failed')
          }, 2), /listener failed/)
          assert.equal(sequence.length, before + 1)
          assert.equal((await model.greedy(sequence, first, 3, undefined, 2)).length, 3)
        }
      } finally {
        sequence.release()
        model.release()
      }
    })
  }

  test('the tuning knobs (loop order, unrolled input steps past a ragged end, team floor, MLP rows, the attention\'s value chains, the input staged in workgroup memory) give the default kernels\' logits', async (t) => {
    if (unavailable) return t.skip(unavailable)
    // hidden 96 (24 groups: two steps of a 32-wide team overrun it), intermediate 1100, P = 3
    const shape = syntheticShape(undefined, {hiddenSize: 96, numHeads: 6, numKvHeads: 2, intermediateSize: 1100, vocabSize: 300})
    const ids = Array.from({length: 6}, (_, i) => (i * 37 + 11) % 300)
    // the steps attend over 5 prefix and 121+ cache positions: with 16 value groups (head size 16), 8 chains of the attention's value sum run whole, then a ragged rest
    const prompt = Array.from({length: 121}, (_, i) => (i * 53 + 7) % 300)
    const logitsWith = (knobs: Record<string, string>) => syntheticLogits(shape, {parallel: 3, seed: 4, knobs, prompt, steps: ids})
    const base = await logitsWith({})
    const variants: Record<string, string>[] = [
      {PARSCALE_WGSL_LOOP: 'streams', PARSCALE_WGSL_TEAM_RULE: 'width'},
      {PARSCALE_WGSL_LOOP: 'weights', PARSCALE_WGSL_UNROLL: '2'},
      {PARSCALE_WGSL_LOOP: 'weights', PARSCALE_WGSL_UNROLL: '4', PARSCALE_WGSL_TEAM_MIN: '64'},
      // the tiles' rows: the defaults before session 44 (1 and 2), and the other ends (P = 3 defaults to 2 and 4)
      {PARSCALE_WGSL_MLP_ROWS: '1', PARSCALE_WGSL_OUT_ROWS: '2'},
      {PARSCALE_WGSL_MLP_ROWS: '4', PARSCALE_WGSL_OUT_ROWS: '1'},
      {PARSCALE_WGSL_OUT_ROWS: '8'},
      // rows owned by invocations over interleaved matrices: slices ragged against K (1100 / 4 = 275 groups), unrolled or not
      {PARSCALE_WGSL_MATVEC: 'columns'},
      {PARSCALE_WGSL_MATVEC: 'gate_up,o_proj'},
      {PARSCALE_WGSL_MATVEC: 'columns', PARSCALE_WGSL_COLUMN_UNROLL: '1', PARSCALE_WGSL_COLUMN_THREADS: '16384', PARSCALE_WGSL_COLUMN_ROWS: '2'},
      {PARSCALE_WGSL_MATVEC: 'columns', PARSCALE_WGSL_COLUMN_UNROLL: '8', PARSCALE_WGSL_COLUMN_THREADS: '262144', PARSCALE_WGSL_COLUMN_SPAN: '2'},
      // the row tiles' sums: one subgroupAdd a value against the butterfly (the default where the adapter's subgroups have one width), one rotary pair a q·k·v tile
      {PARSCALE_WGSL_REDUCE: 'add'},
      {PARSCALE_WGSL_REDUCE: 'butterfly', PARSCALE_WGSL_QKV_PAIRS: '1', PARSCALE_WGSL_MLP_ROWS: '4'},
      // the attention's value sum in 2, 4 and 8 chains (prompt calls and steps)
      {PARSCALE_WGSL_ATTENTION_UNROLL: '2'},
      {PARSCALE_WGSL_ATTENTION_UNROLL: '4'},
      {PARSCALE_WGSL_ATTENTION_UNROLL: '8'},
      // the input staged in workgroup memory, under both loop orders and past a ragged end
      {PARSCALE_WGSL_STAGE: 'f32'},
      {PARSCALE_WGSL_STAGE: 'f32', PARSCALE_WGSL_LOOP: 'streams'},
      {PARSCALE_WGSL_STAGE: 'f16', PARSCALE_WGSL_UNROLL: '4', PARSCALE_WGSL_MLP_ROWS: '1'},
    ]
    for (const knobs of variants) {
      const got = await logitsWith(knobs)
      let worst = 0
      for (const [i, a] of got.entries()) for (let v = 0; v < a.length; v++) worst = Math.max(worst, Math.abs(a[v]! - base[i]![v]!))
      assert.ok(worst < 1e-4, `${JSON.stringify(knobs)}: worst |logit diff| ${worst}`)
    }
    await assert.rejects(logitsWith({PARSCALE_WGSL_LOOP: 'streams', PARSCALE_WGSL_UNROLL: '2'}), /PARSCALE_WGSL_UNROLL needs PARSCALE_WGSL_LOOP=weights/)
    await assert.rejects(logitsWith({PARSCALE_WGSL_MLP_ROWS: '3'}), /PARSCALE_WGSL_MLP_ROWS must be 1, 2 or 4/)
    await assert.rejects(logitsWith({PARSCALE_WGSL_MATVEC: 'cols'}), /PARSCALE_WGSL_MATVEC must be rows, columns or a comma list of qkv, o_proj, gate_up, down, not "cols"/)
    await assert.rejects(logitsWith({PARSCALE_WGSL_MATVEC: 'columns', PARSCALE_WGSL_COLUMN_UNROLL: '3'}), /PARSCALE_WGSL_COLUMN_UNROLL must be 1, 2, 4 or 8/)
    await assert.rejects(logitsWith({PARSCALE_WGSL_REDUCE: 'tree'}), /PARSCALE_WGSL_REDUCE must be auto, add or butterfly, not "tree"/)
    await assert.rejects(logitsWith({PARSCALE_WGSL_QKV_PAIRS: '3'}), /PARSCALE_WGSL_QKV_PAIRS must be 1 or 2, not "3"/)
    await assert.rejects(logitsWith({PARSCALE_WGSL_STAGE: 'half'}), /PARSCALE_WGSL_STAGE must be off, f32 or f16, not "half"/)
    await assert.rejects(logitsWith({PARSCALE_WGSL_ATTENTION_UNROLL: '3'}), /PARSCALE_WGSL_ATTENTION_UNROLL must be 1, 2, 4 or 8, not "3"/)
  })

  test('the columns kernel reads interleaved half and quantized matrices as the row tiles read them: equal logits, prompt call and steps', async (t) => {
    if (unavailable) return t.skip(unavailable)
    // quantized rows are whole blocks: every input width a multiple of 32
    const shape = syntheticShape(undefined, {hiddenSize: 96, numHeads: 6, numKvHeads: 2, intermediateSize: 1088, vocabSize: 300})
    const logitsOf = (weights: WgslWeights, matvec: string | undefined, parallel = 3) => syntheticLogits(shape, {parallel, seed: 9, weights, knobs: {PARSCALE_WGSL_MATVEC: matvec}})
    for (const weights of ['f16', 'q8', 'q4'] as const) {
      const rows = await logitsOf(weights, 'rows')
      const worst = worstLogitDiff(await logitsOf(weights, 'columns'), rows)
      assert.ok(worst < 1e-4, `${weights}: worst |logit diff| ${worst}`)
      assert.ok(rows[0]!.some((v) => v !== 0), `${weights}: logits are not all zero`)
    }
    // at P = 8 (the butterfly's largest tiles): gate·up and o_proj by the columns kernel against the default, row tiles everywhere
    const worst = worstLogitDiff(await logitsOf('f16', 'gate_up,o_proj', 8), await logitsOf('f16', undefined, 8))
    assert.ok(worst < 1e-4, `P = 8, gate_up,o_proj: worst |logit diff| ${worst}`)
  })

  test('the input staged as half pairs (PARSCALE_WGSL_STAGE=f16): half and q4 weights at P = 8 within half rounding of the buffer route; float32 weights keep float32', async (t) => {
    if (unavailable) return t.skip(unavailable)
    const shape = syntheticShape(undefined, {hiddenSize: 96, numHeads: 6, numKvHeads: 2, intermediateSize: 1088, vocabSize: 300})
    const logitsOf = (weights: WgslWeights, stage: string) => syntheticLogits(shape, {parallel: 8, seed: 9, weights, knobs: {PARSCALE_WGSL_STAGE: stage}})
    for (const weights of ['f16', 'q4'] as const) {
      const worst = worstLogitDiff(await logitsOf(weights, 'f16'), await logitsOf(weights, 'off'))
      // the steps' inputs rounded to half: the logits move, by about half's rounding of the products
      assert.ok(worst > 0 && worst < 2e-2, `${weights}: worst |logit diff| ${worst}`)
    }
    assert.ok(worstLogitDiff(await logitsOf('f32', 'f16'), await logitsOf('f32', 'off')) < 1e-4)
  })

  test('the input staged in chunks narrower than the row (PARSCALE_WGSL_STAGE_KB): the buffer route\'s logits, under both loop orders and a ragged last chunk', async (t) => {
    if (unavailable) return t.skip(unavailable)
    // hidden 320 (80 groups), intermediate 2176: gate·up has 1,088 tiles, a 32-invocation team each, 8 a workgroup;
    // at P = 3 a 2 KB copy holds 42 groups a stream, so chunks of 32, 32 and 16 (64 and 16 with two steps unrolled)
    const shape = syntheticShape(undefined, {hiddenSize: 320, numHeads: 10, numKvHeads: 2, intermediateSize: 2176, vocabSize: 300})
    const logitsWith = (knobs: Record<string, string>, weights: WgslWeights = 'f32') => syntheticLogits(shape, {parallel: 3, seed: 6, weights, knobs})
    const base = await logitsWith({})
    const chunked: Record<string, string>[] = [
      {PARSCALE_WGSL_STAGE: 'f32', PARSCALE_WGSL_STAGE_KB: '2'},
      {PARSCALE_WGSL_STAGE: 'f32', PARSCALE_WGSL_STAGE_KB: '4', PARSCALE_WGSL_UNROLL: '2'},
      {PARSCALE_WGSL_STAGE: 'f32', PARSCALE_WGSL_STAGE_KB: '2', PARSCALE_WGSL_LOOP: 'streams'},
    ]
    for (const knobs of chunked) {
      const worst = worstLogitDiff(await logitsWith(knobs), base)
      assert.ok(worst < 1e-4, `${JSON.stringify(knobs)}: worst |logit diff| ${worst}`)
    }
    const half = worstLogitDiff(await logitsWith({PARSCALE_WGSL_STAGE: 'f16', PARSCALE_WGSL_STAGE_KB: '2'}, 'f16'), await logitsWith({}, 'f16'))
    assert.ok(half > 0 && half < 2e-2, `f16 in chunks: worst |logit diff| ${half}`)
  })

  test('every PARSCALE_WGSL_ variable the kernels read is in TUNING_KNOBS, so the sweep can set and clear it', () => {
    const read = new Set<string>()
    for (const file of fs.readdirSync(path.join(REPO_ROOT, 'src/core/wgsl'))) {
      for (const match of fs.readFileSync(path.join(REPO_ROOT, 'src/core/wgsl', file), 'utf8').matchAll(/PARSCALE_WGSL_([A-Z_]+[A-Z])/g)) read.add(match[1]!)
    }
    assert.ok(read.size >= 10, `found ${read.size} variables`)
    assert.deepEqual([...read].filter((name) => !(TUNING_KNOBS as readonly string[]).includes(name)), [])
  })

  test('the butterfly sums a row tile where it takes fewer shuffles than one subgroupAdd a value, on subgroups of one width only', () => {
    // q·k·v at P = 8 on 32-wide subgroups: 4 rows × 8 streams + 8 sums of squares = 40 values → 64 padded, 62 shuffles against 200
    assert.deepEqual(subgroupReduction(40, 32, {}), {width: 32, padded: 64})
    // down at P = 8, two rows a tile, no norm: 16 values
    assert.deepEqual(subgroupReduction(16, 32, {}), {width: 32, padded: 32})
    // P = 1: 3 values cost 15 shuffles added, 31 as a butterfly
    assert.equal(subgroupReduction(3, 32, {}), undefined)
    assert.deepEqual(subgroupReduction(3, 32, {PARSCALE_WGSL_REDUCE: 'butterfly'}), {width: 32, padded: 32})
    assert.equal(subgroupReduction(40, undefined, {PARSCALE_WGSL_REDUCE: 'butterfly'}), undefined)
    assert.equal(subgroupReduction(40, 32, {PARSCALE_WGSL_REDUCE: 'add'}), undefined)
    assert.throws(() => subgroupReduction(40, 32, {PARSCALE_WGSL_REDUCE: 'tree'}), /PARSCALE_WGSL_REDUCE must be auto, add or butterfly, not "tree"/)
  })

  test('tiles take two gate rows where there are several streams and an even intermediate size, and four residual rows', () => {
    assert.equal(mlpTileRows(1, 4864, {}), 1)
    assert.equal(mlpTileRows(2, 4864, {}), 2)
    assert.equal(mlpTileRows(8, 4864, {}), 2)
    assert.equal(mlpTileRows(8, 1101, {}), 1)
    assert.equal(mlpTileRows(8, 4864, {PARSCALE_WGSL_MLP_ROWS: '4'}), 4)
    assert.throws(() => mlpTileRows(8, 1102, {PARSCALE_WGSL_MLP_ROWS: '4'}), /PARSCALE_WGSL_MLP_ROWS must divide the intermediate size 1102, not "4"/)
    assert.throws(() => mlpTileRows(8, 4864, {PARSCALE_WGSL_MLP_ROWS: '3'}), /PARSCALE_WGSL_MLP_ROWS must be 1, 2 or 4, not "3"/)
    assert.equal(residualTileRows({}), 4)
    assert.equal(residualTileRows({PARSCALE_WGSL_OUT_ROWS: '1'}), 1)
    assert.equal(residualTileRows({PARSCALE_WGSL_OUT_ROWS: '8'}), 8)
    assert.throws(() => residualTileRows({PARSCALE_WGSL_OUT_ROWS: '3'}), /PARSCALE_WGSL_OUT_ROWS must be 1, 2, 4 or 8, not "3"/)
  })

  test('the input is staged only where asked for: half pairs over half or coded weights, float32 over float32', () => {
    assert.equal(inputStaging('f16', {}), undefined)
    assert.equal(inputStaging('f16', {PARSCALE_WGSL_STAGE: 'off'}), undefined)
    assert.equal(inputStaging('q4', {PARSCALE_WGSL_STAGE: 'f16'}), 'f16')
    assert.equal(inputStaging('f32', {PARSCALE_WGSL_STAGE: 'f16'}), 'f32')
    assert.equal(inputStaging('f16', {PARSCALE_WGSL_STAGE: 'f32'}), 'f32')
    assert.throws(() => inputStaging('f16', {PARSCALE_WGSL_STAGE: 'on'}), /PARSCALE_WGSL_STAGE must be off, f32 or f16, not "on"/)
    // gate·up at 0.5b, P = 8, two gate rows a tile, a 32-invocation team: 40 sums a tile (11,520 bytes), then 8 streams × 896 inputs
    const gateUp = {k: 896, streams: 8, rows: 4, normEps: 1e-6, team: 32}
    const sums = 4 * 40 * (64 + 8)
    assert.equal(matvecWorkgroupBytes(gateUp), sums)
    assert.equal(matvecWorkgroupBytes({...gateUp, stage: {kind: 'f32', groups: 224}}), sums + 8 * 896 * 4)
    assert.equal(matvecWorkgroupBytes({...gateUp, stage: {kind: 'f16', groups: 224}}), sums + 8 * 896 * 2)
    // NVIDIA's 48 KB: 0.5b's row fits whole in either form
    assert.deepEqual(stagedChunk(gateUp, 'f32', 49152, {}), {kind: 'f32', groups: 224})
    // 1.8b (hidden 2048, 512 groups): f16 whole (32 KB), f32 in chunks of whole 32-group steps (37,632 bytes of room: 294 groups → 288)
    const wide = {...gateUp, k: 2048}
    assert.deepEqual(stagedChunk(wide, 'f16', 49152, {}), {kind: 'f16', groups: 512})
    assert.deepEqual(stagedChunk(wide, 'f32', 49152, {}), {kind: 'f32', groups: 288})
    assert.deepEqual(stagedChunk(wide, 'f32', 49152, {PARSCALE_WGSL_UNROLL: '4'}), {kind: 'f32', groups: 256})
    assert.deepEqual(stagedChunk(wide, 'f16', 49152, {PARSCALE_WGSL_STAGE_KB: '8'}), {kind: 'f16', groups: 128})
    // not one step fits
    assert.equal(stagedChunk(wide, 'f32', sums + 8 * 16 * 31, {}), undefined)
    assert.throws(() => stagedChunk(wide, 'f32', 49152, {PARSCALE_WGSL_STAGE_KB: '3'}), /PARSCALE_WGSL_STAGE_KB must be 2, 4, 8, 16, 32 or 64, not "3"/)
  })

  test('row tiles are the default for every product; columns or a list picks the columns kernel', () => {
    assert.deepEqual([...matvecColumns({})], [])
    assert.deepEqual([...matvecColumns({PARSCALE_WGSL_MATVEC: 'rows'})], [])
    assert.deepEqual([...matvecColumns({PARSCALE_WGSL_MATVEC: 'columns'})].sort(), ['down', 'gate_up', 'o_proj', 'qkv'])
    assert.deepEqual([...matvecColumns({PARSCALE_WGSL_MATVEC: 'down,qkv'})].sort(), ['down', 'qkv'])
    assert.throws(() => matvecColumns({PARSCALE_WGSL_MATVEC: 'gate_up,mlp'}), /PARSCALE_WGSL_MATVEC must be rows, columns or a comma list of qkv, o_proj, gate_up, down, not "gate_up,mlp"/)
  })

  test('a token outside the vocabulary and a full cache are refused with one clear line', async (t) => {
    if (unavailable) return t.skip(unavailable)
    const decoder = await WgslDecoder.open(checkpointSource(path.join(goldenRoot, 'tiny-p4')), {positions: 2})
    try {
      await assert.rejects(decoder.step(272), (e: unknown) => e instanceof UserError && /token id 272 is outside the vocabulary \(0…271\)/.test(e.message))
      await decoder.step(1, false)
      await decoder.step(2, false)
      await assert.rejects(decoder.step(3), (e: unknown) => e instanceof UserError && /cache is full \(2 positions\)/.test(e.message))
    } finally {
      decoder.release()
    }
  })
})

describe('hand-written WebGPU decode step: the default model\'s package against the exact CPU graph', () => {
  const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
    assert.equal(a.length, b.length)
    let worst = 0
    for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!))
    return worst
  }
  for (const parallel of [8, 1]) {
    test(`P = ${parallel}: a 20-token prompt then 10 greedy steps, logits and stream weights`, async (t) => {
      if (unavailable) return t.skip(unavailable)
      const packageDir = resolveModel(undefined, {parallel}).packageDir
      const cpu = await ParScaleModel.open(packageDir)
      const cache = cpu.newCache(parallel)
      cache.reserve(1, 48 + 32)
      cache.reset(0)
      const gpu = await WgslDecoder.open(packageSource(packageDir, parallel), {positions: 32}) // the converted package, as the CLI has it
      try {
        const prompt = Array.from({length: 20}, (_, i) => (i * 37 + 11) % 4000)
        let g: Awaited<ReturnType<WgslDecoder['step']>>
        g = await gpu.prompt(prompt) // calls of gpu.promptTokens tokens (4 at P = 8, 32 at P = 1)
        let c = await cpu.forward(cache, 0, [prompt], 1)
        let worst = maxDiff(g!.logits, c.logits)
        for (let s = 0; s < 10; s++) {
          const next = argmax(c.logits)
          g = await gpu.step(next)
          c = await cpu.forward(cache, 0, [[next]], 1)
          worst = Math.max(worst, maxDiff(g!.logits, c.logits))
          if (c.streamWeights) assert.ok(maxDiff(g!.streamWeights, c.streamWeights) < 1e-5, 'stream weights')
          assert.ok(Math.abs(g!.streamWeights.reduce((a, b) => a + b, 0) - 1) < 1e-5, 'stream weights sum to 1')
        }
        if (process.env.PARSCALE_SHOW_DIFFS) console.log(`P=${parallel}: worst |logit diff| ${worst.toExponential(2)}`)
        assert.ok(worst < 1e-4, `worst |logit diff| ${worst}`)
      } finally {
        cache.dispose()
        await cpu.release()
        gpu.release()
      }
    })
  }
})

describe('PARSCALE_WEBGPU_ROUTE=wgsl: the CLI on the hand-written kernels', () => {
  const cli = (args: string[], env: Record<string, string>) =>
    spawnSync(process.execPath, ['bin/run.js', ...args], {encoding: 'utf8', env: {...process.env, ...env}, timeout: 600_000})
  const route = {PARSCALE_WEBGPU_ROUTE: 'wgsl'}

  test('run at P = 8 gives the CPU graph\'s greedy tokens; eval at P = 1 and 8 its losses', async (t) => {
    if (unavailable) return t.skip(unavailable)
    const prompt = ['run', '--prompt', 'def fibonacci(n):', '--max-new-tokens', '24', '-p', '8', '--temperature', '0', '--json']
    const gpu = cli([...prompt, '--device', 'webgpu'], route)
    const cpu = cli(prompt, {})
    assert.equal(gpu.status, 0, gpu.stderr)
    assert.equal(cpu.status, 0, cpu.stderr)
    assert.doesNotMatch(gpu.stderr, /not the route/, 'the route was taken')
    const text = (out: string) => (JSON.parse(out) as {text: string}).text
    assert.equal(text(gpu.stdout), text(cpu.stdout))
    const evalArgs = ['eval', '-f', 'fixtures/default-model/heldout.py', '-p', '1,8', '--json']
    const gpuEval = cli([...evalArgs, '--device', 'webgpu'], route)
    const cpuEval = cli(evalArgs, {})
    assert.equal(gpuEval.status, 0, gpuEval.stderr)
    const losses = (out: string) => (JSON.parse(out) as {results: {mean_nll: number}[]}).results.map((r) => r.mean_nll)
    const [g, c] = [losses(gpuEval.stdout), losses(cpuEval.stdout)]
    assert.equal(g.length, 2)
    for (let i = 0; i < 2; i++) assert.ok(Math.abs(g[i]! - c[i]!) < 1e-5, `P ${i === 0 ? 1 : 8}: ${g[i]} against ${c[i]}`)
  })

  test('--quant int4 and int8 packages run on the route: eval at P = 1 and 8 within 0.01 of the CPU graph of the same package (its MatMulNBits quantize activations; these kernels do not)', async (t) => {
    if (unavailable) return t.skip(unavailable)
    for (const quant of ['int4', 'int8']) {
      const evalArgs = ['eval', '-f', 'fixtures/default-model/heldout.py', '-p', '1,8', '--quant', quant, '--json']
      const gpuEval = cli([...evalArgs, '--device', 'webgpu'], route)
      const cpuEval = cli(evalArgs, {})
      assert.equal(gpuEval.status, 0, gpuEval.stderr)
      assert.equal(cpuEval.status, 0, cpuEval.stderr)
      assert.doesNotMatch(gpuEval.stderr, /not the route/, 'the route was taken')
      const losses = (out: string) => (JSON.parse(out) as {results: {mean_nll: number}[]}).results.map((r) => r.mean_nll)
      const [g, c] = [losses(gpuEval.stdout), losses(cpuEval.stdout)]
      assert.equal(g.length, 2)
      for (let i = 0; i < 2; i++) assert.ok(Math.abs(g[i]! - c[i]!) < 0.01, `${quant} P ${i === 0 ? 1 : 8}: ${g[i]} on the route against ${c[i]} on the CPU`)
    }
  })

  test('bench --profile on the route: GPU ms per kernel of a prompt call and of decode steps, written to PREFIX-wgsl-p{P}.json and printed', async (t) => {
    if (unavailable) return t.skip(unavailable)
    const prefix = path.join(work, 'profile', 'p')
    fs.mkdirSync(path.dirname(prefix), {recursive: true})
    const shape = ['--synthetic', '0.5b', '--hidden', '64', '--heads', '4', '--kv-heads', '2', '--intermediate', '128', '--layers', '2', '--vocab', '300']
    const out = cli(['bench', ...shape, '--device', 'webgpu', '--parallel', '2', '--prompt-len', '16', '-n', '3', '--repeat', '1', '--no-roofline', '--profile', prefix], route)
    assert.equal(out.status, 0, out.stderr)
    assert.match(out.stdout, /the hand-written kernels' profile/)
    const written = fs.readdirSync(path.dirname(prefix)).filter((f) => f.endsWith('-wgsl-p2.json'))
    assert.equal(written.length, 1, `written: ${fs.readdirSync(path.dirname(prefix)).join(', ')}`)
    const calls = JSON.parse(fs.readFileSync(path.join(path.dirname(prefix), written[0]!), 'utf8')) as {tokens: number; gpu_ms: Record<string, number>; dispatches: Record<string, number>}[]
    assert.deepEqual(calls.map((c) => c.tokens), [16, 1, 1, 1, 1, 1, 1, 1, 1])
    const step = calls[1]!
    // a decode step: embedding, five kernels a layer, final norm, aggregation, mixing, head
    assert.equal(Object.values(step.dispatches).reduce((a, b) => a + b, 0), 1 + 5 * 2 + 4)
    for (const kernel of ['qkv', 'attention', 'o_proj', 'gate_up', 'down', 'lm_head']) assert.ok(step.gpu_ms[kernel]! > 0, `${kernel}: ${step.gpu_ms[kernel]}`)
    assert.match(out.stdout, /\| gate_up \| [\d.]+ \| 2 \|/)
  })

  test('where Dawn is missing, --device webgpu runs the node route and says why in one line', async (t) => {
    const adapter = await checkWebGpu().then(() => true, () => false)
    if (!adapter) return t.skip('no WebGPU adapter on this machine')
    const out = cli(['run', '--prompt', 'def f():', '--max-new-tokens', '4', '-p', '2', '--temperature', '0', '--device', 'webgpu'], {...route, PARSCALE_DAWN: path.join(work, 'no-such-folder')})
    assert.equal(out.status, 0, out.stderr)
    const notices = out.stderr.split('\n').filter((line) => /not the route PARSCALE_WEBGPU_ROUTE asks for/.test(line))
    assert.equal(notices.length, 1, out.stderr)
    assert.match(notices[0]!, /Dawn's webgpu package is not installed/)
  })

  test('an unknown route is one line and exit 1', async (t) => {
    if (!(await checkWebGpu().then(() => true, () => false))) return t.skip('no WebGPU adapter on this machine')
    const out = cli(['run', '--prompt', 'x', '--max-new-tokens', '1', '--device', 'webgpu'], {PARSCALE_WEBGPU_ROUTE: 'fast'})
    assert.equal(out.status, 1)
    assert.match(out.stderr.trim(), /PARSCALE_WEBGPU_ROUTE must be node, capture or wgsl, not "fast"/)
  })
})

test('a package read as tensors equals its checkpoint (q·k·v and gate·up split, 1/√d folded into q, untied head in blocks, fp16 widened)', (t) => {
  for (const [name, options] of [['tiny-p1', []], ['tiny-p4', []], ['tiny-p1', ['--dtype', 'fp16']]] as const) {
    const out = path.join(work, `${name}${options.join('')}`)
    const converted = spawnSync(process.execPath, ['bin/run.js', 'convert', path.join(goldenRoot, name), '-o', out, ...options], {encoding: 'utf8'})
    assert.equal(converted.status, 0, converted.stderr)
    const checkpoint = checkpointSource(path.join(goldenRoot, name))
    const pkg = packageSource(out, checkpoint.config.parallel)
    assert.equal(pkg.queryScaled, true)
    const scale = 1 / Math.sqrt(checkpoint.config.headDim)
    for (const tensor of expectedTensorShapes(checkpoint.config).keys()) {
      const want = checkpoint.read(tensor)
      const got = pkg.read(tensor)
      assert.equal(got.length, want.length, tensor)
      const factor = /q_proj/.test(tensor) ? scale : 1
      const tolerance = options.length > 0 ? 1e-3 : 1e-6
      for (let i = 0; i < want.length; i++) assert.ok(Math.abs(got[i]! - want[i]! * factor) <= tolerance * Math.max(1, Math.abs(want[i]!)), `${tensor}[${i}]: ${got[i]} against ${want[i]! * factor}`)
    }
  }
  t.diagnostic('fp32 and fp16 packages of tiny-p1, fp32 of tiny-p4')
  assert.throws(() => packageSource(path.join(work, 'tiny-p4'), 3), /has no --parallel 3; available: 4/)
})

test('synthetic tensors made in memory equal the synthetic checkpoint written to files', () => {
  const shape = syntheticShape(undefined, {hiddenSize: 64, numLayers: 2, vocabSize: 300})
  const dir = path.join(work, 'synthetic-p4')
  writeSyntheticCheckpoint(dir, shape, {parallel: 4, prefixTokens: 8, seed: 7})
  const files = Checkpoint.open(dir)
  const memory = syntheticTensors(shape, {parallel: 4, prefixTokens: 8, seed: 7})
  assert.deepEqual(memory.config.parallel, files.config.parallel)
  for (const name of files.tensors.keys()) assert.deepEqual(memory.read(name), readTensorFloat32(files.get(name)), name)
  assert.throws(() => memory.read('model.layers.9.mlp.up_proj.weight'), /no tensor "model.layers.9.mlp.up_proj.weight"/)
})
