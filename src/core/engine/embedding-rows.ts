/**
 * The embedding rows of the tokens a call runs, read from the package with positional reads:
 * the CPU graph takes them as `inputs_embeds`. A Gather over a memory-mapped table made the
 * kernel fault in pages all over the table (read-ahead around each row): a 1 k-token prompt
 * held 0.58 GB of the 0.55 GB table resident (docs/benchmarks.md). Reading a row costs
 * `hidden` floats (3.5 kB at 0.5b), through the page cache, and nothing stays mapped.
 */
import {closeSync, openSync} from 'node:fs'
import {join} from 'node:path'

import {decodeToFloat32} from '../checkpoint/dtype.js'
import {UserError} from '../errors.js'
import type {EmbeddingTable} from '../onnx/weights.js'
import {readAt} from '../read-at.js'

export class EmbeddingRows {
  private fd: number | undefined
  /** Bytes of one row's values (codes for a quantized table). */
  private readonly rowBytes: number
  private readonly blocks: number
  private readonly buffer: Buffer

  constructor(
    packageDir: string,
    private readonly table: EmbeddingTable,
  ) {
    const {dtype, hidden, blockSize} = table
    this.rowBytes = dtype === 'float32' ? hidden * 4 : dtype === 'float16' ? hidden * 2 : dtype === 'int8' ? hidden : hidden / 2
    this.blocks = blockSize ? hidden / blockSize : 0
    this.buffer = Buffer.alloc(this.rowBytes + this.blocks * 4)
    this.fd = openSync(join(packageDir, table.file), 'r')
  }

  get hidden(): number {
    return this.table.hidden
  }

  /** The rows of `ids`, one after another: [ids.length, hidden] float32. */
  rows(ids: readonly number[]): Float32Array {
    const {hidden, rows} = this.table
    const out = new Float32Array(ids.length * hidden)
    ids.forEach((id, i) => {
      if (!Number.isInteger(id) || id < 0 || id >= rows) throw new UserError(`token id ${id} is outside the model's vocabulary (0–${rows - 1})`)
      this.readRow(id, out.subarray(i * hidden, (i + 1) * hidden))
    })
    return out
  }

  private readRow(id: number, into: Float32Array): void {
    const {dtype, offset, scalesOffset} = this.table
    const codes = this.read(this.buffer, this.rowBytes, offset + id * this.rowBytes)
    if (dtype === 'float32') {
      into.set(new Float32Array(codes.buffer, codes.byteOffset, into.length))
      return
    }
    if (dtype === 'float16') {
      into.set(decodeToFloat32('F16', codes))
      return
    }
    const scales = this.read(this.buffer.subarray(this.rowBytes), this.blocks * 4, scalesOffset! + id * this.blocks * 4)
    const scale = new Float32Array(scales.buffer, scales.byteOffset, this.blocks)
    const blockSize = this.table.blockSize!
    // symmetric codes around 2^(bits−1), as GatherBlockQuantized dequantizes them
    if (dtype === 'int8') {
      for (let i = 0; i < into.length; i++) into[i] = (codes[i]! - 128) * scale[(i / blockSize) | 0]!
    } else {
      for (let i = 0; i < into.length; i++) into[i] = (((codes[i >> 1]! >> ((i & 1) * 4)) & 15) - 8) * scale[(i / blockSize) | 0]!
    }
  }

  private read(into: Buffer, length: number, position: number): Buffer {
    if (this.fd === undefined) throw new Error('embedding rows: read after close')
    if (readAt(this.fd, into.subarray(0, length), position) < length) throw new UserError(`${this.table.file}: ends inside the embedding table; the package is damaged`)
    // aligned copy for the typed-array views above (a Buffer's byteOffset may not be a multiple of 4)
    return into.byteOffset % 4 === 0 ? into.subarray(0, length) : Buffer.from(into.subarray(0, length))
  }

  close(): void {
    if (this.fd !== undefined) closeSync(this.fd)
    this.fd = undefined
  }
}
