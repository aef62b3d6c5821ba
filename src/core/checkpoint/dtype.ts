import os from 'node:os'

import {DTYPE_BYTES, readTensorBytes, type SafetensorsDtype, type TensorInfo} from './safetensors.js'

// safetensors data is little-endian; the typed-array views below assume the host is too.
if (os.endianness() !== 'LE') throw new Error('parscale needs a little-endian host')

let f16Table: Uint32Array | undefined

/** f16 bit pattern → f32 bit pattern, all 65536 of them (256 KiB, built on first use). */
export function halfToFloatBits(): Uint32Array {
  if (f16Table) return f16Table
  const table = new Uint32Array(65536)
  const f = new Float32Array(1)
  const u = new Uint32Array(f.buffer)
  for (let h = 0; h < 65536; h++) {
    const sign = (h & 0x8000) << 16
    const exp = (h >>> 10) & 0x1f
    const mant = h & 0x3ff
    if (exp === 0) {
      // Zero or subnormal: mant · 2^-24 is exact in f32.
      f[0] = mant * 2 ** -24
      table[h] = (sign | u[0]!) >>> 0
    } else if (exp === 31) {
      table[h] = (sign | 0x7f800000 | (mant << 13)) >>> 0 // inf, or NaN with its payload
    } else {
      table[h] = (sign | ((exp + 112) << 23) | (mant << 13)) >>> 0
    }
  }
  return (f16Table = table)
}

/** Widens F32/F16/BF16 little-endian bytes to float32; exact for every input. */
export function decodeToFloat32(dtype: SafetensorsDtype, bytes: Buffer | Uint8Array): Float32Array {
  const size = DTYPE_BYTES[dtype]
  if (size === undefined) throw new RangeError(`decodeToFloat32: unsupported dtype ${String(dtype)}`)
  if (bytes.byteLength % size !== 0) {
    throw new RangeError(`decodeToFloat32: ${bytes.byteLength} bytes is not a whole number of ${dtype} elements`)
  }
  const n = bytes.byteLength / size
  const out = new Float32Array(n)
  if (dtype === 'F32') {
    new Uint8Array(out.buffer).set(bytes) // copy: the source may be unaligned
    return out
  }
  const outBits = new Uint32Array(out.buffer)
  // Read u16s without requiring alignment of the source.
  const src = bytes.byteOffset % 2 === 0
    ? new Uint16Array(bytes.buffer, bytes.byteOffset, n)
    : new Uint16Array(Uint8Array.from(bytes).buffer)
  if (dtype === 'BF16') {
    for (let i = 0; i < n; i++) outBits[i] = src[i]! << 16
  } else {
    const table = halfToFloatBits()
    for (let i = 0; i < n; i++) outBits[i] = table[src[i]!]!
  }
  return out
}

/** float32 → IEEE half bit patterns, round to nearest even; overflow → ±inf, NaN stays NaN. */
export function encodeFloat16(values: Float32Array): Uint16Array {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length)
  const out = new Uint16Array(values.length)
  for (let i = 0; i < bits.length; i++) {
    const x = bits[i]!
    const sign = (x >>> 16) & 0x8000
    const exp = (x >>> 23) & 0xff
    const mant = x & 0x7fffff
    let h: number
    if (exp === 0xff) {
      h = mant === 0 ? 0x7c00 : 0x7e00 | (mant >>> 13) // keep NaN quiet and non-zero
    } else {
      const e = exp - 112 // rebias 127 → 15
      if (e >= 31) {
        h = 0x7c00
      } else if (e <= 0) {
        if (e < -10) {
          h = 0 // below half the smallest subnormal (or f32 subnormal): rounds to zero
        } else {
          const m = mant | 0x800000
          const shift = 14 - e
          h = m >>> shift
          const rem = m & ((1 << shift) - 1)
          const half = 1 << (shift - 1)
          if (rem > half || (rem === half && (h & 1) !== 0)) h++ // may carry into the smallest normal: correct
        }
      } else {
        h = (e << 10) | (mant >>> 13)
        const rem = mant & 0x1fff
        if (rem > 0x1000 || (rem === 0x1000 && (h & 1) !== 0)) h++ // may carry into the exponent, up to inf: correct
      }
    }
    out[i] = sign | h
  }
  return out
}

/** Reads a whole tensor and widens it to float32. For big tensors use iterateTensorChunks. */
export function readTensorFloat32(info: TensorInfo): Float32Array {
  return decodeToFloat32(info.dtype, readTensorBytes(info))
}
