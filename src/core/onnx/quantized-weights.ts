import type {Hash} from 'node:crypto'

import type {Checkpoint} from '../checkpoint/checkpoint.js'
import {decodeToFloat32} from '../checkpoint/dtype.js'
import {DTYPE_BYTES, iterateTensorChunks, type TensorInfo} from '../checkpoint/safetensors.js'
import {blobBytes, blocksPerRow, quantizeRows, type BlockLayout} from '../quant/blockwise.js'
import {blockSizeFor, type QuantScheme} from '../quant/scheme.js'
import type {GraphBuilder} from './builder.js'
import type {ExternalLocation} from './external-data.js'
import {CheckpointWeights, type EmbeddingTable, type LinearPart, type WeightStore} from './weights.js'

/**
 * `MatMulNBits` accuracy level: 4 quantizes each row of activations to int8 per block and
 * multiplies integers (MLAS's int8 kernels), the fastest of the levels at one row and the one
 * measured in docs/benchmarks.md; 0/1 dequantize the weights to float32 first.
 */
export const MATMUL_ACCURACY_LEVEL = 4

/** Float32 rows of a checkpoint matrix read per step while quantizing (whole rows, about this many bytes). */
const CHUNK_BYTES = 16 << 20

/** A quantized matrix in the package: its codes and scales, and the layout they follow. */
interface StoredMatrix {
  storedAs: string
  codes: ExternalLocation
  scales: ExternalLocation
  rows: number
  layout: BlockLayout
}

/**
 * Weights for a package converted with `--quant`: every matrix a `linear` reads (projections,
 * MLP, LM head) is block-quantized into ONNX Runtime's `MatMulNBits` layout and the embedding
 * table into the same codes read by `GatherBlockQuantized`; vectors (norms, biases) stay
 * float32, as do the stream prefixes and the aggregation head (they are not backbone tensors).
 * Quantization streams: a few thousand rows at a time go from the checkpoint to the file.
 */
export class QuantizedCheckpointWeights extends CheckpointWeights {
  private readonly matrices = new Map<string, StoredMatrix>()
  private readonly initializers = new Set<string>()
  /** Tensors whose block size fell back from the one asked for (see `blockSizeFor`). */
  readonly blockFallbacks: Record<string, number> = {}

  constructor(
    g: GraphBuilder,
    checkpoint: Checkpoint,
    store: WeightStore,
    private readonly scheme: QuantScheme,
    onBytesRead: (bytes: number) => void = () => {},
  ) {
    super(g, checkpoint, store, 'fp32', onBytesRead)
  }

  override linear(x: string, name: string, bias?: string): string {
    return this.matMulNBits(x, this.quantized(name, name), bias ? this.get(bias) : undefined)
  }

  override linearConcat(x: string, parts: LinearPart[], storedAs: string): string {
    const matrix = this.quantizedRows(storedAs, parts.map((p) => ({name: p.weight, region: this.checkpoint.get(p.weight), scale: p.scale})))
    return this.matMulNBits(x, matrix, parts.some((p) => p.bias) ? this.concatBias(parts, storedAs) : undefined)
  }

  override linearByRowBlocks(x: string, name: string, storedAs: string, maxBlockBytes: number): string[] {
    const [rows, k] = this.checkpoint.get(name).shape as [number, number]
    const layout = this.layoutFor(name, k)
    const rowBytes = blocksPerRow(layout) * (blobBytes(layout) + 4)
    const rowsPerBlock = Math.max(1024, Math.floor(maxBlockBytes / rowBytes / 1024) * 1024)
    const outputs: string[] = []
    for (let first = 0; first < rows; first += rowsPerBlock) {
      const count = Math.min(rowsPerBlock, rows - first)
      outputs.push(this.matMulNBits(x, this.quantized(name, `${storedAs}[${first}:${first + count}]`, first, count)))
    }
    return outputs
  }

  /** The table's rows as GatherBlockQuantized reads them: codes [vocab, K·bits/8], scales [vocab, blocks]. */
  override embed(name: string, ids: string): string {
    const table = this.quantized(name, name)
    const {bits, blockSize, k} = table.layout
    const codes = this.quantizedInitializer(`${name}.codes`, 'uint8', [table.rows, (k * bits) / 8], table.codes)
    const scales = this.quantizedInitializer(`${name}.scales`, 'float32', [table.rows, blocksPerRow(table.layout)], table.scales)
    return this.g.node('GatherBlockQuantized', [codes, ids, scales], {bits, block_size: blockSize, gather_axis: 0, quantize_axis: 1}, 'com.microsoft')
  }

  /** The table's codes and scales, placed as `embed` places them, for the engine to read rows of. */
  override embeddingTable(name: string): EmbeddingTable {
    const table = this.quantized(name, name)
    const {bits, blockSize, k} = table.layout
    if (k % blockSize !== 0) throw new Error(`${name}: quantized embedding rows must be whole blocks`)
    return {file: table.codes.file, rows: table.rows, hidden: k, dtype: bits === 4 ? 'int4' : 'int8', offset: table.codes.offset, scalesOffset: table.scales.offset, blockSize}
  }

