/**
 * JSON schemas of the request bodies fastify validates before a handler runs (wrong types,
 * out-of-range numbers → 400), and the TypeScript shapes they guarantee. Fields follow the
 * OpenAI API; `parallel`, `stream_weights`, `top_k` and `repetition_penalty` are this server's
 * extensions (as vLLM accepts `top_k` and `repetition_penalty`). Unknown fields are ignored, as
 * OpenAI clients send fields a server may not know (`user`, `metadata`, …).
 */

const nullable = <T extends string>(type: T) => ({type: [type, 'null']}) as const

/** Fields /v1/chat/completions and /v1/completions share. */
const common = {
  model: {type: 'string', maxLength: 512},
  max_tokens: {...nullable('integer'), minimum: 1},
  temperature: {...nullable('number'), minimum: 0, maximum: 2},
  top_p: {...nullable('number'), exclusiveMinimum: 0, maximum: 1},
  top_k: {...nullable('integer'), minimum: 0},
  repetition_penalty: {...nullable('number'), exclusiveMinimum: 0, maximum: 10},
  frequency_penalty: {...nullable('number'), minimum: -2, maximum: 2},
  presence_penalty: {...nullable('number'), minimum: -2, maximum: 2},
  seed: nullable('integer'),
  stop: {
    anyOf: [
      {type: 'string', minLength: 1, maxLength: 1024},
      {type: 'array', maxItems: 16, items: {type: 'string', minLength: 1, maxLength: 1024}},
      {type: 'null'},
    ],
  },
  stream: nullable('boolean'),
  stream_options: {
    type: ['object', 'null'],
    properties: {include_usage: nullable('boolean')},
  },
  n: {...nullable('integer'), minimum: 1},
  // A P value, or "auto": the server chooses (its --parallel auto policy; else its default P).
  parallel: {anyOf: [{type: 'integer', minimum: 1}, {type: 'string', enum: ['auto']}, {type: 'null'}]},
  stream_weights: nullable('boolean'),
} as const

const textPart = {
  type: 'object',
  required: ['type'],
  properties: {type: {type: 'string'}, text: {type: 'string'}},
} as const

const message = {
  type: 'object',
  required: ['role'],
  properties: {
    role: {type: 'string', enum: ['system', 'developer', 'user', 'assistant', 'tool']},
    content: {anyOf: [{type: 'string'}, {type: 'array', maxItems: 1024, items: textPart}, {type: 'null'}]},
    name: {type: 'string', maxLength: 256},
  },
} as const

export const chatCompletionSchema = {
  type: 'object',
  required: ['messages'],
  properties: {
    ...common,
    messages: {type: 'array', minItems: 1, maxItems: 4096, items: message},
    max_completion_tokens: {...nullable('integer'), minimum: 1},
    logprobs: nullable('boolean'),
    top_logprobs: nullable('integer'),
    tools: {type: ['array', 'null']},
    response_format: {
      type: ['object', 'null'],
      properties: {type: {type: 'string'}},
    },
  },
} as const

export const completionSchema = {
  type: 'object',
  required: ['prompt'],
  properties: {
    ...common,
    prompt: {
      anyOf: [
        {type: 'string'},
        {type: 'array', minItems: 1, maxItems: 64, items: {type: 'string'}},
        // Token-id prompts are valid OpenAI input; they are refused with a clear message later.
        {type: 'array', minItems: 1, items: {anyOf: [{type: 'integer'}, {type: 'array'}]}},
      ],
    },
    echo: nullable('boolean'),
    logprobs: nullable('integer'),
    best_of: nullable('integer'),
    suffix: nullable('string'),
  },
} as const

export interface TextPart {
  type: string
  text?: string
}

export interface ChatMessageBody {
  role: 'system' | 'developer' | 'user' | 'assistant' | 'tool'
  content?: string | TextPart[] | null
  name?: string
}

/** What both endpoints take besides the prompt. */
export interface CommonBody {
  model?: string
  max_tokens?: number | null
  temperature?: number | null
  top_p?: number | null
  top_k?: number | null
  repetition_penalty?: number | null
  frequency_penalty?: number | null
  presence_penalty?: number | null
  seed?: number | null
  stop?: string | string[] | null
  stream?: boolean | null
  stream_options?: {include_usage?: boolean | null} | null
  n?: number | null
  parallel?: number | 'auto' | null
  /** Each choice gets, per generated token, the weight of each of the P streams (streamed: one chunk per token). */
  stream_weights?: boolean | null
}

export interface ChatCompletionBody extends CommonBody {
  messages: ChatMessageBody[]
  max_completion_tokens?: number | null
  logprobs?: boolean | null
  top_logprobs?: number | null
  tools?: unknown[] | null
  response_format?: {type?: string} | null
}

export interface CompletionBody extends CommonBody {
  prompt: string | string[] | (number | unknown[])[]
  echo?: boolean | null
  logprobs?: number | null
  best_of?: number | null
  suffix?: string | null
}
