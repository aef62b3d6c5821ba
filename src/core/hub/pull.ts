import {statfs} from 'node:fs/promises'
import {mkdir, realpath, rm} from 'node:fs/promises'
import {basename, dirname, join} from 'node:path'

import {fileDownloadInfo, listFiles, modelInfo, type ListFileEntry} from '@huggingface/hub'

import {UserError} from '../errors.js'
import {
  findCachedSnapshot,
  hubCacheDir,
  isInside,
  isSafeSegment,
  linkSnapshotFile,
  listSnapshotFiles,
  parseRepoRef,
  removeIfEmpty,
  repoCachePaths,
  snapshotFileOk,
  writeRef,
} from './cache.js'
import {downloadBlob, fileSize} from './download.js'
import {toUserError} from './errors.js'
import {selectFiles} from './files.js'
import {formatBytes} from '../format.js'
import {createHubHttp, DEFAULT_RETRY, hubEndpoint, hubToken, isOffline, type RetryPolicy} from './http.js'
import {withFileLock} from './lock.js'

/**
 * `pullModel`: a checkpoint from the Hugging Face Hub (or `HF_ENDPOINT`) into the standard
 * Hugging Face cache, on @huggingface/hub for the repo info, the file listing and each file's
 * download info; resume, verification, locking and parallel files are ours.
 */

export interface PullProgress {
  phase: 'resolving' | 'downloading' | 'waiting' | 'done'
  repoId: string
  /** The file this update is about. */
  file?: string
  fileBytes?: number
  fileTotal?: number
  /** Bytes of the selected files in place so far (already cached, resumed or downloaded). */
  bytes: number
  totalBytes: number
  /** Bytes received from the network by this pull. */
  downloadedBytes: number
  filesDone: number
  filesTotal: number
  elapsedSeconds: number
  /** Files being downloaded now. */
  active: {file: string; bytes: number; total: number}[]
}

export interface PullOptions {
  /** `org/name`, optionally `@revision`. */
  repoId: string
  /** Branch, tag or commit (default `main`). */
  revision?: string
  /** Overrides `HF_TOKEN`. */
  token?: string
  /** Extra globs (`*` within a folder, `**` across) on top of what running needs. */
  include?: string[]
  onProgress?: (p: PullProgress) => void
  signal?: AbortSignal
  /** Files downloaded at once (default 4). */
  concurrency?: number
  retry?: Partial<RetryPolicy>
  /** A connection that sends nothing for this long is dropped and resumed (default 60 s). */
  idleTimeoutMs?: number
}

export interface PullResult {
  snapshotDir: string
  /** Repo paths of the files in the snapshot, sorted. */
  files: string[]
  /** Total size of those files. */
  bytes: number
  seconds: number
  commit: string
  repoId: string
  revision: string
  /** Bytes received from the network (0 when everything was cached). */
  downloadedBytes: number
  /** Resolved from the cache only (HF_HUB_OFFLINE). */
  offline: boolean
}

