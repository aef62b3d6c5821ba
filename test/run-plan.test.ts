// `parscale run` decisions without a model: option checks, mode picking, sampling and requests.
import assert from 'node:assert/strict'
import {describe, it} from 'node:test'

import type {BatchItem} from '../src/core/run/batch-file.js'
import {UserError} from '../src/core/errors.js'
import {parseRunNumbers, pickMode, planRun, promptFromStdin, type RunNumbers, type RunOptions, splitModelArgument} from '../src/core/run/plan.js'
import {
  batchRequest,
  encodeInput,
  generationOptions,
  maxNewTokens,
  promptRequest,
  type RequestContext,
  type RequestTokenizer,
  resolveSampling,
} from '../src/core/run/requests.js'
import type {ChatMessage, GenerationDefaults} from '../src/core/generation/tokenizer.js'

function options(extra: Partial<RunOptions> = {}): RunOptions {
  return {raw: false, chat: false, json: false, quiet: false, truncate: false, numbers: {}, ...extra}
}

const terminal = () => true
const pipe = () => false
const never = () => assert.fail('stdin must not be consulted')

/** Throws a UserError whose message is exactly `message` (and, when given, whose exit code is `exitCode`). */
function refuses(fn: () => unknown, message: string, exitCode?: number): void {
  assert.throws(fn, (error: unknown) => error instanceof UserError && error.message === message && (exitCode === undefined || error.exitCode === exitCode))
}

/** One id per character; the chat template is `<role>content` per message, then `<assistant>`. */
const fakeTokenizer: RequestTokenizer = {
  hasChatTemplate: true,
  eosId: 3,
  encode: (text: string) => [...text].map((c) => c.charCodeAt(0)),
  encodeChat: (messages: ChatMessage[]) => fakeTokenizer.encode(messages.map((m) => `<${m.role}>${m.content}`).join('') + '<assistant>'),
  decode: (ids: number[]) => String.fromCharCode(...ids),
}

const noDefaults: GenerationDefaults = {eosTokenIds: []}

function context(extra: {numbers?: Partial<RunNumbers>; defaults?: Partial<GenerationDefaults>} & Partial<Omit<RequestContext, 'numbers' | 'defaults'>> = {}): RequestContext {
  const {numbers, defaults, ...rest} = extra
  return {
    options: {truncate: false},
    tokenizer: fakeTokenizer,
    useTemplate: false,
    context: 4096,
    parallel: 2,
    availableParallel: [1, 2, 4],
    ...rest,
    numbers: {batchSize: 8, ...numbers},
    defaults: {...noDefaults, ...defaults},
  }
}

const fixedSeed = () => 99

describe('run plan: numeric options', () => {
  it('parses every number and defaults --batch-size to 8', () => {
    assert.deepEqual(parseRunNumbers({}), {
      batchSize: 8, maxNewTokens: undefined, temperature: undefined, topK: undefined, topP: undefined,
      repetitionPenalty: undefined, seed: undefined, parallel: undefined, threads: undefined,
    })
    const n = parseRunNumbers({
      'batch-size': '3', 'max-new-tokens': '64', temperature: '0.7', 'top-k': '0', 'top-p': '1',
      'repetition-penalty': '1.1', seed: '4294967295', parallel: '2', threads: '4',
    })
    assert.deepEqual(n, {batchSize: 3, maxNewTokens: 64, temperature: 0.7, topK: 0, topP: 1, repetitionPenalty: 1.1, seed: 4294967295, parallel: 2, threads: 4})
  })

  it('names the flag, the rule and the value it refused', () => {
    refuses(() => parseRunNumbers({temperature: '-1'}), '--temperature must be a number >= 0 (got "-1")', 2)
    refuses(() => parseRunNumbers({temperature: 'abc'}), '--temperature must be a number >= 0 (got "abc")', 2)
    refuses(() => parseRunNumbers({temperature: ' '}), '--temperature must be a number >= 0 (got " ")', 2)
    refuses(() => parseRunNumbers({temperature: 'Infinity'}), '--temperature must be a number >= 0 (got "Infinity")', 2)
    refuses(() => parseRunNumbers({'top-p': '0'}), '--top-p must be in (0, 1] (got "0")', 2)
    refuses(() => parseRunNumbers({'top-p': '1.5'}), '--top-p must be in (0, 1] (got "1.5")', 2)
    refuses(() => parseRunNumbers({'max-new-tokens': '0'}), '--max-new-tokens must be a whole number >= 1 (got "0")', 2)
    refuses(() => parseRunNumbers({'max-new-tokens': '1.5'}), '--max-new-tokens must be a whole number >= 1 (got "1.5")', 2)
    refuses(() => parseRunNumbers({'top-k': '-1'}), '--top-k must be a whole number >= 0 (got "-1")', 2)
    refuses(() => parseRunNumbers({'batch-size': '0'}), '--batch-size must be a whole number >= 1 (got "0")', 2)
    refuses(() => parseRunNumbers({parallel: 'x'}), '--parallel must be a whole number >= 1 or auto (got "x")', 2)
    refuses(() => parseRunNumbers({threads: '0'}), '--threads must be a whole number >= 1 (got "0")', 2)
    refuses(() => parseRunNumbers({'repetition-penalty': '0'}), '--repetition-penalty must be a number > 0 (got "0")', 2)
    refuses(() => parseRunNumbers({seed: '4294967296'}), '--seed must be a whole number from 0 to 4294967295 (got "4294967296")', 2)
    refuses(() => parseRunNumbers({seed: '-1'}), '--seed must be a whole number from 0 to 4294967295 (got "-1")', 2)
  })
})

