/** Multi-turn chat over the decode loop, keeping the KV cache between turns. */
import {UserError} from '../errors.js'
import type {Decoder, SequenceCache} from '../engine/decoder.js'
import {checkRequest, generateSequence, prefill, Row, type GenerationOptions, type GenerationRequest, type GenerationResult, type TokenEvent} from '../generation/generation.js'
import type {ChatMessage} from '../generation/tokenizer.js'

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
 * A multi-turn conversation over one decoder at one P (switchable). The cache outlives each
 * turn and holds the model's own answer tokens (never re-tokenized). The next turn renders
 * the conversation, checks that it extends the last prompt + answer, and feeds only the
 * rest: the template's text closing the answer (an EOS the model generated stands for its
 * end-of-turn text) and the new turn. If the rendering does not extend what is cached (a stop
 * string cut the answer, a template rewrites history) it prefills the conversation from scratch.
 */
export class ChatSession<C extends SequenceCache> {
  private messages: ChatMessage[] = []
  private cache: C | undefined
  /** Tokens whose keys/values the cache holds. */
  private cachedIds: number[] = []
  /** Generated tokens not fed yet (the last token of an answer). */
  private pendingIds: number[] = []
  private last: LastTurn | undefined
  readonly stats: ChatStats = {turns: 0, lastPrefillTokens: 0, lastReusedTokens: 0, cachedTokens: 0}

  constructor(
    private readonly decoder: Decoder<C>,
    private parallelStreams: number,
    private readonly format: ChatFormat,
    private readonly options: Omit<GenerationOptions, 'onToken' | 'signal'> & {system?: string},
  ) {
    this.reset()
  }

  get parallel(): number {
    return this.parallelStreams
  }

  get history(): readonly ChatMessage[] {
    return this.messages
  }

  /** Forgets the conversation and the cache. */
  reset(): void {
    this.messages = this.options.system === undefined ? [] : [{role: 'system', content: this.options.system}]
    this.releaseCache()
  }

  /**
   * Switches to `parallel` streams. The model stays loaded (one session runs every P); the
   * cache is per P, so the conversation so far is encoded again at the new P. Returns how
   * long the switch itself took (the P's prefixes and a new cache) and the re-encode, in ms.
   */
  async setParallel(parallel: number): Promise<{switchMs: number; reencodeMs: number}> {
    if (!this.decoder.parallelValues.includes(parallel)) {
      throw new UserError(`no P = ${parallel}; available: ${this.decoder.parallelValues.join(', ')}`)
    }
    const started = performance.now()
    this.releaseCache()
    this.parallelStreams = parallel
    const cache = this.decoder.newCache(parallel)
    const switched = performance.now()
    const switchMs = switched - started
    if (!this.messages.some((m) => m.role !== 'system')) return {switchMs, reencodeMs: 0} // the next turn sends it all
    const text = this.format.renderChat(this.messages, false)
    const ids = this.format.encode(text)
    if (ids.length === 0) return {switchMs, reencodeMs: 0}
    cache.reserve(1, ids.length)
    cache.reset(0)
    await prefill(this.decoder, cache, 0, ids)
    this.cache = cache
    this.cachedIds = ids
    this.last = {promptText: text, content: ''}
    this.stats.cachedTokens = ids.length
    return {switchMs, reencodeMs: performance.now() - switched}
  }

  async send(
    content: string,
    request: Omit<GenerationRequest, 'promptIds' | 'parallel'>,
    hooks: {onToken?: (event: TokenEvent) => void; signal?: AbortSignal} = {},
  ): Promise<ChatTurnResult> {
    const messages = [...this.messages, {role: 'user', content}]
    const rendered = this.format.renderChat(messages, true)
    const reuse = this.continuation(rendered)
    if (!reuse) this.releaseCache()
    const newIds = reuse ?? this.format.encode(rendered)
    if (newIds.length === 0) throw new UserError('nothing to send')
    const reused = this.cachedIds.length
    const total = reused + newIds.length
    const context = this.options.contextLength
    if (context !== undefined && total >= context) {
      throw new UserError(`the conversation is ${total} tokens; the model's context is ${context} (/reset starts over)`)
    }
    const generationRequest: GenerationRequest = {...request, promptIds: newIds, parallel: this.parallelStreams}
    checkRequest(generationRequest, undefined)
    let cache = reuse ? this.cache! : undefined
    if (!cache) {
      cache = this.decoder.newCache(this.parallelStreams)
      cache.reserve(1, newIds.length)
      cache.reset(0)
    }
    const startAt = performance.now()
    const row = new Row(0, generationRequest, total, [...this.cachedIds, ...newIds], {...this.options, ...hooks})
    const previousIds = this.cachedIds
    this.dropCache() // if generation throws, the cache state is unknown: start over next turn
    try {
      await generateSequence(this.decoder, cache, row, newIds, hooks.signal)
    } catch (error) {
      cache.dispose?.()
      throw error
    }
    const sequence = [...previousIds, ...newIds, ...row.generated]
    const held = cache.tokens(0)
    this.cache = cache
    this.cachedIds = sequence.slice(0, held)
    this.pendingIds = sequence.slice(held)
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

  /** Drops the cache and frees it (device memory). */
  private releaseCache(): void {
    this.cache?.dispose?.()
    this.dropCache()
  }

  private dropCache(): void {
    this.cache = undefined
    this.cachedIds = []
    this.pendingIds = []
    this.last = undefined
    this.stats.cachedTokens = 0
  }
}
