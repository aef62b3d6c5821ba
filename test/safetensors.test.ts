import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, it} from 'node:test'

import {decodeToFloat32, encodeFloat16, readTensorFloat32} from '../src/core/checkpoint/dtype.js'
import {FileFormatError} from '../src/core/errors.js'
import {iterateTensorChunks, readTensorBytes, SafetensorsFile} from '../src/core/checkpoint/safetensors.js'
import {f32Bytes, goldenDir, makeTempDir, type TestTensor, writeSafetensors, type WriteOptions} from './helpers/safetensors-writer.js'

const tmp = makeTempDir()
after(() => fs.rmSync(tmp, {recursive: true, force: true}))
let counter = 0

function tensors(): TestTensor[] {
  return [
    {name: 'a', dtype: 'F32', shape: [2, 3], data: f32Bytes([1, 2, 3, 4, 5, 6])},
    {name: 'b', dtype: 'BF16', shape: [4], data: new Uint8Array(new Uint16Array([0x3f80, 0x4000, 0xbf80, 0x0000]).buffer)},
    {name: 'c', dtype: 'F16', shape: [], data: new Uint8Array(new Uint16Array([0x3c00]).buffer)},
    {name: 'empty', dtype: 'F32', shape: [0, 5], data: new Uint8Array(0)},
  ]
}

function write(ts: TestTensor[] = tensors(), opts: WriteOptions = {}): string {
  const file = path.join(tmp, `t${counter++}.safetensors`)
  writeSafetensors(file, ts, opts)
  return file
}

function refuses(file: string, ...parts: string[]): void {
  assert.throws(() => SafetensorsFile.open(file), (err: unknown) => {
    assert.ok(err instanceof FileFormatError, `expected FileFormatError, got ${String(err)}`)
    assert.equal(err.file, file)
    assert.ok(err.message.startsWith(`${file}: `))
    for (const p of parts) assert.ok(err.message.includes(p), `"${err.message}" lacks "${p}"`)
    return true
  })
}

/** Sets one field of tensor `name` in the header. */
function withEntry(name: string, field: string, value: unknown): WriteOptions {
  return {editHeader: (h) => void ((h[name] as Record<string, unknown>)[field] = value)}
}

