/**
 * int8 weights with one scale per output, in the layout ONNX Runtime's
 * `com.microsoft.DynamicQuantizeMatMul` (and `MatMulInteger`) read: B as int8 [K, N] (the
 * transpose of Hugging Face's [out, in]), symmetric (zero point 0), scales [N].
 */
export interface PerColumnInt8 {
  /** [k, n] */
  codes: Int8Array
  /** [n] */
  scales: Float32Array
}

/** Quantizes `n` rows of `k` values (row-major, one row per output) into int8 columns of B. */
export function quantizePerColumn(values: Float32Array, n: number, k: number): PerColumnInt8 {
  if (values.length !== n * k) throw new RangeError(`quantizePerColumn: ${values.length} values are not ${n} rows of ${k}`)
  const codes = new Int8Array(k * n)
  const scales = new Float32Array(n)
  for (let row = 0; row < n; row++) {
    let max = 0
    for (let i = row * k; i < (row + 1) * k; i++) max = Math.max(max, Math.abs(values[i]!))
    const scale = Math.fround(max / 127)
    scales[row] = scale
    const inverse = scale === 0 ? 0 : 1 / scale
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
