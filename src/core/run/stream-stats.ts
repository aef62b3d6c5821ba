/**
 * How the aggregation head spreads its weight over the P streams, token by token (the graph's
 * `stream_weights`, the paper's dynamic weights): mean weight per stream, how often each
 * stream is the top one, and the entropy of the weights against its maximum, ln P (even split).
 */

export interface StreamSummary {
  parallel: number
  /** Tokens whose weights were counted. */
  tokens: number
  /** Per stream: its mean weight (they sum to 1). */
  mean_weight: number[]
  /** Per stream: the share of tokens where it has the largest weight (they sum to 1). */
  top_share: number[]
  /** Mean over tokens of −Σ w·ln w, in nats. */
  mean_entropy: number
  /** ln P: the entropy of an even split; 0 at P = 1. */
  max_entropy: number
  /** Smallest and largest single weight seen. */
  min_weight: number
  max_weight: number
}

/** −Σ w·ln w of one token's weights, in nats. */
export function weightEntropy(weights: ArrayLike<number>): number {
  let h = 0
  for (let i = 0; i < weights.length; i++) {
    const w = weights[i]!
    if (w > 0) h -= w * Math.log(w)
  }
  return h
}

/** Accumulates tokens' stream weights (float64 sums, so long texts stay exact enough). */
export class StreamWeightStats {
  private readonly sums: Float64Array
  private readonly tops: Float64Array
  private entropySum = 0
  private count = 0
  private min = Infinity
  private max = -Infinity

  constructor(readonly parallel: number) {
    this.sums = new Float64Array(parallel)
    this.tops = new Float64Array(parallel)
  }

  /** One token's P weights, from `weights[offset]` on. */
  add(weights: ArrayLike<number>, offset = 0): void {
    let top = 0
    let entropy = 0
    for (let p = 0; p < this.parallel; p++) {
      const w = weights[offset + p]!
      this.sums[p]! += w
      if (w > weights[offset + top]!) top = p
      if (w > 0) entropy -= w * Math.log(w)
      this.min = Math.min(this.min, w)
      this.max = Math.max(this.max, w)
    }
    this.tops[top]! += 1
    this.entropySum += entropy
    this.count++
  }

  summary(): StreamSummary {
    const n = Math.max(1, this.count)
    return {
      parallel: this.parallel,
      tokens: this.count,
      mean_weight: Array.from(this.sums, (s) => s / n),
      top_share: Array.from(this.tops, (t) => t / n),
      mean_entropy: this.entropySum / n,
      max_entropy: Math.log(this.parallel),
      min_weight: this.count > 0 ? this.min : Number.NaN,
      max_weight: this.count > 0 ? this.max : Number.NaN,
    }
  }
}

/** The summary of per-token weight lists (`GenerationResult.streamWeights`). */
export function summarizeStreamWeights(perToken: number[][], parallel: number): StreamSummary {
  const stats = new StreamWeightStats(parallel)
  for (const weights of perToken) stats.add(weights)
  return stats.summary()
}