/** The blob name huggingface_hub uses: the LFS sha256, else the git blob id, else the ETag. */
function normalizeEtag(etag: string): string {
  return etag.replace(/^W\//, '').replace(/^"+|"+$/g, '')
}

async function freeBytes(dir: string): Promise<number | undefined> {
  let d = dir
  for (let i = 0; i < 64; i++) {
    try {
      const st = await statfs(d)
      return Number(st.bavail) * Number(st.bsize)
    } catch {
      const up = dirname(d)
      if (up === d) return undefined
      d = up
    }
  }
  return undefined
}

async function runPool<T>(items: T[], n: number, fn: (t: T) => Promise<void>, onFirstError: () => void): Promise<void> {
  let next = 0
  let failure: {err: unknown} | undefined
  const worker = async (): Promise<void> => {
    while (!failure && next < items.length) {
      const item = items[next++]
      try {
        await fn(item)
      } catch (err) {
        if (!failure) {
          failure = {err}
          onFirstError()
        }
      }
    }
  }
  await Promise.all(Array.from({length: Math.max(1, Math.min(n, items.length))}, worker))
  if (failure) throw failure.err
}

function offlinePull(repoId: string, revision: string, started: number): PullResult {
  const snapshotDir = findCachedSnapshot(repoId, revision)
  if (!snapshotDir) {
    throw new UserError(
      `${repoId}${revision === 'main' ? '' : `@${revision}`} is not in the Hugging Face cache (${hubCacheDir()}) and HF_HUB_OFFLINE=1 is set: pull it while online first`,
    )
  }
  const files = listSnapshotFiles(snapshotDir)
  return {
    snapshotDir,
    files: files.map((f) => f.path),
    bytes: files.reduce((a, f) => a + f.size, 0),
    seconds: (performance.now() - started) / 1000,
    commit: basename(snapshotDir),
    repoId,
    revision,
    downloadedBytes: 0,
    offline: true,
  }
}

/**
 * Downloads what running a checkpoint needs (config, tokenizer, safetensors weights and
 * index, plus `include` globs; never pickles or code) into the Hugging Face cache and returns
 * the snapshot folder. With `HF_HUB_OFFLINE=1` it only looks in the cache. Errors are
 * one-line UserErrors.
 */
export async function pullModel(opts: PullOptions): Promise<PullResult> {
  const started = performance.now()
  const ref = parseRepoRef(opts.repoId, opts.revision)
  const repoId = ref.repoId
  const revision = ref.revision ?? 'main'
  if (isOffline()) return offlinePull(repoId, revision, started)

  const endpoint = hubEndpoint()
  const retry: RetryPolicy = {...DEFAULT_RETRY, ...opts.retry}
  const stop = new AbortController()
  const signal = opts.signal ? AbortSignal.any([opts.signal, stop.signal]) : stop.signal
  const http = createHubHttp({endpoint, token: hubToken(opts.token), signal, retry})
  const ctx = {repoId, revision, endpoint, errorInfo: http.errorInfo}
  const cacheDir = hubCacheDir()
  const paths = repoCachePaths(repoId, cacheDir)
  const hub = {hubUrl: endpoint, fetch: http.fetch}
  const linked: string[] = []
  let snapshotDir: string | undefined

  const progress = {bytes: 0, totalBytes: 0, downloadedBytes: 0, filesDone: 0, filesTotal: 0}
  const active = new Map<string, {bytes: number; total: number}>()
  const emit = (phase: PullProgress['phase'], file?: string): void => {
    if (!opts.onProgress) return
    const a = file ? active.get(file) : undefined
    opts.onProgress({
      phase,
      repoId,
      file,
      fileBytes: a?.bytes,
      fileTotal: a?.total,
      ...progress,
      elapsedSeconds: (performance.now() - started) / 1000,
      active: [...active].map(([f, v]) => ({file: f, ...v})),
    })
  }

  try {
    emit('resolving')
    const info = await modelInfo({name: repoId, revision, ...hub, additionalFields: ['sha']})
    const commit = info.sha
    if (typeof commit !== 'string' || !isSafeSegment(commit)) {
      throw new UserError(`the hub at ${endpoint} gave no usable commit for ${repoId}@${revision}`)
    }
    const listing: ListFileEntry[] = []
    for await (const entry of listFiles({repo: repoId, revision: commit, recursive: true, ...hub})) listing.push(entry)
    const files = selectFiles(repoId, listing, opts.include)
    if (!files.some((f) => f.path === 'config.json')) {
      throw new UserError(`${repoId} has no config.json at its root: it is not a checkpoint parscale can run`)
    }
    if (!files.some((f) => f.path.endsWith('.safetensors'))) {
      throw new UserError(`${repoId} has no *.safetensors weights (parscale never downloads *.bin/*.pt pickles)`)
    }

    const snapDir = join(paths.snapshotsDir, commit)
    snapshotDir = snapDir
    const sizeOf = (f: ListFileEntry): number => f.lfs?.size ?? f.size
    const treeEtag = (f: ListFileEntry): string | undefined => f.lfs?.oid ?? (f.xetHash ? undefined : f.oid)
    progress.totalBytes = files.reduce((a, f) => a + sizeOf(f), 0)
    progress.filesTotal = files.length

    // Enough room for what is not cached yet?
    let needed = 0
    for (const f of files) {
      const size = sizeOf(f)
      if (snapshotFileOk(join(snapDir, f.path), size)) continue
      const etag = treeEtag(f)
      if (etag && isSafeSegment(etag)) {
        const blob = join(paths.blobsDir, etag)
        if ((await fileSize(blob)) === size) continue
        needed += size - Math.min(size, (await fileSize(`${blob}.incomplete`)) ?? 0)
      } else needed += size
    }
    const free = needed > 0 ? await freeBytes(paths.repoDir) : undefined
    if (free !== undefined && free < needed) {
      throw new UserError(`disk full: ${repoId} needs ${formatBytes(needed)} more in ${cacheDir} but only ${formatBytes(free)} is free; free some space or set HF_HUB_CACHE to a larger disk`)
    }

    await mkdir(paths.blobsDir, {recursive: true})
    await mkdir(snapDir, {recursive: true})
    const realSnapshot = await realpath(snapDir)

    const pullFile = async (f: ListFileEntry): Promise<void> => {
      const size = sizeOf(f)
      const finalPath = join(snapDir, f.path)
      const done = (): void => {
        active.delete(f.path)
        progress.bytes += size
        progress.filesDone++
        emit('downloading', f.path)
      }
      if (snapshotFileOk(finalPath, size)) return done()
      // The folder a file lands in must resolve inside the snapshot (no symlinked folders).
      await mkdir(dirname(finalPath), {recursive: true})
      if (!isInside(realSnapshot, await realpath(dirname(finalPath)))) {
        throw new UserError(`${repoId}: ${f.path} would land outside the snapshot folder ${snapDir}; refusing it`)
      }

      const listed = treeEtag(f)
      let etag = listed && isSafeSegment(listed) ? listed : undefined
      let blobPath = etag ? join(paths.blobsDir, etag) : undefined
      if (!blobPath || (await fileSize(blobPath)) !== size) {
        const dl = await fileDownloadInfo({repo: repoId, path: f.path, revision: commit, ...hub})
        if (!dl) throw new UserError(`${repoId}: ${f.path} is in the listing of ${commit} but the hub does not serve it (404)`)
        if (dl.size !== size) throw new UserError(`${repoId}: ${f.path} is listed as ${size} bytes but the hub serves ${dl.size}`)
        etag ??= normalizeEtag(dl.etag)
        if (!isSafeSegment(etag)) throw new UserError(`${repoId}: ${f.path} has an unusable ETag ${JSON.stringify(etag)}`)
        const blob = join(paths.blobsDir, etag)
        blobPath = blob
        await withFileLock(
          join(paths.locksDir, `${etag}.parscale.lock`),
          async () => {
            // Another pull may have finished this blob while we waited.
            const have = await fileSize(blob)
            if (have === size) return
            if (have !== undefined) await rm(blob, {force: true})
            active.set(f.path, {bytes: 0, total: size})
            let last = 0
            await downloadBlob({
              url: dl.url,
              fetch: http.fetch,
              blobPath: blob,
              file: f.path,
              size,
              sha256: f.lfs && /^[0-9a-f]{64}$/i.test(f.lfs.oid) ? f.lfs.oid : undefined,
              gitOid: !f.lfs && !f.xetHash && f.oid && /^[0-9a-f]{40}$/i.test(f.oid) ? f.oid : undefined,
              signal,
              retry,
              idleTimeoutMs: opts.idleTimeoutMs,
              onProgress: (fileDone, delta) => {
                progress.downloadedBytes += delta
                progress.bytes += fileDone - last
                last = fileDone
                active.set(f.path, {bytes: fileDone, total: size})
                emit('downloading', f.path)
              },
            })
            progress.bytes -= last // counted again by done()
          },
          {signal, onWait: () => emit('waiting', f.path)},
        )
      }
      await linkSnapshotFile(blobPath, finalPath)
      linked.push(finalPath)
      done()
    }

    const ordered = [...files].sort((a, b) => sizeOf(a) - sizeOf(b))
    await runPool(ordered, opts.concurrency ?? 4, pullFile, () => stop.abort())
    await writeRef(repoId, revision, commit, cacheDir)
    emit('done')
    return {
      snapshotDir: snapDir,
      files: files.map((f) => f.path),
      bytes: progress.totalBytes,
      seconds: (performance.now() - started) / 1000,
      commit,
      repoId,
      revision,
      downloadedBytes: progress.downloadedBytes,
      offline: false,
    }
  } catch (err) {
    // Nothing this pull put in the snapshot stays there; verified blobs do, for the next try.
    for (const p of linked) await rm(p, {force: true}).catch(() => undefined)
    if (snapshotDir) {
      for (const p of linked) {
        for (let d = dirname(p); isInside(snapshotDir, d) && d !== snapshotDir; d = dirname(d)) await removeIfEmpty(d)
      }
      await removeIfEmpty(snapshotDir)
    }
    if (opts.signal?.aborted) throw opts.signal.reason ?? err
    throw toUserError(err, ctx)
  }
}
