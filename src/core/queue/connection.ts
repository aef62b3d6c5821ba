/**
 * Redis connections for the queue commands. A command (`batch submit`, `status`, `collect`)
 * connects once and gives up at the first failure: one line naming the URL. A worker's
 * connection, once up, retries for ever, so a Redis restart only pauses it.
 */
import {Redis} from 'ioredis'

import {UsageError, UserError} from '../errors.js'

/** `redis://[:password@]host[:port][/db]` or `rediss://…` (TLS); checked before connecting. */
export function checkQueueUrl(url: string): string {
  let parsed: URL
  try {
    parsed = new URL(url)
  } catch {
    throw new UsageError(`--queue must be a Redis URL such as redis://localhost:6379 (got "${url}")`)
  }
  if (parsed.protocol !== 'redis:' && parsed.protocol !== 'rediss:') {
    throw new UsageError(`--queue must be a redis:// or rediss:// URL (got "${url}")`)
  }
  if (parsed.hostname === '') throw new UsageError(`--queue names no host (got "${url}")`)
  return url
}

/** The URL for messages: the password hidden. */
export function displayUrl(url: string): string {
  try {
    const parsed = new URL(url)
    if (parsed.password) parsed.password = '***'
    return parsed.toString().replace(/\/$/, '')
  } catch {
    return url
  }
}

export function unreachable(url: string, reason: string): UserError {
  return new UserError(`cannot reach Redis at ${displayUrl(url)} (${reason})`)
}

/** Whether an error is the connection failing rather than a command. */
export function isConnectionError(error: unknown): boolean {
  const e = error as NodeJS.ErrnoException
  return /Connection is closed|Stream isn't writeable|ECONNREFUSED|ECONNRESET|ETIMEDOUT|EPIPE|ENOTFOUND|EAI_AGAIN/.test(`${e?.code ?? ''} ${e?.message ?? ''}`)
}

export interface ConnectOptions {
  /** Keep reconnecting after the first connection (workers); else fail at once. */
  persistent?: boolean
}

/** Connects, or throws one line naming the URL. */
export async function connectRedis(url: string, {persistent = false}: ConnectOptions = {}): Promise<Redis> {
  checkQueueUrl(url)
  const redis = new Redis(url, {
    lazyConnect: true,
    connectTimeout: 5000,
    // BullMQ needs `null` on the connections its workers block on.
    maxRetriesPerRequest: persistent ? null : 1,
    retryStrategy: persistent ? (attempt) => Math.min(200 * attempt, 2000) : () => null,
  })
  let lastError: Error | undefined
  const remember = (error: Error) => (lastError = error)
  redis.on('error', remember)
  try {
    await redis.connect()
  } catch (error) {
    redis.disconnect()
    const reason = (lastError ?? (error as Error)).message
    throw unreachable(url, reason)
  }
  return redis
}

/** Runs `work` on a fresh connection; a lost connection becomes one line naming the URL. */
export async function withRedis<T>(url: string, work: (redis: Redis) => Promise<T>): Promise<T> {
  const redis = await connectRedis(url)
  try {
    return await work(redis)
  } catch (error) {
    if (!(error instanceof UserError) && isConnectionError(error)) throw new UserError(`lost Redis at ${displayUrl(url)} (${(error as Error).message})`)
    throw error
  } finally {
    redis.disconnect()
  }
}
