/**
 * The model's tokenizer and chat template (through @huggingface/transformers, from the
 * package folder only), its generation defaults, and streaming detokenization.
 */
import {readFile} from 'node:fs/promises'
import {join, resolve} from 'node:path'

import {FileFormatError, UserError} from '../errors.js'

export interface ChatMessage {
  role: string
  content: string
}

/** The subset of transformers.js' PreTrainedTokenizer that parscale uses. */
interface HfTokenizer {
  chat_template: unknown
  encode(text: string, options?: {add_special_tokens?: boolean}): number[]
  decode(ids: number[], options?: {skip_special_tokens?: boolean; clean_up_tokenization_spaces?: boolean}): string
  apply_chat_template(messages: ChatMessage[], options: {add_generation_prompt: boolean; tokenize: false}): unknown
  pad_token_id?: number | null
  eos_token_id?: number | null
}

export class TextTokenizer {
  private constructor(private readonly hf: HfTokenizer) {}

  /** Loads tokenizer.json + tokenizer_config.json from `dir`; never touches the network. */
  static async load(dir: string): Promise<TextTokenizer> {
    // Imported lazily: transformers.js is heavy and `--help` should not pay for it.
    const {AutoTokenizer} = await import('@huggingface/transformers')
    try {
      const hf = await AutoTokenizer.from_pretrained(resolve(dir), {local_files_only: true})
      return new TextTokenizer(hf as unknown as HfTokenizer)
    } catch (error) {
      throw new UserError(`${dir}: cannot load the tokenizer (${(error as Error).message})`)
    }
  }

  get hasChatTemplate(): boolean {
    return typeof this.hf.chat_template === 'string' || (typeof this.hf.chat_template === 'object' && this.hf.chat_template !== null)
  }

  /** Id to left-pad batches with (masked out, so any valid id works). */
  get padId(): number {
    return this.hf.pad_token_id ?? this.hf.eos_token_id ?? 0
  }

  get eosId(): number | undefined {
    return this.hf.eos_token_id ?? undefined
  }

  /** Text as is: no special tokens added (special-token strings inside it are still recognised). */
  encode(text: string): number[] {
    return this.hf.encode(text, {add_special_tokens: false})
  }

  /** The conversation rendered by the chat template, as text. */
  renderChat(messages: ChatMessage[], addGenerationPrompt: boolean): string {
    if (!this.hasChatTemplate) throw new UserError('the model\'s tokenizer has no chat template; use --raw')
    const text = this.hf.apply_chat_template(messages, {add_generation_prompt: addGenerationPrompt, tokenize: false})
    if (typeof text !== 'string') throw new Error('apply_chat_template returned no text')
    return text
  }

  /** Ids of the conversation ready for the assistant's answer. */
  encodeChat(messages: ChatMessage[]): number[] {
    return this.encode(this.renderChat(messages, true))
  }

  /** Text of generated ids: special tokens and ids beyond the tokenizer's vocab are dropped. */
  decode(ids: number[]): string {
    if (ids.length === 0) return '' // transformers.js refuses an empty list
    return this.hf.decode(ids, {skip_special_tokens: true, clean_up_tokenization_spaces: false})
  }

  /** Text including special tokens, to compare against rendered chat templates. */
  decodeWithSpecial(ids: number[]): string {
    if (ids.length === 0) return ''
    return this.hf.decode(ids, {skip_special_tokens: false, clean_up_tokenization_spaces: false})
  }
}

/** Defaults from `generation_config.json` (and `config.json`) of a model folder. */
export interface GenerationDefaults {
  eosTokenIds: number[]
  maxNewTokens?: number
  doSample?: boolean
  temperature?: number
  topK?: number
  topP?: number
  repetitionPenalty?: number
  /** `max_position_embeddings`: the longest sequence (prompt + answer) the model takes. */
  contextLength?: number
}

async function readJsonIfPresent(file: string): Promise<Record<string, unknown> | undefined> {
  let text: string
  try {
    text = await readFile(file, 'utf8')
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw new FileFormatError(file, `cannot read (${(error as Error).message})`)
  }
  let value: unknown
  try {
    value = JSON.parse(text)
  } catch (error) {
    throw new FileFormatError(file, `not valid JSON (${(error as Error).message})`)
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new FileFormatError(file, 'expected a JSON object')
  return value as Record<string, unknown>
}

function tokenIds(value: unknown): number[] | undefined {
  if (typeof value === 'number' && Number.isInteger(value)) return [value]
  if (Array.isArray(value) && value.every((v) => typeof v === 'number' && Number.isInteger(v))) return value as number[]
  return undefined
}

const num = (v: unknown): number | undefined => (typeof v === 'number' && Number.isFinite(v) ? v : undefined)

export async function readGenerationDefaults(dir: string): Promise<GenerationDefaults> {
  const gen = (await readJsonIfPresent(join(dir, 'generation_config.json'))) ?? {}
  const config = (await readJsonIfPresent(join(dir, 'config.json'))) ?? {}
  return {
    eosTokenIds: tokenIds(gen.eos_token_id) ?? tokenIds(config.eos_token_id) ?? [],
    maxNewTokens: num(gen.max_new_tokens),
    doSample: typeof gen.do_sample === 'boolean' ? gen.do_sample : undefined,
    temperature: num(gen.temperature),
    topK: num(gen.top_k),
    topP: num(gen.top_p),
    repetitionPenalty: num(gen.repetition_penalty),
    contextLength: num(config.max_position_embeddings),
  }
}

/**
 * Turns generated ids into text piece by piece. Decodes a short window of recent ids and
 * emits only what is new, holding back while the text ends in an incomplete UTF-8 sequence
 * (decoded as U+FFFD) so a character split across tokens is printed once, whole. The window
 * keeps one already-emitted chunk as context for decoders that depend on it (e.g. spaces).
 */
export class IncrementalDetokenizer {
  private readonly ids: number[] = []
  private windowStart = 0
  private emittedUpTo = 0

  constructor(private readonly decode: (ids: number[]) => string) {}

  push(id: number): string {
    this.ids.push(id)
    const emitted = this.decode(this.ids.slice(this.windowStart, this.emittedUpTo))
    const text = this.decode(this.ids.slice(this.windowStart))
    if (text.length <= emitted.length || text.endsWith('\uFFFD')) return ''
    this.windowStart = this.emittedUpTo
    this.emittedUpTo = this.ids.length
    return text.slice(emitted.length)
  }

  /** Whatever is still held back (an incomplete character stays as U+FFFD). */
  flush(): string {
    const emitted = this.decode(this.ids.slice(this.windowStart, this.emittedUpTo))
    const text = this.decode(this.ids.slice(this.windowStart))
    this.windowStart = this.emittedUpTo = this.ids.length
    return text.slice(emitted.length)
  }
}
