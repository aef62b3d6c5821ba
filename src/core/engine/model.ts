/**
 * One ONNX Runtime session over a converted package, for every P it has: the backbone is held
 * once and each call picks its P through the cache it runs on (prefixes) and the aggregation
 * head it feeds. Sequences live in a `KvCache` of their P; `forward` appends to it.
 */
import {dirname, join} from 'node:path'

import ort from 'onnxruntime-node'

import type {BackboneShape} from '../checkpoint/config.js'
import {UserError} from '../errors.js'
import {io} from '../onnx/parscale-graph.js'
import {MASKED, webgpuIo} from '../onnx/webgpu-graph.js'
import {isCurrentGraph, readManifest, selectVariant, type PackageManifest} from '../package/manifest.js'
import {removalAdvice} from '../package/paths.js'
import {attentionMask, DeviceKvCache, DeviceOps, type DeviceCacheHost, type DeviceSegment, type InitialCache} from './device-cache.js'
import {checkWebGpu, webgpuSessionOptions, type AdapterInfo, type Device} from './device.js'
import {EmbeddingRows} from './embedding-rows.js'
import {GpuFormCache} from './gpu-form-cache.js'
import {GPU_FORM_CALL_TOKENS, gpuFormCallTokens, gpuFormStep, gpuFormSupport, openGpuFormSession, prefixCache, sayHalfFallback, type GpuFormSession} from './gpu-form.js'
import {KvCache} from './kv-cache.js'
import {loadStreamWeights, type HostTensor, type StreamWeights} from './stream-weights.js'
import {CaptureCache, CapturedGpuFormModel, chooseWebGpuRoute, loadCaptureRuntime, type RouteChoice} from './webgpu-capture.js'
import {WgslCache} from './wgsl-cache.js'
import type {KernelCallProfile} from '../bench/profile-summary.js'
import {promptTokensAt, WgslModel} from '../wgsl/decoder.js'
import {packageSource} from '../wgsl/package-source.js'
import {cpuHasInt8DotProduct, decodeRowsOnCodes, widenedDecodeGraph} from '../quant/widen.js'

/** A cache of one P: in JavaScript (CPU), in device memory (WebGPU), or per sequence in the GPU form (onnxruntime-node, or the capture route's GPU buffers). */
export type ModelCache = KvCache | DeviceKvCache | GpuFormCache | CaptureCache | WgslCache

/** The capture route's first cache capacity (slots, prefix included): a prompt of 64 and 32 new tokens at a 48-token prefix fit. */
const CAPTURE_CAPACITY = 256

export interface ModelOptions {
  /** Intra-op threads; default: ONNX Runtime's choice (one per core). */
  threads?: number
  /**
   * The P values this process expects to run. A quantized package decodes at P ≥ 4 through a
   * graph of its own (int8 weights widened at first use, `quant/widen.ts`): faster at many rows
   * per step, slower at one, and more memory. Naming such a P here (with `sequences`) makes that
   * graph at open where a step will run on it (and both sessions' threads sleep when idle);
   * otherwise the first step that needs it makes it.
   */
  parallel?: readonly number[]
  /**
   * The most sequences one step will hold (default 1; `serve`: its batch limit). With the P
   * named above it says whether the widened graph will be needed (see `decodeRowsOnCodes`), so
   * that it is made at open rather than in the middle of the first crowded step.
   */
  sequences?: number
  /** false keeps a quantized package on its stored graph at every P (for A/B measurements). */
  widenDecode?: boolean
  /**
   * The most rows (sequences × P) a decode call at P ≥ 4 runs on the stored codes before the
   * widened graph takes over; default `decodeRowsOnCodes` for the package's bits and this CPU
   * (tests set it to check either choice on any machine).
   */
  decodeRowsOnCodes?: number
  /** Write an ONNX Runtime profile (JSON) with this file prefix. */
  profilePrefix?: string
  /** Most tokens per prefill call (default MAX_PREFILL_CHUNK; smaller in tests of chunking). */
  maxPrefillChunk?: number
  /** Where to run (default cpu). */
  device?: Device
  /**
   * The graph form, default the device's. Tests run the WebGPU form (device-resident cache,
   * its device graphs) on the CPU provider, where every machine can check it.
   */
  form?: Device
  /** Another graph file of the package, in the chosen form (measuring graph variants; bench/stream-weights-cost.ts). */
  graphFile?: string
  /**
   * On `webgpu`: false runs the older WebGPU graph (one graph for every P, its cache joined on
   * the device) instead of the GPU form (gpu-form.ts: one graph per P, streams on the head axis,
   * fused attention, fewer dispatches; quantized and fp16 weights). Default: the GPU form
   * wherever it supports the package (`gpuFormSupport`).
   */
  gpuForm?: boolean
}

export interface ForwardResult {
  /** [batch, positions, vocab] row-major */
  logits: Float32Array
  dims: [number, number, number]
  /** [batch, positions, P]: the aggregation weights of each stream (all 1 at P = 1); absent if the graph lacks the output. */
  streamWeights?: Float32Array
}

