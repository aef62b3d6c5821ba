/**
 * The decode loop over a decoder session: batched, left-padded prefill; incremental decode
 * with the KV cache; per-row stop on EOS, stop strings, max tokens or the context; finished
 * rows are dropped from the batch. `ChatSession` keeps the cache between turns.
 *
 * Only the `Decoder` shape below is needed (DecoderSession satisfies it), so tests can
 * drive the loop with a fake model.
 */
import {UserError} from './errors.js'
import {Sampler, type SamplingOptions} from './sampling.js'
import {IncrementalDetokenizer, type ChatMessage} from './tokenizer.js'

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

/**
 * Streams text while watching for stop strings: text that could be the start of a stop
 * string is held back until it is known not to be one; on a match the text ends before it.
 */
export class StopStringMatcher {
  private pending = ''
  matched = false

  constructor(private readonly stops: string[]) {}

  /** Returns the text that is safe to emit now. */
  push(text: string): string {
    if (this.matched) return ''
    const s = this.pending + text
    let cut = -1
    for (const stop of this.stops) {
      const at = stop === '' ? -1 : s.indexOf(stop)
      if (at >= 0 && (cut < 0 || at < cut)) cut = at
    }
    if (cut >= 0) {
      this.matched = true
      this.pending = ''
      return s.slice(0, cut)
    }
    const hold = this.heldSuffixLength(s)
    this.pending = s.slice(s.length - hold)
    return s.slice(0, s.length - hold)
  }

  /** Releases held-back text at the end of generation. */
  flush(): string {
    const s = this.matched ? '' : this.pending
    this.pending = ''
    return s
  }

  /** Length of the longest suffix of `s` that is a proper prefix of some stop string. */
  private heldSuffixLength(s: string): number {
    let best = 0
    for (const stop of this.stops) {
      for (let n = Math.min(stop.length - 1, s.length); n > best; n--) {
        if (s.endsWith(stop.slice(0, n))) {
          best = n
          break
        }
      }
    }
    return best
  }
}

