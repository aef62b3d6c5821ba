// Test helpers: write (possibly broken) safetensors files and make broken copies of the
// golden checkpoints. Independent of src/core so tests do not check the reader with itself.
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import {fileURLToPath} from 'node:url'

export interface TestTensor {
  name: string
  /** Any string, so tests can write dtypes the reader must refuse. */
  dtype: string
  shape: number[]
  data: Uint8Array
}

export interface WriteOptions {
  metadata?: Record<string, string>
  /** Edit the header object (after offsets are assigned) before it is serialized. */
  editHeader?: (header: Record<string, unknown>) => unknown
  /** Use this header text verbatim instead of building one. */
  rawHeader?: string
  /** Declare this header length instead of the real one. */
  headerLength?: bigint
  /** Drop this many bytes from the end of the finished file. */
  truncateBy?: number
}

/** Writes tensors back to back in the given order (offsets relative to the data section). */
export function writeSafetensors(file: string, tensors: readonly TestTensor[], opts: WriteOptions = {}): void {
  let headerObj: Record<string, unknown> = {}
  if (opts.metadata) headerObj.__metadata__ = opts.metadata
  let offset = 0
  for (const t of tensors) {
    headerObj[t.name] = {dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength]}
    offset += t.data.byteLength
  }
  if (opts.editHeader) headerObj = (opts.editHeader(headerObj) as Record<string, unknown> | undefined) ?? headerObj
  let text = opts.rawHeader ?? JSON.stringify(headerObj)
  // The format pads the header with spaces so the data section is 8-byte aligned.
  if (opts.rawHeader === undefined) text += ' '.repeat((8 - (Buffer.byteLength(text) % 8)) % 8)
  const header = Buffer.from(text, 'utf8')
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(opts.headerLength ?? BigInt(header.length))
  let out = Buffer.concat([len, header, ...tensors.map((t) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength))])
  if (opts.truncateBy) out = out.subarray(0, Math.max(0, out.length - opts.truncateBy))
  fs.mkdirSync(path.dirname(file), {recursive: true})
  fs.writeFileSync(file, out)
}

/** Reads every tensor of a (valid) safetensors file, in data order; small test files only. */
export function readSafetensorsForTest(file: string): {tensors: TestTensor[]; metadata?: Record<string, string>} {
  const buf = fs.readFileSync(file)
  const n = Number(buf.readBigUInt64LE(0))
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, {dtype: string; shape: number[]; data_offsets: [number, number]}>
  const base = 8 + n
  const tensors: TestTensor[] = []
  let metadata: Record<string, string> | undefined
  for (const [name, v] of Object.entries(header)) {
    if (name === '__metadata__') {
      metadata = v as unknown as Record<string, string>
      continue
    }
    const [b, e] = v.data_offsets
    tensors.push({name, dtype: v.dtype, shape: v.shape, data: new Uint8Array(buf.subarray(base + b, base + e))})
  }
  tensors.sort((a, b) => (header[a.name]!.data_offsets[0] - header[b.name]!.data_offsets[0]))
  return {tensors, ...(metadata ? {metadata} : {})}
}

/** Rewrites a safetensors file after `edit` changes its tensor list (remove, reshape, add). */
export function rewriteSafetensors(file: string, edit: (tensors: TestTensor[]) => TestTensor[] | void, opts: WriteOptions = {}): void {
  const {tensors, metadata} = readSafetensorsForTest(file)
  const next = edit(tensors) ?? tensors
  fs.rmSync(file, {force: true}) // the copy may be a symlink: never write through it
  writeSafetensors(file, next, {...(metadata ? {metadata} : {}), ...opts})
}

/** Reads, edits and rewrites a JSON file (config.json, the index). `edit` may return a replacement. */
export function editJson(file: string, edit: (json: Record<string, unknown>) => unknown): void {
  const json = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>
  const next = edit(json) ?? json
  fs.writeFileSync(file, typeof next === 'string' ? next : JSON.stringify(next, null, 2))
}

/** A fresh temporary folder; remove it with `fs.rmSync(dir, {recursive: true, force: true})`. */
export function makeTempDir(prefix = 'parscale-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix))
}

/** The repository's golden fixture folder of `name` (tests run from dist/test/...). */
export function goldenDir(name: 'tiny-p1' | 'tiny-p4' | 'tiny-p2-tied' | string): string {
  let dir = path.dirname(fileURLToPath(import.meta.url))
  while (!fs.existsSync(path.join(dir, 'fixtures', 'golden'))) {
    const up = path.dirname(dir)
    if (up === dir) throw new Error('fixtures/golden not found above ' + fileURLToPath(import.meta.url))
    dir = up
  }
  return path.join(dir, 'fixtures', 'golden', name)
}

/**
 * Copies checkpoint folder `srcDir` to `dstDir` (created; undefined: a new temp folder), then
 * lets `mutate(copy)` break it. Returns the copy's path. Symlinks are copied as files.
 */
export function copyCheckpointWith(srcDir: string, dstDir: string | undefined, mutate?: (dir: string) => void): string {
  const dst = dstDir ?? path.join(makeTempDir(), path.basename(srcDir))
  fs.cpSync(srcDir, dst, {recursive: true, dereference: true})
  mutate?.(dst)
  return dst
}

/** Little-endian float32 bytes of `values`. */
export function f32Bytes(values: readonly number[] | Float32Array): Uint8Array {
  return new Uint8Array(Float32Array.from(values).buffer)
}
