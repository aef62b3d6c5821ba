import type {Decoder, SequenceCache} from '../engine/decoder.js'
import {prefill} from '../generation/generation.js'
import {StreamWeightStats, type StreamSummary} from './stream-stats.js'

export interface EvalResult {
  /** Tokens of the text (no special tokens added). */
  tokens: number
  /** Tokens scored: every token but the first. */
  predicted: number
  mean_nll: number
  perplexity: number
  /** Context windows the text was scored in (1 when it fits the model's context). */
  windows: number
  window_tokens: number
  parallel: number
  /** With `streams`: how the aggregation head weighted the streams over the scored tokens. */
  streams?: StreamSummary
  /** With `perToken`: the NLL of every scored token, in text order (token 1 first); their mean is `mean_nll`. */
  token_nll?: number[]
}

/** −log softmax(row)[target], in float64 for a stable sum over long texts. */
export function negativeLogLikelihood(logits: Float32Array, offset: number, vocab: number, target: number): number {
  let max = -Infinity
  for (let i = 0; i < vocab; i++) max = Math.max(max, logits[offset + i])
  let sum = 0
  for (let i = 0; i < vocab; i++) sum += Math.exp(logits[offset + i] - max)
  return Math.log(sum) + max - logits[offset + target]
}

/**
 * Scores every next token of `ids` from its prefix at `parallel` streams. Texts longer than
 * the context are scored in windows that overlap by half, so each token after the first window
 * still sees at least half a context of history; every token is scored exactly once. Each
 * window goes through the model in chunks (logits for every position). `streams` also sums up
 * the stream weights of the positions that were scored (each once, as the loss). `perToken` keeps
 * each token's NLL, for paired comparisons of two models or two P on the same text.
 */
export async function scoreTokens<C extends SequenceCache>(decoder: Decoder<C>, parallel: number, ids: number[], contextLength: number, options: {streams?: boolean; perToken?: boolean} = {}): Promise<EvalResult> {
  const stats = options.streams ? new StreamWeightStats(parallel) : undefined
  const tokenNll: number[] | undefined = options.perToken ? [] : undefined
  const window = Math.max(2, Math.min(contextLength, ids.length))
  const stride = Math.max(1, Math.floor(window / 2))
  let total = 0
  let scored = 0
  let windows = 0
  let nextTarget = 1 // index of the first token not yet scored
  for (let begin = 0; nextTarget < ids.length; begin += stride) {
    const end = Math.min(begin + window, ids.length)
    const cache = decoder.newCache(parallel)
    cache.reserve(1, end - begin)
    cache.reset(0)
    try {
      await prefill(decoder, cache, 0, ids.slice(begin, end), 0, ({logits, dims, streamWeights}, offset) => {
        const [, positions, vocab] = dims
        // logits of window position p predict token begin + p + 1
        for (let j = 0; j < positions; j++) {
          const target = begin + offset + j + 1
          if (target < nextTarget || target >= end) continue
          const nll = negativeLogLikelihood(logits, j * vocab, vocab, ids[target])
          total += nll
          tokenNll?.push(nll)
          scored++
          if (stats && streamWeights) stats.add(streamWeights, j * parallel)
        }
      })
    } finally {
      cache.dispose?.()
    }
    nextTarget = end
    windows++
  }
  const meanNll = scored > 0 ? total / scored : Number.NaN
  return {
    tokens: ids.length,
    predicted: scored,
    mean_nll: meanNll,
    perplexity: Math.exp(meanNll),
    windows,
    window_tokens: window,
    parallel,
    ...(stats ? {streams: stats.summary()} : {}),
    ...(tokenNll ? {token_nll: tokenNll} : {}),
  }
}