/**
 * Prompts go in by chunks, so no activation grows with the prompt (let alone its square).
 * A chunk runs P·chunk rows through every matmul: at 256 rows the matmuls already run near
 * their peak rate, while the activations of a bigger chunk stay resident in ONNX Runtime's
 * arena (measured, 0.5b at P = 8: +125 MB of transient memory at 32 tokens a chunk and +265 MB
 * at 64 over a 1 k prompt, +720 MB at 256 over a 512-token one).
 */
const PREFILL_ROWS = 256
/** Attention scores of a chunk, [P·heads, chunk, capacity + chunk] floats, stay near this size. */
const PREFILL_SCORE_BYTES = 64 << 20
/** Logits of every position of a chunk (scoring text) are capped the same way. */
const PREFILL_LOGITS_BYTES = 64 << 20
const MAX_PREFILL_CHUNK = 256
const MIN_PREFILL_CHUNK = 16

/** Widened int8 decoding pays off from this many streams per token (docs/benchmarks.md). */
export const WIDENED_DECODE_FROM_PARALLEL = 4

/** Whether a one-token step of `rows` rows (sequences × P) at `parallel` leaves the stored codes for the widened graph. */
function stepWidens(parallel: number, rows: number, rowsOnCodes: number): boolean {
  return parallel >= WIDENED_DECODE_FROM_PARALLEL && rows > rowsOnCodes
}

export class ParScaleModel implements DeviceCacheHost {
  private readonly streamCache = new Map<number, StreamWeights>()
  /** Per P, the aggregation head and the initial cache as device tensors (WebGPU form). */
  private readonly deviceHeads = new Map<number, Promise<Record<string, ort.Tensor>>>()
  private readonly initialCaches = new Map<number, Promise<InitialCache>>()

  /** The GPU form's sessions, one per P (each graph holds the backbone: opened as P values are used). */
  private readonly gpuFormSessions = new Map<number, Promise<GpuFormSession>>()
  private readonly gpuFormPrefixes = new Map<number, ReturnType<typeof prefixCache>>()
  /** The capture route's models, one per P (each with its two sessions and bound cache buffers), and the capacity each was asked for. */
  private readonly captureModels = new Map<number, {capacity: number; model: Promise<CapturedGpuFormModel>}>()
  /** The hand-written kernels' models (PARSCALE_WEBGPU_ROUTE=wgsl), one per P. */
  private readonly wgslModels = new Map<number, Promise<WgslModel>>()

  private constructor(
    /** The package's graph; undefined when the GPU form runs every call. */
    private readonly session: ort.InferenceSession | undefined,
    /** Options of the widened decode session; undefined where there is none (not quantized, WebGPU). */
    private readonly widenedOptions: ort.InferenceSession.SessionOptions | undefined,
    /** The most rows a decode call at P ≥ 4 runs on the stored graph (`decodeRowsOnCodes`). */
    private readonly rowsOnCodes: number,
    readonly packageDir: string,
    readonly manifest: PackageManifest,
    private readonly maxPrefillChunk: number,
    readonly device: Device,
    /** The WebGPU form's device graphs (cache joins, uploads); undefined in the CPU form. */
    private readonly deviceOps: DeviceOps | undefined,
    /** The GPU adapter (WebGPU only). */
    readonly adapter: AdapterInfo | undefined,
    /** The CPU form's embedding rows, read per call (the WebGPU form gathers them itself). */
    private readonly embeddings: EmbeddingRows | undefined,
    /** Whether `webgpu` runs the GPU form (gpu-form.ts) rather than the package's WebGPU graph. */
    readonly gpuForm: boolean,
    private readonly gpuFormOptions: {profilePrefix?: string},
    /** On webgpu's GPU form: the route (node: onnxruntime-node, the default; capture: onnxruntime-web with decode replayed, PARSCALE_WEBGPU_ROUTE=capture) and why not capture. */
    private route: RouteChoice | undefined = undefined,
  ) {}

  /** The WebGPU route taken (GPU form on webgpu only), and the reason where capture was wanted but is not used. */
  get webgpuRoute(): RouteChoice | undefined {
    return this.route
  }

  private widened: Promise<ort.InferenceSession | undefined> | undefined

  /** Which kernels run this model's steps at `parallel`, for reports. */
  kernels(parallel: number): {prefill: string; decode: string} {
    if (this.gpuForm) {
      const kernel = this.manifest.quant ? 'MatMulNBits (GPU form)' : 'MatMul (GPU form)'
      if (this.route?.route === 'capture') return {prefill: `${kernel}, onnxruntime-web`, decode: `${kernel}, onnxruntime-web, captured graph replayed`}
      if (this.route?.route === 'wgsl') return {prefill: 'hand-written WGSL kernels (5 dispatches a layer)', decode: 'hand-written WGSL kernels (5 dispatches a layer)'}
      if (this.route?.fallback) return {prefill: kernel, decode: `${kernel}, not captured: ${this.route.fallback}`}
      return {prefill: kernel, decode: kernel}
    }
    if (!this.manifest.quant) return {prefill: 'Gemm', decode: 'Gemm'}
    if (this.widensAt(parallel, parallel)) return {prefill: 'MatMulNBits', decode: 'DynamicQuantizeMatMul (int8 widened at load)'}
    if (this.widensAt(parallel, Number.MAX_SAFE_INTEGER)) return {prefill: 'MatMulNBits', decode: `MatMulNBits (steps of more than ${this.rowsOnCodes} rows: DynamicQuantizeMatMul, int8 widened)`}
    return {prefill: 'MatMulNBits', decode: 'MatMulNBits'}
  }