describe('safetensors: reading', () => {
  it('parses a header and reports absolute offsets', () => {
    const file = write(tensors(), {metadata: {format: 'pt'}})
    const st = SafetensorsFile.open(file)
    assert.equal(st.path, file)
    assert.deepEqual(st.metadata, {format: 'pt'})
    assert.deepEqual([...st.tensors.keys()], ['a', 'b', 'c', 'empty'])
    const a = st.tensors.get('a')!
    const headerLen = Number(fs.readFileSync(file).readBigUInt64LE(0))
    assert.deepEqual(a, {name: 'a', dtype: 'F32', shape: [2, 3], file, byteOffset: 8 + headerLen, byteLength: 24})
    assert.equal(st.tensors.get('b')!.byteOffset, 8 + headerLen + 24)
    assert.deepEqual(Array.from(readTensorFloat32(a)), [1, 2, 3, 4, 5, 6])
    assert.deepEqual(Array.from(readTensorFloat32(st.tensors.get('b')!)), [1, 2, -1, 0])
    assert.deepEqual(Array.from(readTensorFloat32(st.tensors.get('c')!)), [1])
    assert.equal(readTensorFloat32(st.tensors.get('empty')!).length, 0)
  })

  it('reads byte ranges of a tensor and refuses ranges outside it', () => {
    const a = SafetensorsFile.open(write()).tensors.get('a')!
    assert.deepEqual(Array.from(decodeToFloat32('F32', readTensorBytes(a, 8, 16))), [3, 4])
    assert.throws(() => readTensorBytes(a, 0, 28), RangeError)
    assert.throws(() => readTensorBytes(a, 12, 8), RangeError)
  })

  it('streams a tensor in chunks of whole elements', () => {
    const values = Array.from({length: 1001}, (_, i) => i * 0.5)
    const st = SafetensorsFile.open(write([{name: 'x', dtype: 'F32', shape: [1001], data: f32Bytes(values)}]))
    const x = st.tensors.get('x')!
    const chunks = [...iterateTensorChunks(x, 1000)]
    assert.ok(chunks.every((c) => c.length % 4 === 0 && c.length <= 1000))
    assert.equal(chunks.length, Math.ceil(4004 / 1000))
    assert.deepEqual(Array.from(decodeToFloat32('F32', Buffer.concat(chunks))), values)
    // A chunk limit below one element still yields whole elements.
    assert.ok([...iterateTensorChunks(x, 3)].every((c) => c.length === 4))
  })

  it('opens the golden files (F32, BF16 shards, F16)', () => {
    const p1 = SafetensorsFile.open(path.join(goldenDir('tiny-p1'), 'model.safetensors'))
    assert.equal(p1.tensors.size, 27)
    assert.equal(p1.metadata.format, 'pt')
    const s2 = SafetensorsFile.open(path.join(goldenDir('tiny-p4'), 'model-00002-of-00002.safetensors'))
    assert.ok([...s2.tensors.values()].every((t) => t.dtype === 'BF16'))
    const p2 = SafetensorsFile.open(path.join(goldenDir('tiny-p2-tied'), 'model.safetensors'))
    assert.deepEqual(p2.tensors.get('model.layers.1.self_attn.prefix_v')!.shape, [2, 6, 16, 16])
  })

  it('opens without reading tensor data (a sparse 3 GB file opens at once)', () => {
    const file = path.join(tmp, 'sparse.safetensors')
    const n = 750 * 1024 * 1024 // F32 elements: 3 GiB of data
    writeSafetensors(file, [], {rawHeader: JSON.stringify({big: {dtype: 'F32', shape: [n], data_offsets: [0, n * 4]}})})
    const size = fs.statSync(file).size + n * 4
    fs.truncateSync(file, size) // sparse: reading it whole would take seconds and 3 GB
    const t0 = performance.now()
    const big = SafetensorsFile.open(file).tensors.get('big')!
    assert.ok(performance.now() - t0 < 500)
    assert.equal(big.byteOffset + big.byteLength, size)
    assert.deepEqual(Array.from(decodeToFloat32('F32', readTensorBytes(big, big.byteLength - 8))), [0, 0])
  })

  it('follows symlinked files', () => {
    const target = write()
    const link = path.join(tmp, 'link.safetensors')
    fs.symlinkSync(path.basename(target), link)
    const a = SafetensorsFile.open(link).tensors.get('a')!
    assert.equal(a.file, link)
    assert.deepEqual(Array.from(readTensorFloat32(a)), [1, 2, 3, 4, 5, 6])
  })

  it('accepts tensors listed out of data order', () => {
    const file = write(tensors(), {editHeader: (h) => Object.fromEntries(Object.entries(h).reverse())})
    assert.equal(SafetensorsFile.open(file).tensors.size, 4)
  })
})

