/**
 * The GPU form on WebGPU with graph capture (issue 23): ONNX Runtime Web's WebGPU provider under
 * Node, with Dawn's `webgpu` package as `navigator.gpu`. onnxruntime-node cannot turn capture on
 * (docs/benchmarks.md, "Graph capture routes"); onnxruntime-web reads `enableGraphCapture` and
 * binds GPU buffers made here.
 *
 * One sequence (batch 1) at one P, a fixed capacity:
 * - one GPU buffer per layer and kind holds the cache, [1, P·kv, capacity, d], the prefixes in its
 *   first slots; it is both `past_key_values.*` and `present.*` of every call (GroupQueryAttention
 *   writes in place; capture needs it so);
 * - prompts (several tokens a call) go through the dynamic GPU form (`model.gpu-pP.onnx`), not
 *   captured, the cache bound as above, logits read back by the binding;
 * - one token a call goes through the decode-only form (`model.gpu-pP.decode.onnx`: static
 *   shapes, every node on the GPU), captured at its first run and replayed after: the token and
 *   lengths are written into bound GPU buffers, and only the logits (and P stream weights) are
 *   copied back.
 *
 * The two packages are not dependencies of parscale (270 MB installed, for an opt-in route): they
 * are looked for under `PARSCALE_ORTWEB` (a node_modules folder) alone when it is set, else
 * beside parscale, in the working directory and in NODE_PATH,
 * and imported at run time only (a bundle of parscale does not hold them). Opt-in
 * (PARSCALE_WEBGPU_ROUTE=capture; see requestedWebGpuRoute for why): where they or an adapter
 * are missing, the onnxruntime-node GPU form runs and says why.
 *
 * Two workarounds, both checked at load (docs/benchmarks.md):
 * - Dawn's `queue.writeBuffer` refuses views of shared memory (the wasm heap): such views are
 *   copied first.
 * - onnxruntime-web 1.30 releases a GPU buffer's registration when a run ends, but a captured
 *   session keeps the buffers it bound at its first run, so a replay would fail ("Buffer is not
 *   registered"). Its wasm glue is loaded from a copy with that release taken out (one exact
 *   string, else the route is refused). The buffers bound here are made once per model, so the
 *   registrations kept are few.
 */
import {createHash} from 'node:crypto'
import {closeSync, existsSync, fstatSync, mkdirSync, openSync, readFileSync, readSync, renameSync, writeFileSync} from 'node:fs'
import {createRequire} from 'node:module'
import {tmpdir} from 'node:os'
import {dirname, join} from 'node:path'
import {pathToFileURL} from 'node:url'

import onnxProto from 'onnx-proto'

import type {BackboneShape} from '../checkpoint/config.js'
import {UserError} from '../errors.js'
import {gpuFormIo} from '../onnx/gpu-form-graph.js'
import {readManifest, selectVariant} from '../package/manifest.js'
import type {SequenceCache} from './decoder.js'
import {checkWebGpu} from './device.js'
import {GPU_FORM_CALL_TOKENS, GpuFormModel, placePrefix, prefixCache, writeGpuFormGraph, type GpuFormOptions} from './gpu-form.js'
import {FixedCapacitySlots} from './gpu-form-cache.js'
import {openWgslDevice, runtimeSearchRoots} from '../wgsl/dawn.js'

const {onnx} = onnxProto

// ---- the few parts of WebGPU and onnxruntime-web used here ----------------------------------

interface GpuBuffer {
  readonly size: number
  destroy(): void
  mapAsync(mode: number): Promise<void>
  getMappedRange(): ArrayBuffer
  unmap(): void
}
interface GpuCommandEncoder {
  copyBufferToBuffer(source: GpuBuffer, sourceOffset: number, destination: GpuBuffer, destinationOffset: number, size: number): void
  finish(): unknown
}
interface GpuQueue {
  writeBuffer(buffer: GpuBuffer, offset: number, data: ArrayBufferView | ArrayBuffer, dataOffset?: number, size?: number): void
  submit(commands: unknown[]): void
}
interface GpuDevice {
  readonly queue: GpuQueue
  createBuffer(descriptor: {size: number; usage: number}): GpuBuffer
  createCommandEncoder(): GpuCommandEncoder
}
interface GpuAdapter {
  readonly info?: {vendor?: string; architecture?: string; device?: string; description?: string}
}
interface Gpu {
  requestAdapter(options?: {powerPreference?: string}): Promise<GpuAdapter | null>
}
interface DawnModule {
  create(flags: string[]): Gpu
  globals: Record<string, unknown>
}
interface QueuePrototype {
  writeBuffer: GpuQueue['writeBuffer']
}

