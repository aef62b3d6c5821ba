/**
 * OpenAI request bodies (already schema-checked) → generation requests. Sampling falls back
 * to the model's generation_config exactly as `parscale run` does, so the same prompt, P and
 * sampling give the same tokens from both. Whatever the server cannot honour is refused with
 * a 400 that names the field, rather than silently ignored.
 */
import {UserError} from '../errors.js'
import {rawChatFormat} from '../run/chat.js'
import type {GenerationRequest} from '../generation/generation.js'
import type {RunNumbers} from '../run/plan.js'
import {maxNewTokens, resolveSampling} from '../run/requests.js'
import type {ChatMessage, GenerationDefaults, TextTokenizer} from '../generation/tokenizer.js'
import {invalidRequest, modelNotFound, type ApiError} from './api-error.js'
import type {ChatCompletionBody, ChatMessageBody, CommonBody, CompletionBody} from './schemas.js'

/** What turning a body into requests needs to know about the served model. */
export interface ServedModel {
  /** The name clients pass as `model` (and /v1/models lists). */
  id: string
  tokenizer: Pick<TextTokenizer, 'hasChatTemplate' | 'encode' | 'encodeChat' | 'decodeWithSpecial'>
  defaults: GenerationDefaults
  /** Longest sequence (prompt + answer) the model takes. */
  context: number
  parallelValues: number[]
  /** P of a request that names none (`--parallel`); with `--parallel auto`, the model's largest (a placeholder until chosen). */
  defaultParallel: number
  /** `--parallel auto`: requests that name no P (or "auto") get one chosen by the server's policy when admitted. */
  autoParallel?: boolean
}

/** One HTTP request's work: a generation per choice, and how to answer. */
export interface PreparedRequest {
  requests: GenerationRequest[]
  /** The P every choice runs at; when `auto`, set by the engine at admission (until then the default). */
  parallel: number
  /** The server chooses the P (`--parallel auto` and the request named none, or "auto"). */
  auto: boolean
  /** Who set the P: the policy, the request's "parallel", or the server's --parallel. */
  chosenBy: 'auto' | 'request' | 'default'
  stream: boolean
  /** `stream_options.include_usage`: a last chunk with the token counts. */
  includeUsage: boolean
  /** `stream_weights`: each token's stream weights in the answer (streamed: one chunk per token). */
  streamWeights: boolean
}

export function prepareChat(model: ServedModel, body: ChatCompletionBody): PreparedRequest {
  checkModel(model, body)
  refuseUnsupported(body)
  if (body.logprobs === true || (body.top_logprobs ?? 0) > 0) throw unsupported('logprobs', 'log probabilities are not available')
  if ((body.tools?.length ?? 0) > 0) throw unsupported('tools', 'tool calls are not supported')
  if (body.response_format?.type !== undefined && body.response_format.type !== 'text') {
    throw unsupported('response_format', `response_format "${body.response_format.type}" is not supported; only "text"`)
  }
  const messages = body.messages.map(toChatMessage)
  const promptIds = encodeConversation(model, messages)
  // max_completion_tokens is OpenAI's newer name; it wins when both are sent.
  const maxTokens: MaxTokens | undefined =
    body.max_completion_tokens != null ? {value: body.max_completion_tokens, param: 'max_completion_tokens'}
    : body.max_tokens != null ? {value: body.max_tokens, param: 'max_tokens'}
    : undefined
  return prepared(model, body, [{ids: promptIds, param: 'messages'}], maxTokens)
}

export function prepareCompletion(model: ServedModel, body: CompletionBody): PreparedRequest {
  checkModel(model, body)
  refuseUnsupported(body)
  if (body.echo === true) throw unsupported('echo', 'echo is not supported')
  if ((body.logprobs ?? 0) > 0) throw unsupported('logprobs', 'log probabilities are not available')
  if ((body.best_of ?? 1) > 1) throw unsupported('best_of', 'best_of > 1 is not supported')
  if (body.suffix) throw unsupported('suffix', 'suffix (fill-in-the-middle) is not supported')
  const prompts = typeof body.prompt === 'string' ? [body.prompt] : body.prompt
  if (!prompts.every((p): p is string => typeof p === 'string')) throw unsupported('prompt', 'token-id prompts are not supported; send the prompt as text')
  const encoded = prompts.map((p, i) => ({ids: model.tokenizer.encode(p), param: prompts.length > 1 ? `prompt[${i}]` : 'prompt'}))
  return prepared(model, body, encoded, body.max_tokens != null ? {value: body.max_tokens, param: 'max_tokens'} : undefined)
}

/** A prompt's ids and the field it came from, for error messages. */
interface EncodedPrompt {
  ids: number[]
  param: string
}

/** The request's own limit on new tokens, and the field that set it. */
interface MaxTokens {
  value: number
  param: 'max_tokens' | 'max_completion_tokens'
}

