import {randomBytes} from 'node:crypto'
import {existsSync, readdirSync, readFileSync, statSync} from 'node:fs'
import {mkdir, readdir, rename, rm, rmdir, symlink, copyFile, writeFile, lstat, readlink} from 'node:fs/promises'
import {homedir} from 'node:os'
import {dirname, isAbsolute, join, relative, resolve, sep} from 'node:path'

import {UserError} from '../errors.js'

/**
 * The standard Hugging Face hub cache, laid out exactly as Python's `huggingface_hub` writes it,
 * so that each tool finds the other's downloads:
 *
 * ```
 * <cache>/models--{org}--{name}/
 *   blobs/<etag>                        file contents, named by sha256 (LFS) or git blob sha1
 *   refs/<revision>                     the commit hash a branch/tag resolved to (no newline)
 *   snapshots/<commit>/<file>           relative symlink -> ../../blobs/<etag>
 * <cache>/.locks/models--{org}--{name}/ lock files
 * ```
 */

const COMMIT_RE = /^[0-9a-f]{40}$/
const REPO_ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]*\/[A-Za-z0-9][A-Za-z0-9._-]*$/

/** `~` at the start of a path means the home folder (as Python's `expanduser`). */
function expandHome(p: string): string {
  return p === '~' || p.startsWith('~/') ? join(homedir(), p.slice(1)) : p
}

/** `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE` (legacy), else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub` or `~/.cache/huggingface/hub`. */
export function hubCacheDir(): string {
  const env = process.env
  const explicit = env.HF_HUB_CACHE || env.HUGGINGFACE_HUB_CACHE
  if (explicit) return resolve(expandHome(explicit))
  const hfHome = env.HF_HOME
    ? expandHome(env.HF_HOME)
    : join(env.XDG_CACHE_HOME ? expandHome(env.XDG_CACHE_HOME) : join(homedir(), '.cache'), 'huggingface')
  return resolve(join(hfHome, 'hub'))
}

/** True for a full commit hash (40 lowercase hex digits). */
export function isCommitHash(s: string): boolean {
  return COMMIT_RE.test(s)
}

/** True when `repoId` is shaped `org/name` (no revision). */
export function isRepoIdShape(repoId: string): boolean {
  // The Hub forbids `--` and `..` in names; `--` would also make the cache folder name ambiguous.
  return REPO_ID_RE.test(repoId) && repoId.length <= 200 && !repoId.includes('--') && !repoId.includes('..')
}

/**
 * Splits `org/name@revision` into its parts (`revision` undefined when absent).
 * Throws a UserError when the repo id or revision is malformed.
 */
export function parseRepoRef(ref: string, revision?: string): {repoId: string; revision?: string} {
  let repoId = ref
  let rev = revision
  const at = ref.indexOf('@')
  if (at >= 0) {
    repoId = ref.slice(0, at)
    const fromRef = ref.slice(at + 1)
    if (rev !== undefined && rev !== fromRef) throw new UserError(`${ref}: two different revisions given ("${fromRef}" and "${rev}")`)
    rev = fromRef
  }
  if (!isRepoIdShape(repoId)) throw new UserError(`"${repoId}" is not a Hugging Face repo id (expected org/name, for example ParScale/ParScale-1.8B-P4)`)
  if (rev !== undefined) assertSafeRevision(rev)
  return {repoId, revision: rev}
}

/** A revision (branch, tag, `refs/pr/N` or commit) must stay inside `refs/` when used as a path. */
export function assertSafeRevision(revision: string): void {
  if (!revision || revision.length > 255 || !isSafeRelativePath(revision)) {
    throw new UserError(`"${revision}" is not a valid revision (branch, tag or commit hash)`)
  }
}

/**
 * A repo file name that is safe to place under a folder: relative, `/`-separated, no `..`/`.`/empty
 * segments, no backslashes, no drive letters, no control characters.
 */
export function isSafeRelativePath(name: string): boolean {
  if (!name || name.length > 1024) return false
  // eslint-disable-next-line no-control-regex
  if (/[\\\u0000-\u001f]/.test(name)) return false
  if (name.startsWith('/') || /^[A-Za-z]:/.test(name)) return false
  return name.split('/').every((seg) => seg !== '' && seg !== '.' && seg !== '..' && !/^[A-Za-z]:/.test(seg))
}

