/**
 * Decode speed of the hand-written WebGPU step (issue 23) on a synthetic shape: for each P, a
 * prompt in calls of up to 512 rows (tokens · P; two untimed, then five timed, logits of its last token read back), then timed decode steps with the logits read back (what
 * generation costs), greedy steps chained on the GPU (argmax there, only token ids read), and the
 * same steps submitted back to back without reading (the GPU's own rate), in alternating rounds. Prints one JSON line per P and a table.
 *
 *   PARSCALE_DAWN=<node_modules with webgpu@0.6.2> node dist/bench/wgsl-decode.js
 *   env: BENCH_SHAPE (0.5b), BENCH_PARALLEL (1,2,4,8), BENCH_WEIGHTS (f32,f16: the matrices' format on
   the GPU, also q8 and q4; f16 rounds the synthetic values, q8/q4 quantize them as --quant does), BENCH_PROMPT (64), BENCH_NEW (32), BENCH_ROUNDS (3), BENCH_PROFILE (1: GPU
   time per kernel of a step and a prompt call, where the adapter has timestamps; 0: none), PARSCALE_DAWN_FLAGS (Dawn's toggles, dawn.ts)
 */
import {syntheticShape, syntheticTensors} from '../src/core/checkpoint/synthetic.js'
import {shapeParameters} from '../src/core/bench/scaling-law.js'
import {median} from '../src/core/bench/stats.js'
import {decodeRound} from './wgsl-timing.js'
import {dawnFlags} from '../src/core/wgsl/dawn.js'
import {WgslDecoder, type WgslWeights} from '../src/core/wgsl/decoder.js'

const shapeName = process.env.BENCH_SHAPE ?? '0.5b'
const parallels = (process.env.BENCH_PARALLEL ?? '1,2,4,8').split(',').map(Number)
const formats = (process.env.BENCH_WEIGHTS ?? 'f32,f16').split(',') as WgslWeights[]
for (const f of formats) if (!['f32', 'f16', 'q8', 'q4'].includes(f)) throw new Error(`BENCH_WEIGHTS takes f32, f16, q8 and q4, not "${f}"`)
const prompt = Number(process.env.BENCH_PROMPT ?? 64)
const fresh = Number(process.env.BENCH_NEW ?? 32)
const rounds = Number(process.env.BENCH_ROUNDS ?? 3)
const shape = syntheticShape(shapeName === 'tiny' ? undefined : shapeName)

interface Row {
  shape: string
  weights: WgslWeights
  parallel: number
  dispatches: number
  promptTokens: number
  weightsGB: number
  loadS: number
  prefillMs: number
  prefills: number[]
  /** Host ms a decode step with its logits read (last round): writing its place, encoding, Dawn's submit, submit to logits mapped, copying them. */
  hostMs: {write: number; encode: number; submit: number; wait: number; copy: number}
  readMs: number[]
  gpuMs: number[]
  /** Greedy decoding chained on the GPU (argmax there, token ids read back 16 at a time): ms/token. */
  greedyMs: number[]
  adapter: string
  /** GPU ms per kernel name: one decode step, one prompt call. */
  profile?: {decode: Record<string, number>; prompt: Record<string, number>}
}