  /** Whether a one-token step of `rows` rows (sequences × P) at `parallel` runs on the widened int8 graph. */
  private widensAt(parallel: number, rows: number): boolean {
    return this.widenedOptions !== undefined && stepWidens(parallel, rows, this.rowsOnCodes)
  }

  static async open(packageDir: string, options: ModelOptions = {}): Promise<ParScaleModel> {
    const device = options.device ?? 'cpu'
    const manifest = readManifest(packageDir)
    if (!isCurrentGraph(manifest)) {
      throw new UserError(`${packageDir}: converted by an older parscale (graph version ${manifest.graphVersion}); convert it again`)
    }
    const form = options.form ?? device
    // The GPU form wherever it runs the package; the older WebGPU graph only where it does not
    // (or when asked for: tests of that form on the CPU provider, graph-variant measurements).
    const gpuForm = device === 'webgpu' && form === 'webgpu' && options.gpuForm !== false && !options.graphFile && gpuFormSupport(manifest) === undefined
    if (form === 'webgpu' && !gpuForm && !manifest.webgpuGraph) {
      const scheme = manifest.quant ? `its ${manifest.quant.scheme} weights` : 'it'
      throw new UserError(`${packageDir}: the package has no WebGPU form (${scheme} run on the CPU's quantized operators); use --device cpu, or convert without --quant`)
    }
    const adapter = device === 'webgpu' ? await checkWebGpu() : undefined // before any loading: fail at once
    const base: ort.InferenceSession.SessionOptions = {
      graphOptimizationLevel: 'all',
      executionMode: 'sequential',
      ...(options.threads ? {intraOpNumThreads: options.threads, interOpNumThreads: 1} : {}),
      ...(device === 'webgpu' ? webgpuSessionOptions() : {}), // its own thread settings
    }
    const sessionOptions: ort.InferenceSession.SessionOptions = {
      ...base,
      ...(options.profilePrefix ? {enableProfiling: true, profileFilePrefix: options.profilePrefix} : {}),
      // the cache stays in device memory between calls; logits come back to the CPU
      ...(device === 'webgpu'
        ? {preferredOutputLocation: Object.fromEntries(Array.from({length: manifest.model.numLayers}, (_, l) => [webgpuIo.presentKey(l), webgpuIo.presentValue(l)]).flat().map((name) => [name, 'gpu-buffer']))}
        : {}),
    }
    // Only the CPU form of a quantized package has a widened twin (webgpu ones have no quant).
    const widenable = form === 'cpu' && manifest.quant !== undefined && options.widenDecode !== false && Math.max(...manifest.parallel) >= WIDENED_DECODE_FROM_PARALLEL
    // the CPU is asked (reading /proc/cpuinfo) only where a widened graph may run at all
    const rowsOnCodes = widenable ? (options.decodeRowsOnCodes ?? decodeRowsOnCodes(manifest.quant!.bits, cpuHasInt8DotProduct())) : 0
    const preload = widenable && (options.parallel ?? []).some((p) => stepWidens(p, p * (options.sequences ?? 1), rowsOnCodes))
    // Two sessions mean two thread pools: threads left spinning by one would take the cores
    // the other needs, so with a decode session both pools sleep when idle.
    const sleeping = {...sessionOptions, extra: {session: {intra_op: {allow_spinning: '0'}}}}
    if (gpuForm) {
      const route = await chooseWebGpuRoute()
      const model = new ParScaleModel(undefined, undefined, 0, packageDir, manifest, options.maxPrefillChunk ?? MAX_PREFILL_CHUNK, device, undefined, adapter, undefined, true, {
        ...(options.profilePrefix ? {profilePrefix: options.profilePrefix} : {}),
      }, route)
      // One P named (run, eval, bench): its graph is built and loaded now, so failures and load
      // time show at open. Several (serve): each P's session opens at its first use, as each
      // holds the backbone on the device.
      if (options.parallel?.length === 1) {
        const P = options.parallel[0]!
        if (route.route === 'capture') {
          // where the capture route cannot open this package (an operator onnxruntime-web's
          // WebGPU provider lacks, a session it refuses), onnxruntime-node's GPU form runs it
          await model.captureModel(P, CAPTURE_CAPACITY).catch((error: unknown) => {
            model.captureModels.delete(P)
            model.route = {route: 'node', fallback: `the capture route did not open it: ${(error as Error).message.split('\n')[0]}`}
          })
        }
        if (route.route === 'wgsl') {
          await model.wgslModel(P).catch((error: unknown) => {
            model.wgslModels.delete(P)
            model.route = {route: 'node', fallback: `the hand-written kernels did not open it: ${(error as Error).message.split('\n')[0]}`}
          })
        }
        if (model.route?.route !== 'capture' && model.route?.route !== 'wgsl') await model.gpuFormSession(P)
      }
      return model
    }
    const graph = join(packageDir, options.graphFile ?? (form === 'webgpu' ? manifest.webgpuGraph! : manifest.graph))
    const session = await createSession(graph, preload ? sleeping : sessionOptions)
    const widenedOptions = widenable ? (options.profilePrefix ? {...sleeping, profileFilePrefix: `${options.profilePrefix}-decode`} : sleeping) : undefined
    const deviceOps = form === 'webgpu'
      ? await DeviceOps.create(manifest.model.numLayers, {...base, ...(device === 'webgpu' ? {preferredOutputLocation: 'gpu-buffer'} : {})})
      : undefined
    const embeddings = form === 'cpu' ? new EmbeddingRows(packageDir, manifest.embedding) : undefined
    const model = new ParScaleModel(session, widenedOptions, rowsOnCodes, packageDir, manifest, options.maxPrefillChunk ?? MAX_PREFILL_CHUNK, device, deviceOps, adapter, embeddings, false, {})
    if (preload) await model.decodeSession(WIDENED_DECODE_FROM_PARALLEL, Number.MAX_SAFE_INTEGER)
    return model
  }

