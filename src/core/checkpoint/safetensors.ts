import fs from 'node:fs'

import {FileFormatError} from '../errors.js'
import {readAt} from '../read-at.js'
import {QUANTIZED_REFUSAL} from './config.js'

/** The element types parscale reads; every other safetensors dtype is refused at open. */
export type SafetensorsDtype = 'F32' | 'F16' | 'BF16'

export interface TensorInfo {
  name: string
  dtype: SafetensorsDtype
  shape: number[]
  /** The file that holds the data (as given to `SafetensorsFile.open`; may be a symlink). */
  file: string
  /** Absolute offset of the first byte in `file`. */
  byteOffset: number
  byteLength: number
}

export const DTYPE_BYTES: Readonly<Record<SafetensorsDtype, number>> = {F32: 4, F16: 2, BF16: 2}

/** The safetensors reference implementation refuses headers over 100 MB; so do we. */
export const MAX_HEADER_BYTES = 100 * 1024 * 1024

/** Dtypes that exist in the safetensors format but that parscale does not read. */
const OTHER_KNOWN_DTYPES = new Set([
  'F64', 'I64', 'I32', 'I16', 'I8', 'U64', 'U32', 'U16', 'U8', 'BOOL',
  'F8_E4M3', 'F8_E5M2', 'F8_E8M0', 'F6_E2M3', 'F6_E3M2', 'F4',
])

export function isSupportedDtype(dtype: unknown): dtype is SafetensorsDtype {
  return dtype === 'F32' || dtype === 'F16' || dtype === 'BF16'
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

function isNonNegativeSafeInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0
}

/** Reads exactly `length` bytes at `position`; a file that ends first is a format error naming the bytes wanted. */
function readExactly(fd: number, file: string, position: number, length: number): Buffer {
  const buf = Buffer.allocUnsafe(length)
  const done = readAt(fd, buf, position)
  if (done < length) throw new FileFormatError(file, `unexpected end of file at byte ${position + done} (wanted bytes [${position}, ${position + length}))`)
  return buf
}

function openForRead(file: string): number {
  try {
    return fs.openSync(file, 'r')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    throw new FileFormatError(file, code === 'ENOENT' ? 'file not found' : `cannot open (${code ?? String(err)})`)
  }
}

/** Tensor names GPTQ and AWQ checkpoints use in place of a float `.weight`. */
export function isQuantizedTensorName(name: string): boolean {
  return /\.(qweight|qzeros|scales|g_idx)$/.test(name)
}

export class SafetensorsFile {
  private constructor(
    readonly path: string,
    readonly tensors: ReadonlyMap<string, TensorInfo>,
    readonly metadata: Record<string, string>,
    /** Size of the file in bytes. */
    readonly fileSize: number,
    /** Absolute offset where the data section begins (8 + header length). */
    readonly dataOffset: number,
  ) {}

  /** Reads and strictly validates the header only; tensor data is never touched. */
  static open(path: string): SafetensorsFile {
    const fd = openForRead(path)
    try {
      const fileSize = fs.fstatSync(fd).size
      if (fileSize < 8) {
        throw new FileFormatError(path, `too short to be a safetensors file (${fileSize} bytes; the header length alone takes 8)`)
      }
      const headerLen = readExactly(fd, path, 0, 8).readBigUInt64LE(0)
      if (headerLen > BigInt(MAX_HEADER_BYTES)) {
        throw new FileFormatError(path, `header length ${headerLen} is absurd (over ${MAX_HEADER_BYTES} bytes); not a safetensors file or corrupt`)
      }
      const n = Number(headerLen)
      if (8 + n > fileSize) {
        throw new FileFormatError(path, `header length ${n} runs past the end of the file (${fileSize} bytes); the file is truncated or not safetensors`)
      }
      const text = readExactly(fd, path, 8, n).toString('utf8')
      let header: unknown
      try {
        header = JSON.parse(text)
      } catch (err) {
        throw new FileFormatError(path, `header is not valid JSON (${(err as Error).message})`)
      }
      if (!isPlainObject(header)) {
        throw new FileFormatError(path, 'header is not a JSON object')
      }
      const dataOffset = 8 + n
      const {tensors, metadata} = parseHeader(path, header, dataOffset, fileSize)
      return new SafetensorsFile(path, tensors, metadata, fileSize, dataOffset)
    } finally {
      fs.closeSync(fd)
    }
  }
}

/** A tensor's entry in the header, with its offsets inside the data section. */
interface HeaderEntry {
  info: TensorInfo
  begin: number
  end: number
}

function parseHeader(
  path: string,
  header: Record<string, unknown>,
  dataOffset: number,
  fileSize: number,
): {tensors: Map<string, TensorInfo>; metadata: Record<string, string>} {
  const metadata: Record<string, string> = {}
  const entries: HeaderEntry[] = []
  for (const [name, value] of Object.entries(header)) {
    if (name === '__metadata__') Object.assign(metadata, parseMetadata(path, value))
    else entries.push(parseTensorEntry(path, name, value, dataOffset))
  }
  checkNoOverlap(path, entries)
  checkInsideFile(path, entries, dataOffset, fileSize)
  return {tensors: new Map(entries.map((e) => [e.info.name, e.info])), metadata}
}

