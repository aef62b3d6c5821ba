/**
 * int8 weights with one scale per output, in the layout ONNX Runtime's
 * `com.microsoft.DynamicQuantizeMatMul` reads: B as int8 [K, N] (the transpose of Hugging
 * Face's [out, in]), symmetric (no zero point), scales [N].
 *
 * Codes use 7 bits (±63), not 8: on x86 CPUs without VNNI, MLAS multiplies uint8
 * activations by int8 weights with `vpmaddubsw`, which saturates a pair of products at
 * ±32767; 255 · 127 · 2 overflows it, 255 · 63 · 2 does not (ONNX Runtime's own quantizer
 * calls this reduce_range). Widened from 4-bit blocks, 7 bits add little error.
 */
export const PER_COLUMN_MAX_CODE = 63

export interface PerColumnInt8 {
  /** [k, n] */
  codes: Int8Array
  /** [n] */
  scales: Float32Array
}

/**
 * Quantizes `n` rows of `k` values (row-major, one row per output) into int8 columns of B;
 * `scale` multiplies the scales (a factor folded into the matmul).
 */
export function quantizePerColumn(values: Float32Array, n: number, k: number, scale = 1): PerColumnInt8 {
  if (values.length !== n * k) throw new RangeError(`quantizePerColumn: ${values.length} values are not ${n} rows of ${k}`)
  const codes = new Int8Array(k * n)
  const scales = new Float32Array(n)
  for (let row = 0; row < n; row++) {
    let max = 0
    for (let i = row * k; i < (row + 1) * k; i++) max = Math.max(max, Math.abs(values[i]!))
    const step = max / PER_COLUMN_MAX_CODE
    scales[row] = step * scale
    const inverse = step === 0 ? 0 : 1 / step
    for (let i = 0; i < k; i++) codes[i * n + row] = Math.round(values[row * k + i]! * inverse)
  }
  return {codes, scales}
}

/** The [n, k] float values per-column codes stand for. */
export function dequantizePerColumn(q: PerColumnInt8, n: number, k: number): Float32Array {
  const out = new Float32Array(n * k)
  for (let row = 0; row < n; row++) for (let i = 0; i < k; i++) out[row * k + i] = q.codes[i * n + row]! * q.scales[row]!
  return out
}
