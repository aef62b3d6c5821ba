import {closeSync, fsyncSync, openSync, writeSync} from 'node:fs'
import {basename} from 'node:path'

/** Where one tensor's bytes live inside an external data file. */
export interface ExternalLocation {
  file: string // file name relative to the graph's folder
  offset: number
  length: number
}

// Page alignment lets ONNX Runtime map large weights straight from the file.
const ALIGNMENT = 4096

/**
 * An ONNX external data file written front to back: tensors are appended as they are
 * converted, so no more than one chunk of one tensor is ever in memory.
 */
export class ExternalDataFile {
  private readonly fd: number
  private position = 0
  readonly name: string

  constructor(readonly path: string) {
    this.fd = openSync(path, 'w')
    this.name = basename(path)
  }

  /** Appends one tensor given as consecutive byte chunks. */
  append(chunks: Iterable<Uint8Array>): ExternalLocation {
    this.padTo(ALIGNMENT)
    const offset = this.position
    for (const chunk of chunks) this.write(chunk)
    return {file: this.name, offset, length: this.position - offset}
  }

  get size(): number {
    return this.position
  }

  close(): void {
    fsyncSync(this.fd)
    closeSync(this.fd)
  }

  private padTo(alignment: number): void {
    const rest = this.position % alignment
    if (rest !== 0) this.write(new Uint8Array(alignment - rest))
  }

  private write(bytes: Uint8Array): void {
    let done = 0
    while (done < bytes.byteLength) done += writeSync(this.fd, bytes, done, bytes.byteLength - done, this.position + done)
    this.position += bytes.byteLength
  }
}