/** A single path segment from the server (etag, commit) that names a file of ours. */
export function isSafeSegment(s: string): boolean {
  return /^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$/.test(s)
}

/** `models--org--name`, as huggingface_hub names a model repo's folder. */
export function repoFolderName(repoId: string): string {
  return `models--${repoId.split('/').join('--')}`
}

/** The inverse of {@link repoFolderName}, or undefined for folders that are not model repos. */
function repoIdFromFolder(folder: string): string | undefined {
  if (!folder.startsWith('models--')) return undefined
  const rest = folder.slice('models--'.length)
  const i = rest.indexOf('--')
  if (i <= 0) return undefined
  return `${rest.slice(0, i)}/${rest.slice(i + 2)}`
}

export interface RepoCachePaths {
  repoDir: string
  blobsDir: string
  refsDir: string
  snapshotsDir: string
  locksDir: string
}

export function repoCachePaths(repoId: string, cacheDir = hubCacheDir()): RepoCachePaths {
  const folder = repoFolderName(repoId)
  const repoDir = join(cacheDir, folder)
  return {
    repoDir,
    blobsDir: join(repoDir, 'blobs'),
    refsDir: join(repoDir, 'refs'),
    snapshotsDir: join(repoDir, 'snapshots'),
    locksDir: join(cacheDir, '.locks', folder),
  }
}

/** True when `child` is `parent` or inside it (both resolved, no symlink resolution). */
export function isInside(parent: string, child: string): boolean {
  const rel = relative(resolve(parent), resolve(child))
  return rel === '' || (!rel.startsWith('..') && !isAbsolute(rel) && rel.split(sep)[0] !== '..')
}

function isFile(p: string): boolean {
  try {
    return statSync(p).isFile()
  } catch {
    return false
  }
}

function isDir(p: string): boolean {
  try {
    return statSync(p).isDirectory()
  } catch {
    return false
  }
}

/** The commit a revision resolves to in the cache (a commit resolves to itself), offline. */
export function resolveCachedCommit(repoId: string, revision = 'main', cacheDir = hubCacheDir()): string | undefined {
  if (isCommitHash(revision)) return revision
  if (!isSafeRelativePath(revision)) return undefined
  const {refsDir} = repoCachePaths(repoId, cacheDir)
  try {
    const commit = readFileSync(join(refsDir, revision), 'utf8').trim()
    return isSafeSegment(commit) ? commit : undefined
  } catch {
    return undefined
  }
}

/**
 * Whether a snapshot folder holds what running a model needs: `config.json` and its weights
 * (every shard named by `model.safetensors.index.json`, or at least one `*.safetensors`).
 * Symlinks whose blob is gone do not count.
 */
export function snapshotIsComplete(snapshotDir: string): boolean {
  if (!isFile(join(snapshotDir, 'config.json'))) return false
  const index = join(snapshotDir, 'model.safetensors.index.json')
  if (isFile(index)) {
    try {
      const parsed = JSON.parse(readFileSync(index, 'utf8')) as {weight_map?: Record<string, string>}
      const shards = new Set(Object.values(parsed.weight_map ?? {}))
      if (shards.size === 0) return false
      for (const shard of shards) {
        if (typeof shard !== 'string' || !isSafeRelativePath(shard) || !isFile(join(snapshotDir, shard))) return false
      }
      return true
    } catch {
      return false
    }
  }
  try {
    return readdirSync(snapshotDir).some((f) => f.endsWith('.safetensors') && isFile(join(snapshotDir, f)))
  } catch {
    return false
  }
}

/**
 * The snapshot folder of a cached checkpoint, found without the network: `revision` (default
 * `main`) is a commit hash or a name in `refs/`. Only a snapshot that holds config.json and its
 * weights counts. `repoId` may carry `@revision`.
 */