const rows: Row[] = []
for (const weights of formats) for (const parallel of parallels) {
  const t0 = performance.now()
  const source = syntheticTensors(shape, {parallel})
  const decoder = await WgslDecoder.open(source, {positions: prompt + 1 + fresh * 3 * rounds, weights})
  const loadS = (performance.now() - t0) / 1000
  const c = source.config
  // bytes a parameter: the codes and, quantized, a float32 scale per block (the converter's default blocks: 256 for q4, 32 for q8)
  const weightBytes = {f32: 4, f16: 2, q8: 1 + 4 / 32, q4: 0.5 + 4 / 256}[weights] * shapeParameters(shape)
  const token = (i: number) => (i * 7919 + 13) % c.vocabSize
  const promptIds = Array.from({length: prompt}, (_, i) => token(i))
  // pipelines are made at open, but the first calls after the upload run slow (Dawn releasing the upload's
  // staging, the GPU's clocks): two untimed calls, then five timed
  for (let i = 0; i < 2; i++) {
    decoder.reset()
    await decoder.prompt(promptIds)
  }
  const prefills: number[] = []
  let p0 = 0
  for (let i = 0; i < 5; i++) {
    decoder.reset()
    p0 = performance.now()
    await decoder.prompt(promptIds)
    prefills.push(performance.now() - p0)
  }
  const prefillMs = median(prefills)
  await decoder.step(token(prompt)) // warm the read path
  const readMs: number[] = []
  const gpuMs: number[] = []
  const greedyMs: number[] = []
  const host = decoder.model.hostTimes
  let hostMs = {write: 0, encode: 0, submit: 0, wait: 0, copy: 0}
  for (let r = 0; r < rounds; r++) {
    Object.assign(host, {calls: 0, writeMs: 0, encodeMs: 0, submitMs: 0, waitMs: 0, copyMs: 0})
    const round = await decodeRound(decoder, token, fresh, () => {
      hostMs = {write: host.writeMs / host.calls, encode: host.encodeMs / host.calls, submit: host.submitMs / host.calls, wait: host.waitMs / host.calls, copy: host.copyMs / host.calls}
    })
    readMs.push(round.readMs)
    gpuMs.push(round.gpuMs)
    p0 = performance.now()
    await decoder.greedy(token(0), fresh)
    greedyMs.push((performance.now() - p0) / fresh)
  }
  // where the adapter has timestamps: GPU time per kernel of a decode step and of the prompt's call (after the timed rounds)
  let profile: {decode: Record<string, number>; prompt: Record<string, number>} | undefined
  if (process.env.BENCH_PROFILE !== '0') {
    try {
      decoder.reset()
      const prompt = Object.fromEntries(await decoder.profile(promptIds.slice(0, decoder.promptTokens)))
      let decode: Record<string, number> = {}
      for (let i = 0; i < 3; i++) decode = Object.fromEntries(await decoder.profile([token(i)]))
      profile = {decode, prompt}
    } catch (error) {
      console.error(`no profile: ${(error as Error).message}`)
    }
  }
  const row = {shape: shapeName, weights, parallel, dispatches: decoder.dispatchCount, promptTokens: decoder.promptTokens, weightsGB: weightBytes / 1e9, loadS, prefillMs, prefills, readMs, gpuMs, greedyMs, hostMs, adapter: decoder.adapterName, ...(profile ? {profile} : {})}
  console.log(JSON.stringify(row))
  rows.push(row)
  decoder.release()
}
console.log(`\n${shapeName} on ${rows[0]?.adapter} (Dawn flags: ${dawnFlags().join(' ') || 'none'}): prompt ${prompt} (calls of 512 / P tokens), ${fresh} decode steps, ${rounds} rounds (medians)`)
console.log('weights | P | dispatches | decode ms/token, logits read | greedy on the GPU, ids read | GPU ms/step, nothing read | host ms a step: write / encode / submit / wait / copy | prompt ms (median of 5, fastest)')
const fixed = (xs: number[]) => xs.map((x) => x.toFixed(2)).join(' / ')
for (const r of rows) console.log(`${r.weights} | ${r.parallel} | ${r.dispatches} | ${median(r.readMs).toFixed(2)} | ${median(r.greedyMs).toFixed(2)} | ${median(r.gpuMs).toFixed(2)} | ${fixed([r.hostMs.write, r.hostMs.encode, r.hostMs.submit, r.hostMs.wait, r.hostMs.copy])} | ${r.prefillMs.toFixed(0)} (${Math.min(...r.prefills).toFixed(0)})`)
const ms = (kernels: Record<string, number>) => Object.entries(kernels).map(([name, t]) => `${name} ${t.toFixed(3)}`).join(', ')
for (const r of rows) if (r.profile) console.log(`profile ${r.weights} P=${r.parallel} (GPU ms by kernel): decode step: ${ms(r.profile.decode)}; prompt call: ${ms(r.profile.prompt)}`)
for (const weights of formats) {
  const p1 = rows.find((r) => r.weights === weights && r.parallel === 1)
  const p8 = rows.find((r) => r.weights === weights && r.parallel === 8)
  if (p1 && p8) console.log(`${weights}: P8/P1 ${(median(p8.readMs) / median(p1.readMs)).toFixed(2)}`)
}
process.exit(0)
