import assert from 'node:assert/strict'
import {describe, it} from 'node:test'

import {UserError} from '../src/core/errors.js'
import {ContinuousBatcher, generateAll} from '../src/core/generation/batcher.js'
import {ChatSession} from '../src/core/run/chat.js'
import {fitToContext, type GenerationOptions, type GenerationRequest} from '../src/core/generation/generation.js'
import {StopStringMatcher} from '../src/core/generation/stop-strings.js'
import type {ChatMessage} from '../src/core/generation/tokenizer.js'
import {ALPHABET, ChainingFakeDecoder, charTokenizer, END, FakeDecoder} from './helpers/fake-decoder.js'

const V = 40 // larger than the alphabet, like the real models: ids past it decode to ''
const opts: GenerationOptions = {eosTokenIds: [END], decode: charTokenizer.decode}
const greedy = (promptIds: number[], maxNewTokens = 12, extra: Partial<GenerationRequest> = {}): GenerationRequest => ({
  promptIds,
  maxNewTokens,
  sampling: {temperature: 0},
  parallel: 1,
  ...extra,
})
const enc = charTokenizer.encode
const one = async (decoder: FakeDecoder, request: GenerationRequest, options = opts) => (await generateAll(decoder, [request], 1, options))[0]

describe('generation', () => {
  it('a batch of different lengths gives the same ids as one at a time', async () => {
    const prompts = [enc('the quick brown fox'), enc('p'), enc('def parallel')]
    const alone = []
    for (const p of prompts) alone.push(await one(new FakeDecoder(V), greedy(p)))
    const decoder = new FakeDecoder(V)
    const batch = await generateAll(decoder, prompts.map((p) => greedy(p)), 3, opts)
    assert.deepEqual(batch.map((r) => r.tokenIds), alone.map((r) => r.tokenIds))
    assert.deepEqual(batch.map((r) => r.text), alone.map((r) => r.text))
    const prefills = decoder.calls.filter((c) => c.past[0] === 0)
    assert.deepEqual(prefills.map((c) => [c.rows, c.seq, c.past[0]]), prompts.map((p) => [1, p.length, 0]), 'each prompt prefilled alone, unpadded')
    assert.ok(decoder.calls.some((c) => c.seq === 1 && c.rows === 3), 'then the three decode together, one token per step')
    for (const [i, r] of batch.entries()) {
      assert.equal(r.promptTokens, prompts[i].length)
      assert.equal(r.generatedTokens, r.tokenIds.length)
      assert.equal(r.parallel, 1)
    }
  })

  it('a long prompt goes in by chunks and gives the same answer', async () => {
    const prompt = enc('a prompt much longer than one chunk of four')
    const whole = await one(new FakeDecoder(V), greedy(prompt))
    const chunked = new FakeDecoder(V, undefined, [1], 4)
    const r = await one(chunked, greedy(prompt))
    assert.deepEqual(r.tokenIds, whole.tokenIds)
    const prefills = chunked.calls.slice(0, Math.ceil(prompt.length / 4))
    assert.deepEqual(prefills.map((c) => c.past[0]), prefills.map((_, i) => i * 4), 'chunks extend the same slot')
    assert.ok(prefills.every((c) => c.seq <= 4))
  })

  it('seeded sampling: same seed, same output, alone or in a batch', async () => {
    const req = (p: string, seed: number): GenerationRequest => ({promptIds: enc(p), maxNewTokens: 15, sampling: {temperature: 1, topK: 10, topP: 0.9, seed}, parallel: 1})
    const a = await one(new FakeDecoder(V), req('abc', 1))
    const b = await generateAll(new FakeDecoder(V), [req('hello there', 5), req('abc', 1)], 2, opts)
    assert.deepEqual(b[1].tokenIds, a.tokenIds)
    const c = await one(new FakeDecoder(V), req('abc', 2))
    assert.notDeepEqual(c.tokenIds, a.tokenIds)
  })

  it('stops a row on EOS (id kept, text without it) and drops it from the batch', async () => {
    // row "x…" answers "ok" then END; the other runs to the limit
    const script = (h: number[]) => {
      if (h[0] !== ALPHABET.indexOf('x')) return undefined
      const n = h.length - 2
      return n === 0 ? enc('o')[0] : n === 1 ? enc('k')[0] : n === 2 ? END : undefined
    }
    const decoder = new FakeDecoder(V, script)
    const [x, y] = await generateAll(decoder, [greedy(enc('xy')), greedy(enc('hello'), 8)], 2, {...opts, eosTokenIds: [33, END]})
    assert.deepEqual(x.tokenIds, [...enc('ok'), END])
    assert.equal(x.text, 'ok')
    assert.equal(x.finishReason, 'stop')
    assert.equal(y.finishReason, 'length')
    assert.equal(y.generatedTokens, 8)
    const decodes = decoder.calls.filter((c) => c.seq === 1).map((c) => c.rows)
    assert.deepEqual(decodes, [1, 2, 1, 1, 1, 1, 1, 1], '"hello" is prefilled while "xy" decodes, joins it, and "xy" leaves after its end token')
  })

  it('a finished row leaves its slot and the last row moves into it', async () => {
    // three rows; the first finishes early, so the third must move into slot 0 and keep its history
    const script = (h: number[]) => (h[0] === ALPHABET.indexOf('q') && h.length === 3 ? END : undefined)
    const prompts = [enc('qq'), enc('bcd'), enc('efgh')]
    const decoder = new FakeDecoder(V, script)
    const batch = await generateAll(decoder, prompts.map((p) => greedy(p, 6)), 3, opts)
    const alone = []
    for (const p of prompts) alone.push(await one(new FakeDecoder(V, script), greedy(p, 6)))
    assert.deepEqual(batch.map((r) => r.tokenIds), alone.map((r) => r.tokenIds))
    assert.equal(batch[0].tokenIds.length, 2, '"qq" ends early')
    assert.equal(batch[0].tokenIds[1], END)
  })

  it('stop strings end the text before them and finish with stop', async () => {
    const script = (h: number[]) => enc('say hello world')[h.length]
    const r = await one(new FakeDecoder(V, script), greedy(enc('s'), 30, {stop: ['lo w', 'zzz']}))
    assert.equal(r.text, 'ay hel')
    assert.equal(r.finishReason, 'stop')
    assert.equal(charTokenizer.decode(r.tokenIds), 'ay hello w')
  })

  it('streams each token once; the pieces add up to the text', async () => {
    const events: {index: number; tokenId: number; text: string}[] = []
    const results = await generateAll(new FakeDecoder(V), [greedy(enc('ab'), 10), greedy(enc('c'), 6, {stop: ['q']})], 2, {...opts, onToken: (e) => events.push(e)})
    for (const [i, r] of results.entries()) {
      const mine = events.filter((e) => e.index === i)
      assert.deepEqual(mine.map((e) => e.tokenId), r.tokenIds)
      assert.equal(mine.map((e) => e.text).join(''), r.text)
    }
  })

  it('ids past the tokenizer decode to nothing but still count', async () => {
    const script = (h: number[]) => (h.length < 4 ? 35 : undefined)
    const r = await one(new FakeDecoder(V, script), greedy(enc('a'), 3))
    assert.deepEqual(r.tokenIds, [35, 35, 35])
    assert.equal(r.text, '')
  })

  it('reports timing and, when asked, the stream weights of each token', async () => {
    const r = await one(new FakeDecoder(V, undefined, [4]), greedy(enc('ab'), 5, {parallel: 4}), {...opts, collectStreamWeights: true})
    assert.ok(r.ttftMs >= 0)
    assert.ok(r.decodeTokensPerS > 0)
    assert.equal(r.parallel, 4)
    assert.equal(r.streamWeights?.length, r.generatedTokens)
    assert.deepEqual(r.streamWeights?.[0], [0.25, 0.25, 0.25, 0.25])
  })

  it('stops at the context length', async () => {
    const r = await one(new FakeDecoder(V), greedy(enc('abcd'), 50), {...opts, contextLength: 10})
    assert.equal(r.generatedTokens, 6)
    assert.equal(r.finishReason, 'length')
    await assert.rejects(one(new FakeDecoder(V), greedy(enc('abcdefghij')), {...opts, contextLength: 10}), UserError)
    await assert.rejects(one(new FakeDecoder(V), greedy([])), /empty/)
  })

  it('fitToContext errors or keeps the tail', () => {
    const ids = Array.from({length: 20}, (_, i) => i)
    assert.deepEqual(fitToContext(ids, undefined, 5, false), ids)
    assert.deepEqual(fitToContext(ids, 30, 5, false), ids)
    assert.throws(() => fitToContext(ids, 20, 5, false), /20 tokens.*context is 20.*--truncate/)
    assert.deepEqual(fitToContext(ids, 16, 6, true), ids.slice(10))
    assert.deepEqual(fitToContext(ids, 16, 100, true), ids.slice(19))
    assert.deepEqual(fitToContext(ids, 30, 10, true), ids)
  })

  it('an abort finishes rows with abort', async () => {
    const controller = new AbortController()
    let n = 0
    const r = await one(new FakeDecoder(V), greedy(enc('ab'), 50), {
      ...opts,
      signal: controller.signal,
      onToken: () => {
        if (++n === 3) controller.abort()
      },
    })
    assert.equal(r.finishReason, 'abort')
    assert.equal(r.generatedTokens, 3)
  })

  it('generateAll keeps at most batch-size rows decoding, refills as rows finish, results in order', async () => {
    const prompts = ['a', 'bcd', 'ef', 'ghijk', 'l'].map((p, i) => greedy(enc(p), 3 + i))
    const decoder = new FakeDecoder(V)
    const order: number[] = []
    const all = await generateAll(decoder, prompts, 2, opts, (_, index) => order.push(index))
    const alone = []
    for (const p of prompts) alone.push(await one(new FakeDecoder(V), p))
    assert.deepEqual(all.map((r) => r.tokenIds), alone.map((r) => r.tokenIds))
    assert.deepEqual(order, [0, 1, 2, 3, 4])
    assert.ok(decoder.calls.every((c) => c.rows <= 2))
  })

  it('mixed P: requests are grouped by P, each group batched, each answer as a single-P run gives it', async () => {
    const decoder = new FakeDecoder(V, undefined, [1, 2, 4])
    const requests = [1, 4, 2, 4, 1, 2].map((parallel, i) => greedy(enc(['ab', 'cde', 'f', 'gh', 'ijk', 'l'][i]), 5, {parallel}))
    const noEnd = {...opts, eosTokenIds: []}
    const mixed = await generateAll(decoder, requests, 8, noEnd)
    for (const [i, r] of mixed.entries()) {
      const single = await one(new FakeDecoder(V, undefined, [requests[i].parallel]), requests[i], noEnd)
      assert.deepEqual(r.tokenIds, single.tokenIds, `request ${i} at P=${requests[i].parallel}`)
      assert.equal(r.parallel, requests[i].parallel)
    }
    assert.ok(decoder.calls.some((c) => c.seq === 1 && c.rows === 2 && c.parallel === 4), 'the two P = 4 requests decode together')
    await assert.rejects(generateAll(decoder, [greedy(enc('a'), 2, {parallel: 8})], 1, opts), /no P = 8; available: 1, 2, 4/)
  })
})

