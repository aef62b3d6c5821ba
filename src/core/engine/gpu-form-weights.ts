/**
 * The GPU form's float matrices in the layout its graph multiplies by ([in, out]; float32, or
 * float16 in the half form of an fp16 package, the dtype recorded in the index so that one form's
 * file is never read as the other's), written
 * once into the package folder (`gpu-form.weights`, indexed by `gpu-form.json`), as a quantized
 * package's widened decode graph is (quant/widen.ts). The package stores Hugging Face's [out, in]
 * (and fp16 packages half floats); a graph that transposed (or widened) them with ops on
 * initializers had ONNX Runtime fold those ops when a session loads: a second host copy of every
 * matrix while loading, and freed pages the allocator keeps (docs/benchmarks.md, host memory on
 * WebGPU). Over this file a session reads each matrix once, as stored, into the device.
 *
 * Matrices are transposed a band of output rows at a time (≤ 64 MB, written sequentially at once,
 * from stored rows read 8 MB at a time), so writing the file costs no more memory than the two buffers. Each P's aggregation head is laid out the same way into a small
 * file of its own (`model.gpu-p{P}.weights`), next to that P's graph.
 */
import {closeSync, existsSync, ftruncateSync, openSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync, writeSync} from 'node:fs'
import {join} from 'node:path'

import {encodeFloat16, halfToFloatBits} from '../checkpoint/dtype.js'
import type {ExternalLocation} from '../onnx/external-data.js'
import type {PackageManifest} from '../package/manifest.js'
import {readAt} from '../read-at.js'

export const GPU_FORM_WEIGHTS = 'gpu-form.weights'
const GPU_FORM_INDEX = 'gpu-form.json'
/** Bumped when the file's layout changes for the same package. */
const GPU_FORM_WEIGHTS_VERSION = 1

/** Offsets are multiples of this (ONNX Runtime maps page-aligned external data). */
const ALIGNMENT = 65536
/** Bytes of stored rows read at a time. */
const CHUNK_BYTES = 8 << 20
/** Bytes of output rows made, then written, at a time (many small scattered writes made the first open slow). */
const BAND_BYTES = 64 << 20

/** A stored matrix [rows, cols] (Hugging Face's [out, in]), float32 or float16. */
export interface StoredMatrix {
  /** The tensor's name in the package. */
  name: string
  location: ExternalLocation
  half: boolean
  shape: number[]
}

/** One matrix to lay out: the stored tensors whose rows stack into it (q·k·v parts, the head's vocabulary blocks), [Σ rows, cols] → [cols, Σ rows]. */
export interface LayoutRequest {
  name: string
  sources: StoredMatrix[]
}

export interface LaidOutMatrix {
  location: ExternalLocation
  /** [in, out] */
  shape: [number, number]
}

/** The element type the matrices are written in: float32 (fp16 widened) or float16 (the half GPU form). */
export type LaidOutDtype = 'float32' | 'float16'

interface Index {
  version: number
  /** Absent in files written before the half GPU form: float32. */
  dtype?: LaidOutDtype
  graphVersion: number
  backboneSha256: string
  tensors: Record<string, {sources: string[]; offset: number; length: number; shape: [number, number]}>
}

/**
 * The package's GPU-form matrices: read from `gpu-form.json` when it was written for this
 * backbone and holds every requested matrix from the same sources, else written now (a
 * temporary file renamed into place, then the index).
 */
export function gpuFormMatrices(packageDir: string, manifest: PackageManifest, requests: LayoutRequest[], dtype: LaidOutDtype = 'float32'): Map<string, LaidOutMatrix> {
  const indexPath = join(packageDir, GPU_FORM_INDEX)
  const weightsPath = join(packageDir, GPU_FORM_WEIGHTS)
  const fresh = (index: Index) =>
    index.version === GPU_FORM_WEIGHTS_VERSION && (index.dtype ?? 'float32') === dtype && index.graphVersion === manifest.graphVersion && index.backboneSha256 === manifest.backbone.sha256 &&
    requests.every((r) => index.tensors[r.name]?.sources.join('\n') === r.sources.map((s) => s.name).join('\n'))
  let index: Index | undefined
  try {
    index = JSON.parse(readFileSync(indexPath, 'utf8')) as Index
  } catch {
    index = undefined
  }
  const complete = (i: Index) => existsSync(weightsPath) && statSync(weightsPath).size >= Math.max(0, ...Object.values(i.tensors).map((t) => t.offset + t.length))
  if (!index || !fresh(index) || !complete(index)) {
    removeAbandoned(packageDir)
    const temporary = `${weightsPath}.tmp-${process.pid}`
    try {
      const tensors = writeTransposed(packageDir, temporary, requests, BAND_BYTES, dtype)
      renameSync(temporary, weightsPath)
      index = {version: GPU_FORM_WEIGHTS_VERSION, dtype, graphVersion: manifest.graphVersion, backboneSha256: manifest.backbone.sha256, tensors: {}}
      for (const r of requests) index.tensors[r.name] = {sources: r.sources.map((s) => s.name), ...tensors.get(r.name)!}
      writeFileSync(`${indexPath}.tmp-${process.pid}`, JSON.stringify(index))
      renameSync(`${indexPath}.tmp-${process.pid}`, indexPath)
    } finally {
      rmSync(temporary, {force: true})
    }
  }
  const out = new Map<string, LaidOutMatrix>()
  for (const r of requests) {
    const t = index.tensors[r.name]!
    out.set(r.name, {location: {file: GPU_FORM_WEIGHTS, offset: t.offset, length: t.length}, shape: t.shape})
  }
  return out
}

