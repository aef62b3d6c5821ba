/**
 * A sweep of the hand-written kernels' tuning knobs on one GPU (issue 23: what a decode step at
 * P = 8 costs against P = 1): for each variant (a set of PARSCALE_WGSL_* variables) and each P,
 * the GPU's own rate over decode steps (nothing read), the rate with the logits read, and GPU ms
 * per kernel of a step from timestamps (median of 5 profiled steps). One process, a model opened
 * per variant and P, so the figures share a machine and a moment.
 *
 *   PARSCALE_DAWN=<node_modules with webgpu@0.6.2> node dist/bench/wgsl-sweep.js
 *   env: BENCH_VARIANTS ("name:KEY=V+KEY=V;name2:…"; KEY without the PARSCALE_WGSL_ prefix, e.g.
 *   "base:;weights2:LOOP=weights+UNROLL=2"), BENCH_SHAPE (0.5b), BENCH_PARALLEL (1,8),
 *   BENCH_WEIGHTS (f32; one format), BENCH_NEW (24 steps a round), BENCH_ROUNDS (2)
 */
import {syntheticShape, syntheticTensors} from '../src/core/checkpoint/synthetic.js'
import {median} from '../src/core/bench/stats.js'
import {decodeRound} from './wgsl-timing.js'
import {WgslDecoder, type WgslWeights} from '../src/core/wgsl/decoder.js'
import {knobVariants, useVariant} from './wgsl-variants.js'

const variants = knobVariants()
const parallels = (process.env.BENCH_PARALLEL ?? '1,8').split(',').map(Number)
const weights = (process.env.BENCH_WEIGHTS ?? 'f32') as WgslWeights
const fresh = Number(process.env.BENCH_NEW ?? 24)
const rounds = Number(process.env.BENCH_ROUNDS ?? 2)
const shapeName = process.env.BENCH_SHAPE ?? '0.5b'
const shape = syntheticShape(shapeName === 'tiny' ? undefined : shapeName)

interface Result {
  variant: string
  parallel: number
  readMs: number
  gpuMs: number
  kernels: Record<string, number>
}

const results: Result[] = []
for (const variant of variants) {
  useVariant(variant)
  for (const parallel of parallels) {
    let decoder: WgslDecoder | undefined
    try {
      const source = syntheticTensors(shape, {parallel})
      decoder = await WgslDecoder.open(source, {positions: 64 + 8 + fresh * 2 * rounds, weights})
      const vocab = source.config.vocabSize
      const token = (i: number) => (i * 7919 + 13) % vocab
      await decoder.prompt(Array.from({length: 64}, (_, i) => token(i)))
      for (let i = 0; i < 3; i++) await decoder.step(token(i))
      const reads: number[] = []
      const gpus: number[] = []
      for (let r = 0; r < rounds; r++) {
        const round = await decodeRound(decoder, token, fresh)
        reads.push(round.readMs)
        gpus.push(round.gpuMs)
      }
      const profiles: Map<string, number>[] = []
      for (let i = 0; i < 5; i++) profiles.push(await decoder.profile([token(i)]))
      const kernels = Object.fromEntries([...profiles[0]!.keys()].map((name) => [name, median(profiles.map((p) => p.get(name) ?? 0))]))
      const result = {variant: variant.name, parallel, readMs: median(reads), gpuMs: median(gpus), kernels}
      console.log(JSON.stringify({...result, env: variant.env}))
      results.push(result)
    } catch (error) {
      console.log(`${variant.name} P=${parallel}: ${(error as Error).message.split('\n')[0]}`)
    } finally {
      decoder?.release()
    }
  }
}

const names = ['qkv', 'attention', 'o_proj', 'gate_up', 'down', 'lm_head']
console.log(`\n${shapeName} ${weights}: decode ms/token (logits read | GPU's own rate) and GPU ms a step by kernel (timestamps, median of 5)`)
console.log(`variant | P | read | GPU | ${names.join(' | ')} | sum`)
for (const r of results) {
  const sum = Object.values(r.kernels).reduce((a, b) => a + b, 0)
  console.log(`${r.variant} | ${r.parallel} | ${r.readMs.toFixed(2)} | ${r.gpuMs.toFixed(2)} | ${names.map((n) => (r.kernels[n] ?? 0).toFixed(3)).join(' | ')} | ${sum.toFixed(2)}`)
}
for (const variant of variants) {
  const p1 = results.find((r) => r.variant === variant.name && r.parallel === 1)
  const p8 = results.find((r) => r.variant === variant.name && r.parallel === 8)
  if (p1 && p8) console.log(`${variant.name}: P8/P1 read ${(p8.readMs / p1.readMs).toFixed(2)}, GPU ${(p8.gpuMs / p1.gpuMs).toFixed(2)}`)
}
process.exit(0)
