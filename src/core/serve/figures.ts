/**
 * What this server measured per P, for the page's chart: the time to first token and the decode
 * time per token of its recent generations (medians, as clients saw them: queueing and batching
 * included), and the process's resident memory when they ended. One model session serves every
 * P, so memory is the whole process's, the largest seen at the end of a generation at that P.
 */
import {median} from '../bench/stats.js'
import type {GenerationResult} from '../generation/generation.js'

/** The figures of one P (snake_case: they leave as JSON). */
export interface FiguresOfP {
  parallel: number
  /** Generations measured at this P since the server started. */
  generations: number
  /** Median over the recent ones, from entering the queue to the first token. */
  ttft_ms: number
  /** Median over the recent ones with two tokens or more; null before there is one. */
  decode_ms_per_token: number | null
  /** Largest resident memory of the process at the end of a generation at this P. */
  peak_rss_bytes: number
}

/** Generations per P the medians look back over: recent enough to follow load, many enough to be stable. */
const RECENT = 64

interface Samples {
  count: number
  ttft: number[]
  decode: number[]
  rss: number
}

export class ServedFigures {
  private readonly byParallel = new Map<number, Samples>()

  /** One finished generation; those that produced no token (aborted while queued) measure nothing. */
  record(result: GenerationResult, rssBytes = process.memoryUsage.rss()): void {
    if (result.generatedTokens === 0) return
    let samples = this.byParallel.get(result.parallel)
    if (!samples) {
      samples = {count: 0, ttft: [], decode: [], rss: 0}
      this.byParallel.set(result.parallel, samples)
    }
    samples.count++
    pushRecent(samples.ttft, result.ttftMs)
    if (result.decodeTokensPerS > 0) pushRecent(samples.decode, 1000 / result.decodeTokensPerS)
    samples.rss = Math.max(samples.rss, rssBytes)
  }

  /** Every P measured so far, in increasing P. */
  snapshot(): FiguresOfP[] {
    return [...this.byParallel.entries()]
      .sort(([a], [b]) => a - b)
      .map(([parallel, s]) => ({
        parallel,
        generations: s.count,
        ttft_ms: median(s.ttft),
        decode_ms_per_token: s.decode.length > 0 ? median(s.decode) : null,
        peak_rss_bytes: s.rss,
      }))
  }
}

function pushRecent(values: number[], value: number): void {
  values.push(value)
  if (values.length > RECENT) values.shift()
}