describe('safetensors: refused', () => {
  it('a missing file', () => {
    refuses(path.join(tmp, 'nope.safetensors'), 'not found')
  })

  it('a file shorter than 8 bytes', () => {
    const file = path.join(tmp, 'short.safetensors')
    fs.writeFileSync(file, Buffer.from([1, 2, 3]))
    refuses(file, 'too short', '3 bytes')
  })

  it('a header length past the end of the file', () => {
    refuses(write(tensors(), {headerLength: 100000n}), 'header length 100000', 'past the end')
  })

  it('an absurd header length', () => {
    refuses(write(tensors(), {headerLength: 2n ** 62n}), 'absurd')
    refuses(write(tensors(), {headerLength: 200_000_000n}), 'absurd')
  })

  it('a header that is not JSON', () => {
    refuses(write([], {rawHeader: '{"a": {"dtype": "F32",'}), 'not valid JSON')
  })

  it('a header that is not an object', () => {
    refuses(write([], {rawHeader: '[1, 2, 3]'}), 'not a JSON object')
    refuses(write([], {rawHeader: '"hello"'}), 'not a JSON object')
  })

  it('an entry that is not an object, or metadata that is not strings', () => {
    refuses(write(tensors(), {editHeader: (h) => void (h.z = 5)}), '"z"', 'not an object')
    refuses(write(tensors(), {metadata: {format: 'pt'}, editHeader: (h) => void (h.__metadata__ = {n: 1})}), '__metadata__')
  })

  it('unsupported or unknown dtypes', () => {
    refuses(write([{name: 'i', dtype: 'I8', shape: [4], data: new Uint8Array(4)}]), '"i"', 'dtype "I8" is not supported', 'F32, F16, BF16')
    refuses(write([{name: 'd', dtype: 'F64', shape: [1], data: new Uint8Array(8)}]), 'dtype "F64" is not supported')
    refuses(write([{name: 'q', dtype: 'Q4', shape: [1], data: new Uint8Array(1)}]), 'unknown dtype "Q4"')
    refuses(write(tensors(), withEntry('a', 'dtype', undefined)), '"a"', 'dtype')
  })

  it('a shape that is not an array of non-negative integers', () => {
    refuses(write(tensors(), withEntry('a', 'shape', [2, -3])), '"a"', 'shape [2,-3]')
    refuses(write(tensors(), withEntry('a', 'shape', [2, 1.5])), '"a"', 'shape')
    refuses(write(tensors(), withEntry('a', 'shape', '2x3')), '"a"', 'shape')
    refuses(write(tensors(), withEntry('a', 'shape', undefined)), '"a"', 'shape is missing')
  })

  it('data_offsets that are not [begin, end] integers', () => {
    refuses(write(tensors(), withEntry('a', 'data_offsets', [0])), '"a"', 'data_offsets')
    refuses(write(tensors(), withEntry('a', 'data_offsets', [0, 12, 24])), '"a"', 'data_offsets')
    refuses(write(tensors(), withEntry('a', 'data_offsets', [0, '24'])), '"a"', 'data_offsets')
    refuses(write(tensors(), withEntry('a', 'data_offsets', [-4, 20])), '"a"', 'data_offsets')
  })

  it('begin after end', () => {
    refuses(write(tensors(), withEntry('a', 'data_offsets', [24, 0])), '"a"', '[24, 0]', 'begin after end')
  })

  it('a byte size that does not match shape × dtype', () => {
    refuses(write(tensors(), withEntry('a', 'shape', [2, 2])), '"a"', '24 bytes', '[2, 2]', 'F32 (16 bytes)')
    refuses(write(tensors(), withEntry('b', 'dtype', 'F32')), '"b"', '8 bytes', 'F32 (16 bytes)')
  })

  it('overlapping tensors', () => {
    // "b" moved onto the second half of "a", keeping its size.
    refuses(write(tensors(), withEntry('b', 'data_offsets', [16, 24])), 'overlap', '"a"', '"b"')
  })

  it('offsets out of range of the data section', () => {
    const file = write(tensors(), withEntry('a', 'data_offsets', [1000, 1024]))
    const size = fs.statSync(file).size
    refuses(file, 'tensor "a" data [', `runs past the end of the file (${size} bytes)`)
  })

  it('a truncated file', () => {
    const file = write(tensors(), {truncateBy: 3})
    const size = fs.statSync(file).size
    refuses(file, 'tensor "c"', `runs past the end of the file (${size} bytes)`, 'truncated')
  })
})

