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
  type RepoCachePaths,
  snapshotFileOk,
  writeRef,
} from './cache.js'
import {downloadBlob, fileSize} from './download.js'
import {toUserError} from './errors.js'
import {selectFiles} from './files.js'
import {formatBytes} from '../format.js'
import {createHubHttp, DEFAULT_RETRY, hubEndpoint, hubToken, isOffline, type HubHttp, type RetryPolicy} from './http.js'
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

/** Counts what a pull has in place and reports it through `onProgress`. */
class PullTracker {
  bytes = 0
  totalBytes = 0
  downloadedBytes = 0
  filesDone = 0
  filesTotal = 0
  /** Files being downloaded now. */
  readonly active = new Map<string, {bytes: number; total: number}>()

  constructor(
    private readonly repoId: string,
    private readonly started: number,
    private readonly onProgress?: (p: PullProgress) => void,
  ) {}

  emit(phase: PullProgress['phase'], file?: string): void {
    if (!this.onProgress) return
    const a = file ? this.active.get(file) : undefined
    this.onProgress({
      phase,
      repoId: this.repoId,
      file,
      fileBytes: a?.bytes,
      fileTotal: a?.total,
      bytes: this.bytes,
      totalBytes: this.totalBytes,
      downloadedBytes: this.downloadedBytes,
      filesDone: this.filesDone,
      filesTotal: this.filesTotal,
      elapsedSeconds: this.seconds(),
      active: [...this.active].map(([f, v]) => ({file: f, ...v})),
    })
  }

  /** `file` (of `size` bytes) is in the snapshot. */
  fileDone(file: string, size: number): void {
    this.active.delete(file)
    this.bytes += size
    this.filesDone++
    this.emit('downloading', file)
  }

  seconds(): number {
    return (performance.now() - this.started) / 1000
  }
}

/** What the steps of one online pull share. */
interface Pull {
  opts: PullOptions
  repoId: string
  revision: string
  endpoint: string
  http: HubHttp
  /** The endpoint and fetch that @huggingface/hub's calls take. */
  hub: {hubUrl: string; fetch: typeof fetch}
  /** The caller's signal, or the pool's stop after a file failed. */
  signal: AbortSignal
  retry: RetryPolicy
  cacheDir: string
  paths: RepoCachePaths
  progress: PullTracker
}