  /** x · Wᵀ (+ bias) with W as MatMulNBits reads it: codes [N, blocks, blob], scales [N · blocks]. */
  private matMulNBits(x: string, m: StoredMatrix, bias?: string): string {
    const {bits, blockSize, k} = m.layout
    const blocks = blocksPerRow(m.layout)
    const codes = this.quantizedInitializer(`${m.storedAs}.codes`, 'uint8', [m.rows, blocks, blobBytes(m.layout)], m.codes)
    const scales = this.quantizedInitializer(`${m.storedAs}.scales`, 'float32', [m.rows * blocks], m.scales)
    const inputs = [x, codes, scales]
    if (bias) inputs.push('', '', bias) // no zero points (symmetric), no g_idx
    return this.g.node('MatMulNBits', inputs, {K: k, N: m.rows, bits, block_size: blockSize, accuracy_level: MATMUL_ACCURACY_LEVEL}, 'com.microsoft')
  }

  private quantizedInitializer(name: string, type: 'uint8' | 'float32', shape: number[], location: ExternalLocation): string {
    if (!this.initializers.has(name)) this.initializers.add(this.g.externalInitializer(name, type, shape, location))
    return name
  }

  private layoutFor(name: string, k: number): BlockLayout {
    const blockSize = blockSizeFor(k, this.scheme.blockSize, name)
    if (blockSize !== this.scheme.blockSize) this.blockFallbacks[name] = blockSize
    return {bits: this.scheme.bits, blockSize, k}
  }

  /** Rows [first, first + count) of checkpoint matrix `name`, quantized and placed under `storedAs`. */
  private quantized(name: string, storedAs: string, first = 0, count?: number): StoredMatrix {
    const info = this.checkpoint.get(name)
    return this.quantizedRows(storedAs, [{name, region: rowRegion(info, first, count ?? info.shape[0]! - first)}])
  }

  /**
   * Rows of one or more checkpoint matrices of the same input size, stacked in order, quantized
   * and placed under `storedAs`. Every P of a package reads the backbone again: only the first
   * quantizes it, the others check that their source bytes are the same.
   */
  private quantizedRows(storedAs: string, parts: {name: string; region: TensorInfo; scale?: number}[]): StoredMatrix {
    const cached = this.matrices.get(storedAs)
    if (cached) return cached
    const k = parts[0]!.region.shape[1]!
    if (parts.some((p) => p.region.shape[1] !== k)) throw new Error(`${storedAs}: parts of different input sizes`)
    const [layout] = parts.map((p) => this.layoutFor(p.name, k)) // one block size for all (it depends on k only)
    const rows = parts.reduce((sum, p) => sum + p.region.shape[0]!, 0)
    const placed = this.store.placeDerived(
      storedAs,
      this.checkpoint.dir,
      (sourceHash) => {
        const scales = new Float32Array(rows * blocksPerRow(layout))
        const codes = this.store.place(`${storedAs}.codes`, quantizedChunks(parts, layout, scales, sourceHash), this.checkpoint.dir)
        return {codes, scales: this.store.place(`${storedAs}.scales`, [new Uint8Array(scales.buffer)], this.checkpoint.dir)}
      },
      (sourceHash) => {
        for (const p of parts) for (const chunk of iterateTensorChunks(p.region, CHUNK_BYTES)) sourceHash.update(chunk)
      },
    )
    const matrix: StoredMatrix = {storedAs, ...placed, rows, layout}
    for (const p of parts) this.onBytesRead(p.region.byteLength)
    this.matrices.set(storedAs, matrix)
    return matrix
  }
}

/** Rows [first, first + count) of a 2-D checkpoint tensor, as a tensor of their own. */
function rowRegion(info: TensorInfo, first: number, count: number): TensorInfo {
  const rowBytes = (info.byteLength / info.shape[0]!) | 0
  return {...info, shape: [count, ...info.shape.slice(1)], byteOffset: info.byteOffset + first * rowBytes, byteLength: count * rowBytes}
}

/**
 * Quantized codes of matrix rows (one region after another), a few MB of whole rows at a time;
 * each row's block scales are written into `scales` as its rows go by, and the source bytes
 * into `sourceHash`.
 */
function* quantizedChunks(parts: {region: TensorInfo; scale?: number}[], layout: BlockLayout, scales: Float32Array, sourceHash: Hash): Generator<Uint8Array> {
  let row = 0
  for (const {region, scale} of parts) {
    const rowBytes = layout.k * DTYPE_BYTES[region.dtype]
    const rowsPerChunk = Math.max(1, Math.floor(CHUNK_BYTES / rowBytes))
    for (const chunk of iterateTensorChunks(region, rowsPerChunk * rowBytes)) {
      sourceHash.update(chunk)
      const count = chunk.byteLength / rowBytes
      const quantized = quantizeRows(decodeToFloat32(region.dtype, chunk), count, layout)
      // a constant factor changes no code, only the scales
      if (scale !== undefined) for (let i = 0; i < quantized.scales.length; i++) quantized.scales[i] = quantized.scales[i]! * scale
      scales.set(quantized.scales, row * blocksPerRow(layout))
      row += count
      yield quantized.codes
    }
  }
  if (row * blocksPerRow(layout) !== scales.length) throw new Error(`quantizedChunks: read ${row} rows, expected ${scales.length / blocksPerRow(layout)}`)
}
