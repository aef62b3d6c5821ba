// `npm run bench:gpu-form`: the GPU form (issue 23) on the 0.5b synthetic, batch 1:
// prefill of a 64-token prompt and ms per decoded token at each P, on the WebGPU provider
// (BENCH_DEVICE=cpu: the CPU provider), one child process per P (peak RSS is per P), with the
// kernel launches per step counted from the graph and the adapter's bandwidth floor.
// Env: BENCH_DEVICE (webgpu), BENCH_SHAPE (0.5b), BENCH_PARALLEL (1,8), BENCH_PROMPT (64),
// BENCH_NEW (32), BENCH_REPEAT (3), BENCH_THREADS (CPU provider threads), BENCH_DIMS (JSON shape overrides),
// BENCH_QUANT (int8|int4), BENCH_BLOCK (quantization block size; int4 at 32 lets the WebGPU provider
// fuse the MLP into MatMulNBitsMlp), BENCH_DTYPE (fp32|fp16). On webgpu the route is
// PARSCALE_WEBGPU_ROUTE's (node: onnxruntime-node, the default; capture: onnxruntime-web with the
// decode graph captured and replayed, where it loads), printed per P. An fp16 package runs the half
// form (float16 matrices, activations and cache) unless PARSCALE_GPU_FORM_HALF=0 (the widened
// float32 form) or the adapter lacks shader-f16; each P's line says which form ran.
import {spawnSync} from 'node:child_process'
import path from 'node:path'
import {fileURLToPath} from 'node:url'

import {describeGpuDispatches, gpuDispatches} from '../src/core/bench/gpu-dispatches.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import {syntheticShape} from '../src/core/checkpoint/synthetic.js'
import {adapterName, checkWebGpu, type Device} from '../src/core/engine/device.js'
import {GpuFormModel, gpuFormGraphFile} from '../src/core/engine/gpu-form.js'
import {openGpuFormRunner} from '../src/core/engine/webgpu-capture.js'
import {countDispatches} from '../src/core/bench/dispatches.js'
import type {WeightDtype} from '../src/core/onnx/weights.js'
import {readManifest} from '../src/core/package/manifest.js'
import {quantScheme, type QuantName} from '../src/core/quant/scheme.js'
import {weightBytesPerParameter} from '../src/core/bench/gpu-dispatches.js'

const device = (process.env.BENCH_DEVICE ?? 'webgpu') as Device
const preset = process.env.BENCH_SHAPE ?? '0.5b'
const shape = syntheticShape(preset, JSON.parse(process.env.BENCH_DIMS ?? '{}') as Record<string, number>) // BENCH_DIMS: overrides, for trying it small
const parallel = (process.env.BENCH_PARALLEL ?? '1,8').split(',').map(Number)
const promptLength = Number(process.env.BENCH_PROMPT ?? 64)
const newTokens = Number(process.env.BENCH_NEW ?? 32)
const repeat = Number(process.env.BENCH_REPEAT ?? 3)
const threads = process.env.BENCH_THREADS ? Number(process.env.BENCH_THREADS) : undefined
const log = (t: string) => process.stderr.write(`${t}\n`)
const quant = process.env.BENCH_QUANT as QuantName | undefined
const dtype = (process.env.BENCH_DTYPE ?? 'fp32') as WeightDtype
const weights = quant ?? dtype

interface Measured {
  parallel: number
  prefillMs: number
  decodeMs: number
  decodeP90Ms: number
  peakRssBytes: number
  inPlace: boolean
  route: string
  /** float32, half, or widened (an fp16 package's matrices as float32) with the reason */
  form: string
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!
const p90 = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * 0.9))]!

