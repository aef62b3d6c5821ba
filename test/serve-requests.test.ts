// OpenAI bodies → generation requests: sampling falls back to generation_config as `run` does,
// and what the server cannot honour is refused by name.
import assert from 'node:assert/strict'
import {describe, test} from 'node:test'

import {UsageError} from '../src/core/errors.js'
import {ApiError} from '../src/core/serve/api-error.js'
import {prepareChat, prepareCompletion, type ServedModel} from '../src/core/serve/openai-requests.js'
import {parseServeOptions} from '../src/core/serve/options.js'
import {charTokenizer} from './helpers/fake-decoder.js'

const served = (defaults: ServedModel['defaults'] = {eosTokenIds: []}, template = false): ServedModel => ({
  id: 'm',
  tokenizer: {
    hasChatTemplate: template,
    encode: charTokenizer.encode,
    encodeChat: (messages) => charTokenizer.encode(messages.map((m) => `${m.role}:${m.content};`).join('')),
    decodeWithSpecial: charTokenizer.decodeWithSpecial,
  },
  defaults,
  context: 20,
  parallelValues: [1, 2, 4],
  defaultParallel: 4,
})

function refused(fn: () => unknown, status: number, param: string | null, pattern: RegExp): void {
  assert.throws(fn, (error: unknown) => {
    assert.ok(error instanceof ApiError, String(error))
    assert.equal(error.status, status)
    assert.equal(error.param, param)
    assert.match(error.message, pattern)
    return true
  })
}

