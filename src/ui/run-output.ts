/**
 * How `parscale run` results look: the `--json` object, the timing line on stderr, batch
 * text blocks and summary, streamed tokens.
 */
import type {ChatTurnResult} from '../core/run/chat.js'
import type {GenerationResult, TokenEvent} from '../core/run/generation.js'

/** Prints one line to stdout (the command's `log`). */
export type LineWriter = (line: string) => void

function round(value: number, digits: number): number {
  const f = 10 ** digits
  return Math.round(value * f) / f
}

/** One `--json` line; the field names are a public format. */
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
    // Six decimals: a token's P weights still sum to 1 within 1e-5.
    ...(r.streamWeights ? {stream_weights: r.streamWeights.map((weights) => weights.map((w) => round(w, 6)))} : {}),
  }
}

/** A chat turn adds how much of the conversation the cache saved. */
export function chatJsonResult(r: ChatTurnResult): Record<string, unknown> {
  return {...jsonResult(r), prefill_tokens: r.prefillTokens, reused_tokens: r.reusedTokens}
}

export function timingLine(r: GenerationResult): string {
  return `P=${r.parallel} · ${r.promptTokens} prompt tokens · TTFT ${r.ttftMs.toFixed(0)} ms · ${r.generatedTokens} tokens at ${r.decodeTokensPerS.toFixed(1)} tokens/s · ${r.finishReason}`
}

/** A batch result as text, headed by where its prompt came from. */
export function batchItemText(file: string, line: number, r: GenerationResult): string {
  return `[${file}:${line}]\n${r.text}\n`
}

export function batchSummaryLine(results: GenerationResult[], seconds: number): string {
  const tokens = results.reduce((n, r) => n + r.generatedTokens, 0)
  const parallel = [...new Set(results.map((r) => r.parallel))].sort((a, b) => a - b)
  return `${results.length} prompts · ${tokens} tokens in ${seconds.toFixed(1)} s (${(tokens / seconds).toFixed(1)} tokens/s overall) · P=${parallel.join(', ')}`
}

export function writeTokenText(event: TokenEvent): void {
  if (event.text) process.stdout.write(event.text)
}

/** A closed pipe (`| head`) just ends the output. */
export function endOnClosedPipe(): void {
  process.stdout.on('error', (error: NodeJS.ErrnoException) => {
    if (error.code === 'EPIPE') process.exit(0)
    throw error
  })
}
