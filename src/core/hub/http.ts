import {readFileSync} from 'node:fs'
import {homedir} from 'node:os'
import {join} from 'node:path'

import {UserError} from '../errors.js'

/** HTTP to the Hub: endpoint, token and offline settings from the environment; a fetch with retries. */

export const DEFAULT_ENDPOINT = 'https://huggingface.co'

/** `HF_ENDPOINT` (a mirror) or the Hugging Face Hub, without a trailing slash. */
export function hubEndpoint(): string {
  const raw = (process.env.HF_ENDPOINT || DEFAULT_ENDPOINT).trim().replace(/\/+$/, '')
  let url: URL
  try {
    url = new URL(raw)
  } catch {
    throw new UserError(`HF_ENDPOINT "${raw}" is not a URL (expected for example https://huggingface.co)`)
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new UserError(`HF_ENDPOINT "${raw}" must be an http(s) URL`)
  }
  return raw
}

/** `HF_HUB_OFFLINE` set to 1/true/yes/on: use the cache only, never the network. */
export function isOffline(): boolean {
  return /^(1|true|yes|on)$/i.test((process.env.HF_HUB_OFFLINE ?? '').trim())
}

/**
 * The token to send: `explicit` (`--token`), else `HF_TOKEN`, else the legacy
 * `HUGGING_FACE_HUB_TOKEN`, else the file `huggingface-cli login` writes
 * (`HF_TOKEN_PATH`, else `HF_HOME/token`, else `~/.cache/huggingface/token`).
 */
export function hubToken(explicit?: string): string | undefined {
  const env = process.env
  const direct = explicit ?? env.HF_TOKEN ?? env.HUGGING_FACE_HUB_TOKEN
  if (direct !== undefined) return direct.trim() || undefined
  const hfHome = env.HF_HOME || join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'huggingface')
  try {
    return readFileSync(env.HF_TOKEN_PATH || join(hfHome, 'token'), 'utf8').trim() || undefined
  } catch {
    return undefined
  }
}

export interface RetryPolicy {
  /** Tries in all (first one included). */
  attempts: number
  baseDelayMs: number
  maxDelayMs: number
}

export const DEFAULT_RETRY: RetryPolicy = {attempts: 5, baseDelayMs: 500, maxDelayMs: 15_000}

/** Exponential backoff with jitter for try number `attempt` (1-based) that just failed. */
export function backoffMs(policy: RetryPolicy, attempt: number): number {
  const exp = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** (attempt - 1))
  return Math.round(exp * (0.75 + Math.random() * 0.5))
}

/** Waits `ms`, or rejects as soon as `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason)
    const onAbort = (): void => {
      clearTimeout(timer)
      reject(signal!.reason)
    }
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort)
      resolve()
    }, ms)
    signal?.addEventListener('abort', onAbort, {once: true})
  })
}

/** The errno-style code behind a failed fetch or stream (`ECONNREFUSED`, `UND_ERR_SOCKET`, …). */
export function networkErrorCode(err: unknown): string | undefined {
  let e: unknown = err
  for (let depth = 0; depth < 5 && e && typeof e === 'object'; depth++) {
    const obj = e as {code?: unknown; cause?: unknown; errors?: unknown[]}
    if (typeof obj.code === 'string') return obj.code
    if (Array.isArray(obj.errors) && obj.errors.length > 0) e = obj.errors[0]
    else e = obj.cause
  }
  return undefined
}

/** Codes that say the connection could not be made at all: retrying soon will not help. */
export const UNREACHABLE_CODES = new Set(['ECONNREFUSED', 'ENOTFOUND', 'ENETUNREACH', 'EHOSTUNREACH', 'EADDRNOTAVAIL'])

/** A failure worth another try: a dropped or stalled connection, a DNS hiccup. */
export function isTransientNetworkError(err: unknown): boolean {
  if (err instanceof UserError) return false
  if ((err as Error)?.name === 'AbortError') return false
  const code = networkErrorCode(err)
  if (code && UNREACHABLE_CODES.has(code)) return false
  if (code && /^(ENOSPC|EACCES|EPERM|EROFS|EDQUOT|EISDIR|ENOTDIR)$/.test(code)) return false
  if (code && /^(ERR_TLS|CERT_|DEPTH_ZERO|SELF_SIGNED|UNABLE_TO)/.test(code)) return false
  if (code) return true
  // undici reports a body cut short as TypeError('terminated'); a 'fetch failed' without a code
  // (a refused port, a bad URL) is not worth retrying.
  return err instanceof TypeError && /terminated|other side closed/i.test(err.message)
}

const RETRY_STATUS = new Set([408, 429, 500, 502, 503, 504])

export interface HubHttp {
  endpoint: string
  /** A fetch for @huggingface/hub and for downloads: token on the endpoint's origin, retries, abort. */
  fetch: typeof fetch
  /** `X-Error-Code` / `X-Error-Message` of a failed response, by its URL. */
  errorInfo(url: string): {code?: string; message?: string} | undefined
}

function originOf(url: string): string | undefined {
  try {
    return new URL(url).origin
  } catch {
    return undefined
  }
}

/**
 * A fetch that sends `Authorization: Bearer <token>` to the endpoint's origin only (a redirect to
 * a CDN never carries it), retries transient failures and 408/429/5xx with backoff (honouring
 * `Retry-After`), and aborts with `signal`. The token goes in a header rather than through the
 * library's `accessToken`, so mirrors with tokens not shaped `hf_…` work too.
 */
export function createHubHttp(opts: {endpoint: string; token?: string; signal?: AbortSignal; retry?: RetryPolicy; userAgent?: string}): HubHttp {
  const retry = opts.retry ?? DEFAULT_RETRY
  const hubOrigin = originOf(opts.endpoint)
  const errors = new Map<string, {code?: string; message?: string}>()
  const userAgent = opts.userAgent ?? 'parscale'

  const wrapped = async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
    const url = typeof input === 'string' ? input : input instanceof URL ? input.href : input.url
    const headers = new Headers(init?.headers)
    if (opts.token && !headers.has('authorization') && originOf(url) === hubOrigin) {
      headers.set('authorization', `Bearer ${opts.token}`)
    }
    if (!headers.has('user-agent')) headers.set('user-agent', userAgent)
    const signals = [init?.signal, opts.signal].filter((s): s is AbortSignal => !!s)
    const signal = signals.length > 1 ? AbortSignal.any(signals) : signals[0]
    for (let attempt = 1; ; attempt++) {
      signal?.throwIfAborted()
      let res: Response
      try {
        res = await fetch(url, {...init, headers, signal})
      } catch (err) {
        if (signal?.aborted || !isTransientNetworkError(err) || attempt >= retry.attempts) throw err
        await sleep(backoffMs(retry, attempt), signal)
        continue
      }
      if (RETRY_STATUS.has(res.status) && attempt < retry.attempts) {
        const after = Number(res.headers.get('retry-after'))
        await res.body?.cancel().catch(() => undefined)
        await sleep(Number.isFinite(after) && after > 0 ? Math.min(after * 1000, retry.maxDelayMs) : backoffMs(retry, attempt), signal)
        continue
      }
      if (!res.ok) {
        const info = {code: res.headers.get('x-error-code') ?? undefined, message: res.headers.get('x-error-message') ?? undefined}
        errors.set(res.url || url, info)
        errors.set(url, info)
      }
      return res
    }
  }

  return {
    endpoint: opts.endpoint,
    fetch: wrapped as typeof fetch,
    errorInfo: (url) => errors.get(url),
  }
}