async function measure(packageDir: string, P: number): Promise<Measured> {
  const {runner: model, choice} = await openGpuFormRunner(packageDir, {
    parallel: P, capacity: 48 + promptLength + newTokens + 1, device,
    ...(threads ? {sessionOptions: {intraOpNumThreads: threads, interOpNumThreads: 1}} : {}),
  })
  const prompt = Array.from({length: promptLength}, (_, i) => (i * 7919 + 13) % shape.vocabSize)
  const prefill: number[] = []
  const decode: number[] = []
  for (let round = 0; round <= repeat; round++) {
    model.reset()
    let t = performance.now()
    let {logits} = await model.step(prompt)
    if (round > 0) prefill.push(performance.now() - t) // round 0 warms up
    for (let i = 0; i < newTokens; i++) {
      let best = 0
      for (let v = 1; v < logits.length; v++) if (logits[v]! > logits[best]!) best = v
      t = performance.now()
      ;({logits} = await model.step([best]))
      if (round > 0) decode.push(performance.now() - t)
    }
  }
  const inPlace = model.inPlace
  const form = !(model instanceof GpuFormModel) ? 'float32' : model.half ? 'half' : model.halfFallback ? `widened (${model.halfFallback})` : 'float32'
  await model.release()
  const route = choice.fallback ? `${choice.route} (no capture: ${choice.fallback})` : choice.route
  return {parallel: P, prefillMs: median(prefill), decodeMs: median(decode), decodeP90Ms: p90(decode), peakRssBytes: process.resourceUsage().maxRSS * 1024, inPlace, route, form}
}

if (process.env.BENCH_CHILD) {
  const [packageDir, P] = process.env.BENCH_CHILD.split('|')
  process.stdout.write(JSON.stringify(await measure(packageDir!, Number(P))) + '\n')
} else {
  if (device === 'webgpu') await checkWebGpu().catch((error: Error) => { log(`parscale: ${error.message}`); process.exit(1) })
  const packageDir = ensureSyntheticPackage(shape, {parallel, onProgress: log, ...(quant ? {quant: quantScheme(quant, process.env.BENCH_BLOCK ? Number(process.env.BENCH_BLOCK) : undefined)} : {}), dtype})
  const adapter = device === 'webgpu' ? adapterName() : 'cpu'
  console.log(`GPU form, synthetic ${preset}${process.env.BENCH_DIMS ? ` with ${process.env.BENCH_DIMS}` : ""} ${weights}, prompt ${promptLength}, ${newTokens} new tokens, ${repeat} rounds; device ${device} (${adapter})`)
  const results: Measured[] = []
  for (const P of parallel) {
    const child = spawnSync(process.execPath, [fileURLToPath(import.meta.url)], {env: {...process.env, BENCH_CHILD: `${packageDir}|${P}`}, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit']})
    const line = child.stdout.trim().split('\n').at(-1)
    if (child.status !== 0 || !line) { log(`P=${P}: the measuring process failed (${child.status})`); continue }
    const r = JSON.parse(line) as Measured
    results.push(r)
    console.log(`P=${P}: prefill ${r.prefillMs.toFixed(1)} ms, decode ${r.decodeMs.toFixed(2)} ms/token (p90 ${r.decodeP90Ms.toFixed(2)}), peak RSS ${(r.peakRssBytes / 1e9).toFixed(2)} GB, cache in place ${r.inPlace}, route ${r.route}, form ${r.form}`)
  }
  const p1 = results.find((r) => r.parallel === 1)
  const p8 = results.find((r) => r.parallel === 8)
  if (p1 && p8) console.log(`P8/P1 decode: ${(p8.decodeMs / p1.decodeMs).toFixed(2)}`)
  // the floor counts the bytes the device reads: an fp16 package's widened form reads float32
  const bytesPerWeight = results.some((r) => r.form.startsWith('widened')) ? 4 : weightBytesPerParameter(readManifest(packageDir))
  for (const line of describeGpuDispatches(await gpuDispatches(shape, parallel, adapter, bytesPerWeight))) console.log(line)
  if (device === 'webgpu') {
    // as the WebGPU provider itself optimizes the package's GPU form (its fusions included)
    for (const P of parallel) {
      const count = await countDispatches(path.join(packageDir, gpuFormGraphFile(P)), 'webgpu')
      console.log(`P=${P}: ${count.programs} kernels per decode step after the WebGPU provider's own fusions (${count.dispatches} nodes: ${JSON.stringify(count.byOp)})`)
    }
  }
}