export function findCachedSnapshot(repoId: string, revision?: string): string | undefined {
  let ref: {repoId: string; revision?: string}
  try {
    ref = parseRepoRef(repoId, revision)
  } catch {
    return undefined
  }
  const cacheDir = hubCacheDir()
  const commit = resolveCachedCommit(ref.repoId, ref.revision ?? 'main', cacheDir)
  if (!commit) return undefined
  const snapshotDir = join(repoCachePaths(ref.repoId, cacheDir).snapshotsDir, commit)
  return isDir(snapshotDir) && snapshotIsComplete(snapshotDir) ? snapshotDir : undefined
}

/** Files below `root` as relative `/`-separated paths, following links; unreadable entries are skipped. */
function* walkFiles(root: string, prefix = ''): Generator<{path: string; full: string; size: number}> {
  let names: string[]
  try {
    names = readdirSync(root).sort()
  } catch {
    return
  }
  for (const name of names) {
    const full = join(root, name)
    let st
    try {
      st = statSync(full)
    } catch {
      continue // dangling link
    }
    if (st.isDirectory()) yield* walkFiles(full, `${prefix}${name}/`)
    else if (st.isFile()) yield {path: `${prefix}${name}`, full, size: st.size}
  }
}

/** Every file under a snapshot (relative, `/`-separated), following symlinks to blobs. */
export function listSnapshotFiles(snapshotDir: string): {path: string; size: number}[] {
  return [...walkFiles(snapshotDir)].map(({path, size}) => ({path, size}))
}

export interface CachedModel {
  repoId: string
  /** The ref names (e.g. `main`) pointing at this snapshot, comma-separated, else the commit. */
  revision: string
  commit: string
  refs: string[]
  snapshotDir: string
  sizeBytes: number
  /** config.json and all its weights are there. */
  complete: boolean
}

function readRefs(refsDir: string): Map<string, string[]> {
  const byCommit = new Map<string, string[]>()
  for (const ref of walkFiles(refsDir)) {
    try {
      const commit = readFileSync(ref.full, 'utf8').trim()
      byCommit.set(commit, [...(byCommit.get(commit) ?? []), ref.path])
    } catch {
      /* unreadable ref: ignore */
    }
  }
  return byCommit
}

/** Every snapshot of every model repo in the hub cache, offline, sorted by repo then revision. */
export function listCachedModels(): CachedModel[] {
  const cacheDir = hubCacheDir()
  let folders: string[]
  try {
    folders = readdirSync(cacheDir)
  } catch {
    return []
  }
  const out: CachedModel[] = []
  for (const folder of folders.sort()) {
    const repoId = repoIdFromFolder(folder)
    if (!repoId || !isDir(join(cacheDir, folder))) continue
    const paths = repoCachePaths(repoId, cacheDir)
    const refs = readRefs(paths.refsDir)
    let commits: string[]
    try {
      commits = readdirSync(paths.snapshotsDir).filter((c) => isDir(join(paths.snapshotsDir, c)))
    } catch {
      continue
    }
    for (const commit of commits.sort()) {
      const snapshotDir = join(paths.snapshotsDir, commit)
      const names = (refs.get(commit) ?? []).sort()
      out.push({
        repoId,
        revision: names.length > 0 ? names.join(',') : commit,
        commit,
        refs: names,
        snapshotDir,
        sizeBytes: listSnapshotFiles(snapshotDir).reduce((a, f) => a + f.size, 0),
        complete: snapshotIsComplete(snapshotDir),
      })
    }
  }
  return out
}

/**
 * A temporary name beside `path` for write-then-rename, unique even between two writers of one
 * process in one millisecond (concurrent pulls of one repo write the same ref).
 */
function tempPathBeside(path: string): string {
  return `${path}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`
}

/** Writes `refs/<revision>` = commit atomically (no trailing newline, as huggingface_hub does). */
export async function writeRef(repoId: string, revision: string, commit: string, cacheDir = hubCacheDir()): Promise<void> {
  if (revision === commit) return
  assertSafeRevision(revision)
  const {refsDir} = repoCachePaths(repoId, cacheDir)
  const refPath = join(refsDir, revision)
  await mkdir(dirname(refPath), {recursive: true})
  const tmp = tempPathBeside(refPath)
  await writeFile(tmp, commit)
  await rename(tmp, refPath)
}

