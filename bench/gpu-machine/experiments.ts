// Measurements for the GPU machine that the CLI does not make (bundled by pack.sh):
//   golden ROOT OUT.json        WebGPU vs CPU logits and batcher answers on fixtures/golden/*
//   decode PKG FORM P…          decode ms/token of one graph form (provider settings from the environment)
//   profile PKG OUT.json P      ONNX Runtime's profile of decode steps, summarized per provider and op
//   gpuform-golden ROOT OUT.json  the GPU form (issue 23) on WebGPU vs the PyTorch reference and the CPU graph
//   gpuform-profile PKG OUT.json P  the profile of the GPU form's decode steps, summarized as `profile` does
//   gpuform-eval ROOT OUT.json  held-out NLL of the default model through the GPU form: fp32, int8, int4 at P = 1 and 8
//   gpuform-eval-fp16 ROOT OUT.json  the same for an fp16 package of it: fp32, fp16 in the half form, fp16 widened
//   probe                       the WebGPU adapter (exit 1 without one)
//   gpuform-graphs PKG P…       writes the GPU form's graphs (dynamic and decode-only) for each P (for ortweb-capture.mjs)
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'


import {buildWebGpuDecoderGraph, type WebGpuGraphOptions} from '../../src/core/onnx/webgpu-graph.js'
import {convertCheckpoints} from '../../src/core/package/convert.js'
import {readManifest} from '../../src/core/package/manifest.js'
import {generateAll} from '../../src/core/generation/batcher.js'
import {ParScaleModel, type ModelOptions} from '../../src/core/engine/model.js'
import {GpuFormModel, packageFloatWeights, writeGpuFormGraph} from '../../src/core/engine/gpu-form.js'
import {adapterName, checkWebGpu} from '../../src/core/engine/device.js'
import {resolveModel} from '../../src/core/package/resolve.js'
import {quantScheme} from '../../src/core/quant/scheme.js'
import {negativeLogLikelihood} from '../../src/core/run/evaluate.js'
import {TextTokenizer} from '../../src/core/generation/tokenizer.js'

const [command, ...args] = process.argv.slice(2)
const write = (file: string, value: unknown) => fs.writeFileSync(file, JSON.stringify(value, null, 1) + '\n')
/** EXP_ON_CPU=1 runs the WebGPU form on the CPU provider (checking this script anywhere). */
const gpu: ModelOptions = process.env.EXP_ON_CPU ? {form: 'webgpu'} : {device: 'webgpu'}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

function maxDiff(a: Float32Array, b: Float32Array): number {
  let max = 0
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]))
  return max
}

async function logitsOf(dir: string, options: ModelOptions, ids: number[]) {
  const model = await ParScaleModel.open(dir, options)
  const P = Math.max(...model.parallelValues)
  const cache = model.newCache(P)
  cache.reserve(1, ids.length)
  cache.reset(0)
  const whole = await model.forward(cache, 0, [ids], 0)
  cache.dispose?.()
  const steps = model.newCache(P)
  steps.reserve(1, ids.length)
  steps.reset(0)
  const vocab = whole.dims[2]
  const incremental = new Float32Array(whole.logits.length)
  incremental.set((await model.forward(steps, 0, [ids.slice(0, 3)], 0)).logits)
  for (let t = 3; t < ids.length; t++) incremental.set((await model.forward(steps, 0, [[ids[t]]], 1)).logits, t * vocab)
  steps.dispose?.()
  await model.release()
  return {whole: whole.logits, incremental}
}

async function batched(dir: string, options: ModelOptions, ids: number[]) {
  const model = await ParScaleModel.open(dir, {...options, maxPrefillChunk: 4})
  const requests = [3, 9, 5, ids.length, 2, 7].map((n, i) => ({
    promptIds: ids.slice(0, n), maxNewTokens: 3 + (i % 3) * 4, sampling: {temperature: 0}, parallel: model.parallelValues[i % model.parallelValues.length],
  }))
  const results = await generateAll(model, requests, 3, {eosTokenIds: [], decode: () => ''})
  await model.release()
  return results.map((r) => r.tokenIds)
}

/** The three golden checkpoints, each converted (fp32) into a fresh folder, with their reference logits. */
async function* convertedGoldens(root: string, prefix: string) {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), prefix))
  for (const name of ['tiny-p1', 'tiny-p4', 'tiny-p2-tied']) {
    const source = path.join(root, 'fixtures/golden', name)
    const dir = path.join(work, name)
    convertCheckpoints({sources: [source], outDir: dir, dtype: 'fp32'})
    const {prompt_ids: ids, values} = (JSON.parse(fs.readFileSync(path.join(source, 'golden.json'), 'utf8')) as {logits: {prompt_ids: number[]; values: number[][]}}).logits
    yield {name, dir, ids, values}
  }
}

