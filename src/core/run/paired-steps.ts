// Is the loss step from one P to the next more than the text's noise? Both P score the same
// tokens, so the step is the mean of the paired per-token differences; a moving-block bootstrap
// of that mean gives its interval (neighbouring tokens' losses are correlated, so single tokens
// would understate it). On a few hundred tokens a step of a few thousandths of a nat usually
// is not resolved: docs/default-model.md, "Is one file's reversed step evidence?".
import {createRng} from '../generation/sampling.js'

export type StepVerdict = 'in order' | 'reversed' | 'within noise'

export interface PairedStep {
  from: number
  to: number
  /** Mean of NLL(from) − NLL(to) over the tokens: positive when the larger P predicts better. */
  gain: number
  /** Bootstrap standard error of the gain. */
  se: number
  /** 95 % interval of the gain (normal, from the bootstrap standard error). */
  ci95: [number, number]
  verdict: StepVerdict
}

export const BOOTSTRAP_BLOCK_TOKENS = 32
export const BOOTSTRAP_RESAMPLES = 2000
const Z95 = 1.959964

/** Standard error of mean(values) by a moving-block bootstrap (blocks shrink on texts under 4 blocks). */
export function blockBootstrapSe(values: readonly number[], rng: () => number, block = BOOTSTRAP_BLOCK_TOKENS, resamples = BOOTSTRAP_RESAMPLES): number {
  const n = values.length
  if (n < 2) return Number.NaN
  const length = Math.max(1, Math.min(block, Math.floor(n / 4)))
  const starts = n - length + 1
  // prefix sums: a block's sum in O(1)
  const prefix = new Float64Array(n + 1)
  for (let i = 0; i < n; i++) prefix[i + 1] = prefix[i] + values[i]
  const blocks = Math.ceil(n / length)
  let sum = 0
  let sumSquares = 0
  for (let r = 0; r < resamples; r++) {
    let total = 0
    let taken = 0
    for (let b = 0; b < blocks; b++) {
      const start = Math.floor(rng() * starts)
      const take = Math.min(length, n - taken) // the last block is cut to n tokens in all
      total += prefix[start + take] - prefix[start]
      taken += take
    }
    const mean = total / n
    sum += mean
    sumSquares += mean * mean
  }
  const mean = sum / resamples
  return Math.sqrt(Math.max(0, (sumSquares - resamples * mean * mean) / (resamples - 1)))
}

/**
 * The step between each consecutive pair of `scores` (ordered by P), from their per-token NLLs of
 * the same text. Seeded, so the same scores give the same intervals.
 */
export function pairedSteps(scores: ReadonlyArray<{parallel: number; tokenNll: readonly number[]}>, seed = 20250515): PairedStep[] {
  const rng = createRng(seed)
  const steps: PairedStep[] = []
  for (let i = 1; i < scores.length; i++) {
    const [a, b] = [scores[i - 1], scores[i]]
    if (a.tokenNll.length !== b.tokenNll.length) throw new Error(`P = ${a.parallel} and P = ${b.parallel} scored different tokens`)
    const differences = a.tokenNll.map((v, t) => v - b.tokenNll[t])
    const gain = differences.reduce((s, v) => s + v, 0) / differences.length
    const se = blockBootstrapSe(differences, rng)
    const ci95: [number, number] = [gain - Z95 * se, gain + Z95 * se]
    const verdict: StepVerdict = ci95[0] > 0 ? 'in order' : ci95[1] < 0 ? 'reversed' : 'within noise'
    steps.push({from: a.parallel, to: b.parallel, gain, se, ci95, verdict})
  }
  return steps
}