  /**
   * The session for one-token steps of `rows` rows at `parallel` when it is not the stored
   * graph's: a quantized package's int8-widened graph at P ≥ 4 beyond `rowsOnCodes` rows, made on
   * first need. Chosen per call from P and the rows, not per process, so a lone sequence at one P
   * gives the same answers in every command (run, serve, worker); sequences that share a step on
   * the widened graph share its activations' int8 scale as well.
   */
  private decodeSession(parallel: number, rows: number): Promise<ort.InferenceSession | undefined> {
    const options = this.widenedOptions
    if (!options || !this.widensAt(parallel, rows)) return Promise.resolve(undefined)
    this.widened ??= (async () => {
      const graph = widenedDecodeGraph(this.packageDir, this.manifest)
      return graph ? createSession(graph, options) : undefined // a read-only folder keeps the stored graph
    })()
    return this.widened
  }

  get shape(): BackboneShape {
    return this.manifest.model
  }

  /** The P values this package has, ascending. */
  get parallelValues(): number[] {
    return this.manifest.parallel
  }

  get vocabSize(): number {
    return this.shape.vocabSize
  }

  /** Longest sequence (prompt + answer) the model takes. */
  get maxPositions(): number {
    return this.shape.maxPositionEmbeddings
  }

  /** The prefixes and aggregation head of one P (read from the package on first use). */
  streams(parallel: number): StreamWeights {
    let weights = this.streamCache.get(parallel)
    if (!weights) {
      weights = loadStreamWeights(this.packageDir, selectVariant(this.manifest, parallel, this.packageDir), this.shape)
      this.streamCache.set(parallel, weights)
    }
    return weights
  }

  /** An empty cache for sequences at `parallel` streams (`reserve` sizes it). */
  newCache(parallel: number): ModelCache {
    if (this.gpuForm && this.route?.route === 'wgsl') {
      const prefixTokens = parallel === 1 ? 0 : selectVariant(this.manifest, parallel, this.packageDir).prefixTokens
      return new WgslCache(this.shape, parallel, prefixTokens, () => this.wgslModel(parallel))
    }
    if (this.gpuForm && this.route?.route === 'capture') {
      const prefixTokens = parallel === 1 ? 0 : selectVariant(this.manifest, parallel, this.packageDir).prefixTokens
      return new CaptureCache(this.shape, parallel, prefixTokens, (capacity) => this.captureModel(parallel, capacity))
    }
    if (this.gpuForm) {
      void this.gpuFormSession(parallel).catch(() => undefined) // starts loading; `forward` reports a failure
      return new GpuFormCache(this.shape, parallel, this.gpuFormPrefix(parallel))
    }
    if (this.deviceOps) return new DeviceKvCache(this.shape, this.streams(parallel), this)
    return new KvCache(this.shape, this.streams(parallel))
  }

  /** Tokens per prefill call for a sequence at `parallel` whose cache holds `capacity` positions. */
  prefillChunk(parallel: number, capacity: number, logitsForEveryToken = false): number {
    let chunk = Math.min(Math.floor(PREFILL_ROWS / parallel), Math.floor(PREFILL_SCORE_BYTES / (parallel * this.shape.numHeads * Math.max(1, capacity) * 4)))
    if (logitsForEveryToken) chunk = Math.min(chunk, Math.floor(PREFILL_LOGITS_BYTES / (this.vocabSize * 4)))
    return Math.min(this.maxPrefillChunk, Math.max(MIN_PREFILL_CHUNK, Math.min(MAX_PREFILL_CHUNK, chunk)))
  }