describe('run plan: prompt and mode', () => {
  it('one argument that names no model is the prompt', () => {
    const isModel = (ref: string) => ref === './model'
    assert.deepEqual(splitModelArgument({model: 'hello there'}, isModel), {model: undefined, prompt: 'hello there'})
    assert.deepEqual(splitModelArgument({model: './model'}, isModel), {model: './model'})
    assert.deepEqual(splitModelArgument({model: 'x', prompt: 'p'}, isModel), {model: 'x', prompt: 'p'})
  })

  it('--batch and --chat refuse a prompt and each other', () => {
    refuses(() => pickMode('p', {batch: 'f.jsonl', chat: false}, never), '--batch reads prompts from the file; give no prompt', 2)
    refuses(() => pickMode('p', {batch: 'f.jsonl', chat: true}, never), '--batch reads prompts from the file; give no prompt', 2)
    refuses(() => pickMode(undefined, {batch: 'f.jsonl', chat: true}, never), '--batch and --chat cannot be combined', 2)
    refuses(() => pickMode('p', {chat: true}, never), '--chat takes no prompt; type it in the chat', 2)
  })

  it('without a prompt a terminal chats and a pipe is one prompt; stdin is asked only then', () => {
    assert.equal(pickMode(undefined, {batch: 'f.jsonl', chat: false}, never), 'batch')
    assert.equal(pickMode(undefined, {chat: true}, never), 'chat')
    assert.equal(pickMode('p', {chat: false}, never), 'one-shot')
    assert.equal(pickMode('', {chat: false}, never), 'one-shot')
    assert.equal(pickMode(undefined, {chat: false}, terminal), 'chat')
    assert.equal(pickMode(undefined, {chat: false}, pipe), 'one-shot')
  })

  it('plans each mode with the checked numbers', () => {
    const batch = planRun(options({batch: 'f.jsonl', numbers: {'batch-size': '2'}}), never)
    assert.equal(batch.mode, 'batch')
    assert.equal(batch.mode === 'batch' && batch.file, 'f.jsonl')
    assert.equal(batch.numbers.batchSize, 2)
    assert.equal(planRun(options(), terminal).mode, 'chat')
    assert.deepEqual(planRun(options({prompt: 'hi'}), never), {mode: 'one-shot', prompt: 'hi', options: options({prompt: 'hi'}), numbers: parseRunNumbers({})})
    const piped = planRun(options(), pipe)
    assert.equal(piped.mode === 'one-shot' && piped.prompt, undefined, 'a piped prompt is read later')
  })

  it('refuses in the order a user fixes things: prompt, numbers, sampling, mode, empty prompt', () => {
    refuses(() => planRun(options({promptArgument: 'a', prompt: 'b', numbers: {temperature: '-1'}}), never), 'give the prompt once: as an argument or with --prompt', 2)
    refuses(() => planRun(options({prompt: '', batch: 'f', numbers: {temperature: '-3'}}), never), '--temperature must be a number >= 0 (got "-3")', 2)
    refuses(() => planRun(options({prompt: 'a', batch: 'f', numbers: {temperature: '0', 'top-k': '5'}}), never), '--top-k and --top-p need sampling; drop them or --temperature 0', 2)
    refuses(() => planRun(options({prompt: 'a', numbers: {temperature: '0', 'top-p': '0.5'}}), never), '--top-k and --top-p need sampling; drop them or --temperature 0', 2)
    refuses(() => planRun(options({prompt: '', batch: 'f'}), never), '--batch reads prompts from the file; give no prompt', 2)
    refuses(() => planRun(options({prompt: ''}), never), 'the prompt is empty', 2)
    refuses(() => planRun(options({promptArgument: ''}), never), 'the prompt is empty', 2)
  })

  it('an empty pipe is no prompt', () => {
    refuses(() => promptFromStdin(''), 'no prompt: give PROMPT or --prompt, pipe text on stdin, or use --chat', 1)
    assert.equal(promptFromStdin('text'), 'text')
  })
})

