/**
 * One ONNX Runtime session over a converted package, for every P it has: the backbone is held
 * once and each call picks its P through the cache it runs on (prefixes) and the aggregation
 * head it feeds. Sequences live in a `KvCache` of their P; `forward` appends to it.
 */
import {join} from 'node:path'

import ort from 'onnxruntime-node'

import type {BackboneShape} from '../checkpoint/config.js'
import {UserError} from '../errors.js'
import {io} from '../onnx/parscale-graph.js'
import {isCurrentGraph, readManifest, selectVariant, type PackageManifest} from '../package/manifest.js'
import {KvCache} from './kv-cache.js'
import {loadStreamWeights, type HostTensor, type StreamWeights} from './stream-weights.js'

export interface ModelOptions {
  /** Intra-op threads; default: ONNX Runtime's choice (one per core). */
  threads?: number
  /** Write an ONNX Runtime profile (JSON) with this file prefix. */
  profilePrefix?: string
  /** Most tokens per prefill call (default MAX_PREFILL_CHUNK; smaller in tests of chunking). */
  maxPrefillChunk?: number
}

export interface ForwardResult {
  /** [batch, positions, vocab] row-major */
  logits: Float32Array
  dims: [number, number, number]
  /** [batch, positions, P]: the aggregation weights of each stream (all 1 at P = 1). */
  streamWeights: Float32Array
}

/**
 * Attention scores of a prefill chunk are [P·heads, chunk, capacity + chunk] floats: chunks
 * are sized so that tensor stays near this many bytes (a 1 k-token prompt at P = 8 would
 * otherwise hold over 1 GB of scores at once).
 */
const PREFILL_SCORE_BYTES = 64 << 20
/** Logits of every position of a chunk (scoring text) are capped the same way. */
const PREFILL_LOGITS_BYTES = 64 << 20
/** Longest chunk: past it the matmuls are no faster per token and activations only grow. */
const MAX_PREFILL_CHUNK = 256
const MIN_PREFILL_CHUNK = 16

export class ParScaleModel {
  private readonly streamCache = new Map<number, StreamWeights>()

  private constructor(
    private readonly session: ort.InferenceSession,
    readonly packageDir: string,
    readonly manifest: PackageManifest,
    private readonly maxPrefillChunk: number,
  ) {}

  static async open(packageDir: string, options: ModelOptions = {}): Promise<ParScaleModel> {
    const manifest = readManifest(packageDir)
    if (!isCurrentGraph(manifest)) {
      throw new UserError(`${packageDir}: converted by an older parscale (graph version ${manifest.graphVersion}); convert it again`)
    }
    const sessionOptions: ort.InferenceSession.SessionOptions = {
      graphOptimizationLevel: 'all',
      executionMode: 'sequential',
      ...(options.threads ? {intraOpNumThreads: options.threads, interOpNumThreads: 1} : {}),
      ...(options.profilePrefix ? {enableProfiling: true, profileFilePrefix: options.profilePrefix} : {}),
    }
    const graph = join(packageDir, manifest.graph)
    let session: ort.InferenceSession
    try {
      session = await ort.InferenceSession.create(graph, sessionOptions)
    } catch (error) {
      throw new UserError(`${graph}: ONNX Runtime cannot load it (${(error as Error).message.split('\n')[0]}); convert again`)
    }
    return new ParScaleModel(session, packageDir, manifest, options.maxPrefillChunk ?? MAX_PREFILL_CHUNK)
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
  newCache(parallel: number): KvCache {
    return new KvCache(this.shape, this.streams(parallel))
  }

  /** Tokens per prefill call for a sequence at `parallel` whose cache holds `capacity` positions. */
  prefillChunk(parallel: number, capacity: number, logitsForEveryToken = false): number {
    let chunk = Math.floor(PREFILL_SCORE_BYTES / (parallel * this.shape.numHeads * Math.max(1, capacity) * 4))
    if (logitsForEveryToken) chunk = Math.min(chunk, Math.floor(PREFILL_LOGITS_BYTES / (this.vocabSize * 4)))
    return Math.min(this.maxPrefillChunk, Math.max(MIN_PREFILL_CHUNK, Math.min(MAX_PREFILL_CHUNK, chunk)))
  }

  /**
   * Runs `inputIds` (one equally long list per slot) for slots first … first+count−1 of
   * `cache` and appends their keys and values to it. `numLogitsToKeep` 0 returns logits for
   * every new position, k the last k.
   */
  async forward(cache: KvCache, first: number, inputIds: number[][], numLogitsToKeep: number): Promise<ForwardResult> {
    const count = inputIds.length
    const seq = inputIds[0]?.length ?? 0
    if (count === 0 || seq === 0 || inputIds.some((row) => row.length !== seq)) throw new Error('forward needs rows of equal, non-zero length')
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
      [io.inputIds]: new ort.Tensor('int64', BigInt64Array.from(inputIds.flat(), BigInt), [count, seq]),
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
    const out = await this.session.run(feeds)
    const layers = Array.from({length: this.shape.numLayers}, (_, layer) => layer)
    cache.append(
      first,
      count,
      seq,
      layers.map((layer) => out[io.newKey(layer)].data as Float32Array),
      layers.map((layer) => out[io.newValue(layer)].data as Float32Array),
    )
    const logits = out[io.logits]
    return {logits: logits.data as Float32Array, dims: logits.dims as [number, number, number], streamWeights: out[io.streamWeights].data as Float32Array}
  }

  async release(): Promise<void> {
    await this.session.release()
  }
}
