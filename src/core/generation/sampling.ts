/**
 * Logits → next token: repetition penalty, then greedy (temperature 0) or temperature,
 * top-k and top-p sampling with a seeded PRNG, in the order Hugging Face applies them.
 */

export interface SamplingOptions {
  /** 0 = greedy. */
  temperature: number
  /** 0 = off. */
  topK?: number
  /** 1 = off. */
  topP?: number
  /** 1 = off; > 1 discourages tokens already in the sequence (CTRL-style). */
  repetitionPenalty?: number
  /** Same seed, same output. */
  seed?: number
}

/** mulberry32: tiny, fast and good enough for sampling; state is one 32-bit word. */
export function createRng(seed: number): () => number {
  let state = seed >>> 0
  return () => {
    state = (state + 0x6d2b79f5) >>> 0
    let t = state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

export function randomSeed(): number {
  return Math.floor(Math.random() * 0x100000000)
}

/** Index of the largest value; the first one on ties (as torch.argmax). */
export function argmax(values: ArrayLike<number>): number {
  let best = 0
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i
  return best
}

/** Divides positive / multiplies negative logits of every token seen so far (in place). */
export function applyRepetitionPenalty(logits: Float32Array, seen: Iterable<number>, penalty: number): void {
  if (penalty === 1) return
  for (const id of new Set(seen)) {
    if (id < 0 || id >= logits.length) continue
    const v = logits[id]
    logits[id] = v > 0 ? v / penalty : v * penalty
  }
}

export function softmax(logits: Float32Array): Float64Array {
  let max = -Infinity
  for (const v of logits) if (v > max) max = v
  const out = new Float64Array(logits.length)
  let sum = 0
  for (let i = 0; i < logits.length; i++) sum += out[i] = Math.exp(logits[i] - max)
  for (let i = 0; i < out.length; i++) out[i] /= sum
  return out
}

/** The value of the k-th largest logit (numeric typed-array sort: fast even for 150k ids). */
function kthLargest(logits: Float32Array, k: number): number {
  const sorted = Float32Array.from(logits).sort()
  return sorted[sorted.length - k]
}

/**
 * Softmax over the logits (already scaled by temperature), restricted to top-k and to the
 * smallest set whose probability reaches top-p. Returns candidate ids (best first, lower id
 * first on ties) and their normalized probabilities.
 */
export function candidateDistribution(logits: Float32Array, topK = 0, topP = 1): {ids: number[]; probs: number[]} {
  let max = -Infinity
  for (const v of logits) if (v > max) max = v
  let threshold = -Infinity
  if (topK > 0 && topK < logits.length) threshold = kthLargest(logits, topK)
  let z = 0
  for (const v of logits) if (v >= threshold) z += Math.exp(v - max)
  if (topP < 1) {
    // Walk values best first until the kept mass reaches topP; that value is the cut.
    const sorted = Float32Array.from(logits).sort().reverse()
    let cumulative = 0
    for (const v of sorted) {
      if (v < threshold) break
      cumulative += Math.exp(v - max) / z
      if (cumulative >= topP) {
        threshold = v
        break
      }
    }
  }
  const ids: number[] = []
  for (let i = 0; i < logits.length; i++) if (logits[i] >= threshold) ids.push(i)
  ids.sort((a, b) => logits[b] - logits[a] || a - b)
  const weights = ids.map((id) => Math.exp(logits[id] - max))
  const sum = weights.reduce((a, b) => a + b, 0)
  return {ids, probs: weights.map((w) => w / sum)}
}

/** One sequence's sampler: owns its PRNG so a row's output does not depend on its batch. */
export class Sampler {
  private readonly rng: () => number
  readonly seed: number

  constructor(readonly options: SamplingOptions) {
    if (!(options.temperature >= 0)) throw new RangeError('temperature must be >= 0')
    if (options.topP !== undefined && !(options.topP > 0 && options.topP <= 1)) throw new RangeError('top-p must be in (0, 1]')
    if (options.topK !== undefined && !(Number.isInteger(options.topK) && options.topK >= 0)) throw new RangeError('top-k must be a whole number >= 0')
    if (options.repetitionPenalty !== undefined && !(options.repetitionPenalty > 0)) throw new RangeError('repetition penalty must be > 0')
    this.seed = options.seed ?? randomSeed()
    this.rng = createRng(this.seed)
  }

  get greedy(): boolean {
    return this.options.temperature === 0
  }

  /** Picks the next id from one row of logits; `seen` feeds the repetition penalty. */
  next(row: Float32Array, seen: Iterable<number> = []): number {
    const penalty = this.options.repetitionPenalty ?? 1
    let logits = row
    if (penalty !== 1) {
      logits = Float32Array.from(row)
      applyRepetitionPenalty(logits, seen, penalty)
    }
    if (this.greedy) return argmax(logits)
    const t = this.options.temperature
    const scaled = logits.map((v) => v / t)
    const topK = this.options.topK ?? 0
    const topP = this.options.topP ?? 1
    if (topK === 0 && topP === 1) return this.draw(softmax(scaled))
    const {ids, probs} = candidateDistribution(scaled, topK, topP)
    return ids[this.draw(probs)]
  }

  /** Inverse-CDF draw of an index from normalized weights. */
  private draw(probs: ArrayLike<number>): number {
    let r = this.rng()
    for (let i = 0; i < probs.length; i++) {
      r -= probs[i]
      if (r < 0) return i
    }
    return probs.length - 1
  }
}