  /**
   * Runs `inputIds` (one equally long list per slot) for slots first … first+count−1 of
   * `cache` and appends their keys and values to it. `numLogitsToKeep` 0 returns logits for
   * every new position, k the last k.
   */
  async forward(cache: ModelCache, first: number, inputIds: number[][], numLogitsToKeep: number): Promise<ForwardResult> {
    const count = inputIds.length
    const seq = inputIds[0]?.length ?? 0
    if (count === 0 || seq === 0 || inputIds.some((row) => row.length !== seq)) throw new Error('forward needs rows of equal, non-zero length')
    if (cache instanceof DeviceKvCache) return this.forwardDevice(cache, first, inputIds, numLogitsToKeep)
    if (cache instanceof GpuFormCache) return this.forwardGpuForm(cache, first, inputIds, numLogitsToKeep)
    if (cache instanceof CaptureCache) return this.forwardCapture(cache, first, inputIds, numLogitsToKeep)
    if (cache instanceof WgslCache) return this.forwardWgsl(cache, first, inputIds, numLogitsToKeep)
    const positions = new BigInt64Array(count * seq)
    const lengths = new BigInt64Array(count)
    for (let r = 0; r < count; r++) {
      const slot = first + r
      if (cache.length(slot) + seq > cache.capacity) throw new RangeError(`slot ${slot}: ${seq} more tokens exceed the cache (${cache.capacity}); reserve first`)
      lengths[r] = BigInt(cache.length(slot))
      const start = cache.tokens(slot)
      for (let i = 0; i < seq; i++) positions[r * seq + i] = BigInt(start + i)
    }
    const views = cache.views(first, count)
    const head = cache.streams.aggregate
    const host = (t: HostTensor) => new ort.Tensor('float32', t.data, t.dims)
    const feeds: Record<string, ort.Tensor> = {
      [io.inputsEmbeds]: new ort.Tensor('float32', this.embeddings!.rows(inputIds.flat()), [count, seq, this.embeddings!.hidden]),
      [io.positions]: new ort.Tensor('int64', positions, [count, seq]),
      [io.cacheLengths]: new ort.Tensor('int64', lengths, [count]),
      [io.numLogitsToKeep]: new ort.Tensor('int64', BigInt64Array.of(BigInt(numLogitsToKeep)), []),
      [io.aggregate.weight0]: host(head.weight0),
      [io.aggregate.bias0]: host(head.bias0),
      [io.aggregate.weight2]: host(head.weight2),
      [io.aggregate.bias2]: host(head.bias2),
      [io.aggregate.smooth]: new ort.Tensor('float32', Float32Array.of(head.smooth), []),
    }
    for (let layer = 0; layer < this.shape.numLayers; layer++) {
      feeds[io.pastKey(layer)] = new ort.Tensor('float32', views.keys[layer], views.dims.keys)
      feeds[io.pastValue(layer)] = new ort.Tensor('float32', views.values[layer], views.dims.values)
    }
    const decode = seq === 1 ? await this.decodeSession(cache.parallel, count * cache.parallel) : undefined
    const out = await (decode ?? this.session!).run(feeds)
    const layers = Array.from({length: this.shape.numLayers}, (_, layer) => layer)
    cache.append(
      first,
      count,
      seq,
      layers.map((layer) => out[io.newKey(layer)].data as Float32Array),
      layers.map((layer) => out[io.newValue(layer)].data as Float32Array),
    )
    const logits = out[io.logits]
    const weights = out[io.streamWeights]
    return {logits: logits.data as Float32Array, dims: logits.dims as [number, number, number], ...(weights ? {streamWeights: weights.data as Float32Array} : {})}
  }

  /** The WebGPU form: the cache goes in as the last call's device tensors and comes back longer. */
  private async forwardDevice(cache: DeviceKvCache, first: number, inputIds: number[][], numLogitsToKeep: number): Promise<ForwardResult> {
    const count = inputIds.length
    const seq = inputIds[0].length
    const P = cache.parallel
    const segment = await cache.prepare(first, count)
    const positions = new BigInt64Array(count * P * seq)
    segment.slots.forEach((slot, b) => {
      for (let p = 0; p < P; p++) for (let i = 0; i < seq; i++) positions[(b * P + p) * seq + i] = BigInt(slot.tokens + i)
    })
    const feeds: Record<string, ort.Tensor> = {
      ...(await this.deviceHead(P)),
      [webgpuIo.inputIds]: new ort.Tensor('int64', BigInt64Array.from(inputIds.flat(), BigInt), [count, seq]),
      [webgpuIo.positions]: new ort.Tensor('int64', positions, [count * P, seq]),
      [webgpuIo.attentionMask]: new ort.Tensor('float32', attentionMask(segment, seq, MASKED), [count, 1, seq, segment.length + seq]),
      [webgpuIo.numLogitsToKeep]: new ort.Tensor('int64', BigInt64Array.of(BigInt(numLogitsToKeep)), []),
    }
    for (let layer = 0; layer < this.shape.numLayers; layer++) {
      feeds[webgpuIo.pastKey(layer)] = segment.keys[layer]
      feeds[webgpuIo.pastValue(layer)] = segment.values[layer]
    }
    const out = await this.session!.run(feeds)
    const layers = Array.from({length: this.shape.numLayers}, (_, layer) => layer)
    cache.commit(segment, layers.map((l) => out[webgpuIo.presentKey(l)]), layers.map((l) => out[webgpuIo.presentValue(l)]), seq)
    const logits = out[io.logits]
    return {logits: logits.data as Float32Array, dims: logits.dims as [number, number, number], streamWeights: out[io.streamWeights].data as Float32Array}
  }

