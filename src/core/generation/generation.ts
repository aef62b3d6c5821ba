/**
 * Generation over a decoder: the request and result shapes, one sequence's sampling and stop
 * checks (`Row`), and prefill in chunks. Sequences live in slots of a cache of their P; the
 * continuous batcher (batcher.ts) runs many of them, `generateSequence` one (chat).
 *
 * Only the engine's `Decoder` shape is needed (ParScaleModel satisfies it), so tests can drive
 * generation with a fake model.
 */
import type {Decoder, DecoderOutput, SequenceCache} from '../engine/decoder.js'
import {UserError} from '../errors.js'
import {Sampler, type SamplingOptions} from './sampling.js'
import {StopStringMatcher} from './stop-strings.js'
import {IncrementalDetokenizer} from './tokenizer.js'

export type FinishReason = 'stop' | 'length' | 'abort'

export interface GenerationRequest {
  promptIds: number[]
  maxNewTokens: number
  sampling: SamplingOptions
  stop?: string[]
  /** Streams P to run this request at. */
  parallel: number
}

export interface TokenEvent {
  /** Index of the request among those of one call. */
  index: number
  tokenId: number
  /** Newly completed text (may be empty: a partial character, a held-back stop prefix, EOS). */
  text: string
  /** The P stream weights that mixed the prediction of this token, when the decoder returned them (a view: copy to keep). */
  streamWeights?: Float32Array
}

export interface GenerationOptions {
  eosTokenIds: number[]
  decode: (ids: number[]) => string
  /** Longest sequence the model takes (prompt + answer). */
  contextLength?: number
  /** Keep each generated token's stream weights (`GenerationResult.streamWeights`). */
  collectStreamWeights?: boolean
  onToken?: (event: TokenEvent) => void
  /** Aborting finishes every sequence after the current step with `abort`. */
  signal?: AbortSignal
}

export interface GenerationResult {
  text: string
  /** Generated ids, including the EOS id if it stopped on one. */
  tokenIds: number[]
  finishReason: FinishReason
  promptTokens: number
  generatedTokens: number
  ttftMs: number
  decodeTokensPerS: number
  parallel: number
  /** Per generated token, the weight of each of the P streams (with `collectStreamWeights`). */
  streamWeights?: number[][]
}

/** One sequence: sampling, stop checks, text and timing. */
export class Row {
  readonly sampler: Sampler
  readonly generated: number[] = []
  readonly seen: number[]
  readonly weights: number[][] = []
  text = ''
  finishReason: FinishReason | undefined
  firstAt = 0
  endAt = 0
  /** The stream weights of the latest step, handed out with its token. */
  private stepWeights: Float32Array | undefined
  private readonly detok: IncrementalDetokenizer
  private readonly stops: StopStringMatcher
  private readonly eos: Set<number>

  constructor(
    readonly index: number,
    readonly request: GenerationRequest,
    /** Real tokens in the sequence before generation (earlier turns + prompt). */
    readonly startLength: number,
    context: number[],
    private readonly options: GenerationOptions,
  ) {
    this.sampler = new Sampler(request.sampling)
    this.seen = [...context]
    this.detok = new IncrementalDetokenizer(options.decode)
    this.stops = new StopStringMatcher(request.stop ?? [])
    this.eos = new Set(options.eosTokenIds)
  }

  get done(): boolean {
    return this.finishReason !== undefined
  }

  get lastToken(): number {
    return this.generated[this.generated.length - 1]
  }

  /** Picks the next token from its logits (and keeps the stream weights behind them). */
  step(logits: Float32Array, now: number, streamWeights?: Float32Array): void {
    this.accept(this.sampler.next(logits, this.request.sampling.repetitionPenalty ? this.seen : []), now, streamWeights)
  }

  /** Whether the next tokens are the logits' argmax alone (what a device can pick without sending them back). */
  get argmaxOnly(): boolean {
    return this.sampler.greedy && (this.request.sampling.repetitionPenalty ?? 1) === 1
  }

  /** Takes `id` as the next token (picked here by `step`, or on the device): stop checks, text, events. */
  accept(id: number, now: number, streamWeights?: Float32Array): void {
    if (this.generated.length === 0) this.firstAt = now
    this.generated.push(id)
    this.seen.push(id)
    this.stepWeights = streamWeights
    if (this.options.collectStreamWeights && streamWeights) this.weights.push(Array.from(streamWeights))
    if (this.eos.has(id)) return this.finish('stop', now, id)
    const text = this.stops.push(this.detok.push(id))
    if (this.stops.matched) return this.finish('stop', now, id, text)
    const context = this.options.contextLength ?? Infinity
    if (this.generated.length >= this.request.maxNewTokens || this.startLength + this.generated.length >= context) {
      return this.finish('length', now, id, text)
    }
    this.emit(id, text)
  }

  finish(reason: FinishReason, now: number, id?: number, text = ''): void {
    this.finishReason = reason
    this.endAt = now
    if (!this.stops.matched) text += this.stops.push(this.detok.flush())
    text += this.stops.flush()
    if (id !== undefined) this.emit(id, text)
    else this.text += text
  }

  private emit(tokenId: number, text: string): void {
    this.text += text
    this.options.onToken?.({index: this.index, tokenId, text, ...(this.stepWeights ? {streamWeights: this.stepWeights} : {})})
  }

