/**
 * Response bodies in the OpenAI API's shapes: chat.completion and its chunks,
 * text_completion (whose chunks have the same shape), the model list, usage. Each carries
 * `parallel`, the P it ran at (an extension field; OpenAI clients keep unknown fields).
 * Finish reasons are OpenAI's `stop` and `length`, and `abort` for a request cut off at
 * shutdown (as vLLM reports it). With `stream_weights`, a choice also carries `stream_weights`:
 * one array of P weights per generated token (streamed: one chunk per token, so one array).
 */
import type {FinishReason, GenerationResult} from '../generation/generation.js'

export interface Usage {
  prompt_tokens: number
  completion_tokens: number
  total_tokens: number
}

/** What every completion object and chunk starts with. */
export interface CompletionHeader {
  id: string
  created: number
  model: string
  parallel: number
}

export function usageOf(results: GenerationResult[]): Usage {
  const prompt = results.reduce((sum, r) => sum + r.promptTokens, 0)
  const completion = results.reduce((sum, r) => sum + r.generatedTokens, 0)
  return {prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion}
}

/** Per generated token, the P stream weights (the `stream_weights` extension; rounded as `run --json` rounds them). */
export type TokenWeights = number[][]

/** `stream_weights` on a choice when the request asked for them. */
function weightsField(weights: TokenWeights | undefined) {
  return weights ? {stream_weights: weights} : {}
}

/** `weights[choice]`: each choice's token weights, when the request asked for them. */
export function chatCompletion(header: CompletionHeader, results: GenerationResult[], weights?: TokenWeights[]) {
  return {
    ...fields(header, 'chat.completion'),
    choices: results.map((r, index) => ({
      index,
      message: {role: 'assistant' as const, content: r.text, refusal: null},
      logprobs: null,
      finish_reason: r.finishReason,
      ...weightsField(weights?.[index]),
    })),
    usage: usageOf(results),
  }
}

/** One streamed piece of a chat answer: the role first, then text, then the finish reason. */
export function chatChunk(header: CompletionHeader, index: number, delta: {role?: 'assistant'; content?: string}, finish: FinishReason | null = null, weights?: TokenWeights) {
  return {
    ...fields(header, 'chat.completion.chunk'),
    choices: [{index, delta, logprobs: null, finish_reason: finish, ...weightsField(weights)}],
  }
}

export function textCompletion(header: CompletionHeader, results: GenerationResult[], weights?: TokenWeights[]) {
  return {
    ...fields(header, 'text_completion'),
    choices: results.map((r, index) => ({index, text: r.text, logprobs: null, finish_reason: r.finishReason, ...weightsField(weights?.[index])})),
    usage: usageOf(results),
  }
}

export function textChunk(header: CompletionHeader, index: number, text: string, finish: FinishReason | null = null, weights?: TokenWeights) {
  return {
    ...fields(header, 'text_completion'),
    choices: [{index, text, logprobs: null, finish_reason: finish, ...weightsField(weights)}],
  }
}

/** The last chunk with `stream_options.include_usage`: no choices, the token counts. */
export function usageChunk(header: CompletionHeader, object: 'chat.completion.chunk' | 'text_completion', results: GenerationResult[]) {
  return {...fields(header, object), choices: [], usage: usageOf(results)}
}

export interface ModelCard {
  id: string
  created: number
  /** The P values a request may ask for with `parallel`. */
  parallel: number[]
  /** `auto` when the server chooses P per request (--parallel auto). */
  default_parallel: number | 'auto'
  context_length: number
  chat_template: boolean
}

export function modelList(card: ModelCard) {
  return {object: 'list' as const, data: [{...card, object: 'model' as const, owned_by: 'parscale'}]}
}

function fields<O extends string>(header: CompletionHeader, object: O) {
  return {id: header.id, object, created: header.created, model: header.model, parallel: header.parallel, system_fingerprint: null}
}