/**
 * Writes each request's matrix transposed, as `dtype` (half sources copied bit for bit, or
 * widened; float32 sources rounded to half), into `path` (replacing it), and returns
 * where each lies. Output rows (stored columns) are made a band at a time in one reused buffer
 * of at most BAND_BYTES and written with one sequential write each; the stored rows are read
 * a chunk at a time (one reused buffer) once per band, so a matrix of at most BAND_BYTES is read
 * once and the largest (the vocabulary) a few times, from the page cache.
 */
export function writeTransposed(packageDir: string, path: string, requests: LayoutRequest[], bandBytes = BAND_BYTES, dtype: LaidOutDtype = 'float32'): Map<string, {offset: number; length: number; shape: [number, number]}> {
  const placed = new Map<string, {offset: number; length: number; shape: [number, number]}>()
  let end = 0
  const outBytes = dtype === 'float16' ? 2 : 4
  for (const r of requests) {
    const cols = r.sources[0]!.shape[1]!
    if (r.sources.some((s) => s.shape.length !== 2 || s.shape[1] !== cols)) throw new Error(`${r.name}: its parts are not matrices of ${cols} columns`)
    const rows = r.sources.reduce((n, s) => n + s.shape[0]!, 0)
    const offset = Math.ceil(end / ALIGNMENT) * ALIGNMENT
    placed.set(r.name, {offset, length: rows * cols * outBytes, shape: [cols, rows]})
    end = offset + rows * cols * outBytes
  }
  const out = openSync(path, 'w')
  const inputs = new Map<string, number>()
  let band: Uint32Array | Uint16Array = new (dtype === 'float16' ? Uint16Array : Uint32Array)(0) // bits of the output rows being made
  let chunk = new ArrayBuffer(0) // stored rows as read
  const halfBits = halfToFloatBits()
  try {
    ftruncateSync(out, end)
    for (const r of requests) {
      const {offset, shape} = placed.get(r.name)!
      const [cols, rows] = shape
      const bandRows = Math.max(1, Math.min(cols, Math.floor(bandBytes / (rows * outBytes))))
      if (band.length < bandRows * rows) band = new (dtype === 'float16' ? Uint16Array : Uint32Array)(bandRows * rows)
      for (let c0 = 0; c0 < cols; c0 += bandRows) {
        const width = Math.min(bandRows, cols - c0)
        let firstRow = 0 // of the stacked matrix
        for (const source of r.sources) {
          let fd = inputs.get(source.location.file)
          if (fd === undefined) inputs.set(source.location.file, (fd = openSync(join(packageDir, source.location.file), 'r')))
          const elementBytes = source.half ? 2 : 4
          const sourceRows = source.shape[0]!
          const chunkRows = Math.max(1, Math.floor(CHUNK_BYTES / (cols * elementBytes)))
          if (chunk.byteLength < chunkRows * cols * elementBytes) chunk = new ArrayBuffer(chunkRows * cols * elementBytes)
          for (let r0 = 0; r0 < sourceRows; r0 += chunkRows) {
            const n = Math.min(chunkRows, sourceRows - r0)
            readFully(fd, new Uint8Array(chunk, 0, n * cols * elementBytes), source.location.offset + r0 * cols * elementBytes)
            // stored rows r0 … r0+n become columns firstRow+r0 … of output rows c0 … c0+width
            const base = firstRow + r0
            if (source.half) {
              const values = new Uint16Array(chunk, 0, n * cols)
              // half to half: the stored bits as they are
              const bits = outBytes === 2 ? (h: number) => h : (h: number) => halfBits[h]!
              for (let i = 0; i < n; i++) for (let c = 0, from = i * cols + c0, to = base + i; c < width; c++, to += rows) band[to] = bits(values[from + c]!)
            } else if (outBytes === 2) {
              const values = encodeFloat16(new Float32Array(chunk, 0, n * cols))
              for (let i = 0; i < n; i++) for (let c = 0, from = i * cols + c0, to = base + i; c < width; c++, to += rows) band[to] = values[from + c]!
            } else {
              const values = new Uint32Array(chunk, 0, n * cols)
              for (let i = 0; i < n; i++) for (let c = 0, from = i * cols + c0, to = base + i; c < width; c++, to += rows) band[to] = values[from + c]!
            }
          }
          firstRow += sourceRows
        }
        writeFully(out, new Uint8Array(band.buffer, 0, width * rows * outBytes), offset + c0 * rows * outBytes)
      }
    }
  } finally {
    for (const fd of inputs.values()) closeSync(fd)
    closeSync(out)
  }
  return placed
}

/** Temporary files a killed process left (`<name>.tmp-<pid>` of a pid no longer running): never a half-written file under the real name, but disk to take back. */
function removeAbandoned(packageDir: string): void {
  for (const name of readdirSync(packageDir)) {
    const match = /^(?:gpu-form\.weights|gpu-form\.json)\.tmp-(\d+)$/.exec(name)
    if (!match || Number(match[1]) === process.pid) continue
    try {
      process.kill(Number(match[1]), 0)
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ESRCH') rmSync(join(packageDir, name), {force: true})
    }
  }
}

/** Reads exactly `into.byteLength` bytes at `position` (readAt); `what` names the read in the error. */
export function readFully(fd: number, into: Uint8Array, position: number, what?: string): void {
  const done = readAt(fd, into, position)
  if (done < into.byteLength) throw new Error(`${what ? `${what}: ` : ''}unexpected end of file at ${position + done}`)
}

function writeFully(fd: number, bytes: Uint8Array, position: number): void {
  let done = 0
  while (done < bytes.byteLength) done += writeSync(fd, bytes, done, bytes.byteLength - done, position + done)
}