describe('greedy steps chained on the device (decodeGreedy)', () => {
  const script = (h: number[]) => (h.length === 9 ? END : undefined) // an end token at the 9th position
  it('a lone greedy request runs on the chain and gives the tokens, text, stops and stream weights of step-by-step decoding', async () => {
    for (const request of [greedy(enc('ab'), 20), greedy(enc('abc'), 4), greedy(enc('s'), 30, {stop: ['q']}), greedy(enc('ab'), 5, {parallel: 4})]) {
      const parallel = [request.parallel]
      const events: string[] = []
      const options = {...opts, collectStreamWeights: true, onToken: (e: {tokenId: number; text: string; streamWeights?: Float32Array}) => events.push(`${e.tokenId}:${e.text}:${e.streamWeights?.length}`)}
      const stepped = await one(new FakeDecoder(V, script, parallel), request, options)
      const steppedEvents = events.splice(0)
      const chain = new ChainingFakeDecoder(V, script, parallel)
      const chained = await one(chain, request, options)
      assert.deepEqual({...chained, ttftMs: 0, decodeTokensPerS: 0}, {...stepped, ttftMs: 0, decodeTokensPerS: 0})
      assert.deepEqual(events, steppedEvents)
      assert.equal(chain.chainedTokens, stepped.generatedTokens - 1, 'every token after the first came from the chain')
      assert.ok(chain.calls.every((c) => c.rows === 1))
    }
  })

  it('sampling, a repetition penalty, or a second sequence decoding beside it keep to one step at a time', async () => {
    const sampled = new ChainingFakeDecoder(V)
    await one(sampled, {promptIds: enc('abc'), maxNewTokens: 8, sampling: {temperature: 1, seed: 3}, parallel: 1})
    const penalized = new ChainingFakeDecoder(V)
    await one(penalized, greedy(enc('abc'), 8, {sampling: {temperature: 0, repetitionPenalty: 1.3}}))
    assert.equal(sampled.chainedRuns + penalized.chainedRuns, 0)
    const pair = new ChainingFakeDecoder(V)
    const alone = await Promise.all([one(new FakeDecoder(V), greedy(enc('hello'), 6)), one(new FakeDecoder(V), greedy(enc('ab'), 14))])
    const both = await generateAll(pair, [greedy(enc('hello'), 6), greedy(enc('ab'), 14)], 2, opts)
    assert.deepEqual(both.map((r) => r.tokenIds), alone.map((r) => r.tokenIds))
    assert.ok(pair.calls.some((c) => c.rows === 2), 'the two decoded together')
    // the longer one's 13 tokens after its first: those made beside the other one stepped, the rest chained
    const together = pair.calls.filter((c) => c.rows === 2).length
    assert.equal(pair.chainedTokens, 13 - together, 'the chain took over once the longer one was alone')
  })

  it('the chat session\'s answer runs on the chain too', async () => {
    const stepped = new ChatSession(new FakeDecoder(V, answerOk), 1, toyFormat, {...opts})
    const chain = new ChainingFakeDecoder(V, answerOk)
    const chained = new ChatSession(chain, 1, toyFormat, {...opts})
    for (const question of ['hi', 'more']) {
      const a = await stepped.send(question, {maxNewTokens: 10, sampling: {temperature: 0}})
      const b = await chained.send(question, {maxNewTokens: 10, sampling: {temperature: 0}})
      assert.deepEqual(b.tokenIds, a.tokenIds)
      assert.equal(chained.stats.cachedTokens, stepped.stats.cachedTokens)
    }
    assert.ok(chain.chainedTokens > 0)
  })
})