async function golden(root: string, out: string): Promise<void> {
  const rows = []
  for await (const {name, dir, ids, values} of convertedGoldens(root, 'golden-')) {
    const cpu = await logitsOf(dir, {}, ids)
    const onGpu = await logitsOf(dir, gpu, ids)
    const vocab = values[0].length
    let reference = 0
    values.forEach((row, i) => row.forEach((v, j) => (reference = Math.max(reference, Math.abs(v - onGpu.whole[i * vocab + j])))))
    const answersCpu = await batched(dir, {}, ids)
    const answersGpu = await batched(dir, gpu, ids)
    const row = {
      name, whole_vs_cpu: maxDiff(cpu.whole, onGpu.whole), incremental_vs_cpu: maxDiff(cpu.whole, onGpu.incremental),
      gpu_vs_pytorch: reference, batcher_same_answers: JSON.stringify(answersCpu) === JSON.stringify(answersGpu),
    }
    console.log(JSON.stringify(row))
    rows.push(row)
  }
  write(out, rows)
}

async function decodeMs(dir: string, options: ModelOptions, parallel: number[], steps = 32) {
  const t0 = performance.now()
  const model = await ParScaleModel.open(dir, {...gpu, ...options})
  const result: Record<string, unknown> = {load_ms: Math.round(performance.now() - t0)}
  for (const P of parallel) {
    const prompt = Array.from({length: 64}, (_, i) => (i * 7919 + 13) % 150000)
    const runs: number[] = []
    let prefillMs = 0
    for (let rep = 0; rep < 2; rep++) {
      const cache = model.newCache(P)
      cache.reserve(1, 64 + steps + 4)
      cache.reset(0)
      const p0 = performance.now()
      await model.forward(cache, 0, [prompt], 1)
      prefillMs = performance.now() - p0
      for (let s = 0; s < (rep === 0 ? 3 : steps); s++) {
        const s0 = performance.now()
        await model.forward(cache, 0, [[(s * 31 + 7) % 150000]], 1)
        if (rep > 0) runs.push(performance.now() - s0)
      }
      cache.dispose?.()
    }
    result[`P${P}`] = {decode_ms: +median(runs).toFixed(2), min_ms: +Math.min(...runs).toFixed(2), prefill_ms: +prefillMs.toFixed(1)}
  }
  await model.release()
  return result
}

/**
 * Decode ms/token of one graph form (written next to the package's graphs from its weight
 * table) under the provider settings of PARSCALE_WEBGPU_OPTIONS; one process per setting, as
 * the WebGPU context takes its settings from the first session of a process.
 */
async function decode(dir: string, form: string, parallel: number[]): Promise<void> {
  const forms: Record<string, WebGpuGraphOptions> = {
    default: {}, gemm: {linear: 'gemm', fuse: false}, unfused: {fuse: false},
    nosplit: {splitK: 0}, t1536: {splitK: 1536}, t3072: {splitK: 3072}, t768: {splitK: 768}, mlp: {splitOn: 'mlp'}, down: {splitOn: 'down'},
  }
  const file = `model.webgpu.${form}.onnx`
  fs.writeFileSync(path.join(dir, file), buildWebGpuDecoderGraph(readManifest(dir).model, packageFloatWeights(dir, readManifest(dir)), forms[form]).toModelBytes('variant'))
  let row: Record<string, unknown>
  try {
    row = {form, settings: process.env.PARSCALE_WEBGPU_OPTIONS ?? 'parscale defaults', ...(await decodeMs(dir, {graphFile: file}, parallel))}
  } catch (error) {
    row = {form, settings: process.env.PARSCALE_WEBGPU_OPTIONS ?? 'parscale defaults', error: String(error).slice(0, 500)}
  }
  console.log(JSON.stringify(row))
}