describe('serve: OpenAI bodies to generation requests', () => {
  test('sampling left out comes from generation_config; fields given override it', () => {
    const model = served({eosTokenIds: [], doSample: false, repetitionPenalty: 1.3, maxNewTokens: 7})
    const [plain] = prepareCompletion(model, {prompt: 'ab'}).requests
    assert.deepEqual({...plain.sampling, seed: 0}, {temperature: 0, topK: undefined, topP: undefined, repetitionPenalty: 1.3, seed: 0})
    assert.equal(plain.maxNewTokens, 7)
    assert.equal(plain.parallel, 4, '--parallel when the request names none')
    const [given] = prepareCompletion(model, {prompt: 'ab', temperature: 0.5, top_p: 0.9, top_k: 3, repetition_penalty: 1, seed: -1, max_tokens: 3, parallel: 2, stop: 'x'}).requests
    assert.deepEqual(given.sampling, {temperature: 0.5, topK: 3, topP: 0.9, repetitionPenalty: 1, seed: 2 ** 32 - 1})
    assert.deepEqual([given.maxNewTokens, given.parallel, given.stop], [3, 2, ['x']])
  })

  test('chat: the template when there is one, else the texts joined without system messages', () => {
    const messages = [{role: 'system' as const, content: 'a'}, {role: 'user' as const, content: [{type: 'text', text: 'b'}, {type: 'text', text: 'c'}]}]
    assert.deepEqual(prepareChat(served(), {messages}).requests[0].promptIds, charTokenizer.encode('bc'))
    const templated = prepareChat(served(undefined, true), {messages, max_completion_tokens: 2, max_tokens: 9}).requests[0]
    assert.deepEqual(templated.promptIds, charTokenizer.encode('system:a;user:bc;'))
    assert.equal(templated.maxNewTokens, 2, 'max_completion_tokens wins over max_tokens')
  })

  test('max_tokens up to the context is taken as is; without it, the default ends at the context', () => {
    const model = served({eosTokenIds: [], maxNewTokens: 256})
    assert.equal(prepareCompletion(model, {prompt: 'abc', max_tokens: 17}).requests[0].maxNewTokens, 17, 'prompt + max_tokens = the context')
    assert.equal(prepareChat(model, {messages: [{role: 'user', content: 'ab'}], max_completion_tokens: 18, max_tokens: 10_000}).requests[0].maxNewTokens, 18)
    assert.equal(prepareCompletion(model, {prompt: 'abc'}).requests[0].maxNewTokens, 256, 'generation_config\'s limit is not refused')
  })

  test('a list of prompts: one request each, seeds one apart', () => {
    const {requests} = prepareCompletion(served(), {prompt: ['a', 'b'], seed: 10, temperature: 1})
    assert.deepEqual(requests.map((r) => [r.promptIds, r.sampling.seed]), [[[0], 10], [[1], 11]])
  })

  test('refusals name the field', () => {
    const model = served()
    refused(() => prepareCompletion(model, {prompt: 'a', model: 'other'}), 404, 'model', /"other" does not exist; this server runs "m"/)
    refused(() => prepareCompletion(model, {prompt: 'a', parallel: 8}), 400, 'parallel', /no parallel = 8; available: 1, 2, 4/)
    refused(() => prepareCompletion(model, {prompt: 'a'.repeat(20)}), 400, 'prompt', /maximum context length is 20 tokens; the prompt is 20 tokens/)
    refused(() => prepareCompletion(model, {prompt: ['a', '']}), 400, 'prompt[1]', /empty/)
    refused(
      () => prepareCompletion(model, {prompt: 'abc', max_tokens: 18}),
      400,
      'max_tokens',
      /^This model's maximum context length is 20 tokens\. However, you requested 21 tokens \(3 in the prompt, 18 in the completion\)\. Please reduce the length of the prompt or max_tokens\.$/,
    )
    refused(() => prepareCompletion(model, {prompt: ['a', 'abc'], max_tokens: 18}), 400, 'max_tokens', /you requested 21 tokens \(3 in the prompt, 18 in the completion\)/)
    refused(() => prepareChat(model, {messages: [{role: 'user', content: 'ab'}], max_completion_tokens: 10_000_000}), 400, 'max_completion_tokens', /\(2 in the messages, 10000000 in the completion\)/)
    refused(() => prepareChat(model, {messages: [{role: 'user', content: 'ab'}], max_tokens: 19}), 400, 'max_tokens', /reduce the length of the messages or max_tokens/)
    refused(() => prepareCompletion(model, {prompt: 'a', n: 2}), 400, 'n', /n > 1/)
    refused(() => prepareCompletion(model, {prompt: 'a', presence_penalty: 0.5}), 400, 'presence_penalty', /repetition_penalty/)
    refused(() => prepareCompletion(model, {prompt: [1, 2]}), 400, 'prompt', /token-id prompts/)
    refused(() => prepareChat(model, {messages: [{role: 'user', content: 'a'}], tools: [{}]}), 400, 'tools', /tool calls/)
    refused(() => prepareChat(model, {messages: [{role: 'user', content: 'a'}], logprobs: true}), 400, 'logprobs', /log probabilities/)
    refused(() => prepareChat(model, {messages: [{role: 'user', content: 'a'}], response_format: {type: 'json_object'}}), 400, 'response_format', /json_object/)
    refused(() => prepareChat(model, {messages: [{role: 'user', content: [{type: 'image_url'}]}]}), 400, 'messages[0].content[0]', /only text/)
    refused(() => prepareChat(model, {messages: [{role: 'system', content: 'a'}]}), 400, 'messages', /empty/)
    const templated = served(undefined, true)
    const failing = {
      ...templated,
      tokenizer: {
        ...templated.tokenizer,
        encodeChat: () => {
          throw new Error('Conversation roles must alternate')
        },
      },
    }
    refused(() => prepareChat(failing, {messages: [{role: 'user', content: 'a'}]}), 400, 'messages', /chat template cannot render these messages: Conversation roles must alternate/)
  })
})

describe('serve: options', () => {
  test('defaults, and one line per bad value', () => {
    assert.deepEqual(parseServeOptions({numbers: {}}), {host: '127.0.0.1', port: 8080, parallel: undefined, maxBatch: 8, maxQueue: 64, threads: undefined, shutdownTimeout: 30})
    assert.equal(parseServeOptions({numbers: {port: '0'}}).port, 0)
    // A bad value is a usage error (exit 2).
    assert.throws(() => parseServeOptions({numbers: {'max-batch': '0'}}), (error: unknown) => error instanceof UsageError && error.exitCode === 2 && error.message === '--max-batch must be a whole number >= 1 (got "0")')
    assert.throws(() => parseServeOptions({numbers: {'max-queue': '1.5'}}), /--max-queue must be a whole number >= 1/)
    assert.throws(() => parseServeOptions({numbers: {port: '-1'}}), /--port must be a whole number from 0 to 65535/)
    assert.throws(() => parseServeOptions({apiKey: ' ', numbers: {}}), /--api-key must not be empty/)
  })
})