/**
 * Points `snapshotDir/relPath` at `blobPath` with a relative symlink (as huggingface_hub does),
 * replacing whatever was there atomically; copies the blob where symlinks are not allowed.
 */
export async function linkSnapshotFile(blobPath: string, finalPath: string): Promise<void> {
  await mkdir(dirname(finalPath), {recursive: true})
  const tmp = tempPathBeside(finalPath)
  try {
    await symlink(relative(dirname(finalPath), blobPath), tmp)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP') throw err
    await copyFile(blobPath, tmp)
  }
  try {
    await rename(tmp, finalPath)
  } catch (err) {
    await rm(tmp, {force: true})
    throw err
  }
}

/** True when `finalPath` resolves to a regular file of `size` bytes. */
export function snapshotFileOk(finalPath: string, size: number): boolean {
  try {
    const st = statSync(finalPath)
    return st.isFile() && st.size === size
  } catch {
    return false
  }
}

/** Size of a tree on disk (files counted once; symlinks not followed). */
async function treeSize(dir: string): Promise<number> {
  let total = 0
  let names: string[]
  try {
    names = await readdir(dir)
  } catch {
    return 0
  }
  for (const name of names) {
    const full = join(dir, name)
    const st = await lstat(full).catch(() => undefined)
    if (!st) continue
    if (st.isDirectory()) total += await treeSize(full)
    else if (st.isFile()) total += st.size
  }
  return total
}

/** Removes a whole cached repo (all revisions, blobs, refs, locks). Undefined when not cached. */
export async function removeCachedRepo(repoId: string): Promise<{path: string; bytes: number} | undefined> {
  const cacheDir = hubCacheDir()
  const paths = repoCachePaths(repoId, cacheDir)
  if (!isInside(cacheDir, paths.repoDir) || !existsSync(paths.repoDir)) return undefined
  const bytes = await treeSize(paths.repoDir)
  await rm(paths.repoDir, {recursive: true, force: true})
  await rm(paths.locksDir, {recursive: true, force: true})
  return {path: paths.repoDir, bytes}
}

/**
 * Removes one snapshot of a cached repo: its folder, the refs that point at it, and the blobs no
 * other snapshot links to. The repo folder goes too when nothing is left.
 */
export async function removeCachedRevision(repoId: string, revision: string): Promise<{path: string; bytes: number; commit: string} | undefined> {
  const cacheDir = hubCacheDir()
  const commit = resolveCachedCommit(repoId, revision, cacheDir)
  if (!commit) return undefined
  const paths = repoCachePaths(repoId, cacheDir)
  const snapshotDir = join(paths.snapshotsDir, commit)
  if (!existsSync(snapshotDir)) return undefined
  const refs = readRefs(paths.refsDir)
  for (const name of refs.get(commit) ?? []) await rm(join(paths.refsDir, name), {force: true})
  let bytes = await treeSize(snapshotDir)
  await rm(snapshotDir, {recursive: true, force: true})
  // Blobs still linked from another snapshot stay.
  const used = new Set<string>()
  const collect = async (dir: string): Promise<void> => {
    for (const name of await readdir(dir).catch(() => [] as string[])) {
      const full = join(dir, name)
      const st = await lstat(full).catch(() => undefined)
      if (st?.isDirectory()) await collect(full)
      else if (st?.isSymbolicLink()) used.add(resolve(dirname(full), await readlink(full)))
    }
  }
  await collect(paths.snapshotsDir)
  for (const name of await readdir(paths.blobsDir).catch(() => [] as string[])) {
    const blob = join(paths.blobsDir, name)
    if (used.has(blob)) continue
    const st = await lstat(blob).catch(() => undefined)
    if (st?.isFile()) bytes += st.size
    await rm(blob, {force: true})
  }
  const left = await readdir(paths.snapshotsDir).catch(() => [] as string[])
  if (left.length === 0) {
    await rm(paths.repoDir, {recursive: true, force: true})
    await rm(paths.locksDir, {recursive: true, force: true})
  }
  return {path: snapshotDir, bytes, commit}
}

/** Removes `dir` if it is empty (ignores every error). */
export async function removeIfEmpty(dir: string): Promise<void> {
  await rmdir(dir).catch(() => undefined)
}