describe('continuous batching', () => {
  it('a request that arrives while others decode joins the running batch', async () => {
    const decoder = new FakeDecoder(V)
    const batcher = new ContinuousBatcher(decoder, {maxBatch: 4, generation: opts})
    let late: Promise<unknown> | undefined
    let tokens = 0
    const first = batcher.submit(greedy(enc('abc'), 12), {
      onToken: () => {
        if (++tokens === 4) late = batcher.submit(greedy(enc('xyz'), 4))
      },
    })
    await first
    await late
    const decodes = decoder.calls.filter((c) => c.seq === 1).map((c) => c.rows)
    assert.ok(decodes.includes(2), `the late request decoded next to the first (${decodes})`)
    assert.equal(decodes.at(-1), 1, 'and left when it finished')
    await batcher.idle()
    assert.deepEqual(batcher.stats, {queued: 0, running: {}})
  })

  it('an aborted request leaves at once; a request aborted while queued never runs', async () => {
    const decoder = new FakeDecoder(V)
    const batcher = new ContinuousBatcher(decoder, {maxBatch: 1, generation: opts})
    const controller = new AbortController()
    const queued = new AbortController()
    let n = 0
    const running = batcher.submit(greedy(enc('ab'), 50), {
      signal: controller.signal,
      onToken: () => {
        if (++n === 2) controller.abort()
      },
    })
    const waiting = batcher.submit(greedy(enc('cd'), 5), {signal: queued.signal})
    queued.abort()
    const [a, b] = await Promise.all([running, waiting])
    assert.equal(a.finishReason, 'abort')
    assert.equal(a.generatedTokens, 2)
    assert.equal(b.finishReason, 'abort')
    assert.equal(b.generatedTokens, 0)
    assert.ok(decoder.calls.every((c) => c.past.length === 1 && c.first === 0), 'the queued request never reached the model')
  })
})