describe('dtype conversions', () => {
  /** Independent reference: IEEE half from its fields. */
  function halfRef(h: number): number {
    const s = h & 0x8000 ? -1 : 1
    const e = (h >> 10) & 0x1f
    const m = h & 0x3ff
    if (e === 0) return s * m * 2 ** -24
    if (e === 31) return m ? NaN : s * Infinity
    return s * (1 + m / 1024) * 2 ** (e - 15)
  }

  it('decodes every f16 bit pattern exactly', () => {
    const all = new Uint16Array(65536).map((_, i) => i)
    const out = decodeToFloat32('F16', new Uint8Array(all.buffer))
    for (let h = 0; h < 65536; h++) {
      const ref = halfRef(h)
      if (Number.isNaN(ref)) assert.ok(Number.isNaN(out[h]), `0x${h.toString(16)}`)
      else assert.ok(Object.is(out[h], ref), `0x${h.toString(16)}: ${out[h]} vs ${ref}`)
    }
  })

  it('decodes bf16 as the top half of f32, from unaligned bytes too', () => {
    const vals = [1, -2.5, 3.140625, 1e30, -1e-30, 0, Infinity]
    const buf = Buffer.alloc(1 + vals.length * 2)
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.length)
    vals.forEach((v, i) => {
      const f = new DataView(new ArrayBuffer(4))
      f.setFloat32(0, v, true)
      dv.setUint16(1 + 2 * i, f.getUint16(2, true), true)
    })
    const out = decodeToFloat32('BF16', buf.subarray(1))
    vals.forEach((v, i) => {
      const f = new DataView(new ArrayBuffer(4))
      f.setFloat32(0, v, true)
      f.setUint16(0, 0, true) // bf16 truncation of the reference
      assert.equal(out[i], f.getFloat32(0, true))
    })
  })

  it('refuses a byte count that is not whole elements', () => {
    assert.throws(() => decodeToFloat32('F32', new Uint8Array(6)), RangeError)
  })

  it('encodes f16 round trips for every non-NaN half', () => {
    const all = new Uint16Array(65536).map((_, i) => i)
    const back = encodeFloat16(decodeToFloat32('F16', new Uint8Array(all.buffer)))
    for (let h = 0; h < 65536; h++) {
      if (Number.isNaN(halfRef(h))) assert.ok(Number.isNaN(halfRef(back[h]!)))
      else assert.equal(back[h], h, `0x${h.toString(16)}`)
    }
  })

  it('encodes f16 with round-to-nearest-even, overflow, underflow and specials', () => {
    const cases: [number, number][] = [
      [1 + 2 ** -11, 0x3c00], // tie → even (down)
      [1 + 3 * 2 ** -11, 0x3c02], // tie → even (up)
      [1 + 2 ** -11 + 2 ** -20, 0x3c01], // just above a tie
      [65504, 0x7bff],
      [65519, 0x7bff],
      [65520, 0x7c00], // tie at max rounds to inf
      [1e6, 0x7c00],
      [-1e6, 0xfc00],
      [Infinity, 0x7c00],
      [2 ** -24, 0x0001],
      [2 ** -25, 0x0000], // tie → even (zero)
      [2 ** -25 * 1.0001, 0x0001],
      [3 * 2 ** -25, 0x0002], // tie → even (up)
      [2 ** -14, 0x0400],
      [2 ** -14 - 2 ** -25, 0x0400], // subnormal rounding carries into the smallest normal
      [1e-10, 0x0000],
      [-1e-10, 0x8000],
      [1e-45, 0x0000], // f32 subnormal
      [-0, 0x8000],
    ]
    const out = encodeFloat16(Float32Array.from(cases.map((c) => c[0])))
    cases.forEach(([v, h], i) => assert.equal(out[i], h, `${v}: 0x${out[i]!.toString(16)} vs 0x${h.toString(16)}`))
    const nan = encodeFloat16(Float32Array.of(NaN))[0]!
    assert.ok((nan & 0x7c00) === 0x7c00 && (nan & 0x3ff) !== 0)
  })

  it('encodes random floats to the nearest half', () => {
    let seed = 12345
    const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32)
    const vals = Float32Array.from({length: 20000}, () => (rand() - 0.5) * 2 ** (rand() * 40 - 26))
    const enc = encodeFloat16(vals)
    vals.forEach((v, i) => {
      const h = enc[i]!
      const err = Math.abs(halfRef(h) - v)
      for (const n of [h - 1, h + 1]) {
        if ((n & 0x7fff) >= 0x7c00 || n < 0 || ((n ^ h) & 0x8000)) continue
        const nErr = Math.abs(halfRef(n) - v)
        assert.ok(err < nErr || (err === nErr && (h & 1) === 0), `${v} → 0x${h.toString(16)}`)
      }
    })
  })
})