describe('run requests: sampling resolution', () => {
  const doSample: Partial<GenerationDefaults> = {doSample: true, temperature: 0.6, topK: 20, topP: 0.8, repetitionPenalty: 1.05}

  it('generation_config decides when no option is given', () => {
    assert.deepEqual(resolveSampling(context({defaults: doSample}), fixedSeed), {temperature: 0.6, topK: 20, topP: 0.8, repetitionPenalty: 1.05, seed: 99})
    // do_sample false is greedy whatever temperature the config holds
    assert.deepEqual(resolveSampling(context({defaults: {...doSample, doSample: false}}), fixedSeed), {temperature: 0, topK: undefined, topP: undefined, repetitionPenalty: 1.05, seed: 99})
    assert.equal(resolveSampling(context({defaults: {doSample: true}}), fixedSeed).temperature, 1)
    assert.equal(resolveSampling(context(), fixedSeed).temperature, 0)
  })

  it('options win over generation_config', () => {
    const n = {temperature: 1.5, topK: 5, topP: 0.9, repetitionPenalty: 1.3, seed: 7}
    assert.deepEqual(resolveSampling(context({numbers: n, defaults: doSample}), fixedSeed), {temperature: 1.5, topK: 5, topP: 0.9, repetitionPenalty: 1.3, seed: 7})
    // --temperature 0 drops the config's top-k / top-p
    assert.deepEqual(resolveSampling(context({numbers: {temperature: 0}, defaults: doSample}), fixedSeed), {temperature: 0, topK: undefined, topP: undefined, repetitionPenalty: 1.05, seed: 99})
    // an option only partly given keeps the rest from the config
    assert.deepEqual(resolveSampling(context({numbers: {topK: 3}, defaults: doSample}), fixedSeed), {temperature: 0.6, topK: 3, topP: 0.8, repetitionPenalty: 1.05, seed: 99})
  })

  it('--top-k or --top-p alone turn sampling on at temperature 1 over a greedy config', () => {
    assert.deepEqual(resolveSampling(context({numbers: {topK: 5}}), fixedSeed), {temperature: 1, topK: 5, topP: undefined, repetitionPenalty: undefined, seed: 99})
    assert.equal(resolveSampling(context({numbers: {topP: 0.5}}), fixedSeed).temperature, 1)
  })

  it('without --seed each call draws a new seed', () => {
    let next = 10
    const ctx = context()
    assert.equal(resolveSampling(ctx, () => next++).seed, 10)
    assert.equal(resolveSampling(ctx, () => next++).seed, 11)
  })

  it('max new tokens: option, then generation_config, then 256', () => {
    assert.equal(maxNewTokens(context({numbers: {maxNewTokens: 5}, defaults: {maxNewTokens: 50}})), 5)
    assert.equal(maxNewTokens(context({defaults: {maxNewTokens: 50}})), 50)
    assert.equal(maxNewTokens(context()), 256)
  })

  it('EOS ids come from generation_config, else the tokenizer', () => {
    assert.deepEqual(generationOptions(context({defaults: {eosTokenIds: [7, 8]}})).eosTokenIds, [7, 8])
    const fallback = generationOptions(context({context: 100}))
    assert.deepEqual(fallback.eosTokenIds, [3])
    assert.equal(fallback.contextLength, 100)
    assert.equal(fallback.decode([104, 105]), 'hi')
    assert.deepEqual(generationOptions(context({tokenizer: {...fakeTokenizer, eosId: undefined}})).eosTokenIds, [])
  })
})