  result(startAt: number): GenerationResult {
    const n = this.generated.length
    const decodeSeconds = (this.endAt - this.firstAt) / 1000
    return {
      text: this.text,
      tokenIds: [...this.generated],
      finishReason: this.finishReason ?? 'length',
      promptTokens: this.request.promptIds.length,
      generatedTokens: n,
      ttftMs: n > 0 ? this.firstAt - startAt : 0,
      decodeTokensPerS: n > 1 && decodeSeconds > 0 ? (n - 1) / decodeSeconds : 0,
      parallel: this.request.parallel,
      ...(this.options.collectStreamWeights ? {streamWeights: this.weights} : {}),
    }
  }
}

/** The logits (and stream weights) of one row's last position in a decoder output. */
export function lastPosition(out: DecoderOutput, row: number): {logits: Float32Array; streamWeights?: Float32Array} {
  const [, keep, vocab] = out.dims
  const position = row * keep + keep - 1
  const streams = out.streamWeights ? out.streamWeights.length / (out.dims[0] * keep) : 0
  return {
    logits: out.logits.subarray(position * vocab, (position + 1) * vocab),
    ...(out.streamWeights ? {streamWeights: out.streamWeights.subarray(position * streams, (position + 1) * streams)} : {}),
  }
}

/**
 * Feeds `ids` into one slot in chunks (so no prefill tensor grows with the square of a long
 * prompt) and returns the output of the last chunk. `keep` as the decoder's numLogitsToKeep.
 */
export async function prefill<C extends SequenceCache>(decoder: Decoder<C>, cache: C, slot: number, ids: number[], keep = 1, onChunk?: (out: DecoderOutput, offset: number) => void): Promise<DecoderOutput> {
  const chunk = decoder.prefillChunk(cache.parallel, cache.capacity, keep === 0)
  let out: DecoderOutput | undefined
  for (let offset = 0; offset < ids.length; offset += chunk) {
    out = await decoder.forward(cache, slot, [ids.slice(offset, offset + chunk)], keep)
    onChunk?.(out, offset)
  }
  if (!out) throw new Error('nothing to prefill')
  return out
}

/**
 * Generates one sequence in slot 0 of `cache` (which may already hold earlier turns): feeds
 * `newIds`, then decodes until the row finishes.
 */
export async function generateSequence<C extends SequenceCache>(decoder: Decoder<C>, cache: C, row: Row, newIds: number[], signal?: AbortSignal): Promise<void> {
  cache.reserve(1, cache.tokens(0) + newIds.length + row.request.maxNewTokens)
  let out = await prefill(decoder, cache, 0, newIds)
  for (;;) {
    const now = performance.now()
    if (signal?.aborted) return row.finish('abort', now)
    const last = lastPosition(out, 0)
    row.step(last.logits, now, last.streamWeights)
    if (row.done) return
    await decodeGreedyBurst(decoder, cache, 0, row, row.request.maxNewTokens, signal)
    if (row.done) return
    out = await decoder.forward(cache, 0, [[row.lastToken]], 1)
  }
}

/**
 * Where the decoder chains greedy steps on its device and the row takes the argmax alone: up to
 * `count` tokens of the row in one run (each accepted as it arrives; an abort stops at the next
 * token). Resolves whether it ran (the row is then done, or further on by up to `count` tokens:
 * fewer where the device's positions end first).
 */
export async function decodeGreedyBurst<C extends SequenceCache>(decoder: Decoder<C>, cache: C, slot: number, row: Row, count: number, signal?: AbortSignal): Promise<boolean> {
  if (!decoder.decodeGreedy || !row.argmaxOnly) return false
  const left = Math.min(count, row.request.maxNewTokens - row.generated.length)
  if (left < 1) return false
  return decoder.decodeGreedy(cache, slot, row.lastToken, left, (id, streamWeights) => {
    const now = performance.now()
    if (signal?.aborted) {
      row.finish('abort', now)
      return true
    }
    row.accept(id, now, streamWeights)
    return row.done
  })
}

function promptTooLong(tokens: number, contextLength: number): UserError {
  return new UserError(`the prompt is ${tokens} tokens; the model's context is ${contextLength} (--truncate keeps the tail)`)
}

export function checkRequest(request: Omit<GenerationRequest, 'parallel'>, contextLength: number | undefined): void {
  if (request.promptIds.length === 0) throw new UserError('the prompt is empty')
  if (!(Number.isInteger(request.maxNewTokens) && request.maxNewTokens >= 1)) throw new UserError('max new tokens must be a whole number >= 1')
  if (contextLength !== undefined && request.promptIds.length >= contextLength) {
    throw promptTooLong(request.promptIds.length, contextLength)
  }
}

/**
 * Fits a prompt to the context: too long is an error unless `truncate`, which keeps the
 * tail, leaving room for `maxNewTokens` when it can (at least one prompt token stays).
 */
export function fitToContext(ids: number[], contextLength: number | undefined, maxNewTokens: number, truncate: boolean): number[] {
  if (contextLength === undefined) return ids
  if (truncate) {
    if (ids.length + maxNewTokens <= contextLength) return ids
    return ids.slice(ids.length - Math.max(1, Math.min(ids.length, contextLength - maxNewTokens)))
  }
  if (ids.length >= contextLength) {
    throw promptTooLong(ids.length, contextLength)
  }
  return ids
}