  /**
   * The GPU form: one sequence per call (batch 1, the streams on the head axis), so a batch's
   * rows run one after another, each in pieces (forwardInPieces) that keep the logits asked for.
   */
  private async forwardGpuForm(cache: GpuFormCache, first: number, inputIds: number[][], numLogitsToKeep: number): Promise<ForwardResult> {
    const {session, half} = await this.gpuFormSession(cache.parallel)
    const pieceTokens = await gpuFormCallTokens(this.device, this.shape.headDim)
    return forwardInPieces(inputIds, numLogitsToKeep, this.vocabSize, cache.parallel, pieceTokens, async (r, seq) => {
      const slot = first + r
      let state = await cache.ready(slot, half)
      if (cache.tokens(slot) + seq > cache.capacity - cache.prefixTokens) throw new RangeError(`slot ${slot}: ${seq} more tokens exceed the cache (${cache.capacity}); reserve first`)
      return async (ids, wanted) => {
        // Never in place: the GPU form runs here on WebGPU only, where a bound output leaks (gpu-form.ts).
        const out = await gpuFormStep(session, this.shape.numLayers, state, ids, false, wanted)
        state = {keys: out.keys, values: out.values, filled: state.filled + ids.length}
        cache.update(slot, state)
        return out
      }
    })
  }

  /**
   * The capture route (webgpu-capture.ts): as forwardGpuForm, a one-token piece replaying the
   * captured decode graph.
   */
  private async forwardCapture(cache: CaptureCache, first: number, inputIds: number[][], numLogitsToKeep: number): Promise<ForwardResult> {
    return forwardInPieces(inputIds, numLogitsToKeep, this.vocabSize, cache.parallel, GPU_FORM_CALL_TOKENS, async (r, seq) => {
      const slot = first + r
      if (cache.tokens(slot) + seq > cache.capacity - cache.prefixTokens) throw new RangeError(`slot ${slot}: ${seq} more tokens exceed the cache (${cache.capacity}); reserve first`)
      const model = await cache.ready(slot)
      return async (ids, wanted) => {
        const out = await model.run(ids, wanted)
        cache.update(slot)
        return out
      }
    })
  }

  /**
   * The hand-written kernels (PARSCALE_WEBGPU_ROUTE=wgsl): a row's tokens in calls of several,
   * one token a call where every position's logits are kept (eval).
   */
  private async forwardWgsl(cache: WgslCache, first: number, inputIds: number[][], numLogitsToKeep: number): Promise<ForwardResult> {
    const P = cache.parallel
    const V = this.vocabSize
    return forwardInPieces(inputIds, numLogitsToKeep, V, P, promptTokensAt(P), async (r) => {
      const slot = first + r
      const model = await cache.model()
      const sequence = await cache.sequence(slot)
      return async (ids, wanted) => {
        if (wanted === 1) {
          const out = (await model.run(sequence, ids, true))!
          cache.update(slot)
          return out
        }
        // every kept position read: the tokens before them in one call, then one a call
        const logits = new Float32Array(wanted * V)
        const streamWeights = new Float32Array(wanted * P)
        const head = ids.length - wanted
        if (head > 0) await model.run(sequence, ids.slice(0, head), false)
        for (let i = 0; i < wanted; i++) {
          const out = (await model.run(sequence, [ids[head + i]!], true))!
          logits.set(out.logits, i * V)
          streamWeights.set(out.streamWeights, i * P)
        }
        cache.update(slot)
        return {logits, streamWeights}
      }
    })
  }

  /**
   * Greedy tokens chained on the GPU (the hand-written kernels' argmax; only ids and stream
   * weights come back); false on every other cache, which then decodes through `forward`.
   */
  async decodeGreedy(cache: ModelCache, slot: number, token: number, count: number, accept: (token: number, streamWeights: Float32Array) => boolean): Promise<boolean> {
    if (!(cache instanceof WgslCache)) return false
    const model = await cache.model()
    const sequence = await cache.sequence(slot)
    // no further than the kernels' positions: past them `forward` says so, if the sequence gets there
    const room = Math.min(count, model.maxPositions - sequence.length)
    if (room < 1) return false
    await model.greedy(sequence, token, room, accept)
    cache.update(slot)
    return true
  }

