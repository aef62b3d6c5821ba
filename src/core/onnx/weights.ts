import {createHash, type Hash} from 'node:crypto'

import type {Checkpoint} from '../checkpoint/checkpoint.js'
import {UserError} from '../errors.js'
import {decodeToFloat32, encodeFloat16} from '../checkpoint/dtype.js'
import {iterateTensorChunks, type TensorInfo} from '../checkpoint/safetensors.js'
import type {GraphBuilder} from './builder.js'
import {ExternalDataFile, type ExternalLocation} from './external-data.js'

export type WeightDtype = 'fp32' | 'fp16'

/** Where a float32 tensor of a P variant lies in that variant's weights file. */
export interface StoredTensor {
  offset: number
  length: number
  shape: number[]
}

/**
 * Where the embedding table lies in a package, for the engine to read the rows of the tokens
 * it runs (`engine/embedding-rows.ts`): float32 or float16 rows, or block-quantized codes
 * (`GatherBlockQuantized`'s layout: [rows, hidden·bits/8] codes, [rows, hidden/blockSize]
 * float32 scales, symmetric around 2^(bits−1)).
 */
export interface EmbeddingTable {
  file: string
  rows: number
  hidden: number
  dtype: 'float32' | 'float16' | 'int8' | 'int4'
  offset: number
  /** Quantized tables: where the scales start, and the inputs per scale. */
  scalesOffset?: number
  blockSize?: number
}

/** A matrix of a `linearConcat`, with its bias if it has one. */
export interface LinearPart {
  weight: string
  bias?: string
  /** Multiplies the part's weights and bias (folds a constant factor into the matmul). */
  scale?: number
}

/**
 * Hands the graph blocks weights by their checkpoint names. Vectors come as float32 values;
 * matrices are used only through `linear`, `linearByRowBlocks` and `embed`, so the weight
 * format (float32, fp16, quantized) decides which operators compute with them.
 */
export interface WeightProvider {
  /** The weight `name`, optionally viewed with another shape of the same size. */
  get(name: string, shape?: number[]): string
  /** y = x · Wᵀ (+ bias) for rows x [rows, in] and the matrix `name` as Hugging Face stores it, [out, in]. */
  linear(x: string, name: string, bias?: string): string
  /**
   * One linear over several matrices of the same input size, their rows (outputs) stacked in
   * order and stored as one tensor `storedAs`: the outputs of all parts side by side, from a
   * single matmul (one kernel instead of one per part).
   */
  linearConcat(x: string, parts: LinearPart[], storedAs: string): string
  /**
   * The same for a large matrix stored under `storedAs` (a name of its own, so it may be a
   * second copy) as consecutive blocks of whole rows of at most `maxBlockBytes` each: returns
   * one output per block, whose columns follow each other.
   */
  linearByRowBlocks(x: string, name: string, storedAs: string, maxBlockBytes: number): string[]
  /** Rows of the [vocab, hidden] table `name` for the token ids `ids`: [...ids shape, hidden]. */
  embed(name: string, ids: string): string
  /** A float32 backbone tensor computed at conversion time (e.g. rotary tables). */
  computed(name: string, values: Float32Array, shape: number[]): string
}

/**
 * Float matrices (float32, or fp16 widened by a Cast), which a graph may also arrange itself:
 * the WebGPU form transposes and concatenates them before multiplying.
 */
export interface FloatWeightProvider extends WeightProvider {
  /** The 2-D weight `name`, stored under `storedAs`, as consecutive blocks of whole rows of at most `maxBlockBytes` each. */
  rowBlocks(name: string, storedAs: string, maxBlockBytes: number): string[]
  /**
   * The matrix `linearConcat` multiplies by: the parts' rows stacked in order as one stored
   * tensor [Σ out, in] (each part's `scale` already applied), and their biases likewise.
   */
  concatenated(parts: LinearPart[], storedAs: string): {weight: string; bias?: string}
}

/** The operators on float matrices, given how to reach the weights. */
export function floatWeights(g: GraphBuilder, source: Pick<FloatWeightProvider, 'get' | 'rowBlocks' | 'computed' | 'concatenated'>): FloatWeightProvider {
  return {
    get: (name, shape) => source.get(name, shape),
    rowBlocks: (name, storedAs, maxBlockBytes) => source.rowBlocks(name, storedAs, maxBlockBytes),
    computed: (name, values, shape) => source.computed(name, values, shape),
    concatenated: (parts, storedAs) => source.concatenated(parts, storedAs),
    linearConcat: (x, parts, storedAs) => {
      const {weight, bias} = source.concatenated(parts, storedAs)
      return g.node('Gemm', bias ? [x, weight, bias] : [x, weight], {transB: 1})
    },
    linear: (x, name, bias) => g.node('Gemm', bias ? [x, source.get(name), source.get(bias)] : [x, source.get(name)], {transB: 1}),
    linearByRowBlocks: (x, name, storedAs, maxBlockBytes) => source.rowBlocks(name, storedAs, maxBlockBytes).map((block) => g.node('Gemm', [x, block], {transB: 1})),
    embed: (name, ids) => g.node('Gather', [source.get(name), ids], {axis: 0}),
  }
}

