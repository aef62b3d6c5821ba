import {randomBytes} from 'node:crypto'
import {mkdir, open, readFile, rm, stat, utimes} from 'node:fs/promises'
import {hostname} from 'node:os'
import {dirname} from 'node:path'

import {sleep} from './http.js'
import {isProcessAlive} from '../processes.js'

/**
 * A lock file shared by processes (and by concurrent pulls in one process): created with
 * O_EXCL, holding `{pid, host, token}`, its mtime refreshed while held. A lock whose process
 * is gone (same host) or that has not been refreshed for `staleMs` (any host, e.g. a shared
 * cache on NFS) is taken over.
 */

export interface LockOptions {
  signal?: AbortSignal
  /** Called once when the lock is busy and we start waiting. */
  onWait?: () => void
  staleMs?: number
  pollMs?: number
}

interface LockContent {
  pid?: number
  host?: string
  token?: string
}

async function readLock(path: string): Promise<{content: LockContent; mtimeMs: number} | undefined> {
  try {
    const [text, st] = await Promise.all([readFile(path, 'utf8'), stat(path)])
    let content: LockContent = {}
    try {
      content = JSON.parse(text) as LockContent
    } catch {
      /* being written, or foreign: judged by age */
    }
    return {content, mtimeMs: st.mtimeMs}
  } catch {
    return undefined
  }
}

function isStale(lock: {content: LockContent; mtimeMs: number}, staleMs: number): boolean {
  const {pid, host} = lock.content
  if (host === hostname() && typeof pid === 'number' && pid !== process.pid && !isProcessAlive(pid)) return true
  return Date.now() - lock.mtimeMs > staleMs
}

/** Runs `fn` while holding the lock file `path`. */
export async function withFileLock<T>(path: string, fn: () => Promise<T>, opts: LockOptions = {}): Promise<T> {
  const staleMs = opts.staleMs ?? 60_000
  const pollMs = opts.pollMs ?? 100
  const token = randomBytes(12).toString('hex')
  await mkdir(dirname(path), {recursive: true})
  let waited = false
  for (;;) {
    opts.signal?.throwIfAborted()
    try {
      const fh = await open(path, 'wx')
      try {
        await fh.writeFile(JSON.stringify({pid: process.pid, host: hostname(), token}))
      } finally {
        await fh.close()
      }
      break
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
    }
    const held = await readLock(path)
    if (held && isStale(held, staleMs)) {
      // Re-read just before removing so a lock that changed hands meanwhile is left alone.
      const again = await readLock(path)
      if (again && again.content.token === held.content.token && again.mtimeMs === held.mtimeMs) {
        await rm(path, {force: true})
      }
      continue
    }
    if (!waited) {
      waited = true
      opts.onWait?.()
    }
    await sleep(pollMs, opts.signal)
  }

  const beat = setInterval(() => {
    const now = new Date()
    utimes(path, now, now).catch(() => undefined)
  }, Math.max(1000, Math.floor(staleMs / 4)))
  beat.unref()
  try {
    return await fn()
  } finally {
    clearInterval(beat)
    const mine = await readLock(path)
    if (mine?.content.token === token) await rm(path, {force: true})
  }
}