/** Every stage of the GPU form's first positions: whole prompt, then token by token, on WebGPU and the CPU graph. */
async function gpuFormGolden(root: string, out: string): Promise<void> {
  const rows = []
  for await (const {name, dir, ids, values} of convertedGoldens(root, 'gpuform-golden-')) {
    const P = Math.max(...readManifest(dir).parallel)
    const cpu = await logitsOf(dir, {}, ids)
    const vocab = values[0].length
    const model = await GpuFormModel.open(dir, {parallel: P, capacity: 128, device: process.env.EXP_ON_CPU ? 'cpu' : 'webgpu'})
    let reference = 0
    let vsCpu = 0
    let at = 0
    for (const n of [5, ...Array.from({length: ids.length - 5}, () => 1)]) {
      const {logits} = await model.step(ids.slice(at, at + n))
      at += n
      for (let j = 0; j < vocab; j++) {
        reference = Math.max(reference, Math.abs(logits[j] - values[at - 1][j]))
        vsCpu = Math.max(vsCpu, Math.abs(logits[j] - cpu.whole[(at - 1) * vocab + j]))
      }
    }
    const row = {name, parallel: P, gpu_form_vs_pytorch: reference, gpu_form_vs_cpu_graph: vsCpu, cache_in_place: model.inPlace}
    await model.release()
    console.log(JSON.stringify(row))
    rows.push(row)
  }
  write(out, rows)
}

/** Mean NLL of the held-out text (first 8 tokens a prompt, then one a step) through the GPU form. */
/** Mean NLL of `ids` (after the first 8) through the GPU form of a package, one token a step. */
async function gpuFormNll(dir: string, parallel: number, ids: number[], half?: boolean): Promise<{nll: number; half: boolean}> {
  // the capacity counts the prefix rows (48 at P > 1) and may not exceed them + the 512 positions
  const model = await GpuFormModel.open(dir, {parallel, capacity: (parallel > 1 ? 64 : 0) + ids.length, device: process.env.EXP_ON_CPU ? 'cpu' : 'webgpu', ...(half === undefined ? {} : {half})})
  let total = 0
  let {logits} = await model.step(ids.slice(0, 8))
  for (let t = 8; t < ids.length; t++) {
    total += negativeLogLikelihood(logits, 0, logits.length, ids[t])
    if (t + 1 < ids.length) ({logits} = await model.step([ids[t]]))
  }
  await model.release()
  return {nll: total / (ids.length - 8), half: model.half}
}

async function gpuFormEval(root: string, out: string): Promise<void> {
  const tokenizer = await TextTokenizer.load(path.join(root, 'fixtures/default-model'))
  const ids = tokenizer.encode(fs.readFileSync(path.join(root, 'fixtures/default-model/heldout.py'), 'utf8'))
  const rows = []
  for (const parallel of [1, 8]) {
    const row: Record<string, number> = {parallel}
    // int4 at its default block and at 32 (the block the WebGPU provider fuses into MatMulNBitsMlp)
    for (const [name, quant, block] of [['fp32'], ['int8', 'int8'], ['int4', 'int4'], ['int4-b32', 'int4', 32]] as const) {
      const dir = resolveModel(undefined, {parallel, ...(quant ? {quant: quantScheme(quant, block)} : {})}).packageDir
      row[name] = (await gpuFormNll(dir, parallel, ids)).nll
    }
    console.log(JSON.stringify(row))
    rows.push(row)
  }
  write(out, rows)
}

/** Held-out NLL through the GPU form of the default model: fp32, and an fp16 package in the half form and widened. */
async function gpuFormEvalFp16(root: string, out: string): Promise<void> {
  const tokenizer = await TextTokenizer.load(path.join(root, 'fixtures/default-model'))
  const ids = tokenizer.encode(fs.readFileSync(path.join(root, 'fixtures/default-model/heldout.py'), 'utf8'))
  const fp16 = path.join(os.tmpdir(), 'parscale-default-fp16')
  if (!fs.existsSync(path.join(fp16, 'parscale.json'))) {
    convertCheckpoints({sources: [1, 8].map((p) => path.join(root, `fixtures/default-model/p${p}`)), outDir: fp16, dtype: 'fp16'})
  }
  const rows = []
  for (const parallel of [1, 8]) {
    const half = await gpuFormNll(fp16, parallel, ids, true)
    const row = {parallel, fp32: (await gpuFormNll(resolveModel(undefined, {parallel}).packageDir, parallel, ids)).nll, fp16Half: half.nll, halfRan: half.half, fp16Widened: (await gpuFormNll(fp16, parallel, ids, false)).nll}
    console.log(JSON.stringify(row))
    rows.push(row)
  }
  write(out, rows)
}

