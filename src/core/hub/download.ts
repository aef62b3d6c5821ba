import {createHash, type Hash} from 'node:crypto'
import {createReadStream} from 'node:fs'
import {lstat, open, rename, rm, stat} from 'node:fs/promises'

import {HubApiError} from '@huggingface/hub'

import {UserError} from '../errors.js'
import {backoffMs, isTransientNetworkError, sleep, type RetryPolicy} from './http.js'

/**
 * One file from the Hub into a blob of the cache: the bytes go to `<blob>.incomplete` (resumed
 * with a Range request after a drop, or by a later pull), are checked against the size and hash
 * the hub listed, and only then renamed to the blob. A blob path therefore never holds a
 * partial or corrupt file.
 */

export interface BlobDownloadOptions {
  /** Where to GET the file (the resolve URL, or where it redirected). */
  url: string
  fetch: typeof fetch
  /** Final blob path; the partial download lives beside it as `<blobPath>.incomplete`. */
  blobPath: string
  /** The repo path, for messages. */
  file: string
  size: number
  /** LFS files: the sha256 of the content. */
  sha256?: string
  /** Other files: the git blob sha1 (`sha1("blob <size>\0" + content)`). */
  gitOid?: string
  signal?: AbortSignal
  retry: RetryPolicy
  /** A connection that sends nothing for this long is dropped and resumed (default 60 s). */
  idleTimeoutMs?: number
  /** `done`: bytes of this file on disk so far; `delta`: bytes just received from the network. */
  onProgress?: (done: number, delta: number) => void
}

export interface BlobDownloadResult {
  /** Bytes received from the network by this call. */
  downloadedBytes: number
  /** Bytes already on disk (a previous partial download) when this call started. */
  resumedFrom: number
  /** Range requests made to resume after a drop. */
  resumes: number
}

/** A reason to start the file again from its first byte (server ignored or botched the range). */
class RestartDownload extends Error {}

/** A transfer that failed in a way worth retrying (dropped, stalled, cut short). */
class TransientDownloadError extends Error {
  readonly code = 'ETRANSFER'
}

function diskError(err: unknown, path: string): UserError | undefined {
  const code = (err as NodeJS.ErrnoException)?.code
  if (code === 'ENOSPC' || code === 'EDQUOT') {
    return new UserError(`disk full while writing ${path}: free some space, or set HF_HUB_CACHE to a folder on a larger disk`)
  }
  if (code === 'EACCES' || code === 'EPERM' || code === 'EROFS') {
    return new UserError(`cannot write ${path} (${code}): set HF_HUB_CACHE to a writable folder`)
  }
  return undefined
}

/** Size of the partial file, after removing anything there that is not a plain file. */
async function partialSize(path: string): Promise<number> {
  try {
    const st = await lstat(path)
    if (st.isFile()) return st.size
    await rm(path, {recursive: true, force: true})
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
  }
  return 0
}

async function hashPrefix(path: string, length: number, hash: Hash): Promise<void> {
  if (length === 0) return
  for await (const chunk of createReadStream(path, {start: 0, end: length - 1})) hash.update(chunk as Buffer)
}

function parseContentRangeStart(header: string | null): number | undefined {
  const m = /^bytes\s+(\d+)-\d+\/(\d+|\*)$/i.exec(header?.trim() ?? '')
  return m ? Number(m[1]) : undefined
}

async function writeAll(fh: import('node:fs/promises').FileHandle, chunk: Uint8Array): Promise<void> {
  let off = 0
  while (off < chunk.length) {
    const {bytesWritten} = await fh.write(chunk, off, chunk.length - off)
    off += bytesWritten
  }
}

/** Downloads into `<blobPath>.incomplete`, verifies, renames to `blobPath`. */
export async function downloadBlob(o: BlobDownloadOptions): Promise<BlobDownloadResult> {
  const tmp = `${o.blobPath}.incomplete`
  const algo = o.sha256 ? 'sha256' : o.gitOid ? 'sha1' : undefined
  const expected = (o.sha256 ?? o.gitOid)?.toLowerCase()
  const newHash = (): Hash | undefined => {
    if (!algo) return undefined
    const h = createHash(algo)
    if (algo === 'sha1') h.update(`blob ${o.size}\0`)
    return h
  }
  let failures = 0
  let restartedAfterMismatch = false
  let downloadedBytes = 0
  let resumedFrom = -1
  let resumes = 0

  for (;;) {
    o.signal?.throwIfAborted()
    let offset = await partialSize(tmp)
    if (offset > o.size) {
      await rm(tmp, {force: true})
      offset = 0
    }
    const state = {hash: newHash(), offset}
    if (state.hash) await hashPrefix(tmp, offset, state.hash)
    if (resumedFrom < 0) resumedFrom = offset
    const resumedPartial = offset > 0
    o.onProgress?.(offset, 0)

    try {
      if (offset > 0 && offset === o.size) {
        // Everything is on disk already: just verify below.
      } else {
        if (offset > 0) resumes++
        await transfer(o, tmp, state, (n) => (downloadedBytes += n))
      }
    } catch (err) {
      if (err instanceof UserError || o.signal?.aborted) throw err
      const disk = diskError(err, tmp)
      if (disk) throw disk
      if (err instanceof RestartDownload) {
        await rm(tmp, {force: true})
      } else if (!(err instanceof TransientDownloadError) && !isTransientNetworkError(err)) {
        throw err
      }
      failures++
      if (failures >= o.retry.attempts) {
        throw err instanceof HubApiError ? err : new TransientDownloadError(`${o.file}: download failed ${failures} times (${(err as Error).message})`)
      }
      await sleep(backoffMs(o.retry, failures), o.signal)
      continue
    }

    const onDisk = await partialSize(tmp)
    if (onDisk !== o.size) {
      // A body that ended early without an error: resume it like a drop.
      failures++
      if (onDisk > o.size || failures >= o.retry.attempts) {
        await rm(tmp, {force: true})
        throw new UserError(`${o.file}: got ${onDisk} bytes, the hub listed ${o.size}; the download was discarded`)
      }
      await sleep(backoffMs(o.retry, failures), o.signal)
      continue
    }
    const digest = state.hash?.digest('hex')
    if (expected && digest !== expected) {
      await rm(tmp, {force: true})
      if (resumedPartial && !restartedAfterMismatch) {
        // The partial may predate this pull: one fresh try from the first byte.
        restartedAfterMismatch = true
        continue
      }
      const what = algo === 'sha256' ? 'sha256' : 'git sha1'
      throw new UserError(`${o.file}: ${what} mismatch (the hub listed ${expected}, the bytes hash to ${digest}); the download was discarded`)
    }
    await rename(tmp, o.blobPath)
    return {downloadedBytes, resumedFrom: Math.max(0, resumedFrom), resumes}
  }
}