const CHUNK_BYTES = 16 << 20

/** The tensors that belong to one P (the rest is the backbone every P shares). */
export function streamTensorNames(numLayers: number): string[] {
  const prefixes = Array.from({length: numLayers}, (_, layer) => [`model.layers.${layer}.self_attn.prefix_k`, `model.layers.${layer}.self_attn.prefix_v`]).flat()
  return [...prefixes, 'model.aggregate_layer.0.weight', 'model.aggregate_layer.0.bias', 'model.aggregate_layer.2.weight', 'model.aggregate_layer.2.bias']
}

/**
 * Writes one P's own tensors (prefixes, aggregation head) as float32 into `path`, whatever the
 * package's dtype: they are small, precision-sensitive, and read by the runtime, not the graph.
 */
export function writeStreamTensors(path: string, checkpoint: Checkpoint, onBytesRead: (bytes: number) => void = () => {}): Record<string, StoredTensor> {
  const file = new ExternalDataFile(path)
  const tensors: Record<string, StoredTensor> = {}
  try {
    for (const name of streamTensorNames(checkpoint.config.numLayers)) {
      const info = checkpoint.get(name)
      const {offset, length} = file.append(convertedChunks(info, false))
      tensors[name] = {offset, length, shape: info.shape}
      onBytesRead(info.byteLength)
    }
  } finally {
    file.close()
  }
  return tensors
}

/** A backbone tensor already in the package: where, and a digest of its converted bytes. */
export interface PlacedTensor {
  location: ExternalLocation
  sha256: string
}

/**
 * Where converted backbone weights go: the file shared by every P of a package. A tensor
 * already placed (by an earlier P) is referenced again, not rewritten, once its bytes are
 * proven identical.
 */
export class WeightStore {
  readonly placedBackbone = new Map<string, PlacedTensor>()

  constructor(private readonly backbone: ExternalDataFile) {}

  place(name: string, chunks: Iterable<Uint8Array>, source: string): ExternalLocation {
    const placed = this.placedBackbone.get(name)
    if (!placed) {
      const hash = createHash('sha256')
      const location = this.backbone.append(hashing(chunks, hash))
      this.placedBackbone.set(name, {location, sha256: hash.digest('hex')})
      return location
    }
    const hash = createHash('sha256')
    for (const chunk of chunks) hash.update(chunk)
    if (hash.digest('hex') !== placed.sha256) {
      throw new UserError(`${source}: tensor "${name}" differs from the backbone already in the package; the P values of one package must share one backbone`)
    }
    return placed.location
  }

  private readonly derived = new Map<string, {sourceDigest: string; value: unknown}>()

  /**
   * Tensors derived from checkpoint bytes (a matrix's quantized codes and scales): `derive`
   * places them and returns where; it runs once, and is given a hash to feed the source
   * bytes it reads. A later P reading the same tensor only hashes its source (`hashSource`)
   * and gets the same result, or is refused like `place` refuses different bytes.
   */
  placeDerived<T>(key: string, source: string, derive: (sourceHash: Hash) => T, hashSource: (sourceHash: Hash) => void): T {
    const known = this.derived.get(key)
    const hash = createHash('sha256')
    if (!known) {
      const value = derive(hash)
      this.derived.set(key, {sourceDigest: hash.digest('hex'), value})
      return value
    }
    hashSource(hash)
    if (hash.digest('hex') !== known.sourceDigest) {
      throw new UserError(`${source}: tensor "${key}" differs from the backbone already in the package; the P values of one package must share one backbone`)
    }
    return known.value as T
  }

  /** One digest of the whole backbone, in placement order. */
  backboneDigest(): string {
    const hash = createHash('sha256')
    for (const [name, placed] of this.placedBackbone) hash.update(`${name}:${placed.sha256}\n`)
    return hash.digest('hex')
  }
}

function* hashing(chunks: Iterable<Uint8Array>, hash: ReturnType<typeof createHash>): Generator<Uint8Array> {
  for (const chunk of chunks) {
    hash.update(chunk)
    yield chunk
  }
}

