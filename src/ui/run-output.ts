/**
 * How `parscale run` results look: the `--json` object (built in core), the timing line on
 * stderr, batch text blocks and summary, streamed tokens.
 */
import type {ChatTurnResult} from '../core/run/chat.js'
import type {GenerationResult, TokenEvent} from '../core/generation/generation.js'
import type {BatchItem} from '../core/run/batch-file.js'
import {batchJsonResult, jsonResult} from '../core/run/json-result.js'

export {batchJsonResult, jsonResult}

/** Prints one line to stdout (the command's `log`). */
export type LineWriter = (line: string) => void

/** A chat turn adds how much of the conversation the cache saved. */
export function chatJsonResult(r: ChatTurnResult): Record<string, unknown> {
  return {...jsonResult(r), prefill_tokens: r.prefillTokens, reused_tokens: r.reusedTokens}
}

export function timingLine(r: GenerationResult): string {
  return `P=${r.parallel} · ${r.promptTokens} prompt tokens · TTFT ${r.ttftMs.toFixed(0)} ms · ${r.generatedTokens} tokens at ${r.decodeTokensPerS.toFixed(1)} tokens/s · ${r.finishReason}`
}

/** A batch result as text, headed by where its prompt came from (and its id). */
export function batchItemText(file: string, item: Pick<BatchItem, 'line' | 'id'>, r: GenerationResult): string {
  return `[${file}:${item.line}${item.id === undefined ? '' : ` id ${item.id}`}]\n${r.text}\n`
}

/** The spinner's text while a batch runs. */
export function batchProgressLine(done: number, total: number, tokens: number, seconds: number): string {
  const rate = seconds > 0 && tokens > 0 ? ` · ${(tokens / seconds).toFixed(1)} tokens/s` : ''
  return `generating: ${done}/${total} lines done · ${tokens} tokens${rate}`
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