type WebTensorType = 'float32' | 'int32' | 'int64'
interface WebTensor {
  readonly dims: readonly number[]
  readonly location: string
  readonly data: unknown
  dispose(): void
}
interface WebSession {
  readonly inputNames: readonly string[]
  readonly outputNames: readonly string[]
  run(feeds: Record<string, WebTensor>, fetches?: Record<string, WebTensor | null>): Promise<Record<string, WebTensor>>
  release(): Promise<void>
}
interface OrtWeb {
  env: {
    logLevel?: string
    wasm: {numThreads?: number; wasmPaths?: {mjs: string; wasm: string}}
    webgpu: {device?: GpuDevice; powerPreference?: string}
  }
  Tensor: {
    new (type: WebTensorType, data: Float32Array | Int32Array | BigInt64Array, dims: readonly number[]): WebTensor
    fromGpuBuffer(buffer: GpuBuffer, options: {dataType: WebTensorType; dims: readonly number[]}): WebTensor
  }
  InferenceSession: {create(model: Uint8Array, options: Record<string, unknown>): Promise<WebSession>}
}

// GPUBufferUsage and GPUMapMode bits (the WebGPU specification's values)
const MAP_READ = 0x1
const COPY_SRC = 0x4
const COPY_DST = 0x8
const STORAGE = 0x80
const READ = 0x1

// ---- loading the route -----------------------------------------------------------------------

/** The one string of onnxruntime-web 1.30's wasm glue taken out: the release of a buffer's registration when a run ends. */
const REGISTRATION_RELEASE = 'l[1]--;0===l[1]&&(re(l[0]),delete h[k])'
const GLUE = 'ort-wasm-simd-threaded.asyncify.mjs'

export interface CaptureRuntime {
  ort: OrtWeb
  /** Where the two packages were found. */
  from: string
  adapter: string
}

/**
 * Which WebGPU route `--device webgpu` takes: `capture` (onnxruntime-web + Dawn, when both load),
 * `wgsl` (parscale's hand-written kernels on Dawn, src/core/wgsl/; float and quantized packages) or `node`
 * (onnxruntime-node, no capture).
 */
export type WebGpuRoute = 'capture' | 'node' | 'wgsl'

/**
 * `PARSCALE_WEBGPU_ROUTE`: `node` (the default), `capture` or `wgsl` (opt-in: where it loads, else
 * node with the reason). Capture is not the default: on an H100 (2026-12-06, 0.5b fp32, prompt 64)
 * it gained only 1.03–1.12× over the same bindings without it, and onnxruntime-web's decode was
 * slower than onnxruntime-node's GPU form (P = 1 18.8 against 12.45 ms/token, P = 8 37.0 against
 * 13.95). `wgsl` needs Dawn's webgpu package, which is not a dependency (docs/benchmarks.md).
 */
export function requestedWebGpuRoute(): WebGpuRoute {
  const value = process.env.PARSCALE_WEBGPU_ROUTE ?? 'node'
  if (value !== 'capture' && value !== 'node' && value !== 'wgsl') throw new UserError(`PARSCALE_WEBGPU_ROUTE must be node, capture or wgsl, not "${value}"`)
  return value
}

/** The two packages' entry files from the first root that has both, or why none has. */
function resolvePackages(): {dawn: string; ort: string; root: string} | string {
  for (const root of runtimeSearchRoots(process.env.PARSCALE_ORTWEB)) {
    // a node_modules folder itself (PARSCALE_ORTWEB, NODE_PATH) or a folder whose node_modules holds them
    const from = createRequire(join(root, 'x.js'))
    try {
      return {dawn: from.resolve('webgpu'), ort: from.resolve('onnxruntime-web/webgpu'), root}
    } catch {
      // not here
    }
    try {
      const inside = createRequire(join(root, 'node_modules', 'x.js'))
      return {dawn: inside.resolve('webgpu'), ort: inside.resolve('onnxruntime-web/webgpu'), root}
    } catch {
      // not here either
    }
  }
  const where = process.env.PARSCALE_ORTWEB ? ` under PARSCALE_ORTWEB=${process.env.PARSCALE_ORTWEB}` : ' (npm i onnxruntime-web@1.30.0 webgpu@0.6.2 in a folder and set PARSCALE_ORTWEB to its node_modules)'
  return `onnxruntime-web and webgpu (Dawn) are not installed${where}`
}