  /**
   * On the hand-written kernels (PARSCALE_WEBGPU_ROUTE=wgsl), `bench --profile`'s calls: a fresh
   * sequence of P streams takes the prompt in one call (as many tokens as a call holds) and then
   * `steps` decode steps, each profiled (GPU ms per kernel from timestamps, its wall time);
   * undefined on every other route, whose profiles are ONNX Runtime's own files.
   */
  async kernelProfile(parallel: number, prompt: number[], steps: number): Promise<KernelCallProfile[] | undefined> {
    if (!(this.gpuForm && this.route?.route === 'wgsl')) return undefined
    const model = await this.wgslModel(parallel)
    const ids = prompt.slice(0, model.promptTokens)
    const sequence = model.sequence(ids.length + steps)
    try {
      const calls: KernelCallProfile[] = []
      let next = ids
      for (let i = 0; i <= steps; i++) {
        const dispatches = new Map<string, number>()
        const t0 = performance.now()
        const ms = await model.profile(sequence, next, dispatches)
        calls.push({tokens: next.length, wallMs: performance.now() - t0, ms, dispatches})
        next = [(ids[i % ids.length]! + i) % this.vocabSize]
      }
      return calls
    } finally {
      sequence.release()
    }
  }

  /** The hand-written kernels' model of one P, opened at first use (its weights read from this package). */
  private wgslModel(parallel: number): Promise<WgslModel> {
    let model = this.wgslModels.get(parallel)
    if (!model) {
      model = WgslModel.open(packageSource(this.packageDir, parallel)).catch((error: unknown) => {
        if (error instanceof UserError) throw error
        throw new UserError(`${this.packageDir}: the hand-written kernels cannot run it at P = ${parallel} (${(error as Error).message.split('\n')[0]})`)
      })
      this.wgslModels.set(parallel, model)
    }
    return model
  }

  /**
   * The capture route's model of one P with room for `capacity` slots: opened at first use, and
   * opened again, bigger, when a cache outgrows it (the sequence in its buffers copied over).
   */
  private captureModel(parallel: number, capacity: number): Promise<CapturedGpuFormModel> {
    const current = this.captureModels.get(parallel)
    if (current && current.capacity >= capacity) return current.model
    const model = (async () => {
      const old = await current?.model.catch(() => undefined)
      const runtime = await loadCaptureRuntime()
      if (typeof runtime === 'string') throw new UserError(runtime)
      const made = await CapturedGpuFormModel.open(this.packageDir, {parallel, capacity}, runtime).catch((error: unknown) => {
        if (error instanceof UserError) throw error
        throw new UserError(`${this.packageDir}: the GPU form at P = ${parallel} cannot be loaded on the capture route (${(error as Error).message.split('\n')[0]})`)
      })
      if (old) {
        if (old.holder) {
          made.load(old.buffers, old.filledSlots)
          made.holder = old.holder
        }
        await old.release()
      }
      return made
    })()
    this.captureModels.set(parallel, {capacity, model})
    return model
  }

  /** The GPU form's session for one P, opened at first use. */
  private gpuFormSession(parallel: number): Promise<GpuFormSession> {
    let session = this.gpuFormSessions.get(parallel)
    if (!session) {
      selectVariant(this.manifest, parallel, this.packageDir) // an unknown P: its own one-line error
      session = openGpuFormSession(this.packageDir, parallel, this.device, this.gpuFormOptions).then((opened) => {
        sayHalfFallback(opened.fallback) // one line per process: an fp16 package runs widened, and why
        return opened
      }, (error: unknown) => {
        if (error instanceof UserError) throw error
        throw new UserError(`${this.packageDir}: the GPU form at P = ${parallel} cannot be loaded (${(error as Error).message.split('\n')[0]})`)
      })
      this.gpuFormSessions.set(parallel, session)
    }
    return session
  }

  private gpuFormPrefix(parallel: number): ReturnType<typeof prefixCache> {
    let prefix = this.gpuFormPrefixes.get(parallel)
    if (!prefix) {
      prefix = prefixCache(this.packageDir, selectVariant(this.manifest, parallel, this.packageDir), this.shape)
      this.gpuFormPrefixes.set(parallel, prefix)
    }
    return prefix
  }

  /** The aggregation head of one P as device tensors (weights transposed for MatMul), uploaded once. */
  private deviceHead(parallel: number): Promise<Record<string, ort.Tensor>> {
    let head = this.deviceHeads.get(parallel)
    if (!head) {
      const {aggregate} = this.streams(parallel)
      const up = (t: HostTensor) => this.deviceOps!.upload(t.data, t.dims)
      const names = webgpuIo.aggregate
      head = (async () => ({
        [names.weight0]: await up(transposed(aggregate.weight0)),
        [names.bias0]: await up(aggregate.bias0),
        [names.weight2]: await up(transposed(aggregate.weight2)),
        [names.bias2]: await up(aggregate.bias2),
        [names.smooth]: await up({data: Float32Array.of(aggregate.smooth), dims: []}),
      }))()
      this.deviceHeads.set(parallel, head)
    }
    return head
  }