async function profile(dir: string, out: string, P: number, form?: string): Promise<void> {
  const prefix = path.join(os.tmpdir(), 'wgprof')
  const prompt = Array.from({length: 64}, (_, i) => i + 5)
  if (form === 'gpuform') {
    const model = await GpuFormModel.open(dir, {parallel: P, capacity: 48 + 64 + 8, device: process.env.EXP_ON_CPU ? 'cpu' : 'webgpu', profilePrefix: prefix})
    await model.step(prompt)
    for (let s = 0; s < 4; s++) await model.step([s + 9])
    await model.release()
  } else {
    const model = await ParScaleModel.open(dir, {...gpu, profilePrefix: prefix, ...(form ? {graphFile: `model.webgpu.${form}.onnx`} : {})})
    const cache = model.newCache(P)
    cache.reserve(1, 80)
    cache.reset(0)
    await model.forward(cache, 0, [prompt], 1)
    for (let s = 0; s < 4; s++) await model.forward(cache, 0, [[s + 9]], 1)
    await model.release()
  }
  const file = fs.readdirSync(os.tmpdir()).filter((f) => f.startsWith('wgprof')).map((f) => path.join(os.tmpdir(), f)).sort().at(-1)!
  const events = JSON.parse(fs.readFileSync(file, 'utf8')) as {cat: string; name: string; dur: number; ts: number; args?: {provider?: string; op_name?: string}}[]
  const runs = events.filter((e) => e.cat === 'Session' && e.name === 'model_run')
  const last = runs.at(-1)!
  const inLast = events.filter((e) => e.cat === 'Node' && e.ts >= last.ts && e.ts <= last.ts + last.dur && e.name.endsWith('_kernel_time'))
  const byProvider: Record<string, number> = {}
  const byOp: Record<string, {count: number; us: number; provider: string}> = {}
  for (const e of inLast) {
    const provider = e.args?.provider ?? '?'
    byProvider[provider] = (byProvider[provider] ?? 0) + 1
    const key = `${e.args?.op_name ?? '?'}@${provider}`
    byOp[key] ??= {count: 0, us: 0, provider}
    byOp[key].count++
    byOp[key].us += e.dur
  }
  // Events other than the CPU-side node times (the WebGPU provider's GPU timestamps, if any)
  const categories: Record<string, number> = {}
  for (const e of events) categories[e.cat] = (categories[e.cat] ?? 0) + 1
  const gpuEvents = events.filter((e) => e.cat !== 'Node' && e.cat !== 'Session' && e.ts >= last.ts)
  const gpuByName: Record<string, {count: number; us: number}> = {}
  for (const e of gpuEvents) {
    const key = e.name.replace(/_\d+$/, '').slice(0, 60)
    gpuByName[key] ??= {count: 0, us: 0}
    gpuByName[key].count++
    gpuByName[key].us += e.dur
  }
  const cpuNodes = [...new Set(inLast.filter((e) => !(e.args?.provider ?? '').includes('WebGpu')).map((e) => e.name.replace(/_kernel_time$/, '')))].slice(0, 30)
  write(out, {
    parallel: P, model_run_us: runs.slice(-4).map((r) => r.dur), kernels: inLast.length, byProvider, categories,
    gpu_events_us: gpuEvents.reduce((a, e) => a + e.dur, 0), gpuByName: Object.entries(gpuByName).sort((a, b) => b[1].us - a[1].us).slice(0, 40),
    sample_gpu_events: gpuEvents.slice(0, 5), byOp: Object.entries(byOp).sort((a, b) => b[1].us - a[1].us), cpuNodes,
  })
  fs.rmSync(file)
}

if (command === 'golden') await golden(args[0], args[1])
else if (command === 'decode') await decode(args[0], args[1], args.slice(2).map(Number))
else if (command === 'profile') await profile(args[0], args[1], Number(args[2]), args[3])
else if (command === 'gpuform-golden') await gpuFormGolden(args[0], args[1])
else if (command === 'gpuform-eval') await gpuFormEval(args[0], args[1])
else if (command === 'gpuform-eval-fp16') await gpuFormEvalFp16(args[0], args[1])
else if (command === 'probe') {
  const adapter = await checkWebGpu().catch((error: Error) => {
    console.log(JSON.stringify({adapter: null, error: error.message}))
    process.exit(1)
  })
  console.log(JSON.stringify({adapter: adapterName(), backend: adapter.backend}))
} else if (command === 'gpuform-graphs') {
  for (const P of args.slice(1).map(Number)) for (const decodeOnly of [false, true]) console.log(writeGpuFormGraph(args[0], P, decodeOnly))
} else if (command === 'gpuform-profile') await profile(args[0], args[1], Number(args[2]), 'gpuform')
else throw new Error(`unknown command ${command}`)
