/**
 * The JSON object `run --json` prints for one result, one per line. The field names are a
 * public format: `batch collect` writes the same objects, stored on each queue job.
 */
import type {GenerationResult} from '../generation/generation.js'

function round(value: number, digits: number): number {
  const f = 10 ** digits
  return Math.round(value * f) / f
}

/** One token's P stream weights as they leave (run --json, serve's `stream_weights`): six decimals, so they still sum to 1 within 1e-5. */
export function roundedWeights(weights: ArrayLike<number>): number[] {
  return Array.from(weights, (w) => round(w, 6))
}

export function jsonResult(r: GenerationResult): Record<string, unknown> {
  return {
    text: r.text,
    token_ids: r.tokenIds,
    finish_reason: r.finishReason,
    prompt_tokens: r.promptTokens,
    generated_tokens: r.generatedTokens,
    parallel: r.parallel,
    ttft_ms: round(r.ttftMs, 2),
    decode_tokens_per_s: round(r.decodeTokensPerS, 2),
    ...(r.streamWeights ? {stream_weights: r.streamWeights.map(roundedWeights)} : {}),
  }
}

/** A batch line's result: its `id`, when the line has one, first, then `jsonResult`. */
export function batchJsonResult(r: GenerationResult, id: string | number | undefined): Record<string, unknown> {
  return {...(id === undefined ? {} : {id}), ...jsonResult(r)}
}
