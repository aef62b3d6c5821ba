// Paired, alternating benchmark rounds: the machine these targets are measured on is shared,
// and its speed drifts by more than the margins measured. So every side of a comparison runs
// once per round, in turns (A, B, A, B, …), and a target is judged on the ratio of each round
// (both sides measured minutes apart), summarised as the median and the spread (min–max).
import os from 'node:os'

import {median} from './stats.js'

export interface Round<T> {
  /** 1-based. */
  round: number
  /** Each side's result in this round, by name. */
  results: Record<string, T>
  /** The machine's 1-minute load average when the round started. */
  load: number
  /** Seconds spent waiting for the load to fall under `quiet.maxLoad` before the round (0 without). */
  waitedS: number
}

/**
 * Waiting for a quieter machine before each round (BENCH_MAX_LOAD, BENCH_MAX_WAIT): on a shared
 * machine a peer that spin-waits (llama.cpp) runs 5–300× slower while others build, which
 * measures the schedulers, not the kernels. A round starts once the 1-minute load average is at
 * most `maxLoad`, or after `maxWaitS` seconds anyway (its load is recorded either way).
 */
export interface QuietRule {
  maxLoad: number
  maxWaitS: number
  /** Seconds between looks at the load (default 10). */
  pollS?: number
  /** Defaults to os.loadavg()[0] and a timer; tests replace them. */
  loadNow?: () => number
  sleep?: (seconds: number) => Promise<void>
}

export interface Side<T> {
  name: string
  run: () => Promise<T>
}

/**
 * Runs every side once per round, `rounds` times. Odd rounds run the sides in the given order,
 * even rounds in reverse, so neither side always runs first (first after a cold page cache) or
 * always last.
 */
export async function pairedRounds<T>(rounds: number, sides: readonly Side<T>[], log?: (line: string) => void, quiet: QuietRule | undefined = quietFromEnv()): Promise<Round<T>[]> {
  if (rounds < 1) throw new Error(`paired rounds: need at least one round (got ${rounds})`)
  const out: Round<T>[] = []
  for (let round = 1; round <= rounds; round++) {
    const waitedS = quiet ? await waitForQuiet(quiet, log) : 0
    const load = quiet?.loadNow?.() ?? os.loadavg()[0]!
    log?.(`round ${round} of ${rounds} (load ${load.toFixed(2)}${waitedS > 0 ? `, after waiting ${waitedS} s for load ≤ ${quiet!.maxLoad}` : ''})`)
    const order = round % 2 === 1 ? sides : [...sides].reverse()
    const results: Record<string, T> = {}
    for (const side of order) results[side.name] = await side.run()
    out.push({round, results, load, waitedS})
  }
  return out
}

/** Waits until the load is at most `maxLoad` or `maxWaitS` has passed; returns the seconds waited. */
export async function waitForQuiet(rule: QuietRule, log?: (line: string) => void): Promise<number> {
  const loadNow = rule.loadNow ?? (() => os.loadavg()[0]!)
  const sleep = rule.sleep ?? ((seconds: number) => new Promise<void>((resolve) => setTimeout(resolve, seconds * 1000)))
  const poll = rule.pollS ?? 10
  let waited = 0
  while (loadNow() > rule.maxLoad && waited < rule.maxWaitS) {
    if (waited === 0) log?.(`load ${loadNow().toFixed(2)} > ${rule.maxLoad}: waiting up to ${rule.maxWaitS} s for a quieter machine`)
    const step = Math.min(poll, rule.maxWaitS - waited)
    await sleep(step)
    waited += step
  }
  return waited
}

/** BENCH_MAX_LOAD (off when unset) and BENCH_MAX_WAIT (seconds, default 600). */
export function quietFromEnv(env: NodeJS.ProcessEnv = process.env): QuietRule | undefined {
  if (env.BENCH_MAX_LOAD === undefined || env.BENCH_MAX_LOAD === '') return undefined
  const maxLoad = Number(env.BENCH_MAX_LOAD)
  const maxWaitS = Number(env.BENCH_MAX_WAIT ?? 600)
  if (!(maxLoad > 0) || !(maxWaitS >= 0)) throw new Error(`BENCH_MAX_LOAD must be > 0 and BENCH_MAX_WAIT ≥ 0 (got ${env.BENCH_MAX_LOAD}, ${env.BENCH_MAX_WAIT})`)
  return {maxLoad, maxWaitS}
}

export interface RatioSpread {
  /** One ratio per round, in round order. */
  values: number[]
  median: number
  min: number
  max: number
}

/** The median and spread of one per-round figure (a ratio of two sides of the same round). */
export function spread(values: readonly number[]): RatioSpread {
  if (values.length === 0) throw new Error('paired rounds: no values')
  return {values: [...values], median: median(values), min: Math.min(...values), max: Math.max(...values)}
}

/** Per round, `figure(round)`; rounds where it is undefined (a side failed) are skipped. */
export function perRound<T>(rounds: readonly Round<T>[], figure: (results: Record<string, T>) => number | undefined): RatioSpread | undefined {
  const values = rounds.map((r) => figure(r.results)).filter((v): v is number => v !== undefined && Number.isFinite(v))
  return values.length ? spread(values) : undefined
}

export type TargetRule = 'median' | 'every round'

export interface PairedTarget {
  name: string
  figure: RatioSpread | undefined
  /** The figure must be at most (or, with atLeast, at least) this. */
  limit: number
  atLeast?: boolean
  /** 'median' (default): the median meets the limit; 'every round': the worst round does. */
  rule?: TargetRule
}

/** One line per target: `MET    name: median 0.95 (0.90–1.01, 3 rounds)`, or SKIPPED without a figure. */
export function targetLine(target: PairedTarget): string {
  const {name, figure, limit, atLeast = false, rule = 'median'} = target
  if (!figure) return `SKIPPED ${name}: no figure`
  const judged = rule === 'median' ? figure.median : atLeast ? figure.min : figure.max
  const met = atLeast ? judged >= limit : judged <= limit
  const rounds = figure.values.length
  const detail = `median ${figure.median.toFixed(2)} (${figure.min.toFixed(2)}–${figure.max.toFixed(2)}, ${rounds} round${rounds === 1 ? '' : 's'}: ${figure.values.map((v) => v.toFixed(2)).join(', ')})`
  return `${met ? 'MET   ' : 'MISSED'} ${name}${rule === 'every round' ? ' in every round' : ''}: ${detail}`
}

/** The load averages the rounds started at, for the figures' record. */
export function loadLine(rounds: readonly Round<unknown>[]): string {
  const now = os.loadavg().map((l) => l.toFixed(2)).join(' ')
  const waited = rounds.some((r) => r.waitedS > 0) ? `; waited for a quieter machine (s): ${rounds.map((r) => r.waitedS).join(', ')}` : ''
  return `load average at each round's start: ${rounds.map((r) => r.load.toFixed(2)).join(', ')}${waited}; now (1/5/15 min) ${now}`
}

/** BENCH_ROUNDS, at least 3 unless set lower on purpose (quick checks). */
export function roundsFromEnv(fallback = 3): number {
  const n = Number(process.env.BENCH_ROUNDS ?? fallback)
  if (!Number.isInteger(n) || n < 1) throw new Error(`BENCH_ROUNDS must be a positive integer (got ${process.env.BENCH_ROUNDS})`)
  return n
}
