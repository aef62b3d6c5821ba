// Route 1 for WebGPU graph capture (issue 23): the GPU form on onnxruntime-web's WebGPU provider
// under Node, with Dawn's `webgpu` package as navigator.gpu. onnxruntime-node cannot turn
// capture on; onnxruntime-web reads `enableGraphCapture` and binds GPU tensors made in JS.
// Not a dependency of parscale: install both beside it, e.g.
//   mkdir /tmp/ortweb && cd /tmp/ortweb && npm init -y && npm i webgpu@0.6.2 onnxruntime-web@1.30.0
//   NODE_PATH=/tmp/ortweb/node_modules node bench/gpu-machine/ortweb-capture.mjs PACKAGE_DIR P [capture]
// PACKAGE_DIR: a converted fp32 package in which `model.gpu-pP.onnx` (and for `capture`,
// `model.gpu-pP.decode.onnx`: writeGpuFormGraph(dir, P, true)) exist. Prints the provider's
// logits against onnxruntime-node's CPU provider on the same feeds (a synthetic cache).
// Findings (lavapipe, 2026-12-05) are in docs/benchmarks.md, "Graph capture: routes".
import {createRequire} from 'node:module'
import fs from 'node:fs'
import path from 'node:path'

const fromNodePath = createRequire(path.join(process.env.NODE_PATH ?? '.', 'x.js'))
const {create, globals} = fromNodePath('webgpu')
Object.assign(globalThis, globals)
globalThis.navigator = {gpu: create([])}
// dawn.node refuses views of shared memory (the wasm heap) in writeBuffer: copy them
const writeBuffer = GPUQueue.prototype.writeBuffer
GPUQueue.prototype.writeBuffer = function (buffer, offset, data, dataOffset = 0, size) {
  if (ArrayBuffer.isView(data) && data.buffer instanceof SharedArrayBuffer) {
    const per = data.BYTES_PER_ELEMENT ?? 1
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
    const start = dataOffset * per
    return writeBuffer.call(this, buffer, offset, bytes.slice(start, size === undefined ? undefined : start + size * per))
  }
  return writeBuffer.call(this, buffer, offset, data, dataOffset, size)
}
const ortNode = createRequire(path.resolve('package.json'))('onnxruntime-node')
const ortWebModule = await import(fromNodePath.resolve('onnxruntime-web/webgpu'))
const ortWeb = ortWebModule.env ? ortWebModule : ortWebModule.default

