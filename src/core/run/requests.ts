/**
 * The generation requests `parscale run` sends: sampling resolved (options over the model's
 * generation_config), prompts and batch lines encoded (chat template, --system) and fitted
 * to the context. Pure over a `RequestContext`, so tests can use a fake tokenizer.
 */
import type {BatchInput, BatchItem} from './batch-file.js'
import {UserError} from '../errors.js'
import {fitToContext, type GenerationOptions, type GenerationRequest} from '../generation/generation.js'
import type {RunNumbers, RunOptions} from './plan.js'
import {randomSeed, type SamplingOptions} from '../generation/sampling.js'
import type {ChatMessage, GenerationDefaults, TextTokenizer} from '../generation/tokenizer.js'

/** What requests need from the tokenizer (TextTokenizer provides it). */
export type RequestTokenizer = Pick<TextTokenizer, 'hasChatTemplate' | 'eosId' | 'encode' | 'encodeChat' | 'decode'>

export interface RequestContext {
  options: Pick<RunOptions, 'system' | 'stop' | 'truncate' | 'streams'>
  numbers: RunNumbers
  tokenizer: RequestTokenizer
  defaults: GenerationDefaults
  /** Prompts go through the chat template (it exists and --raw is off). */
  useTemplate: boolean
  /** Longest sequence (prompt + answer) the model takes. */
  context: number
  /** Streams P a request runs at unless it names its own. */
  parallel: number
  /** The P values the model has. */
  availableParallel: number[]
}

export function maxNewTokens(ctx: Pick<RequestContext, 'numbers' | 'defaults'>): number {
  return ctx.numbers.maxNewTokens ?? ctx.defaults.maxNewTokens ?? 256
}

/** Options over generation_config; --top-k / --top-p alone turn sampling on at temperature 1. */
export function resolveSampling(ctx: Pick<RequestContext, 'numbers' | 'defaults'>, newSeed: () => number = randomSeed): SamplingOptions {
  const {numbers: n, defaults} = ctx
  const truncation = n.topK !== undefined || n.topP !== undefined
  const fromConfig = defaults.doSample ? (defaults.temperature ?? 1) : 0
  const temperature = n.temperature ?? (truncation && fromConfig === 0 ? 1 : fromConfig)
  const sample = temperature > 0
  return {
    temperature,
    topK: sample ? (n.topK ?? defaults.topK) : undefined,
    topP: sample ? (n.topP ?? defaults.topP) : undefined,
    repetitionPenalty: n.repetitionPenalty ?? defaults.repetitionPenalty,
    seed: n.seed ?? newSeed(),
  }
}

/** EOS from generation_config, else the tokenizer's; stream weights kept with --streams. */
export function generationOptions(ctx: Pick<RequestContext, 'tokenizer' | 'defaults' | 'context'> & Partial<Pick<RequestContext, 'options'>>): GenerationOptions {
  const {tokenizer, defaults} = ctx
  const eos = defaults.eosTokenIds.length > 0 ? defaults.eosTokenIds : tokenizer.eosId !== undefined ? [tokenizer.eosId] : []
  return {
    eosTokenIds: eos,
    decode: (ids) => tokenizer.decode(ids),
    contextLength: ctx.context,
    ...(ctx.options?.streams ? {collectStreamWeights: true} : {}),
  }
}

/** Adds --system unless the conversation brings its own. */
export function withSystem(system: string | undefined, messages: ChatMessage[]): ChatMessage[] {
  if (system === undefined || messages[0]?.role === 'system') return messages
  return [{role: 'system', content: system}, ...messages]
}

export function encodeInput(ctx: RequestContext, input: BatchInput): number[] {
  const {tokenizer, options} = ctx
  if (input.kind === 'messages') return tokenizer.encodeChat(withSystem(options.system, input.messages))
  if (!ctx.useTemplate) return tokenizer.encode(input.text)
  return tokenizer.encodeChat(withSystem(options.system, [{role: 'user', content: input.text}]))
}

/** The one-shot request. */
export function promptRequest(ctx: RequestContext, prompt: string): GenerationRequest {
  const maxNew = maxNewTokens(ctx)
  const promptIds = fitToContext(encodeInput(ctx, {kind: 'prompt', text: prompt}), ctx.context, maxNew, ctx.options.truncate)
  return {promptIds, maxNewTokens: maxNew, sampling: resolveSampling(ctx), stop: ctx.options.stop, parallel: ctx.parallel}
}

/** A chat turn's request (the chat session supplies the ids); a fresh seed each turn. */
export function chatTurnRequest(ctx: RequestContext): Omit<GenerationRequest, 'promptIds' | 'parallel'> {
  return {maxNewTokens: maxNewTokens(ctx), sampling: resolveSampling(ctx), stop: ctx.options.stop}
}

/** One batch line; problems are reported as `FILE:LINE: …`. */
export function batchRequest(ctx: RequestContext, file: string, item: BatchItem, base: SamplingOptions, index: number): GenerationRequest {
  const where = `${file}:${item.line}`
  if (item.input.kind === 'messages' && !ctx.tokenizer.hasChatTemplate) {
    throw new UserError(`${where}: "messages" need a chat template and the model's tokenizer has none; use "prompt"`)
  }
  const parallel = item.parallel ?? ctx.parallel
  if (!ctx.availableParallel.includes(parallel)) {
    throw new UserError(`${where}: "parallel": ${parallel} is not a P the model has; available: ${ctx.availableParallel.join(', ')}`)
  }
  const maxNew = item.maxNewTokens ?? maxNewTokens(ctx)
  let promptIds: number[]
  try {
    promptIds = fitToContext(encodeInput(ctx, item.input), ctx.context, maxNew, ctx.options.truncate)
  } catch (error) {
    if (error instanceof UserError) throw new UserError(`${where}: ${error.message}`)
    throw error
  }
  if (promptIds.length === 0) throw new UserError(`${where}: the prompt is empty`)
  const temperature = item.temperature ?? base.temperature
  // Each line gets its own seed, so identical lines differ and results do not depend on --batch-size.
  const sampling: SamplingOptions = {...base, temperature, seed: ((base.seed ?? 0) + index) >>> 0}
  if (temperature > 0 && base.temperature === 0) {
    Object.assign(sampling, {topK: ctx.numbers.topK ?? ctx.defaults.topK, topP: ctx.numbers.topP ?? ctx.defaults.topP})
  }
  return {promptIds, maxNewTokens: maxNew, sampling, stop: ctx.options.stop, parallel}
}

/** Every line of a batch file (`run --batch`, `batch submit`): one base sampling, a seed per line. */
export function batchRequests(ctx: RequestContext, file: string, items: BatchItem[]): GenerationRequest[] {
  const base = resolveSampling(ctx)
  return items.map((item, i) => batchRequest(ctx, file, item, base, i))
}
