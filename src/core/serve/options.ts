/**
 * `parscale serve`'s options, checked before any model is loaded: numbers arrive as text so
 * a bad value is one clear line like every user error (as `run` does it).
 */
import {UsageError} from '../errors.js'
import {parseAutoBudget, parseParallel} from '../parallel/policy.js'

export type ServeNumberOption = 'port' | 'parallel' | 'max-batch' | 'max-queue' | 'threads' | 'shutdown-timeout'

export interface ServeOptions {
  host: string
  port: number
  /** A P, or `auto`: chosen per request from the measured cost profile. */
  parallel?: number | 'auto'
  /** --auto-budget (with --parallel auto). */
  autoBudget?: number
  maxBatch: number
  maxQueue: number
  threads?: number
  apiKey?: string
  /** Seconds running generations get to finish after SIGTERM / Ctrl-C. */
  shutdownTimeout: number
}

export const SERVE_DEFAULTS = {host: '127.0.0.1', port: 8080, maxBatch: 8, maxQueue: 64, shutdownTimeout: 30} as const

function whole(name: ServeNumberOption, input: string | undefined, min: number, max = Number.MAX_SAFE_INTEGER): number | undefined {
  if (input === undefined) return undefined
  const value = Number(input)
  if (input.trim() === '' || !Number.isInteger(value) || value < min || value > max) {
    const rule = max === Number.MAX_SAFE_INTEGER ? `a whole number >= ${min}` : `a whole number from ${min} to ${max}`
    throw new UsageError(`--${name} must be ${rule} (got "${input}")`)
  }
  return value
}

export function parseServeOptions(input: {host?: string; apiKey?: string; autoBudget?: string; numbers: Partial<Record<ServeNumberOption, string>>}): ServeOptions {
  const {numbers} = input
  const host = input.host ?? SERVE_DEFAULTS.host
  if (host.trim() === '') throw new UsageError('--host must name an address (127.0.0.1, 0.0.0.0, ::)')
  if (input.apiKey !== undefined && input.apiKey.trim() === '') throw new UsageError('--api-key must not be empty')
  return {
    host,
    port: whole('port', numbers.port, 0, 65535) ?? SERVE_DEFAULTS.port,
    parallel: parseParallel(numbers.parallel),
    ...autoBudget(input.autoBudget, numbers.parallel),
    maxBatch: whole('max-batch', numbers['max-batch'], 1) ?? SERVE_DEFAULTS.maxBatch,
    maxQueue: whole('max-queue', numbers['max-queue'], 1) ?? SERVE_DEFAULTS.maxQueue,
    threads: whole('threads', numbers.threads, 1),
    ...(input.apiKey !== undefined ? {apiKey: input.apiKey} : {}),
    shutdownTimeout: whole('shutdown-timeout', numbers['shutdown-timeout'], 0) ?? SERVE_DEFAULTS.shutdownTimeout,
  }
}

/** --auto-budget, which only --parallel auto reads. */
function autoBudget(input: string | undefined, parallel: string | undefined): {autoBudget?: number} {
  const budget = parseAutoBudget(input)
  if (budget === undefined) return {}
  if (parallel?.trim().toLowerCase() !== 'auto') throw new UsageError('--auto-budget needs --parallel auto')
  return {autoBudget: budget}
}