/** One GET (with Range when resuming), appended to `tmp`; `count` sees every chunk received. */
async function transfer(o: BlobDownloadOptions, tmp: string, state: {hash?: Hash; offset: number}, count: (n: number) => void): Promise<number> {
  const idle = new AbortController()
  const signal = o.signal ? AbortSignal.any([o.signal, idle.signal]) : idle.signal
  const idleMs = o.idleTimeoutMs ?? 60_000
  let timer = setTimeout(() => idle.abort(), idleMs)
  const kick = (): void => {
    clearTimeout(timer)
    timer = setTimeout(() => idle.abort(), idleMs)
  }
  const headers: Record<string, string> = {'accept-encoding': 'identity'}
  if (state.offset > 0) headers.range = `bytes=${state.offset}-`
  try {
    const res = await o.fetch(o.url, {headers, signal})
    await checkResumeStatus(o, res, state.offset)
    if (!res.body) throw new TransientDownloadError('empty response body')
    return await appendBody(o, tmp, res.body, state, kick, count)
  } catch (err) {
    if (idle.signal.aborted && !o.signal?.aborted) {
      throw new TransientDownloadError(`no data for ${Math.round(idleMs / 1000)} s`)
    }
    throw err
  } finally {
    clearTimeout(timer)
  }
}

/** Whether a response continues the file at `offset`: else a restart from the first byte, or the hub's error. */
async function checkResumeStatus(o: BlobDownloadOptions, res: Response, offset: number): Promise<void> {
  if (res.status === 206) {
    const start = parseContentRangeStart(res.headers.get('content-range'))
    if (start !== offset) {
      await res.body?.cancel().catch(() => undefined)
      throw new RestartDownload(`unexpected Content-Range ${res.headers.get('content-range')}`)
    }
  } else if (res.status === 200) {
    if (offset > 0) {
      // The server ignored the range: start over from the first byte.
      await res.body?.cancel().catch(() => undefined)
      throw new RestartDownload('range ignored')
    }
  } else if (res.status === 416) {
    await res.body?.cancel().catch(() => undefined)
    throw new RestartDownload('range not satisfiable')
  } else {
    const text = await res.text().catch(() => '')
    throw new HubApiError(res.url || o.url, res.status, res.headers.get('x-request-id') ?? undefined, `HTTP ${res.status} ${text.slice(0, 200)}`)
  }
}

/** Appends the body to `tmp` and hashes it; never past the listed size. Returns the bytes received. */
async function appendBody(
  o: BlobDownloadOptions,
  tmp: string,
  body: ReadableStream<Uint8Array>,
  state: {hash?: Hash; offset: number},
  onChunk: () => void,
  count: (n: number) => void,
): Promise<number> {
  let received = 0
  const fh = await open(tmp, 'a')
  try {
    const reader = body.getReader()
    const room = o.size - state.offset
    for (;;) {
      const {done, value} = await reader.read()
      if (done) break
      onChunk()
      if (received + value.length > room) {
        await reader.cancel().catch(() => undefined)
        await fh.close().catch(() => undefined)
        await rm(tmp, {force: true})
        throw new UserError(`${o.file}: the server sent more than the ${o.size} bytes the hub listed; the download was discarded`)
      }
      try {
        await writeAll(fh, value)
      } catch (err) {
        await reader.cancel().catch(() => undefined)
        throw diskError(err, tmp) ?? err
      }
      state.hash?.update(value)
      received += value.length
      count(value.length)
      o.onProgress?.(state.offset + received, value.length)
    }
  } finally {
    await fh.close().catch(() => undefined)
  }
  return received
}

/** The size of a file, or undefined when there is none. */
export async function fileSize(path: string): Promise<number | undefined> {
  try {
    const st = await stat(path)
    return st.isFile() ? st.size : undefined
  } catch {
    return undefined
  }
}
