import {join} from 'node:path'

import ort from 'onnxruntime-node'

import type {ModelConfig} from '../checkpoint/config.js'
import {UserError} from '../errors.js'
import {type PackageManifest, readManifest, selectVariant, variantConfig} from '../package/manifest.js'
import {io} from '../onnx/parscale-graph.js'

type Tensor = ort.Tensor

/** Per-layer keys and values, each [batch, P·kv_heads, pastLength, head_dim] float32. */
export interface KvCache {
  keys: Tensor[]
  values: Tensor[]
  pastLength: number
}

export interface SessionOptions {
  /** Which P of the package to run; default: the package's first. */
  parallel?: number
  /** Intra-op threads; default: ONNX Runtime's choice (one per core). */
  threads?: number
  /** Write an ONNX Runtime profile (JSON) with this file prefix. */
  profilePrefix?: string
}

export interface ForwardResult {
  /** [batch, positions, vocab] row-major */
  logits: Float32Array
  dims: [number, number, number]
  present: KvCache
}

/**
 * One ONNX Runtime session over one P of a converted package: a plain decoder whose batch
 * is the caller's batch (the streams live inside the cache's head axis).
 */
export class DecoderSession {
  private constructor(
    private readonly session: ort.InferenceSession,
    readonly packageDir: string,
    readonly manifest: PackageManifest,
    readonly config: ModelConfig,
  ) {}

  static async open(packageDir: string, options: SessionOptions = {}): Promise<DecoderSession> {
    const manifest = readManifest(packageDir)
    const variant = selectVariant(manifest, options.parallel, packageDir)
    const sessionOptions: ort.InferenceSession.SessionOptions = {
      graphOptimizationLevel: 'all',
      executionMode: 'sequential',
      ...(options.threads ? {intraOpNumThreads: options.threads, interOpNumThreads: 1} : {}),
      ...(options.profilePrefix ? {enableProfiling: true, profileFilePrefix: options.profilePrefix} : {}),
    }
    let session: ort.InferenceSession
    try {
      session = await ort.InferenceSession.create(join(packageDir, variant.graph), sessionOptions)
    } catch (error) {
      throw new UserError(`${join(packageDir, variant.graph)}: ONNX Runtime cannot load it (${(error as Error).message.split('\n')[0]}); convert again`)
    }
    return new DecoderSession(session, packageDir, manifest, variantConfig(manifest, variant))
  }

  get parallel(): number {
    return this.config.parallel
  }

  get availableParallel(): number[] {
    return this.manifest.parallel
  }

  get numLayers(): number {
    return this.config.numLayers
  }

  get cacheHeads(): number {
    return this.config.parallel * this.config.numKvHeads
  }

  get headDim(): number {
    return this.config.headDim
  }

  get vocabSize(): number {
    return this.config.vocabSize
  }

  get maxPositions(): number {
    return this.config.maxPositionEmbeddings
  }

  emptyCache(batch: number): KvCache {
    const empty = () => new ort.Tensor('float32', new Float32Array(0), [batch, this.cacheHeads, 0, this.headDim])
    return {
      keys: Array.from({length: this.numLayers}, empty),
      values: Array.from({length: this.numLayers}, empty),
      pastLength: 0,
    }
  }

  /**
   * Runs new tokens through the decoder. `attentionMask` covers past and new tokens
   * (0 marks left padding); `numLogitsToKeep` 0 returns logits for every new position.
   */
  async forward(inputIds: number[][], attentionMask: number[][], past: KvCache, numLogitsToKeep: number): Promise<ForwardResult> {
    const batch = inputIds.length
    const seq = inputIds[0]?.length ?? 0
    const total = past.pastLength + seq
    if (attentionMask.length !== batch || attentionMask.some((row) => row.length !== total)) {
      throw new Error(`attention mask must be [${batch}, ${total}]`)
    }
    const feeds: Record<string, Tensor> = {
      [io.inputIds]: new ort.Tensor('int64', BigInt64Array.from(inputIds.flat(), BigInt), [batch, seq]),
      [io.attentionMask]: new ort.Tensor('int64', BigInt64Array.from(attentionMask.flat(), BigInt), [batch, total]),
      [io.numLogitsToKeep]: new ort.Tensor('int64', BigInt64Array.of(BigInt(numLogitsToKeep)), []),
    }
    for (let layer = 0; layer < this.numLayers; layer++) {
      feeds[io.pastKey(layer)] = past.keys[layer]
      feeds[io.pastValue(layer)] = past.values[layer]
    }
    const out = await this.session.run(feeds)
    const logits = out[io.logits]
    const present: KvCache = {
      keys: Array.from({length: this.numLayers}, (_, layer) => out[io.presentKey(layer)]),
      values: Array.from({length: this.numLayers}, (_, layer) => out[io.presentValue(layer)]),
      pastLength: total,
    }
    return {logits: logits.data as Float32Array, dims: logits.dims as [number, number, number], present}
  }

  /** Keeps (and reorders) batch rows of a cache, e.g. to drop finished sequences. */
  selectRows(cache: KvCache, rows: number[]): KvCache {
    const pick = (tensor: Tensor) => {
      const [batch, heads, length, dim] = tensor.dims
      const rowSize = heads * length * dim
      const data = tensor.data as Float32Array
      const out = new Float32Array(rows.length * rowSize)
      rows.forEach((row, i) => {
        if (row < 0 || row >= batch) throw new RangeError(`row ${row} outside batch ${batch}`)
        out.set(data.subarray(row * rowSize, (row + 1) * rowSize), i * rowSize)
      })
      return new ort.Tensor('float32', out, [rows.length, heads, length, dim])
    }
    return {keys: cache.keys.map(pick), values: cache.values.map(pick), pastLength: cache.pastLength}
  }

  async release(): Promise<void> {
    await this.session.release()
  }
}