let runtime: Promise<CaptureRuntime | string> | undefined

/** Loads onnxruntime-web on Dawn once per process: the runtime, or one line saying why it cannot. */
export function loadCaptureRuntime(): Promise<CaptureRuntime | string> {
  runtime ??= load().catch((error: unknown) => `the capture route did not load (${String((error as Error)?.message ?? error).split('\n')[0]})`)
  return runtime
}

async function load(): Promise<CaptureRuntime | string> {
  const found = resolvePackages()
  if (typeof found === 'string') return found
  const glue = join(dirname(found.ort), GLUE)
  if (!existsSync(glue)) return `onnxruntime-web at ${dirname(found.ort)} has no ${GLUE} (version 1.30 is needed)`
  const source = readFileSync(glue, 'utf8')
  if (source.split(REGISTRATION_RELEASE).length !== 2) return `onnxruntime-web at ${dirname(found.ort)} is not the 1.30 build whose buffer release can be taken out (graph capture would fail at its first replay)`
  const patched = patchedGlue(source.replace(REGISTRATION_RELEASE, 'l[1]--'))

  const dawn = (await import(pathToFileURL(found.dawn).href)) as DawnModule | {default: DawnModule}
  const {create, globals} = 'create' in dawn ? dawn : dawn.default
  const scope = globalThis as unknown as Record<string, unknown>
  for (const [name, value] of Object.entries(globals)) if (!(name in scope)) scope[name] = value
  const gpu = create([])
  if (!scope.navigator || !(scope.navigator as {gpu?: unknown}).gpu) Object.defineProperty(globalThis, 'navigator', {value: {...(scope.navigator as object | undefined), gpu}, configurable: true, writable: true})
  shimWriteBuffer(scope.GPUQueue as {prototype: QueuePrototype})
  const adapter = await gpu.requestAdapter({powerPreference: 'high-performance'})
  if (!adapter) return 'Dawn found no WebGPU adapter'
  const info = adapter.info ?? {}
  const loaded = (await import(pathToFileURL(found.ort).href)) as OrtWeb | {default: OrtWeb}
  const ort = 'env' in loaded ? loaded : loaded.default
  ort.env.wasm.numThreads = 1
  ort.env.wasm.wasmPaths = {mjs: pathToFileURL(patched).href, wasm: pathToFileURL(glue.replace(/\.mjs$/, '.wasm')).href}
  ort.env.webgpu.powerPreference = 'high-performance'
  ort.env.logLevel = 'error'
  return {ort, from: found.root, adapter: [info.vendor, info.architecture, info.description || info.device].filter(Boolean).join(' ') || 'unknown adapter'}
}

/** The patched glue, written once per content under the temporary folder (the .wasm stays where it is). */
function patchedGlue(text: string): string {
  const folder = join(tmpdir(), `parscale-ortweb-${createHash('sha256').update(text).digest('hex').slice(0, 16)}`)
  const path = join(folder, GLUE)
  if (!existsSync(path)) {
    mkdirSync(folder, {recursive: true})
    writeFileSync(`${path}.${process.pid}.tmp`, text)
    renameSync(`${path}.${process.pid}.tmp`, path)
  }
  return path
}

/** Dawn's writeBuffer refuses views of a SharedArrayBuffer (the wasm heap): hand it a copy. */
function shimWriteBuffer(queue: {prototype: QueuePrototype}): void {
  const proto = queue.prototype as QueuePrototype & {parscaleShim?: boolean}
  if (proto.parscaleShim) return
  const original = proto.writeBuffer
  proto.writeBuffer = function (this: GpuQueue, buffer, offset, data, dataOffset = 0, size) {
    if (ArrayBuffer.isView(data) && data.buffer instanceof SharedArrayBuffer) {
      const per = (data as unknown as {BYTES_PER_ELEMENT?: number}).BYTES_PER_ELEMENT ?? 1
      const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
      const start = dataOffset * per
      return original.call(this, buffer, offset, bytes.slice(start, size === undefined ? undefined : start + size * per))
    }
    return original.call(this, buffer, offset, data, dataOffset, size)
  }
  proto.parscaleShim = true
}

// ---- the model -------------------------------------------------------------------------------

