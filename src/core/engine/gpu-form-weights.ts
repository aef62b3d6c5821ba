/**
 * The GPU form's float matrices in the layout its graph multiplies by ([in, out], float32), written
 * once into the package folder (`gpu-form.weights`, indexed by `gpu-form.json`), as a quantized
 * package's widened decode graph is (quant/widen.ts). The package stores Hugging Face's [out, in]
 * (and fp16 packages half floats); a graph that transposed (or widened) them with ops on
 * initializers had ONNX Runtime fold those ops when a session loads: a second host copy of every
 * matrix while loading, and freed pages the allocator keeps (docs/benchmarks.md, host memory on
 * WebGPU). Over this file a session reads each matrix once, as stored, into the device.
 *
 * Matrices are transposed chunk by chunk (a few MB of rows at a time), so writing the file costs
 * no more memory than a chunk. Each P's aggregation head is laid out the same way into a small
 * file of its own (`model.gpu-p{P}.weights`), next to that P's graph.
 */
import {closeSync, existsSync, ftruncateSync, openSync, readFileSync, readSync, renameSync, rmSync, statSync, writeFileSync, writeSync} from 'node:fs'
import {join} from 'node:path'

import {decodeToFloat32} from '../checkpoint/dtype.js'
import type {ExternalLocation} from '../onnx/external-data.js'
import type {PackageManifest} from '../package/manifest.js'

export const GPU_FORM_WEIGHTS = 'gpu-form.weights'
const GPU_FORM_INDEX = 'gpu-form.json'
/** Bumped when the file's layout changes for the same package. */
const GPU_FORM_WEIGHTS_VERSION = 1

/** Offsets are multiples of this (ONNX Runtime maps page-aligned external data). */
const ALIGNMENT = 65536
/** Bytes of stored rows transposed at a time. */
const CHUNK_BYTES = 8 << 20

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

interface Index {
  version: number
  graphVersion: number
  backboneSha256: string
  tensors: Record<string, {sources: string[]; offset: number; length: number; shape: [number, number]}>
}

/**
 * The package's GPU-form matrices: read from `gpu-form.json` when it was written for this
 * backbone and holds every requested matrix from the same sources, else written now (a
 * temporary file renamed into place, then the index).
 */
export function gpuFormMatrices(packageDir: string, manifest: PackageManifest, requests: LayoutRequest[]): Map<string, LaidOutMatrix> {
  const indexPath = join(packageDir, GPU_FORM_INDEX)
  const weightsPath = join(packageDir, GPU_FORM_WEIGHTS)
  const fresh = (index: Index) =>
    index.version === GPU_FORM_WEIGHTS_VERSION && index.graphVersion === manifest.graphVersion && index.backboneSha256 === manifest.backbone.sha256 &&
    requests.every((r) => index.tensors[r.name]?.sources.join('\n') === r.sources.map((s) => s.name).join('\n'))
  let index: Index | undefined
  try {
    index = JSON.parse(readFileSync(indexPath, 'utf8')) as Index
  } catch {
    index = undefined
  }
  const complete = (i: Index) => existsSync(weightsPath) && statSync(weightsPath).size >= Math.max(0, ...Object.values(i.tensors).map((t) => t.offset + t.length))
  if (!index || !fresh(index) || !complete(index)) {
    const temporary = `${weightsPath}.tmp-${process.pid}`
    try {
      const tensors = writeTransposed(packageDir, temporary, requests)
      renameSync(temporary, weightsPath)
      index = {version: GPU_FORM_WEIGHTS_VERSION, graphVersion: manifest.graphVersion, backboneSha256: manifest.backbone.sha256, tensors: {}}
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
 * Writes each request's matrix transposed, float32, into `path` (replacing it), and returns
 * where each lies. Reads the package's files (`packageDir`) a chunk of rows at a time.
 */
export function writeTransposed(packageDir: string, path: string, requests: LayoutRequest[]): Map<string, {offset: number; length: number; shape: [number, number]}> {
  const placed = new Map<string, {offset: number; length: number; shape: [number, number]}>()
  let end = 0
  for (const r of requests) {
    const cols = r.sources[0]!.shape[1]!
    if (r.sources.some((s) => s.shape.length !== 2 || s.shape[1] !== cols)) throw new Error(`${r.name}: its parts are not matrices of ${cols} columns`)
    const rows = r.sources.reduce((n, s) => n + s.shape[0]!, 0)
    const offset = Math.ceil(end / ALIGNMENT) * ALIGNMENT
    placed.set(r.name, {offset, length: rows * cols * 4, shape: [cols, rows]})
    end = offset + rows * cols * 4
  }
  const out = openSync(path, 'w')
  const inputs = new Map<string, number>()
  try {
    ftruncateSync(out, end)
    for (const r of requests) {
      const {offset, shape} = placed.get(r.name)!
      const [cols, rows] = shape
      let firstRow = 0 // of the stacked matrix
      for (const source of r.sources) {
        let fd = inputs.get(source.location.file)
        if (fd === undefined) inputs.set(source.location.file, (fd = openSync(join(packageDir, source.location.file), 'r')))
        const elementBytes = source.half ? 2 : 4
        const sourceRows = source.shape[0]!
        const chunkRows = Math.max(1, Math.floor(CHUNK_BYTES / (cols * 4)))
        for (let r0 = 0; r0 < sourceRows; r0 += chunkRows) {
          const n = Math.min(chunkRows, sourceRows - r0)
          const bytes = Buffer.alloc(n * cols * elementBytes)
          readFully(fd, bytes, source.location.offset + r0 * cols * elementBytes)
          const values = decodeToFloat32(source.half ? 'F16' : 'F32', bytes)
          // rows r0 … r0+n of the source become columns firstRow+r0 … of the output's every row
          const tile = new Float32Array(cols * n)
          for (let i = 0; i < n; i++) for (let c = 0; c < cols; c++) tile[c * n + i] = values[i * cols + c]!
          const tileBytes = new Uint8Array(tile.buffer)
          for (let c = 0; c < cols; c++) {
            writeFully(out, tileBytes.subarray(c * n * 4, (c + 1) * n * 4), offset + (c * rows + firstRow + r0) * 4)
          }
        }
        firstRow += sourceRows
      }
    }
  } finally {
    for (const fd of inputs.values()) closeSync(fd)
    closeSync(out)
  }
  return placed
}

function readFully(fd: number, into: Buffer, position: number): void {
  let done = 0
  while (done < into.byteLength) {
    const n = readSync(fd, into, done, into.byteLength - done, position + done)
    if (n === 0) throw new Error(`unexpected end of file at ${position + done}`)
    done += n
  }
}

function writeFully(fd: number, bytes: Uint8Array, position: number): void {
  let done = 0
  while (done < bytes.byteLength) done += writeSync(fd, bytes, done, bytes.byteLength - done, position + done)
}