/** A float weight already in the package's weight files: where, its shape, whether stored as half. */
export interface PlacedInitializer {
  half: boolean
  shape: number[]
  location: ExternalLocation
}

/**
 * Initializers of another graph over weights already placed in the package's files, each made once
 * (half ones widened to float32 by a Cast): how a second graph reads the same bytes as the first.
 */
export function placedInitializers(g: GraphBuilder, entryOf: (name: string) => PlacedInitializer): (name: string) => string {
  const made = new Map<string, string>()
  return (name) => {
    const cached = made.get(name)
    if (cached) return cached
    const entry = entryOf(name)
    const value = g.externalInitializer(name, entry.half ? 'float16' : 'float32', entry.shape, entry.location)
    const out = entry.half ? g.node('Cast', [value], {to: 1}) : value
    made.set(name, out)
    return out
  }
}

/**
 * Streams checkpoint tensors into the store as the graph asks for them. With fp16, matrices
 * are stored in half precision and widened by a Cast in the graph; vectors (norms, biases)
 * and the stream prefixes stay float32, as they are small and precision-sensitive.
 */
export class CheckpointWeights implements FloatWeightProvider {
  private readonly values = new Map<string, string>()
  /** Every initializer made, by name, so another graph of the package can read the same bytes. */
  private readonly made = new Map<string, PlacedInitializer>()
  private readonly blocks = new Map<string, string[]>()

  constructor(
    protected readonly g: GraphBuilder,
    protected readonly checkpoint: Checkpoint,
    protected readonly store: WeightStore,
    private readonly dtype: WeightDtype,
    protected readonly onBytesRead: (bytes: number) => void = () => {},
  ) {}

  get(name: string, shape?: number[]): string {
    return this.load(name, shape ? `${name}#${shape.join('x')}` : name, shape)
  }

  linear(x: string, name: string, bias?: string): string {
    const inputs = [x, this.get(name)]
    if (bias) inputs.push(this.get(bias))
    return this.g.node('Gemm', inputs, {transB: 1})
  }

  linearByRowBlocks(x: string, name: string, storedAs: string, maxBlockBytes: number): string[] {
    return this.rowBlocks(name, storedAs, maxBlockBytes).map((block) => this.g.node('Gemm', [x, block], {transB: 1}))
  }

  linearConcat(x: string, parts: LinearPart[], storedAs: string): string {
    const {weight, bias} = this.concatenated(parts, storedAs)
    return this.g.node('Gemm', bias ? [x, weight, bias] : [x, weight], {transB: 1})
  }

  concatenated(parts: LinearPart[], storedAs: string): {weight: string; bias?: string} {
    const infos = parts.map((p) => this.checkpoint.get(p.weight))
    const rows = infos.reduce((sum, info) => sum + info.shape[0]!, 0)
    const half = this.isHalf(infos[0]!)
    const location = this.store.place(storedAs, concatenated(infos.map((info, i) => convertedChunks(info, half, parts[i]!.scale))), this.checkpoint.dir)
    for (const info of infos) this.onBytesRead(info.byteLength)
    const weight = this.initializer(`${storedAs}.weight`, half, [rows, infos[0]!.shape[1]!], location)
    return parts.some((p) => p.bias) ? {weight, bias: this.concatBias(parts, storedAs)} : {weight}
  }

  /** The parts' biases one after another, float32 (zeros for a part without one). */
  protected concatBias(parts: LinearPart[], storedAs: string): string {
    const values = parts.map((p) => {
      const bias = p.bias ? readFloat32(this.checkpoint.get(p.bias)) : new Float32Array(this.checkpoint.get(p.weight).shape[0]!)
      return p.scale === undefined ? bias : bias.map((v) => v * p.scale!)
    })
    const total = values.reduce((sum, v) => sum + v.length, 0)
    const location = this.store.place(`${storedAs}.bias`, values.map((v) => new Uint8Array(v.buffer, v.byteOffset, v.byteLength)), this.checkpoint.dir)
    return this.initializer(`${storedAs}.bias`, false, [total], location)
  }

  embed(name: string, ids: string): string {
    return this.g.node('Gather', [this.get(name), ids], {axis: 0})
  }

  /**
   * Places the [vocab, hidden] table `name` in the package without a graph initializer (the CPU
   * graph takes the rows as an input) and says where it is. Another form (`placedFor`) may still
   * read it as an initializer.
   */
  embeddingTable(name: string): EmbeddingTable {
    const info = this.checkpoint.get(name)
    const half = this.isHalf(info)
    const location = this.place(info, name)
    this.made.set(name, {half, shape: info.shape, location})
    return {file: location.file, rows: info.shape[0]!, hidden: info.shape[1]!, dtype: half ? 'float16' : 'float32', offset: location.offset}
  }