function parseMetadata(path: string, value: unknown): Record<string, string> {
  if (!isPlainObject(value)) throw new FileFormatError(path, '"__metadata__" is not an object of strings')
  const metadata: Record<string, string> = {}
  for (const [k, v] of Object.entries(value)) {
    if (typeof v !== 'string') throw new FileFormatError(path, `"__metadata__" value "${k}" is not a string`)
    metadata[k] = v
  }
  return metadata
}

/** One tensor's header entry: a supported dtype, a shape, and offsets that hold exactly its bytes. */
function parseTensorEntry(path: string, name: string, value: unknown, dataOffset: number): HeaderEntry {
  if (!isPlainObject(value)) throw new FileFormatError(path, `tensor "${name}": header entry is not an object`)
  const {dtype, shape, data_offsets: offsets} = value
  if (!isSupportedDtype(dtype) && isQuantizedTensorName(name)) {
    throw new FileFormatError(path, `tensor "${name}" is a quantized weight (GPTQ/AWQ layout); ${QUANTIZED_REFUSAL}`)
  }
  if (!isSupportedDtype(dtype)) {
    const what = typeof dtype === 'string'
      ? (OTHER_KNOWN_DTYPES.has(dtype) ? `dtype "${dtype}" is not supported` : `unknown dtype "${dtype}"`)
      : `dtype ${JSON.stringify(dtype) ?? 'is missing'}`
    throw new FileFormatError(path, `tensor "${name}": ${what} (supported: F32, F16, BF16)`)
  }
  if (!Array.isArray(shape) || !shape.every(isNonNegativeSafeInt)) {
    throw new FileFormatError(path, `tensor "${name}": shape ${JSON.stringify(shape) ?? 'is missing'} is not an array of non-negative integers`)
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegativeSafeInt)) {
    throw new FileFormatError(path, `tensor "${name}": data_offsets ${JSON.stringify(offsets) ?? 'is missing'} is not [begin, end] of non-negative integers`)
  }
  const [begin, end] = offsets as [number, number]
  if (begin > end) {
    throw new FileFormatError(path, `tensor "${name}": data_offsets [${begin}, ${end}] begin after end`)
  }
  let elements = 1
  for (const d of shape as number[]) elements *= d
  const expected = elements * DTYPE_BYTES[dtype]
  if (!Number.isSafeInteger(expected) || expected !== end - begin) {
    throw new FileFormatError(
      path,
      `tensor "${name}": ${end - begin} bytes of data do not match shape [${(shape as number[]).join(', ')}] × ${dtype} (${expected} bytes)`,
    )
  }
  return {
    begin, end,
    info: {name, dtype, shape: [...(shape as number[])], file: path, byteOffset: dataOffset + begin, byteLength: end - begin},
  }
}

/** Sorted by start; empty tensors occupy no bytes and cannot overlap anything. */
function checkNoOverlap(path: string, entries: HeaderEntry[]): void {
  const sorted = entries.filter((e) => e.end > e.begin).sort((a, b) => a.begin - b.begin || a.end - b.end)
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1]!, cur = sorted[i]!
    if (cur.begin < prev.end) {
      throw new FileFormatError(
        path,
        `tensors "${prev.info.name}" [${prev.begin}, ${prev.end}) and "${cur.info.name}" [${cur.begin}, ${cur.end}) overlap in the data section`,
      )
    }
  }
}

/** Reports the tensor reaching furthest, so a truncated file names the real tail. */
function checkInsideFile(path: string, entries: HeaderEntry[], dataOffset: number, fileSize: number): void {
  const dataSize = fileSize - dataOffset
  const last = entries.reduce<HeaderEntry | undefined>((m, e) => (m === undefined || e.end > m.end ? e : m), undefined)
  if (last && last.end > dataSize) {
    const a = last.info.byteOffset, b = a + last.info.byteLength
    throw new FileFormatError(
      path,
      `tensor "${last.info.name}" data [${a}, ${b}) runs past the end of the file (${fileSize} bytes); the file is truncated or its offsets are out of range`,
    )
  }
}

/** Positional read of bytes [start, end) of one tensor (defaults: the whole tensor). */
export function readTensorBytes(info: TensorInfo, start = 0, end = info.byteLength): Buffer {
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end > info.byteLength || start > end) {
    throw new RangeError(`readTensorBytes: range [${start}, ${end}) is outside tensor "${info.name}" (${info.byteLength} bytes)`)
  }
  const fd = openForRead(info.file)
  try {
    return readExactly(fd, info.file, info.byteOffset + start, end - start)
  } finally {
    fs.closeSync(fd)
  }
}

/**
 * Streams a tensor in chunks of whole elements, at most `maxChunkBytes` each (at least one
 * element), so multi-GB tensors never sit in memory at once. Each chunk is a fresh Buffer.
 */
export function* iterateTensorChunks(info: TensorInfo, maxChunkBytes: number): Generator<Buffer> {
  const elem = DTYPE_BYTES[info.dtype]
  const step = Math.max(elem, Math.floor(maxChunkBytes / elem) * elem)
  if (info.byteLength === 0) return
  const fd = openForRead(info.file)
  try {
    for (let pos = 0; pos < info.byteLength; pos += step) {
      yield readExactly(fd, info.file, info.byteOffset + pos, Math.min(step, info.byteLength - pos))
    }
  } finally {
    fs.closeSync(fd)
  }
}