function startPull(opts: PullOptions, repoId: string, revision: string, started: number, stop: AbortSignal): Pull {
  const endpoint = hubEndpoint()
  const retry: RetryPolicy = {...DEFAULT_RETRY, ...opts.retry}
  const signal = opts.signal ? AbortSignal.any([opts.signal, stop]) : stop
  const http = createHubHttp({endpoint, token: hubToken(opts.token), signal, retry})
  const cacheDir = hubCacheDir()
  return {
    opts,
    repoId,
    revision,
    endpoint,
    http,
    hub: {hubUrl: endpoint, fetch: http.fetch},
    signal,
    retry,
    cacheDir,
    paths: repoCachePaths(repoId, cacheDir),
    progress: new PullTracker(repoId, started, opts.onProgress),
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

  const stop = new AbortController()
  const pull = startPull(opts, repoId, revision, started, stop.signal)
  const linked: string[] = []
  let snapshotDir: string | undefined
  try {
    pull.progress.emit('resolving')
    const commit = await resolveCommit(pull)
    const files = await listCheckpointFiles(pull, commit)
    snapshotDir = join(pull.paths.snapshotsDir, commit)
    pull.progress.totalBytes = files.reduce((a, f) => a + sizeOf(f), 0)
    pull.progress.filesTotal = files.length
    await checkDiskSpace(pull, files, snapshotDir)
    await downloadFiles(pull, files, commit, snapshotDir, linked, () => stop.abort())
    await writeRef(repoId, revision, commit, pull.cacheDir)
    pull.progress.emit('done')
    return pullSummary(pull, files, commit, snapshotDir)
  } catch (err) {
    await unlinkPulledFiles(linked, snapshotDir)
    if (opts.signal?.aborted) throw opts.signal.reason ?? err
    throw toUserError(err, {repoId, revision, endpoint: pull.endpoint, errorInfo: pull.http.errorInfo})
  }
}

/** The commit that the pull's revision (branch, tag or commit) names on the hub. */
async function resolveCommit(pull: Pull): Promise<string> {
  const {repoId, revision} = pull
  const info = await modelInfo({name: repoId, revision, ...pull.hub, additionalFields: ['sha']})
  const commit = info.sha
  if (typeof commit !== 'string' || !isSafeSegment(commit)) {
    throw new UserError(`the hub at ${pull.endpoint} gave no usable commit for ${repoId}@${revision}`)
  }
  return commit
}

/** The files of `commit` that running needs (plus `include`); refuses a repo that is no checkpoint. */
async function listCheckpointFiles(pull: Pull, commit: string): Promise<ListFileEntry[]> {
  const repoId = pull.repoId
  const listing: ListFileEntry[] = []
  for await (const entry of listFiles({repo: repoId, revision: commit, recursive: true, ...pull.hub})) listing.push(entry)
  const files = selectFiles(repoId, listing, pull.opts.include)
  if (!files.some((f) => f.path === 'config.json')) {
    throw new UserError(`${repoId} has no config.json at its root: it is not a checkpoint parscale can run`)
  }
  if (!files.some((f) => f.path.endsWith('.safetensors'))) {
    throw new UserError(`${repoId} has no *.safetensors weights (parscale never downloads *.bin/*.pt pickles)`)
  }
  return files
}

function sizeOf(f: ListFileEntry): number {
  return f.lfs?.size ?? f.size
}

/** The blob name the listing gives a file (LFS sha256, else git blob id; none for Xet files). */
function treeEtag(f: ListFileEntry): string | undefined {
  return f.lfs?.oid ?? (f.xetHash ? undefined : f.oid)
}

/** The listing's blob name for `f` when it is usable as a file name. */
function listedBlobName(f: ListFileEntry): string | undefined {
  const listed = treeEtag(f)
  return listed && isSafeSegment(listed) ? listed : undefined
}

/** Bytes still to download: files neither in the snapshot nor as a complete blob, less their partials. */
async function bytesToDownload(pull: Pull, files: ListFileEntry[], snapshotDir: string): Promise<number> {
  let needed = 0
  for (const f of files) {
    const size = sizeOf(f)
    if (snapshotFileOk(join(snapshotDir, f.path), size)) continue
    const etag = treeEtag(f)
    if (etag && isSafeSegment(etag)) {
      const blob = join(pull.paths.blobsDir, etag)
      if ((await fileSize(blob)) === size) continue
      needed += size - Math.min(size, (await fileSize(`${blob}.incomplete`)) ?? 0)
    } else needed += size
  }
  return needed
}

/** Refuses the pull up front when the disk cannot hold what is not cached yet. */
async function checkDiskSpace(pull: Pull, files: ListFileEntry[], snapshotDir: string): Promise<void> {
  const needed = await bytesToDownload(pull, files, snapshotDir)
  const free = needed > 0 ? await freeBytes(pull.paths.repoDir) : undefined
  if (free !== undefined && free < needed) {
    throw new UserError(`disk full: ${pull.repoId} needs ${formatBytes(needed)} more in ${pull.cacheDir} but only ${formatBytes(free)} is free; free some space or set HF_HUB_CACHE to a larger disk`)
  }
}

/** Puts every file into the snapshot, smallest first, `concurrency` at a time; `linked` collects what it linked. */
async function downloadFiles(pull: Pull, files: ListFileEntry[], commit: string, snapshotDir: string, linked: string[], onFirstError: () => void): Promise<void> {
  await mkdir(pull.paths.blobsDir, {recursive: true})
  await mkdir(snapshotDir, {recursive: true})
  const snapshot = {dir: snapshotDir, real: await realpath(snapshotDir)}
  const ordered = [...files].sort((a, b) => sizeOf(a) - sizeOf(b))
  await runPool(ordered, pull.opts.concurrency ?? 4, (f) => pullFile(pull, f, commit, snapshot, linked), onFirstError)
}

/** One file into the snapshot: a link to its blob, downloading the blob unless it is cached. */
async function pullFile(pull: Pull, f: ListFileEntry, commit: string, snapshot: {dir: string; real: string}, linked: string[]): Promise<void> {
  const size = sizeOf(f)
  const finalPath = join(snapshot.dir, f.path)
  if (snapshotFileOk(finalPath, size)) return pull.progress.fileDone(f.path, size)
  // The folder a file lands in must resolve inside the snapshot (no symlinked folders).
  await mkdir(dirname(finalPath), {recursive: true})
  if (!isInside(snapshot.real, await realpath(dirname(finalPath)))) {
    throw new UserError(`${pull.repoId}: ${f.path} would land outside the snapshot folder ${snapshot.dir}; refusing it`)
  }
  const listed = listedBlobName(f)
  const cached = listed ? join(pull.paths.blobsDir, listed) : undefined
  const blobPath = cached && (await fileSize(cached)) === size ? cached : await fetchBlob(pull, f, commit, listed)
  await linkSnapshotFile(blobPath, finalPath)
  linked.push(finalPath)
  pull.progress.fileDone(f.path, size)
}

/** Asks the hub where `f` is, then downloads its blob under a lock shared with other pulls; returns the blob's path. */
async function fetchBlob(pull: Pull, f: ListFileEntry, commit: string, listedEtag: string | undefined): Promise<string> {
  const {repoId, paths} = pull
  const size = sizeOf(f)
  const dl = await fileDownloadInfo({repo: repoId, path: f.path, revision: commit, ...pull.hub})
  if (!dl) throw new UserError(`${repoId}: ${f.path} is in the listing of ${commit} but the hub does not serve it (404)`)
  if (dl.size !== size) throw new UserError(`${repoId}: ${f.path} is listed as ${size} bytes but the hub serves ${dl.size}`)
  const etag = listedEtag ?? normalizeEtag(dl.etag)
  if (!isSafeSegment(etag)) throw new UserError(`${repoId}: ${f.path} has an unusable ETag ${JSON.stringify(etag)}`)
  const blob = join(paths.blobsDir, etag)
  await withFileLock(join(paths.locksDir, `${etag}.parscale.lock`), () => downloadUnlessComplete(pull, f, dl.url, blob), {
    signal: pull.signal,
    onWait: () => pull.progress.emit('waiting', f.path),
  })
  return blob
}

/** Under the blob's lock: downloads `url` into `blob`, unless another pull finished it while we waited. */
async function downloadUnlessComplete(pull: Pull, f: ListFileEntry, url: string, blob: string): Promise<void> {
  const size = sizeOf(f)
  const have = await fileSize(blob)
  if (have === size) return
  if (have !== undefined) await rm(blob, {force: true})
  const progress = pull.progress
  progress.active.set(f.path, {bytes: 0, total: size})
  let last = 0
  await downloadBlob({
    url,
    fetch: pull.http.fetch,
    blobPath: blob,
    file: f.path,
    size,
    ...expectedHashes(f),
    signal: pull.signal,
    retry: pull.retry,
    idleTimeoutMs: pull.opts.idleTimeoutMs,
    onProgress: (fileDone, delta) => {
      progress.downloadedBytes += delta
      progress.bytes += fileDone - last
      last = fileDone
      progress.active.set(f.path, {bytes: fileDone, total: size})
      progress.emit('downloading', f.path)
    },
  })
  progress.bytes -= last // counted again by fileDone()
}

/** What the downloaded bytes must hash to: the LFS sha256, else the git blob sha1 (none for Xet files). */
function expectedHashes(f: ListFileEntry): {sha256: string | undefined; gitOid: string | undefined} {
  return {
    sha256: f.lfs && /^[0-9a-f]{64}$/i.test(f.lfs.oid) ? f.lfs.oid : undefined,
    gitOid: !f.lfs && !f.xetHash && f.oid && /^[0-9a-f]{40}$/i.test(f.oid) ? f.oid : undefined,
  }
}

function pullSummary(pull: Pull, files: ListFileEntry[], commit: string, snapshotDir: string): PullResult {
  return {
    snapshotDir,
    files: files.map((f) => f.path),
    bytes: pull.progress.totalBytes,
    seconds: pull.progress.seconds(),
    commit,
    repoId: pull.repoId,
    revision: pull.revision,
    downloadedBytes: pull.progress.downloadedBytes,
    offline: false,
  }
}

/** After a failed pull: nothing it put in the snapshot stays there; verified blobs do, for the next try. */
async function unlinkPulledFiles(linked: string[], snapshotDir: string | undefined): Promise<void> {
  for (const p of linked) await rm(p, {force: true}).catch(() => undefined)
  if (!snapshotDir) return
  for (const p of linked) {
    for (let d = dirname(p); isInside(snapshotDir, d) && d !== snapshotDir; d = dirname(d)) await removeIfEmpty(d)
  }
  await removeIfEmpty(snapshotDir)
}