function prepared(model: ServedModel, body: CommonBody, prompts: EncodedPrompt[], maxTokens: MaxTokens | undefined): PreparedRequest {
  // "auto" on a server without the policy means its default P, as a request naming none.
  const auto = model.autoParallel === true && (body.parallel == null || body.parallel === 'auto')
  const parallel = body.parallel == null || body.parallel === 'auto' ? model.defaultParallel : body.parallel
  if (!model.parallelValues.includes(parallel)) {
    throw invalidRequest(`The model has no parallel = ${parallel}; available: ${model.parallelValues.join(', ')}`, 'parallel', 'unsupported_parallel')
  }
  const numbers: RunNumbers = {
    batchSize: 1,
    maxNewTokens: maxTokens?.value,
    temperature: body.temperature ?? undefined,
    topK: body.top_k ?? undefined,
    topP: body.top_p ?? undefined,
    repetitionPenalty: body.repetition_penalty ?? undefined,
    // OpenAI seeds are any integer; the sampler's PRNG takes 32 bits.
    seed: body.seed != null ? uint32(body.seed) : undefined,
  }
  const sampling = resolveSampling({numbers, defaults: model.defaults})
  const maxNew = maxNewTokens({numbers, defaults: model.defaults})
  const stop = body.stop == null ? undefined : typeof body.stop === 'string' ? [body.stop] : body.stop
  const requests = prompts.map(({ids: promptIds, param}, index): GenerationRequest => {
    if (promptIds.length === 0) throw invalidRequest('The prompt is empty', param)
    if (promptIds.length >= model.context) {
      throw invalidRequest(
        `This model's maximum context length is ${model.context} tokens; the prompt is ${promptIds.length} tokens`,
        param,
        'context_length_exceeded',
      )
    }
    // A limit the client set that cannot fit is refused, as OpenAI and vLLM do; the default one
    // (generation_config's) ends at the context instead, with finish reason "length".
    if (maxTokens !== undefined && promptIds.length + maxTokens.value > model.context) {
      const where = param.startsWith('prompt') ? 'prompt' : 'messages'
      throw invalidRequest(
        `This model's maximum context length is ${model.context} tokens. However, you requested ${promptIds.length + maxTokens.value} tokens ` +
          `(${promptIds.length} in the ${where}, ${maxTokens.value} in the completion). Please reduce the length of the ${where} or ${maxTokens.param}.`,
        maxTokens.param,
        'context_length_exceeded',
      )
    }
    // Each prompt of a list gets its own seed, so identical prompts give different samples.
    return {promptIds, maxNewTokens: maxNew, sampling: {...sampling, seed: ((sampling.seed ?? 0) + index) >>> 0}, stop, parallel}
  })
  const chosenBy = auto ? 'auto' : typeof body.parallel === 'number' ? 'request' : 'default'
  return {requests, parallel, auto, chosenBy, stream: body.stream === true, includeUsage: body.stream_options?.include_usage === true, streamWeights: body.stream_weights === true}
}

function checkModel(model: ServedModel, body: CommonBody): void {
  // Clients must name the model in OpenAI's API; curl users often do not, so it is optional.
  if (body.model !== undefined && body.model !== model.id) throw modelNotFound(body.model, model.id)
}

function refuseUnsupported(body: CommonBody): void {
  if ((body.n ?? 1) !== 1) throw unsupported('n', 'n > 1 is not supported; send separate requests')
  for (const field of ['frequency_penalty', 'presence_penalty'] as const) {
    if ((body[field] ?? 0) !== 0) throw unsupported(field, `${field} is not supported; use repetition_penalty (> 1 discourages repeats)`)
  }
}

function unsupported(param: string, message: string): ApiError {
  return invalidRequest(message, param, 'unsupported_parameter')
}

function toChatMessage(message: ChatMessageBody, index: number): ChatMessage {
  // Templates know "system"; "developer" is OpenAI's newer name for it.
  const role = message.role === 'developer' ? 'system' : message.role
  if (typeof message.content === 'string') return {role, content: message.content}
  if (message.content == null) return {role, content: ''}
  const parts = message.content
  const other = parts.findIndex((part) => part.type !== 'text' || typeof part.text !== 'string')
  if (other >= 0) throw invalidRequest(`only text content is supported (got a "${parts[other].type}" part)`, `messages[${index}].content[${other}]`)
  return {role, content: parts.map((part) => part.text).join('')}
}

/**
 * The conversation through the model's chat template; a model without one (a base model,
 * like the embedded default) gets its messages' texts one after another, system messages
 * left out, as `parscale run --chat` does: OpenAI clients expect chat to work, and a base
 * model continues text.
 */
function encodeConversation(model: ServedModel, messages: ChatMessage[]): number[] {
  const {tokenizer} = model
  if (!tokenizer.hasChatTemplate) {
    const format = rawChatFormat(tokenizer)
    return format.encode(format.renderChat(messages, true))
  }
  try {
    return tokenizer.encodeChat(messages)
  } catch (error) {
    // Templates refuse some conversations (roles out of order) by raising an exception.
    const reason = error instanceof UserError || error instanceof Error ? error.message : String(error)
    throw invalidRequest(`The chat template cannot render these messages: ${reason}`, 'messages')
  }
}

function uint32(value: number): number {
  const mod = 2 ** 32
  return ((value % mod) + mod) % mod
}