describe('stop strings', () => {
  it('holds back a possible start of a stop string', () => {
    const m = new StopStringMatcher(['END', 'xy'])
    assert.equal(m.push('abcE'), 'abc')
    assert.equal(m.push('N'), '')
    assert.equal(m.push('x'), 'EN')
    assert.equal(m.push('z'), 'xz')
    assert.equal(m.push('EN'), '')
    assert.equal(m.push('Dmore'), '')
    assert.ok(m.matched)
    assert.equal(m.flush(), '')
  })

  it('releases held text at the end; no stops = pass through', () => {
    const m = new StopStringMatcher(['aab'])
    assert.equal(m.push('xaa'), 'x')
    assert.equal(m.push('a'), 'a')
    assert.equal(m.flush(), 'aa')
    const n = new StopStringMatcher([])
    assert.equal(n.push('anything'), 'anything')
  })
})

/** A toy chat template: user `u:text;`, assistant `a:text|` (| = the end token). */
const toyFormat = {
  renderChat: (messages: ChatMessage[], addGenerationPrompt: boolean) =>
    messages.map((m) => (m.role === 'user' ? `u:${m.content};` : m.role === 'assistant' ? `a:${m.content}|` : `s:${m.content};`)).join('') +
    (addGenerationPrompt ? 'a:' : ''),
  encode: charTokenizer.encode,
  decodeWithSpecial: charTokenizer.decodeWithSpecial,
}