const [pkg, P, capture] = [process.argv[2], Number(process.argv[3] ?? 8), process.argv[4] === 'capture']
const model = JSON.parse(fs.readFileSync(path.join(pkg, 'parscale.json'), 'utf8')).model
// CAPACITY/FILLED: cache slots and filled slots at the first step (prompt 64 after 48 prefix rows: 145/112)
const [layers, kv, d, capacity, filled] = [model.numLayers, model.numKvHeads, model.headDim, Number(process.env.CAPACITY ?? 64), Number(process.env.FILLED ?? 48)]
const graph = path.join(pkg, `model.gpu-p${P}${capture ? '.decode' : ''}.onnx`)
const feedsOf = (ort, step) => {
  const feeds = {
    input_ids: new ort.Tensor('int64', BigInt64Array.of(BigInt(5 + step)), [1, 1]),
    seqlens_k: new ort.Tensor('int32', Int32Array.of(filled + step), [1]),
    total_sequence_length: new ort.Tensor('int32', Int32Array.of(filled + step + 1), []),
  }
  if (!capture) feeds.num_logits_to_keep = new ort.Tensor('int64', BigInt64Array.of(1n), [])
  for (let l = 0; l < layers; l++) for (const kind of ['key', 'value']) {
    const cache = new Float32Array(P * kv * capacity * d).map((_, i) => Math.sin(i * 0.37 + l) * 0.5)
    feeds[`past_key_values.${l}.${kind}`] = new ort.Tensor('float32', cache, [1, P * kv, capacity, d])
  }
  return feeds
}
const maxDiff = (a, b) => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i])), 0)
const reference = (await (await ortNode.InferenceSession.create(graph)).run(feedsOf(ortNode, 0))).logits.data
// only the weight files this graph names (a package also holds the CPU graph's)
const graphText = fs.readFileSync(graph).toString('latin1')
// read in chunks: fs.readFileSync refuses files over 2 GiB (a 0.5b package's backbone.weights is 2.5 GB)
const readWhole = (file) => {
  const fd = fs.openSync(file, 'r')
  const data = new Uint8Array(fs.fstatSync(fd).size)
  for (let at = 0; at < data.length;) at += fs.readSync(fd, data, at, Math.min(1 << 30, data.length - at), at)
  fs.closeSync(fd)
  return data
}
const externalData = fs.readdirSync(pkg).filter((f) => f.endsWith('.weights') && graphText.includes(f)).map((f) => ({path: f, data: readWhole(path.join(pkg, f))}))
ortWeb.env.wasm.numThreads = 1
// onnxruntime-web 1.30 releases a GPU buffer's registration when a run ends, but a captured
// session keeps the buffers it bound at its first run: the replay then fails ("Buffer is not
// registered", or a bind group over a released buffer). Load its wasm glue with that release
// taken out (one exact match, or refuse).
if (capture) {
  const glue = path.join(path.dirname(fromNodePath.resolve('onnxruntime-web/webgpu')), 'ort-wasm-simd-threaded.asyncify.mjs')
  const release = 'l[1]--;0===l[1]&&(re(l[0]),delete h[k])'
  const source = fs.readFileSync(glue, 'utf8')
  if (source.split(release).length !== 2) throw new Error(`${glue}: the registration release to take out is not there once`)
  const patched = path.join(fs.mkdtempSync('/tmp/ortweb-glue-'), path.basename(glue))
  fs.writeFileSync(patched, source.replace(release, 'l[1]--'))
  const {pathToFileURL} = await import('node:url')
  ortWeb.env.wasm.wasmPaths = {mjs: pathToFileURL(patched).href, wasm: pathToFileURL(glue.replace(/\.mjs$/, '.wasm')).href}
}
const options = {executionProviders: ['webgpu'], externalData, graphOptimizationLevel: 'all'}
const plain = await ortWeb.InferenceSession.create(new Uint8Array(fs.readFileSync(graph)), options)
console.log('onnxruntime-web WebGPU vs onnxruntime-node CPU: max |logit diff|', maxDiff((await plain.run(feedsOf(ortWeb, 0))).logits.data, reference).toExponential(2))
if (capture) {
  const device = ortWeb.env.webgpu.device
  const gpuTensor = (type, data, dims) => {
    const size = Math.max(16, Math.ceil(data.byteLength / 16) * 16)
    const buffer = device.createBuffer({size, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST})
    if (data.byteLength) device.queue.writeBuffer(buffer, 0, new Uint8Array(data.buffer, data.byteOffset, data.byteLength))
    const download = async () => {
      const staging = device.createBuffer({size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST})
      const encoder = device.createCommandEncoder()
      encoder.copyBufferToBuffer(buffer, 0, staging, 0, size)
      device.queue.submit([encoder.finish()])
      await staging.mapAsync(GPUMapMode.READ)
      const copy = new Float32Array(staging.getMappedRange().slice(0, data.byteLength))
      staging.unmap()
      return copy
    }
    return ortWeb.Tensor.fromGpuBuffer(buffer, {dataType: type, dims, download})
  }
  const readBack = async (buffer, count) => {
    const staging = device.createBuffer({size: count * 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST})
    const encoder = device.createCommandEncoder()
    encoder.copyBufferToBuffer(buffer, 0, staging, 0, count * 4)
    device.queue.submit([encoder.finish()])
    await staging.mapAsync(GPUMapMode.READ)
    const copy = new Float32Array(staging.getMappedRange().slice(0))
    staging.unmap()
    staging.destroy()
    return copy
  }
  const feeds = Object.fromEntries(Object.entries(feedsOf(ortWeb, 0)).map(([name, t]) => [name, gpuTensor(t.type, t.data, t.dims)]))
  const session = await ortWeb.InferenceSession.create(new Uint8Array(fs.readFileSync(graph)), {...options, enableGraphCapture: true, preferredOutputLocation: 'gpu-buffer'})
  // present.* must be past_key_values.*'s buffer (GroupQueryAttention refuses capture otherwise)
  const fetches = {}
  for (const name of session.outputNames) {
    const past = feeds[name.replace('present.', 'past_key_values.')]
    fetches[name] = name.startsWith('present.')
      ? ortWeb.Tensor.fromGpuBuffer(past.gpuBuffer, {dataType: 'float32', dims: past.dims})
      : gpuTensor('float32', new Float32Array(name === 'logits' ? model.vocabSize : P), name === 'logits' ? [1, model.vocabSize] : [1, P])
  }
  // decode 6 tokens: each step writes the token and lengths into the bound buffers and replays;
  // the CPU provider steps the same graph with its own cache (present fed back as past)
  const cpuSession = await ortNode.InferenceSession.create(graph)
  let cpuFeeds = feedsOf(ortNode, 0)
  let worst = 0
  for (let step = 0; step < 6; step++) {
    const stepFeeds = feedsOf(ortNode, step)
    for (const name of ['input_ids', 'seqlens_k', 'total_sequence_length']) {
      cpuFeeds[name] = stepFeeds[name]
      device.queue.writeBuffer(feeds[name].gpuBuffer, 0, new Uint8Array(stepFeeds[name].data.buffer))
    }
    const started = performance.now()
    await session.run(feeds, fetches)
    // read the buffer ourselves: Tensor.getData() would turn the fetch into a CPU tensor
    const logits = await readBack(fetches.logits.gpuBuffer, model.vocabSize)
    const ms = performance.now() - started
    const cpuOut = await cpuSession.run(cpuFeeds)
    for (let l = 0; l < layers; l++) for (const kind of ['key', 'value']) cpuFeeds[`past_key_values.${l}.${kind}`] = cpuOut[`present.${l}.${kind}`]
    const diff = maxDiff(logits, cpuOut.logits.data)
    worst = Math.max(worst, diff)
    console.log(`capture step ${step}${step === 0 ? ' (records)' : ' (replays)'}: ${ms.toFixed(1)} ms, max |logit diff| vs CPU ${diff.toExponential(2)}`)
  }
  console.log(`graph capture: 6 decode steps, worst |logit diff| ${worst.toExponential(2)}`)

  // timing (STEPS, default 64): replays against the same bound buffers run without capture, in
  // alternating rounds; each step writes its inputs, runs, and reads the logits back
  const timed = Number(process.env.STEPS ?? 64)
  if (timed > 0) {
    const plainBound = await ortWeb.InferenceSession.create(new Uint8Array(fs.readFileSync(graph)), {...options, preferredOutputLocation: 'gpu-buffer'})
    const stepTimes = async (s, from) => {
      const times = []
      for (let step = from; step < from + timed; step++) {
        const stepFeeds = feedsOf(ortNode, step % (capacity - filled - 1))
        const started = performance.now()
        for (const name of ['input_ids', 'seqlens_k', 'total_sequence_length']) device.queue.writeBuffer(feeds[name].gpuBuffer, 0, new Uint8Array(stepFeeds[name].data.buffer))
        await s.run(feeds, fetches)
        await readBack(fetches.logits.gpuBuffer, model.vocabSize)
        times.push(performance.now() - started)
      }
      return times.sort((a, b) => a - b)[times.length >> 1]
    }
    const rounds = []
    for (let round = 0; round < 3; round++) rounds.push({capture: await stepTimes(session, 0), plain: await stepTimes(plainBound, 0)})
    const median = (xs) => xs.sort((a, b) => a - b)[xs.length >> 1]
    const [withCapture, without] = [median(rounds.map((r) => r.capture)), median(rounds.map((r) => r.plain))]
    console.log(JSON.stringify({adapter: (await navigator.gpu.requestAdapter())?.info?.description, package: path.basename(pkg), parallel: P, capacity, filled, steps_per_round: timed, rounds: rounds.length,
      ms_per_token_capture: +withCapture.toFixed(3), ms_per_token_no_capture: +without.toFixed(3), speedup: +(without / withCapture).toFixed(2)}))
  }
}