/** What `run`, `bench` and the tests drive: one sequence on the GPU form (GpuFormModel's interface). */
export interface GpuFormRunner {
  readonly parallel: number
  readonly capacity: number
  readonly prefixTokens: number
  /** Tokens fed so far. */
  readonly length: number
  /** Whether the cache is written in place (past and present one buffer). */
  readonly inPlace: boolean
  /** `capture` (onnxruntime-web, decode replayed) or `node` (onnxruntime-node). */
  readonly route: WebGpuRoute | 'cpu'
  step(ids: number[]): Promise<{logits: Float32Array; streamWeights: Float32Array}>
  reset(): void
  release(): Promise<void>
}

/** External-data files a graph reads (so only those are read and handed to onnxruntime-web). */
function externalFiles(graph: Uint8Array): string[] {
  const files = new Set<string>()
  for (const t of onnx.ModelProto.decode(graph).graph?.initializer ?? []) {
    const location = t.externalData?.find((e) => e.key === 'location')?.value
    if (location) files.add(location)
  }
  return [...files]
}

/** A cache's GPU buffers, per layer [1, P·kv, capacity, d]. */
export interface CacheBuffers {
  keys: GpuBuffer[]
  values: GpuBuffer[]
  capacity: number
}

export class CapturedGpuFormModel implements GpuFormRunner {
  readonly route = 'capture' as const
  readonly inPlace = true
  /** Whose sequence the bound buffers hold (CaptureCache): it saves them before another is loaded. */
  holder: {evict(): void} | undefined
  private filled: number
  private readonly staging: GpuBuffer
  private recorded = false

  private constructor(
    private readonly ort: OrtWeb,
    private readonly device: GpuDevice,
    private readonly prefill: WebSession,
    private readonly decode: WebSession,
    readonly shape: BackboneShape,
    readonly parallel: number,
    readonly prefixTokens: number,
    readonly capacity: number,
    private readonly initial: {keys: Float32Array[]; values: Float32Array[]},
    /** Per layer, the key and value buffers (past and present of both sessions). */
    private readonly cache: {keys: GpuBuffer[]; values: GpuBuffer[]},
    /** The decode session's bound inputs and outputs. */
    private readonly bound: {ids: GpuBuffer; seqlens: GpuBuffer; total: GpuBuffer; logits: GpuBuffer; streamWeights: GpuBuffer; feeds: Record<string, WebTensor>; fetches: Record<string, WebTensor>},
    readonly adapter: string,
  ) {
    const readBytes = (shape.vocabSize + parallel) * 4
    this.staging = device.createBuffer({size: Math.ceil(readBytes / 16) * 16, usage: MAP_READ | COPY_DST})
    this.filled = prefixTokens
    this.reset()
  }