describe('run requests: prompts and batch lines', () => {
  const encoded = (text: string) => fakeTokenizer.encode(text)

  it('the template wraps a prompt unless raw; --system is added unless the messages bring one', () => {
    assert.deepEqual(encodeInput(context(), {kind: 'prompt', text: 'hi'}), encoded('hi'))
    assert.deepEqual(encodeInput(context({useTemplate: true}), {kind: 'prompt', text: 'hi'}), encoded('<user>hi<assistant>'))
    const sys = context({useTemplate: true, options: {system: 'S', truncate: false}})
    assert.deepEqual(encodeInput(sys, {kind: 'prompt', text: 'hi'}), encoded('<system>S<user>hi<assistant>'))
    assert.deepEqual(encodeInput(sys, {kind: 'messages', messages: [{role: 'user', content: 'a'}]}), encoded('<system>S<user>a<assistant>'))
    assert.deepEqual(encodeInput(sys, {kind: 'messages', messages: [{role: 'system', content: 'T'}]}), encoded('<system>T<assistant>'))
  })

  it('a one-shot request carries the resolved options; too long is refused unless truncated', () => {
    const ctx = context({numbers: {maxNewTokens: 4, seed: 5}, options: {stop: ['\n'], truncate: false}})
    assert.deepEqual(promptRequest(ctx, 'ab'), {promptIds: encoded('ab'), maxNewTokens: 4, sampling: {temperature: 0, topK: undefined, topP: undefined, repetitionPenalty: undefined, seed: 5}, stop: ['\n'], parallel: 2})
    refuses(() => promptRequest({...ctx, context: 10}, 'x'.repeat(12)), 'the prompt is 12 tokens; the model\'s context is 10 (--truncate keeps the tail)')
    assert.deepEqual(promptRequest({...ctx, context: 10, options: {truncate: true}}, 'abcdefghijkl').promptIds, encoded('ghijkl'))
  })

  it('each batch line gets its own seed, max tokens and temperature', () => {
    const ctx = context({numbers: {maxNewTokens: 4, topK: 9}, defaults: {topP: 0.7}})
    const base = {temperature: 0, repetitionPenalty: 1.2, seed: 0xffffffff}
    const line = (n: number, extra: Partial<BatchItem> = {}): BatchItem => ({line: n, input: {kind: 'prompt', text: 'ab'}, ...extra})
    const first = batchRequest(ctx, 'f.jsonl', line(1), base, 0)
    assert.deepEqual(first, {promptIds: encoded('ab'), maxNewTokens: 4, sampling: {...base, seed: 0xffffffff}, stop: undefined, parallel: 2})
    // the seed wraps around 2^32
    assert.equal(batchRequest(ctx, 'f.jsonl', line(2), base, 1).sampling.seed, 0)
    // a sampling line over a greedy run takes top-k / top-p from the options, then the config
    const hot = batchRequest(ctx, 'f.jsonl', line(3, {temperature: 0.8, maxNewTokens: 2}), base, 2)
    assert.equal(hot.maxNewTokens, 2)
    assert.deepEqual(hot.sampling, {temperature: 0.8, repetitionPenalty: 1.2, seed: 1, topK: 9, topP: 0.7})
  })

  it('a bad batch line is named by FILE:LINE', () => {
    const base = {temperature: 0}
    const messages: BatchItem = {line: 4, input: {kind: 'messages', messages: [{role: 'user', content: 'a'}]}}
    refuses(
      () => batchRequest(context({tokenizer: {...fakeTokenizer, hasChatTemplate: false}}), 'f.jsonl', messages, base, 0),
      'f.jsonl:4: "messages" need a chat template and the model\'s tokenizer has none; use "prompt"',
    )
    refuses(() => batchRequest(context(), 'f.jsonl', {line: 2, input: {kind: 'prompt', text: ''}}, base, 0), 'f.jsonl:2: the prompt is empty')
    refuses(
      () => batchRequest(context({context: 3}), 'f.jsonl', {line: 7, input: {kind: 'prompt', text: 'abc'}}, base, 0),
      'f.jsonl:7: the prompt is 3 tokens; the model\'s context is 3 (--truncate keeps the tail)',
    )
    refuses(
      () => batchRequest(context(), 'f.jsonl', {line: 9, input: {kind: 'prompt', text: 'a'}, parallel: 8}, base, 0),
      'f.jsonl:9: "parallel": 8 is not a P the model has; available: 1, 2, 4',
    )
  })

  it('a batch line may run at its own P', () => {
    const base = {temperature: 0}
    assert.equal(batchRequest(context(), 'f.jsonl', {line: 1, input: {kind: 'prompt', text: 'a'}, parallel: 4}, base, 0).parallel, 4)
    assert.equal(batchRequest(context(), 'f.jsonl', {line: 2, input: {kind: 'prompt', text: 'a'}}, base, 1).parallel, 2, 'else --parallel')
  })
})
