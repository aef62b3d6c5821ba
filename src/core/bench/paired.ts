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
export async function pairedRounds<T>(rounds: number, sides: readonly Side<T>[], log?: (line: string) => void): Promise<Round<T>[]> {
  if (rounds < 1) throw new Error(`paired rounds: need at least one round (got ${rounds})`)
  const out: Round<T>[] = []
  for (let round = 1; round <= rounds; round++) {
    const load = os.loadavg()[0]!
    log?.(`round ${round} of ${rounds} (load ${load.toFixed(2)})`)
    const order = round % 2 === 1 ? sides : [...sides].reverse()
    const results: Record<string, T> = {}
    for (const side of order) results[side.name] = await side.run()
    out.push({round, results, load})
  }
  return out
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
  return `load average at each round's start: ${rounds.map((r) => r.load.toFixed(2)).join(', ')}; now (1/5/15 min) ${now}`
}

/** BENCH_ROUNDS, at least 3 unless set lower on purpose (quick checks). */
export function roundsFromEnv(fallback = 3): number {
  const n = Number(process.env.BENCH_ROUNDS ?? fallback)
  if (!Number.isInteger(n) || n < 1) throw new Error(`BENCH_ROUNDS must be a positive integer (got ${process.env.BENCH_ROUNDS})`)
  return n
}