  /** Opens both sessions of one P on onnxruntime-web (capture route); throws when the route is not there. */
  static async open(packageDir: string, options: Pick<GpuFormOptions, 'parallel' | 'capacity'>, loaded?: CaptureRuntime): Promise<CapturedGpuFormModel> {
    const rt = loaded ?? (await loadCaptureRuntime())
    if (typeof rt === 'string') throw new UserError(rt)
    const {ort} = rt
    const manifest = readManifest(packageDir)
    const variant = selectVariant(manifest, options.parallel, packageDir)
    const P = options.parallel
    const shape = manifest.model
    const prefixTokens = P === 1 ? 0 : variant.prefixTokens
    checkCapacity(options.capacity, prefixTokens, shape.maxPositionEmbeddings)
    const prefillGraph = new Uint8Array(readFileSync(writeGpuFormGraph(packageDir, P)))
    const decodeGraph = new Uint8Array(readFileSync(writeGpuFormGraph(packageDir, P, true)))
    // the weights' files, read once and handed to both sessions
    const files = new Map<string, Uint8Array>()
    const externalData = (graph: Uint8Array) =>
      externalFiles(graph).map((file) => {
        let data = files.get(file)
        if (!data) files.set(file, (data = readWhole(join(packageDir, file))))
        return {path: file, data}
      })
    const {numLayers, numKvHeads: kv, headDim: d, vocabSize} = shape
    const presents = Array.from({length: numLayers}, (_, l) => [gpuFormIo.presentKey(l), gpuFormIo.presentValue(l)]).flat()
    const base = {executionProviders: [{name: 'webgpu'}], graphOptimizationLevel: 'all', logSeverityLevel: 3}
    // sessions are made one after the other (onnxruntime-web refuses two WebGPU sessions being created at once)
    const prefill = await ort.InferenceSession.create(prefillGraph, {...base, externalData: externalData(prefillGraph), preferredOutputLocation: Object.fromEntries(presents.map((n) => [n, 'gpu-buffer']))})
    const decode = await ort.InferenceSession.create(decodeGraph, {...base, externalData: externalData(decodeGraph), enableGraphCapture: true, preferredOutputLocation: 'gpu-buffer'}).catch(async (error: unknown) => {
      await prefill.release()
      throw error
    })
    files.clear()
    const device = ort.env.webgpu.device
    if (!device) throw new Error('onnxruntime-web made its sessions without a WebGPU device')
    const buffer = (bytes: number) => device.createBuffer({size: Math.max(16, Math.ceil(bytes / 16) * 16), usage: STORAGE | COPY_SRC | COPY_DST})
    const cacheDims = [1, P * kv, options.capacity, d]
    const cacheBytes = P * kv * options.capacity * d * 4
    const cache = {keys: Array.from({length: numLayers}, () => buffer(cacheBytes)), values: Array.from({length: numLayers}, () => buffer(cacheBytes))}
    const bound = {ids: buffer(8), seqlens: buffer(4), total: buffer(4), logits: buffer(vocabSize * 4), streamWeights: buffer(P * 4)}
    const gpu = (b: GpuBuffer, dataType: WebTensorType, dims: number[]) => ort.Tensor.fromGpuBuffer(b, {dataType, dims})
    const feeds: Record<string, WebTensor> = {
      [gpuFormIo.inputIds]: gpu(bound.ids, 'int64', [1, 1]),
      [gpuFormIo.seqlensK]: gpu(bound.seqlens, 'int32', [1]),
      [gpuFormIo.totalSequenceLength]: gpu(bound.total, 'int32', []),
    }
    const fetches: Record<string, WebTensor> = {
      [gpuFormIo.logits]: gpu(bound.logits, 'float32', [1, vocabSize]),
      [gpuFormIo.streamWeights]: gpu(bound.streamWeights, 'float32', [1, P]),
    }
    for (let l = 0; l < numLayers; l++) {
      feeds[gpuFormIo.pastKey(l)] = gpu(cache.keys[l]!, 'float32', cacheDims)
      feeds[gpuFormIo.pastValue(l)] = gpu(cache.values[l]!, 'float32', cacheDims)
      fetches[gpuFormIo.presentKey(l)] = gpu(cache.keys[l]!, 'float32', cacheDims)
      fetches[gpuFormIo.presentValue(l)] = gpu(cache.values[l]!, 'float32', cacheDims)
    }
    const prefix = prefixCache(packageDir, variant, shape)
    const place = (rows: Float32Array) => placePrefix(rows, P * kv, prefix.tokens, options.capacity, d)
    return new CapturedGpuFormModel(ort, device, prefill, decode, shape, P, prefixTokens, options.capacity, {keys: prefix.keys.map(place), values: prefix.values.map(place)}, cache, {...bound, feeds, fetches}, rt.adapter)
  }

  /** Back to the prefixes only: the same buffers rewritten (the captured graph keeps them). */
  reset(): void {
    for (let l = 0; l < this.shape.numLayers; l++) {
      this.device.queue.writeBuffer(this.cache.keys[l]!, 0, this.initial.keys[l]!)
      this.device.queue.writeBuffer(this.cache.values[l]!, 0, this.initial.values[l]!)
    }
    this.filled = this.prefixTokens
  }

  get length(): number {
    return this.filled - this.prefixTokens
  }

  /** Filled cache slots, the prefix included. */
  get filledSlots(): number {
    return this.filled
  }

  /** The bound cache buffers (past and present of both sessions). */
  get buffers(): CacheBuffers {
    return {keys: this.cache.keys, values: this.cache.values, capacity: this.capacity}
  }

  /** Buffers for a cache of `capacity` slots kept aside (another sequence's, while this one runs). */
  newBuffers(capacity = this.capacity): CacheBuffers {
    const bytes = this.parallel * this.shape.numKvHeads * capacity * this.shape.headDim * 4
    const make = () => this.device.createBuffer({size: bytes, usage: STORAGE | COPY_SRC | COPY_DST})
    return {keys: Array.from({length: this.shape.numLayers}, make), values: Array.from({length: this.shape.numLayers}, make), capacity}
  }

