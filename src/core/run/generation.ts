/**
 * The decode loop over a decoder session: batched, left-padded prefill; incremental decode
 * with the KV cache; per-row stop on EOS, stop strings, max tokens or the context; finished
 * rows are dropped from the batch. `ChatSession` (chat.ts) keeps the cache between turns.
 *
 * Only the `Decoder` shape below is needed (DecoderSession satisfies it), so tests can
 * drive the loop with a fake model.
 */
import {UserError} from '../errors.js'
import {Sampler, type SamplingOptions} from './sampling.js'
import {StopStringMatcher} from './stop-strings.js'
import {IncrementalDetokenizer} from './tokenizer.js'

export interface CacheLike {
  readonly pastLength: number
}

export interface Decoder<C extends CacheLike> {
  readonly parallel: number
  emptyCache(batch: number): C
  /** inputIds [batch][seq]; attentionMask [batch][pastLength + seq], 0 = left pad. */
  forward(inputIds: number[][], attentionMask: number[][], past: C, numLogitsToKeep: number): Promise<{logits: Float32Array; dims: [number, number, number]; present: C}>
  selectRows(cache: C, rows: number[]): C
}

export type FinishReason = 'stop' | 'length' | 'abort'

export interface GenerationRequest {
  promptIds: number[]
  maxNewTokens: number
  sampling: SamplingOptions
  stop?: string[]
}

export interface TokenEvent {
  /** Index of the request in its batch. */
  index: number
  tokenId: number
  /** Newly completed text (may be empty: a partial character, a held-back stop prefix, EOS). */
  text: string
}

export interface GenerationOptions {
  eosTokenIds: number[]
  decode: (ids: number[]) => string
  /** Id placed in left padding (masked out). */
  padId?: number
  /** Longest sequence the model takes (prompt + answer). */
  contextLength?: number
  onToken?: (event: TokenEvent) => void
  /** Aborting finishes every row after the current step with `abort`. */
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
}

/** One sequence in the loop: sampling, stop checks, text and timing. */
export class Row {
  readonly sampler: Sampler
  readonly generated: number[] = []
  readonly seen: number[]
  text = ''
  finishReason: FinishReason | undefined
  firstAt = 0
  endAt = 0
  private readonly detok: IncrementalDetokenizer
  private readonly stops: StopStringMatcher
  private readonly eos: Set<number>

  constructor(
    readonly index: number,
    readonly request: GenerationRequest,
    /** Real tokens in the sequence before generation (past cache + prompt). */
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

  step(logits: Float32Array, now: number): void {
    const id = this.sampler.next(logits, this.request.sampling.repetitionPenalty ? this.seen : [])
    if (this.generated.length === 0) this.firstAt = now
    this.generated.push(id)
    this.seen.push(id)
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
    this.options.onToken?.({index: this.index, tokenId, text})
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
    }
  }
}

/**
 * Feeds `inputIds` (one list per row) over `cache`, then decodes one token per live row per
 * step until every row has finished. Finished rows leave the batch (cache rows selected
 * away). Returns the cache as it stands when the last row finished.
 */
export async function decodeLoop<C extends CacheLike>(decoder: Decoder<C>, rows: Row[], inputIds: number[][], masks: number[][], cache: C, signal?: AbortSignal): Promise<C> {
  let active = rows.map((_, i) => i)
  let input = inputIds
  while (active.length > 0) {
    if (signal?.aborted) {
      for (const i of active) rows[i].finish('abort', performance.now())
      break
    }
    const out = await decoder.forward(input, masks, cache, 1)
    cache = out.present
    const [, keep, vocab] = out.dims
    const now = performance.now()
    const aborted = signal?.aborted ?? false
    for (const [b, i] of active.entries()) {
      const start = (b * keep + keep - 1) * vocab
      if (aborted) rows[i].finish('abort', now)
      else rows[i].step(out.logits.subarray(start, start + vocab), now)
    }
    const live = [...active.keys()].filter((b) => !rows[active[b]].done)
    if (live.length === 0) break
    if (live.length < active.length) {
      cache = decoder.selectRows(cache, live)
      masks = live.map((b) => masks[b])
      active = live.map((b) => active[b])
    }
    input = active.map((i) => [rows[i].lastToken])
    for (const m of masks) m.push(1)
  }
  return cache
}

function promptTooLong(tokens: number, contextLength: number): UserError {
  return new UserError(`the prompt is ${tokens} tokens; the model's context is ${contextLength} (--truncate keeps the tail)`)
}

export function checkRequest(request: GenerationRequest, contextLength: number | undefined): void {
  if (request.promptIds.length === 0) throw new UserError('the prompt is empty')
  if (!(Number.isInteger(request.maxNewTokens) && request.maxNewTokens >= 1)) throw new UserError('max new tokens must be a whole number >= 1')
  if (contextLength !== undefined && request.promptIds.length >= contextLength) {
    throw promptTooLong(request.promptIds.length, contextLength)
  }
}

/** Generates for several prompts at once: left padding, one shared decode loop. */
export async function generateBatch<C extends CacheLike>(decoder: Decoder<C>, requests: GenerationRequest[], options: GenerationOptions): Promise<GenerationResult[]> {
  if (requests.length === 0) return []
  for (const r of requests) checkRequest(r, options.contextLength)
  const startAt = performance.now()
  const width = Math.max(...requests.map((r) => r.promptIds.length))
  const pad = options.padId ?? 0
  const rows = requests.map((r, i) => new Row(i, r, r.promptIds.length, r.promptIds, options))
  const inputIds = requests.map((r) => [...Array<number>(width - r.promptIds.length).fill(pad), ...r.promptIds])
  const masks = requests.map((r) => [...Array<number>(width - r.promptIds.length).fill(0), ...Array<number>(r.promptIds.length).fill(1)])
  await decodeLoop(decoder, rows, inputIds, masks, decoder.emptyCache(requests.length), options.signal)
  return rows.map((row) => row.result(startAt))
}

/** All requests, `batchSize` at a time, results in input order. */
export async function generateAll<C extends CacheLike>(
  decoder: Decoder<C>,
  requests: GenerationRequest[],
  batchSize: number,
  options: GenerationOptions,
  onBatchDone?: (results: GenerationResult[], offset: number) => void,
): Promise<GenerationResult[]> {
  const results: GenerationResult[] = []
  for (let offset = 0; offset < requests.length; offset += batchSize) {
    const chunk = requests.slice(offset, offset + batchSize)
    const onToken = options.onToken
    const batchResults = await generateBatch(decoder, chunk, {
      ...options,
      onToken: onToken && ((e) => onToken({...e, index: e.index + offset})),
    })
    results.push(...batchResults)
    onBatchDone?.(batchResults, offset)
  }
  return results
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