  rowBlocks(name: string, storedAs: string, maxBlockBytes: number): string[] {
    const info = this.checkpoint.get(name)
    const [rows, columns] = info.shape
    const half = this.isHalf(info)
    const rowBytes = columns * (half ? 2 : 4)
    // Whole pages per block keep every block's offset page-aligned for memory mapping.
    const rowsPerBlock = Math.max(1024, Math.floor(maxBlockBytes / rowBytes / 1024) * 1024)
    const location = this.place(info, storedAs)
    const blocks: string[] = []
    const names: string[] = []
    for (let first = 0, i = 0; first < rows; first += rowsPerBlock, i++) {
      const count = Math.min(rowsPerBlock, rows - first)
      const block = {file: location.file, offset: location.offset + first * rowBytes, length: count * rowBytes}
      names.push(`${storedAs}[${first}:${first + count}]`)
      blocks.push(this.initializer(names[names.length - 1], half, [count, columns], block))
    }
    this.blocks.set(storedAs, names)
    return blocks
  }

  /**
   * The weights this provider placed, for a second graph of the same package (another device's
   * form): same initializer names, same bytes in the same files, nothing written again. Asking
   * it for a weight the first graph did not use is an error.
   */
  placedFor(g: GraphBuilder): FloatWeightProvider {
    const initializer = placedInitializers(g, (name) => {
      const entry = this.made.get(name)
      if (!entry) throw new Error(`weight "${name}" was not placed by the first graph`)
      return entry
    })
    return floatWeights(g, {
      get: (name, shape) => initializer(shape ? `${name}#${shape.join('x')}` : name),
      rowBlocks: (_name, storedAs) => {
        const names = this.blocks.get(storedAs)
        if (!names) throw new Error(`weight "${storedAs}" was not placed in blocks by the first graph`)
        return names.map((block) => initializer(block))
      },
      computed: (name) => initializer(name),
      concatenated: (parts, storedAs) => {
        const weight = initializer(`${storedAs}.weight`)
        return parts.some((p) => p.bias) ? {weight, bias: initializer(`${storedAs}.bias`)} : {weight}
      },
    })
  }

  computed(name: string, values: Float32Array, shape: number[]): string {
    const cached = this.values.get(name)
    if (cached) return cached
    const location = this.store.place(name, [new Uint8Array(values.buffer, values.byteOffset, values.byteLength)], this.checkpoint.dir)
    const value = this.initializer(name, false, shape, location)
    this.values.set(name, value)
    return value
  }

  private load(name: string, storedAs: string, shape?: number[]): string {
    const cached = this.values.get(storedAs)
    if (cached) return cached
    const info = this.checkpoint.get(name)
    const value = this.initializer(storedAs, this.isHalf(info), shape ?? info.shape, this.place(info, storedAs))
    this.values.set(storedAs, value)
    return value
  }

  protected isHalf(info: TensorInfo): boolean {
    return this.dtype === 'fp16' && info.shape.length === 2
  }

  private place(info: TensorInfo, storedAs: string): ExternalLocation {
    const location = this.store.place(storedAs, convertedChunks(info, this.isHalf(info)), this.checkpoint.dir)
    this.onBytesRead(info.byteLength)
    return location
  }

  /** A float32-valued initializer: half-precision storage is widened by a Cast. */
  protected initializer(name: string, half: boolean, shape: number[], location: ExternalLocation): string {
    this.made.set(name, {half, shape, location})
    const initializer = this.g.externalInitializer(name, half ? 'float16' : 'float32', shape, location)
    return half ? this.g.node('Cast', [initializer], {to: 1}) : initializer
  }
}

function* concatenated(parts: Iterable<Uint8Array>[]): Generator<Uint8Array> {
  for (const part of parts) yield* part
}

function readFloat32(info: TensorInfo): Float32Array {
  return Float32Array.from([...iterateTensorChunks(info, CHUNK_BYTES)].flatMap((chunk) => [...decodeToFloat32(info.dtype, chunk)]))
}

function* convertedChunks(info: TensorInfo, half: boolean, scale?: number): Generator<Uint8Array> {
  for (const chunk of iterateTensorChunks(info, CHUNK_BYTES)) {
    const values = decodeToFloat32(info.dtype, chunk)
    if (scale !== undefined) for (let i = 0; i < values.length; i++) values[i] = values[i]! * scale
    const out = half ? encodeFloat16(values) : values
    yield new Uint8Array(out.buffer, out.byteOffset, out.byteLength)
  }
}