  /** Copies the first `filled` slots of every head from one cache to another on the GPU (whole buffers where the capacities match). */
  copyCache(from: CacheBuffers, to: CacheBuffers, filled: number): void {
    if (filled > to.capacity) throw new RangeError(`${filled} slots do not fit a cache of ${to.capacity}`)
    const heads = this.parallel * this.shape.numKvHeads
    const rowBytes = this.shape.headDim * 4
    const encoder = this.device.createCommandEncoder()
    for (const kind of ['keys', 'values'] as const) {
      for (let l = 0; l < this.shape.numLayers; l++) {
        const [a, b] = [from[kind][l]!, to[kind][l]!]
        if (from.capacity === to.capacity) encoder.copyBufferToBuffer(a, 0, b, 0, heads * from.capacity * rowBytes)
        else if (filled > 0) for (let h = 0; h < heads; h++) encoder.copyBufferToBuffer(a, h * from.capacity * rowBytes, b, h * to.capacity * rowBytes, filled * rowBytes)
      }
    }
    this.device.queue.submit([encoder.finish()])
  }

  /** Makes `from` (or, undefined, the prefixes only) this model's cache, `filled` slots used; the bound buffers stay (the captured graph keeps them). */
  load(from: CacheBuffers | undefined, filled: number): void {
    if (!from) return this.reset()
    this.copyCache(from, this.buffers, filled)
    this.filled = filled
  }

  destroyBuffers(buffers: CacheBuffers): void {
    for (const b of [...buffers.keys, ...buffers.values]) b.destroy()
  }

  /** Whether the decode graph has been recorded (its first run). */
  get captured(): boolean {
    return this.recorded
  }

  async step(ids: number[]): Promise<{logits: Float32Array; streamWeights: Float32Array}> {
    if (ids.length === 0) throw new RangeError('a step needs at least one token')
    if (this.filled + ids.length > this.capacity) throw new UserError(`the cache holds ${this.capacity - this.prefixTokens} tokens; ${this.length + ids.length} do not fit`)
    let out: {logits: Float32Array; streamWeights: Float32Array} | undefined
    for (let begin = 0; begin < ids.length; begin += GPU_FORM_CALL_TOKENS) out = await this.run(ids.slice(begin, begin + GPU_FORM_CALL_TOKENS))
    return out!
  }

  /**
   * Appends at most GPU_FORM_CALL_TOKENS `ids` and returns the last `keep` positions' logits
   * [keep, vocab] and stream weights [keep, P]: one token (keep 1) replays the captured decode
   * graph, more go through the dynamic form.
   */
  async run(ids: readonly number[], keep = 1): Promise<{logits: Float32Array; streamWeights: Float32Array}> {
    if (ids.length === 0 || ids.length > GPU_FORM_CALL_TOKENS) throw new RangeError(`${ids.length} tokens in one GPU-form call (1 to ${GPU_FORM_CALL_TOKENS})`)
    if (!Number.isInteger(keep) || keep < 1 || keep > ids.length) throw new RangeError(`keep ${keep} of ${ids.length} tokens`)
    if (this.filled + ids.length > this.capacity) throw new RangeError(`the GPU form's cache holds ${this.capacity} slots; ${this.filled + ids.length} do not fit`)
    return ids.length === 1 ? this.decodeStep(ids[0]!) : this.prefillStep(ids, keep)
  }

  /** Several tokens through the dynamic form (not captured), the cache bound in place. */
  private async prefillStep(ids: readonly number[], keep: number): Promise<{logits: Float32Array; streamWeights: Float32Array}> {
    const {ort} = this
    const total = this.filled + ids.length
    const feeds: Record<string, WebTensor> = {
      [gpuFormIo.inputIds]: new ort.Tensor('int64', BigInt64Array.from(ids, BigInt), [1, ids.length]),
      [gpuFormIo.seqlensK]: new ort.Tensor('int32', Int32Array.of(total - 1), [1]),
      [gpuFormIo.totalSequenceLength]: new ort.Tensor('int32', Int32Array.of(total), []),
      [gpuFormIo.numLogitsToKeep]: new ort.Tensor('int64', BigInt64Array.of(BigInt(keep)), []),
    }
    const fetches: Record<string, WebTensor | null> = {[gpuFormIo.logits]: null, [gpuFormIo.streamWeights]: null}
    for (let l = 0; l < this.shape.numLayers; l++) {
      for (const [past, present] of [[gpuFormIo.pastKey(l), gpuFormIo.presentKey(l)], [gpuFormIo.pastValue(l), gpuFormIo.presentValue(l)]] as const) {
        feeds[past] = this.bound.feeds[past]!
        fetches[present] = this.bound.fetches[present]!
      }
    }
    const out = await this.prefill.run(feeds, fetches)
    this.filled = total
    return {logits: out[gpuFormIo.logits]!.data as Float32Array, streamWeights: out[gpuFormIo.streamWeights]!.data as Float32Array}
  }