  /** A sequence's cache at the start, uploaded once per P: its prefixes, or one masked placeholder position. */
  initialCache(parallel: number): Promise<InitialCache> {
    let initial = this.initialCaches.get(parallel)
    if (!initial) {
      const streams = this.streams(parallel)
      const {numLayers, numKvHeads: kv, headDim: d} = this.shape
      const n = streams.prefixTokens
      const P = parallel
      initial = (async () => {
        const keys: ort.Tensor[] = []
        const values: ort.Tensor[] = []
        for (let layer = 0; layer < numLayers; layer++) {
          keys.push(await this.deviceOps!.upload(n > 0 ? streams.prefixKeys[layer] : new Float32Array(P * kv * d), [P, kv, d, Math.max(n, 1)]))
          values.push(await this.deviceOps!.upload(n > 0 ? streams.prefixValues[layer] : new Float32Array(P * kv * d), [P, kv, Math.max(n, 1), d]))
        }
        return {keys, values, valid: new Uint8Array(Math.max(n, 1)).fill(n > 0 ? 1 : 0)}
      })()
      this.initialCaches.set(parallel, initial)
    }
    return initial
  }

  select(tensors: ort.Tensor[], rows: number[]): Promise<ort.Tensor[]> {
    return this.deviceOps!.select(tensors, rows)
  }

  join(a: DeviceSegment, b: DeviceSegment, length: number): Promise<{keys: ort.Tensor[]; values: ort.Tensor[]}> {
    return this.deviceOps!.join(a, b, length)
  }

  async release(): Promise<void> {
    for (const head of this.deviceHeads.values()) for (const t of Object.values(await head)) t.dispose()
    for (const initial of this.initialCaches.values()) for (const t of [...(await initial).keys, ...(await initial).values]) t.dispose()
    await this.deviceOps?.release()
    await this.session?.release()
    for (const session of this.gpuFormSessions.values()) await (await session.catch(() => undefined))?.session.release()
    for (const {model} of this.captureModels.values()) await (await model.catch(() => undefined))?.release()
    for (const model of this.wgslModels.values()) (await model.catch(() => undefined))?.release()
    await (await this.widened)?.release()
    this.embeddings?.close()
  }
}

async function createSession(graph: string, options: ort.InferenceSession.SessionOptions): Promise<ort.InferenceSession> {
  try {
    return await ort.InferenceSession.create(graph, options)
  } catch (error) {
    // The package is damaged in a way its file sizes do not show (resolve.ts repairs those).
    throw new UserError(`${graph}: ONNX Runtime cannot load it (${(error as Error).message.split('\n')[0]}); the package is damaged: ${removalAdvice(dirname(graph))} (a checkpoint is converted again on its next use)`)
  }
}

/** A matrix [rows, cols] as [cols, rows]. */
function transposed(t: HostTensor): HostTensor {
  const [rows, cols] = t.dims
  const data = new Float32Array(t.data.length)
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) data[c * rows + r] = t.data[r * cols + c]
  return {data, dims: [cols, rows]}
}

/** Runs one piece of a row: its ids and how many of its last positions' logits to return (≥ 1). */
type PieceRunner = (ids: number[], wanted: number) => Promise<{logits: Float32Array; streamWeights: Float32Array}>

/**
 * A batch on a one-sequence form (the GPU form, the capture route): each row in pieces of at most
 * `pieceTokens`, keeping the last `numLogitsToKeep` positions' logits and stream weights
 * (0: all). `row` checks the row's slot and returns the runner of its pieces.
 */
async function forwardInPieces(inputIds: number[][], numLogitsToKeep: number, vocab: number, P: number, pieceTokens: number, row: (r: number, seq: number) => Promise<PieceRunner>): Promise<ForwardResult> {
  const count = inputIds.length
  const seq = inputIds[0]!.length
  const kept = numLogitsToKeep === 0 ? seq : Math.min(numLogitsToKeep, seq)
  const logits = new Float32Array(count * kept * vocab)
  const streamWeights = new Float32Array(count * kept * P)
  const firstKept = seq - kept
  for (let r = 0; r < count; r++) {
    const run = await row(r, seq)
    const ids = inputIds[r]!
    for (let begin = 0; begin < seq; begin += pieceTokens) {
      const end = Math.min(seq, begin + pieceTokens)
      const wanted = Math.max(0, end - Math.max(begin, firstKept)) // kept positions in this piece
      const out = await run(ids.slice(begin, end), Math.max(1, wanted))
      if (wanted === 0) continue
      const at = r * kept + (end - wanted - firstKept) // row of this piece's first kept position
      logits.set(out.logits.subarray(0, wanted * vocab), at * vocab)
      if (out.streamWeights.length >= wanted * P) streamWeights.set(out.streamWeights.subarray(0, wanted * P), at * P)
      else streamWeights.fill(1, at * P, (at + wanted) * P) // P = 1: one stream, weight 1
    }
  }
  return {logits, dims: [count, kept, vocab], streamWeights}
}