/** One sequence in the loop: sampling, stop checks, text and timing. */
class Row {
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
async function decodeLoop<C extends CacheLike>(decoder: Decoder<C>, rows: Row[], inputIds: number[][], masks: number[][], cache: C, signal?: AbortSignal): Promise<C> {
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

function checkRequest(request: GenerationRequest, contextLength: number | undefined): void {
  if (request.promptIds.length === 0) throw new UserError('the prompt is empty')
  if (!(Number.isInteger(request.maxNewTokens) && request.maxNewTokens >= 1)) throw new UserError('max new tokens must be a whole number >= 1')
  if (contextLength !== undefined && request.promptIds.length >= contextLength) {
    throw new UserError(`the prompt is ${request.promptIds.length} tokens; the model's context is ${contextLength} (--truncate keeps the tail)`)
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
    throw new UserError(`the prompt is ${ids.length} tokens; the model's context is ${contextLength} (--truncate keeps the tail)`)
  }
  return ids
}

/** What a chat needs from the tokenizer (TextTokenizer provides it; see `rawChatFormat`). */
export interface ChatFormat {
  renderChat(messages: ChatMessage[], addGenerationPrompt: boolean): string
  encode(text: string): number[]
  decodeWithSpecial(ids: number[]): string
}

/** A chat without a template: the conversation is its texts one after another. */
export function rawChatFormat(tokenizer: Pick<ChatFormat, 'encode' | 'decodeWithSpecial'>): ChatFormat {
  return {
    renderChat: (messages) => messages.filter((m) => m.role !== 'system').map((m) => m.content).join(''),
    encode: (text) => tokenizer.encode(text),
    decodeWithSpecial: (ids) => tokenizer.decodeWithSpecial(ids),
  }
}

export interface ChatTurnResult extends GenerationResult {
  /** Tokens this turn fed through the model before its first answer token. */
  prefillTokens: number
  /** Tokens whose cache was reused from earlier turns. */
  reusedTokens: number
  /** The whole conversation the answer was conditioned on (reused + prefilled tokens). */
  promptIds: number[]
}

export interface ChatStats {
  turns: number
  /** Prefill length of the last turn (its new tokens only when the cache was reused). */
  lastPrefillTokens: number
  lastReusedTokens: number
  /** Tokens held in the cache now. */
  cachedTokens: number
}

/** What the cache holds of the last answer, to extend it on the next turn. */
interface LastTurn {
  /** The rendered prompt the answer followed. */
  promptText: string
  /** The answer's text, exactly the text of its generated tokens (without EOS). */
  content: string
  /** The EOS id the answer ended on (generated, not fed yet). */
  eosId?: number
}

/**
 * A multi-turn conversation over one decoder. The cache outlives each turn and holds the
 * model's own answer tokens (never re-tokenized). The next turn renders the conversation,
 * checks that it extends the last prompt + answer, and feeds only the rest: the template's
 * text closing the answer (an EOS the model generated stands for its end-of-turn text) and
 * the new turn. If the rendering does not extend what is cached (a stop string cut the
 * answer, a template rewrites history) it prefills the conversation from scratch.
 */
export class ChatSession<C extends CacheLike> {
  private messages: ChatMessage[] = []
  private cache: C | undefined
  /** Tokens whose keys/values the cache holds. */
  private cachedIds: number[] = []
  /** Generated tokens not fed yet (the last token of an answer). */
  private pendingIds: number[] = []
  private last: LastTurn | undefined
  readonly stats: ChatStats = {turns: 0, lastPrefillTokens: 0, lastReusedTokens: 0, cachedTokens: 0}

  constructor(
    private decoder: Decoder<C>,
    private readonly format: ChatFormat,
    private readonly options: Omit<GenerationOptions, 'onToken' | 'signal'> & {system?: string},
  ) {
    this.reset()
  }

  get parallel(): number {
    return this.decoder.parallel
  }

  get history(): readonly ChatMessage[] {
    return this.messages
  }

  /** Forgets the conversation and the cache. */
  reset(): void {
    this.messages = this.options.system === undefined ? [] : [{role: 'system', content: this.options.system}]
    this.dropCache()
  }

  /** Switches model session (e.g. another P); history stays, the next turn prefills it. */
  setDecoder(decoder: Decoder<C>): void {
    this.decoder = decoder
    this.dropCache()
  }

  async send(
    content: string,
    request: Omit<GenerationRequest, 'promptIds'>,
    hooks: {onToken?: (event: TokenEvent) => void; signal?: AbortSignal} = {},
  ): Promise<ChatTurnResult> {
    const messages = [...this.messages, {role: 'user', content}]
    const rendered = this.format.renderChat(messages, true)
    const reuse = this.continuation(rendered)
    if (!reuse) this.dropCache()
    const cache = reuse ? this.cache! : this.decoder.emptyCache(1)
    const newIds = reuse ?? this.format.encode(rendered)
    if (newIds.length === 0) throw new UserError('nothing to send')
    const reused = this.cachedIds.length
    const total = reused + newIds.length
    const context = this.options.contextLength
    if (context !== undefined && total >= context) {
      throw new UserError(`the conversation is ${total} tokens; the model's context is ${context} (/reset starts over)`)
    }
    const generationRequest: GenerationRequest = {...request, promptIds: newIds}
    checkRequest(generationRequest, undefined)
    const startAt = performance.now()
    const row = new Row(0, generationRequest, total, [...this.cachedIds, ...newIds], {...this.options, ...hooks})
    const mask = Array<number>(total).fill(1)
    const previousIds = this.cachedIds
    this.dropCache() // if the loop throws, the cache state is unknown: start over next turn
    const finalCache = await decodeLoop(this.decoder, [row], [newIds], [mask], cache, hooks.signal)
    const sequence = [...previousIds, ...newIds, ...row.generated]
    this.cache = finalCache
    this.cachedIds = sequence.slice(0, finalCache.pastLength)
    this.pendingIds = sequence.slice(finalCache.pastLength)
    const result = row.result(startAt)
    const eos = new Set(this.options.eosTokenIds)
    const lastId = row.generated.at(-1)
    const eosId = lastId !== undefined && eos.has(lastId) ? lastId : undefined
    const answerIds = eosId === undefined ? row.generated : row.generated.slice(0, -1)
    // Reusable only if the history's text is exactly what the cached tokens say.
    const exact = this.pendingIds.length <= 1 && result.text === this.options.decode(answerIds)
    this.last = exact ? {promptText: rendered, content: result.text, eosId} : undefined
    this.messages = [...messages, {role: 'assistant', content: result.text}]
    this.stats.turns++
    this.stats.lastPrefillTokens = newIds.length
    this.stats.lastReusedTokens = reused
    this.stats.cachedTokens = this.cachedIds.length
    return {...result, promptTokens: total, prefillTokens: newIds.length, reusedTokens: reused, promptIds: [...previousIds, ...newIds]}
  }

  /** Tokens to feed over the kept cache for this rendering, or undefined to start over. */
  private continuation(rendered: string): number[] | undefined {
    if (!this.cache || !this.last) return undefined
    const {promptText, content, eosId} = this.last
    const before = this.format.renderChat(this.messages, false)
    if (!rendered.startsWith(before) || !before.startsWith(promptText + content)) return undefined
    let closing = before.slice(promptText.length + content.length)
    let feed = this.pendingIds
    if (eosId !== undefined) {
      // The generated EOS stands for the template's end-of-turn text when they agree;
      // otherwise it is left out (it was never fed) and the template's text is fed.
      const eosText = this.format.decodeWithSpecial([eosId])
      if (eosText !== '' && closing.startsWith(eosText)) closing = closing.slice(eosText.length)
      else feed = []
    }
    const rest = closing + rendered.slice(before.length)
    return [...feed, ...(rest === '' ? [] : this.format.encode(rest))]
  }

  private dropCache(): void {
    this.cache = undefined
    this.cachedIds = []
    this.pendingIds = []
    this.last = undefined
    this.stats.cachedTokens = 0
  }
}