  /** One token: its inputs written into the bound buffers, the captured graph replayed (recorded the first time), logits and stream weights read back. */
  private async decodeStep(id: number): Promise<{logits: Float32Array; streamWeights: Float32Array}> {
    const total = this.filled + 1
    const queue = this.device.queue
    queue.writeBuffer(this.bound.ids, 0, BigInt64Array.of(BigInt(id)))
    queue.writeBuffer(this.bound.seqlens, 0, Int32Array.of(total - 1))
    queue.writeBuffer(this.bound.total, 0, Int32Array.of(total))
    await this.decode.run(this.bound.feeds, this.bound.fetches)
    this.recorded = true
    this.filled = total
    // never Tensor.getData on the fetches: it would turn them into CPU tensors (and the captured graph's buffers with them)
    const vocabBytes = this.shape.vocabSize * 4
    const encoder = this.device.createCommandEncoder()
    encoder.copyBufferToBuffer(this.bound.logits, 0, this.staging, 0, vocabBytes)
    encoder.copyBufferToBuffer(this.bound.streamWeights, 0, this.staging, vocabBytes, this.parallel * 4)
    queue.submit([encoder.finish()])
    await this.staging.mapAsync(READ)
    const all = new Float32Array(this.staging.getMappedRange().slice(0, vocabBytes + this.parallel * 4))
    this.staging.unmap()
    return {logits: all.subarray(0, this.shape.vocabSize), streamWeights: all.subarray(this.shape.vocabSize)}
  }

  async release(): Promise<void> {
    await this.decode.release()
    await this.prefill.release()
    for (const b of [...this.cache.keys, ...this.cache.values, this.bound.ids, this.bound.seqlens, this.bound.total, this.bound.logits, this.bound.streamWeights, this.staging]) b.destroy()
  }
}

/** A file's bytes, read in chunks: readFileSync refuses files over 2 GiB (a 0.5b package's backbone). */
function readWhole(path: string): Uint8Array {
  const fd = openSync(path, 'r')
  try {
    const out = new Uint8Array(fstatSync(fd).size)
    for (let at = 0; at < out.length; ) {
      const n = readSync(fd, out, at, Math.min(1 << 30, out.length - at), at)
      if (n <= 0) throw new Error(`${path}: ended at ${at} of ${out.length} bytes`)
      at += n
    }
    return out
  } finally {
    closeSync(fd)
  }
}

function checkCapacity(capacity: number, prefixTokens: number, positions: number): void {
  if (capacity <= prefixTokens) throw new UserError(`capacity ${capacity} leaves no room after the ${prefixTokens}-token prefix`)
  if (capacity - prefixTokens > positions) throw new UserError(`capacity ${capacity} holds more tokens than the model's ${positions} positions`)
}

/** How a GPU-form runner was chosen: the route taken and, where capture was wanted but not taken, why. */
export interface RouteChoice {
  route: WebGpuRoute | 'cpu'
  /** Why the route asked for (capture, wgsl) was not taken (one line). */
  fallback?: string
  adapter?: string
}

/**
 * The GPU form for one sequence: on `webgpu`, onnxruntime-node's GPU form, or with
 * PARSCALE_WEBGPU_ROUTE=capture the capture route where onnxruntime-web and Dawn load and find
 * an adapter (else node, with the reason); on `cpu`, the CPU provider (checking).
 */