/** Answers "ok" then the end token, after any "a:". */
const answerOk = (h: number[]) => {
  const colon = ALPHABET.indexOf(':')
  const a = ALPHABET.indexOf('a')
  let start = -1
  for (let i = h.length - 1; i > 0; i--) if (h[i] === colon && h[i - 1] === a) {
    start = i + 1
    break
  }
  if (start < 0) return undefined
  return [...enc('ok'), END][h.length - start]
}

describe('chat session', () => {
  it('keeps the cache across turns: a new turn prefills only its own tokens', async () => {
    const decoder = new FakeDecoder(V, answerOk)
    const chat = new ChatSession(decoder, 1, toyFormat, {...opts})
    const req = {maxNewTokens: 10, sampling: {temperature: 0}}
    const t1 = await chat.send('hi', req)
    assert.equal(t1.text, 'ok')
    assert.deepEqual(t1.tokenIds, [...enc('ok'), END])
    assert.equal(t1.prefillTokens, enc('u:hi;a:').length)
    // the cache holds the prompt and the fed answer tokens; the end token is not fed yet
    assert.equal(chat.stats.cachedTokens, 7 + 2)

    const before = decoder.calls.length
    const t2 = await chat.send('yo', req)
    const full = enc(toyFormat.renderChat([...chat.history.slice(0, 2), {role: 'user', content: 'yo'}], true))
    assert.equal(t2.reusedTokens, 9)
    assert.equal(t2.prefillTokens, full.length - 9)
    assert.equal(chat.stats.lastPrefillTokens, 8, 'the end token of turn 1 and "u:yo;a:"')
    assert.deepEqual(decoder.calls[before], {parallel: 1, first: 0, rows: 1, seq: 8, past: [9]})
    assert.equal(t2.promptTokens, full.length)
    assert.equal(t2.text, 'ok')
  })

  it('gives the same answer as a full prefill of the conversation', async () => {
    // a vocabulary of the alphabet only, so the answer's text re-encodes to the same ids
    const W = ALPHABET.length
    const chat = new ChatSession(new FakeDecoder(W), 1, toyFormat, {...opts, system: 'be nice'})
    const req = {maxNewTokens: 6, sampling: {temperature: 0}}
    await chat.send('hi', req)
    const t2 = await chat.send('and then', req)
    const messages = [...chat.history.slice(0, -1)]
    const fresh = await one(new FakeDecoder(W), greedy(enc(toyFormat.renderChat(messages, true)), 6))
    assert.deepEqual(t2.tokenIds, fresh.tokenIds)
    assert.ok(t2.reusedTokens > 0)
  })

  it('keeps the model\'s own answer tokens even when their text does not re-encode to them', async () => {
    // answers 35 (past the tokenizer: no text), "o", then the end token
    const script = (h: number[]) => {
      const i = h.lastIndexOf(ALPHABET.indexOf(':'))
      return [35, enc('o')[0], END][h.length - i - 1]
    }
    const decoder = new FakeDecoder(V, script)
    const chat = new ChatSession(decoder, 1, toyFormat, {...opts})
    const req = {maxNewTokens: 5, sampling: {temperature: 0}}
    const t1 = await chat.send('hi', req)
    assert.deepEqual(t1.tokenIds, [35, enc('o')[0], END])
    assert.equal(t1.text, 'o')
    const t2 = await chat.send('yo', req)
    assert.equal(t2.reusedTokens, enc('u:hi;a:').length + 2)
    assert.equal(t2.prefillTokens, 1 + enc('u:yo;a:').length)
    // the same as one forward over exactly those tokens
    const sequence = [...enc('u:hi;a:'), 35, enc('o')[0], END, ...enc('u:yo;a:')]
    const fresh = await one(new FakeDecoder(V, script), greedy(sequence, 5))
    assert.deepEqual(t2.tokenIds, fresh.tokenIds)
  })

  it('an answer cut by max tokens: its last token and the closing text are fed next turn', async () => {
    const chat = new ChatSession(new FakeDecoder(ALPHABET.length), 1, toyFormat, {...opts})
    const t1 = await chat.send('hi', {maxNewTokens: 3, sampling: {temperature: 0}})
    assert.equal(t1.finishReason, 'length')
    const t2 = await chat.send('yo', {maxNewTokens: 3, sampling: {temperature: 0}})
    assert.equal(t2.reusedTokens, 7 + 2)
    assert.equal(t2.prefillTokens, 1 + enc('|u:yo;a:').length)
  })

  it('prefills again from scratch when the cache no longer matches the conversation', async () => {
    const chat = new ChatSession(new FakeDecoder(V, answerOk), 1, toyFormat, {...opts})
    await chat.send('hi', {maxNewTokens: 10, sampling: {temperature: 0}, stop: ['k']})
    assert.equal(chat.history[1].content, 'o')
    const t2 = await chat.send('yo', {maxNewTokens: 10, sampling: {temperature: 0}})
    assert.equal(t2.reusedTokens, 0)
    assert.equal(t2.prefillTokens, enc('u:hi;a:o|u:yo;a:').length)
  })

  it('reset forgets the conversation; setParallel re-encodes it at the new P without reloading', async () => {
    const decoder = new FakeDecoder(V, answerOk, [1, 2])
    const chat = new ChatSession(decoder, 1, toyFormat, {...opts, system: 'x'})
    const req = {maxNewTokens: 10, sampling: {temperature: 0}}
    await chat.send('hi', req)
    const {switchMs, reencodeMs} = await chat.setParallel(2)
    assert.ok(switchMs >= 0 && reencodeMs > 0)
    assert.equal(chat.parallel, 2)
    const reencoded = decoder.calls.at(-1)!
    assert.deepEqual([reencoded.parallel, reencoded.seq, reencoded.past[0]], [2, enc('s:x;u:hi;a:ok|').length, 0], 'the whole conversation at P = 2')
    const t2 = await chat.send('yo', req)
    assert.equal(t2.reusedTokens, enc('s:x;u:hi;a:ok|').length, 'the next turn reuses the re-encoded cache')
    assert.equal(t2.prefillTokens, enc('u:yo;a:').length)
    assert.equal(t2.parallel, 2)
    assert.equal(t2.text, 'ok')
    await assert.rejects(chat.setParallel(8), /no P = 8; available: 1, 2/)
    chat.reset()
    assert.deepEqual(chat.history, [{role: 'system', content: 'x'}])
    const t3 = await chat.send('hi', req)
    assert.equal(t3.prefillTokens, enc('s:x;u:hi;a:').length)
  })

  it('refuses a conversation longer than the context', async () => {
    const chat = new ChatSession(new FakeDecoder(V, answerOk), 1, toyFormat, {...opts, contextLength: 12})
    await assert.rejects(chat.send('a long message', {maxNewTokens: 4, sampling: {temperature: 0}}), /context is 12.*\/reset/)
  })
})
