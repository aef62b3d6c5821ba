/**
 * Block quantization of weight rows, in the layout ONNX Runtime's `com.microsoft` operators
 * read: `MatMulNBits` takes B as [N, blocks, blob] uint8 with one float scale per block, and
 * `GatherBlockQuantized` takes a table as [rows, K·bits/8] uint8 with scales [rows, blocks].
 * Both are the same bytes for a Hugging Face [out, in] matrix: each row (one output of a
 * linear, or one token's embedding) is cut along its K inputs into blocks of `blockSize`
 * values, and each block is stored as unsigned codes with the implicit zero point
 * 2^(bits−1) (8 for 4-bit, 128 for 8-bit) and a scale, value = (code − zero) · scale. 4-bit
 * codes are packed two per byte, the lower K index in the low nibble.
 */

export type QuantBits = 4 | 8

export interface BlockLayout {
  bits: QuantBits
  blockSize: number
  /** Inputs per row (K). */
  k: number
}

/** Blocks per row: the last one is padded with zero codes when blockSize does not divide K. */
export function blocksPerRow(layout: BlockLayout): number {
  return Math.ceil(layout.k / layout.blockSize)
}

/** Bytes of one block's codes (MatMulNBits' blob_size). */
export function blobBytes(layout: BlockLayout): number {
  return (layout.blockSize * layout.bits) / 8
}

export interface QuantizedRows {
  /** [rows, blocks, blob] */
  codes: Uint8Array
  /** [rows, blocks] */
  scales: Float32Array
}

/**
 * Quantizes `rows` consecutive rows of K float values each (row-major). Symmetric, as
 * llama.cpp's q4_0/q8_0: the block's value of largest magnitude m becomes the most negative
 * code, scale = m / −2^(bits−1), so the full code range is used whichever sign m has (the
 * scale is negative when m is positive; ONNX Runtime only multiplies by it). Values within
 * half a step of −m on the other side are clipped to the largest code (error < one step).
 */
export function quantizeRows(values: Float32Array, rows: number, layout: BlockLayout): QuantizedRows {
  const {bits, blockSize, k} = layout
  if (values.length !== rows * k) throw new RangeError(`quantizeRows: ${values.length} values are not ${rows} rows of ${k}`)
  const blocks = blocksPerRow(layout)
  const blob = blobBytes(layout)
  const zero = 1 << (bits - 1)
  const maxCode = (1 << bits) - 1
  const codes = new Uint8Array(rows * blocks * blob)
  const scales = new Float32Array(rows * blocks)
  const block = new Uint8Array(blockSize)
  for (let row = 0; row < rows; row++) {
    for (let b = 0; b < blocks; b++) {
      const start = row * k + b * blockSize
      const end = row * k + Math.min(k, (b + 1) * blockSize)
      let extreme = 0
      for (let i = start; i < end; i++) if (Math.abs(values[i]!) > Math.abs(extreme)) extreme = values[i]!
      const scale = extreme === 0 ? 0 : Math.fround(extreme / -zero)
      const inverse = scale === 0 ? 0 : 1 / scale
      block.fill(zero)
      for (let i = start; i < end; i++) {
        const code = Math.round(values[i]! * inverse) + zero
        block[i - start] = code < 0 ? 0 : code > maxCode ? maxCode : code
      }
      scales[row * blocks + b] = scale
      const out = (row * blocks + b) * blob
      if (bits === 8) codes.set(block, out)
      else for (let j = 0; j < blob; j++) codes[out + j] = block[2 * j]! | (block[2 * j + 1]! << 4)
    }
  }
  return {codes, scales}
}

/** The float values quantized rows stand for (the reference the operators are tested against). */
export function dequantizeRows(quantized: QuantizedRows, rows: number, layout: BlockLayout): Float32Array {
  const {bits, blockSize, k} = layout
  const blocks = blocksPerRow(layout)
  const blob = blobBytes(layout)
  const zero = 1 << (bits - 1)
  const out = new Float32Array(rows * k)
  for (let row = 0; row < rows; row++) {
    for (let i = 0; i < k; i++) {
      const b = Math.floor(i / blockSize)
      const within = i - b * blockSize
      const base = (row * blocks + b) * blob
      const code = bits === 8 ? quantized.codes[base + within]! : (quantized.codes[base + (within >> 1)]! >> ((within & 1) * 4)) & 15
      out[row * k + i] = (code - zero) * quantized.scales[row * blocks + b]!
    }
  }
  return out
}