export async function openGpuFormRunner(packageDir: string, options: GpuFormOptions): Promise<{runner: GpuFormRunner; choice: RouteChoice}> {
  const device = options.device ?? 'cpu'
  if (device === 'cpu') return {runner: await GpuFormModel.open(packageDir, options), choice: {route: 'cpu'}}
  await checkWebGpu() // one line and exit 1 where there is no adapter, as on the node route
  const chosen = await chooseWebGpuRoute()
  // this runner is ONNX Runtime's GPU form; the hand-written kernels have their own benchmark
  const choice: RouteChoice = chosen.route === 'wgsl' ? {route: 'node', fallback: 'the GPU form benchmark runs ONNX Runtime (bench:wgsl times the hand-written kernels)'} : chosen
  if (choice.route === 'capture') {
    const rt = (await loadCaptureRuntime()) as CaptureRuntime
    return {runner: await CapturedGpuFormModel.open(packageDir, options, rt), choice}
  }
  return {runner: await GpuFormModel.open(packageDir, options), choice}
}

/** The route `--device webgpu` takes in this process, and why not the one asked for where it is not. */
export async function chooseWebGpuRoute(): Promise<RouteChoice> {
  const requested = requestedWebGpuRoute()
  if (requested === 'node') return {route: 'node'}
  if (requested === 'wgsl') {
    const device = await openWgslDevice()
    return typeof device === 'string' ? {route: 'node', fallback: device} : {route: 'wgsl', adapter: device.name}
  }
  const rt = await loadCaptureRuntime()
  if (typeof rt === 'string') return {route: 'node', fallback: rt}
  return {route: 'capture', adapter: rt.adapter}
}

/**
 * The capture route's sequences as the engine's `SequenceCache` (decoder.ts), so `run`, `bench`,
 * `eval` and `serve` drive it through `ParScaleModel.forward`. A captured graph keeps the buffers
 * it recorded with, so one sequence at a time lives in the model's bound buffers (per P, one
 * `CapturedGpuFormModel`); the others wait in buffers of their own, copied in and out on the GPU
 * when their turn comes (nothing is copied while one sequence runs, as in `run`).
 */
export class CaptureCache extends FixedCapacitySlots<{filled: number; saved?: CacheBuffers}> implements SequenceCache {
  private resident: number | undefined
  private model: CapturedGpuFormModel | undefined

  constructor(
    shape: BackboneShape,
    parallel: number,
    prefixTokens: number,
    /** The model of this P with room for at least `capacity` slots (made bigger when it has less). */
    private readonly modelFor: (capacity: number) => Promise<CapturedGpuFormModel>,
  ) {
    super(shape, parallel, prefixTokens, "the capture route's cache")
  }

  reset(slot: number): void {
    if (slot >= this.states.length || this.cap === 0) throw new RangeError(`slot ${slot}: reserve first`)
    this.drop(slot)
    this.states[slot] = {filled: this.prefixTokens}
  }

  move(from: number, to: number): void {
    if (from === to) return
    this.drop(to)
    this.states[to] = this.states[from]
    this.states[from] = undefined
    if (this.resident === from) this.resident = to
  }

  /** The model with `slot`'s sequence in its bound buffers (the one there before saved aside). */
  async ready(slot: number): Promise<CapturedGpuFormModel> {
    const state = this.states[slot]
    if (!state) throw new RangeError(`slot ${slot} of the capture route's cache is not reset`)
    const model = await this.modelFor(this.cap)
    if (model !== this.model) {
      // a new (bigger) model: the sequence that was resident was copied into it, holder and all
      if (model.holder !== this) this.resident = undefined
      this.model = model
    }
    if (model.holder === this && this.resident === slot) return model
    model.holder?.evict()
    model.load(state.saved, state.filled)
    if (state.saved) model.destroyBuffers(state.saved)
    state.saved = undefined
    this.resident = slot
    model.holder = this
    return model
  }

  /** After a step: the slot's filled count, as the model has it. */
  update(slot: number): void {
    const state = this.states[slot]
    if (state && this.model) state.filled = this.model.filledSlots
  }

  /** Another sequence needs the model's buffers: the resident one is copied aside. */
  evict(): void {
    const model = this.model
    const slot = this.resident
    this.resident = undefined
    if (model) model.holder = undefined
    if (!model || slot === undefined) return
    const state = this.states[slot]
    if (!state) return
    const saved = model.newBuffers()
    model.copyCache(model.buffers, saved, state.filled)
    state.saved = saved
  }

  dispose(): void {
    for (let slot = 0; slot < this.states.length; slot++) this.drop(slot)
    if (this.model?.holder === this) this.model.holder = undefined
    this.states = []
  }

  private drop(slot: number): void {
    const state = this.states[slot]
    if (state?.saved) this.model?.destroyBuffers(state.saved)
    if (this.resident === slot) this.resident = undefined
    this.states[slot] = undefined
  }
}
