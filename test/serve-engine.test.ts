// `parscale serve`'s HTTP layer over the fake decoder, whose steps a test can hold: queue
// limits, disconnects, shutdown, the API key and hostile input, with no dependence on timing.
import assert from 'node:assert/strict'
import {PassThrough} from 'node:stream'
import {describe, test} from 'node:test'

import OpenAI from 'openai'

import {eventually, metricValue, sseEvents, type FakeServer, withFakeServer} from './helpers/serve.js'

const metrics = async (s: FakeServer) => (await fetch(`${s.url}/metrics`)).text()

describe('serve: limits and lifecycle (fake model)', () => {
  test('over --max-queue: 429 with Retry-After; room again once a request finishes', () =>
    withFakeServer({maxQueue: 1}, async (s) => {
      s.decoder.hold()
      const holder = await s.client.chat.completions.create({model: 'fake-model', messages: [{role: 'user', content: 'ab'}], max_tokens: 3, stream: true})
      const chunks = holder[Symbol.asyncIterator]()
      assert.equal((await chunks.next()).value?.choices[0].delta.role, 'assistant', 'the first request is admitted')
      await assert.rejects(s.client.completions.create({model: 'fake-model', prompt: 'a', max_tokens: 2}), (error: unknown) => {
        assert.ok(error instanceof OpenAI.RateLimitError)
        assert.equal(error.status, 429)
        assert.equal(error.headers.get('retry-after'), '1')
        assert.match(error.message, /--max-queue/)
        return true
      })
      s.decoder.resume()
      let text = ''
      for (let next = await chunks.next(); !next.done; next = await chunks.next()) text += next.value.choices[0]?.delta.content ?? ''
      assert.equal(text, 'aaa')
      const after = await s.client.completions.create({model: 'fake-model', prompt: 'a', max_tokens: 2})
      assert.equal(after.choices[0].text, 'aa')
      assert.equal(metricValue(await metrics(s), 'parscale_requests_total', {endpoint: '/v1/completions', status: '429'}), 1)
    }))

  test('a request that arrives mid-stream joins the running batch at the next step, and leaves when done', () =>
    withFakeServer({}, async (s) => {
      const controller = new AbortController()
      const long = await s.client.completions.create({model: 'fake-model', prompt: 'ab', max_tokens: 90_000, stream: true}, {signal: controller.signal})
      const chunks = long[Symbol.asyncIterator]()
      for (let i = 0; i < 3; i++) assert.equal((await chunks.next()).value?.choices[0].text, 'a')
      const joinedAt = s.decoder.calls.length
      // Not streamed: it must come back while the long stream is still going, not after it.
      const short = await s.client.completions.create({model: 'fake-model', prompt: 'cd', max_tokens: 4})
      assert.equal(short.choices[0].text, 'aaaa')
      assert.equal(s.engine.inProgress, 1, 'the long stream is still running')
      const decodes = s.decoder.calls.slice(joinedAt).filter((c) => c.seq === 1).map((c) => c.rows)
      assert.ok(decodes.includes(2), `the two decoded in one batch (${decodes})`)
      await eventually('the short one has left the batch', () => s.decoder.calls.at(-1)?.rows === 1)
      assert.equal(metricValue(await metrics(s), 'parscale_running_rows', {parallel: '1'}), 1)
      controller.abort()
      await eventually('the long one is gone', () => s.engine.inProgress === 0)
    }))

  test('a list of prompts counts once per prompt against --max-queue', () =>
    withFakeServer({maxQueue: 2}, async (s) => {
      await assert.rejects(s.client.completions.create({model: 'fake-model', prompt: ['a', 'b', 'c'], max_tokens: 1}), OpenAI.RateLimitError)
      const two = await s.client.completions.create({model: 'fake-model', prompt: ['a', 'b'], max_tokens: 2})
      assert.deepEqual(two.choices.map((c) => [c.index, c.text]), [[0, 'aa'], [1, 'aa']])
      assert.equal(two.usage?.completion_tokens, 4)
    }))

  test('a client that disconnects mid-stream frees its row at once', () =>
    withFakeServer({}, async (s) => {
      const controller = new AbortController()
      const stream = await s.client.completions.create({model: 'fake-model', prompt: 'ab', max_tokens: 90_000, stream: true}, {signal: controller.signal})
      let received = 0
      for await (const chunk of stream) {
        assert.equal(chunk.choices[0].text, 'a')
        if (++received === 3) {
          controller.abort()
          break
        }
      }
      await eventually('the row is gone', async () => {
        const text = await metrics(s)
        return metricValue(text, 'parscale_running_rows', {parallel: '1'}) === 0 && metricValue(text, 'parscale_generations_total', {parallel: '1', finish_reason: 'abort'}) === 1
      })
      assert.equal(s.engine.inProgress, 0)
      assert.equal(metricValue(await metrics(s), 'parscale_requests_total', {endpoint: '/v1/completions', status: '499'}), 1)
    }))

  test('a non-streamed request whose client leaves is aborted too', () =>
    withFakeServer({}, async (s) => {
      const controller = new AbortController()
      const pending = fetch(`${s.url}/v1/completions`, {
        method: 'POST',
        headers: {'content-type': 'application/json'},
        body: JSON.stringify({prompt: 'a', max_tokens: 90_000}),
        signal: controller.signal,
      })
      await eventually('the generation runs', () => s.engine.inProgress === 1)
      controller.abort()
      await assert.rejects(pending)
      await eventually('it is aborted', () => s.engine.inProgress === 0)
      assert.equal(metricValue(await metrics(s), 'parscale_generations_total', {parallel: '1', finish_reason: 'abort'}), 1)
    }))

  test('shutdown refuses new requests and lets running streams finish', () =>
    withFakeServer({}, async (s) => {
      s.decoder.hold()
      const responses = await Promise.all(
        [1, 2].map((parallel) =>
          fetch(`${s.url}/v1/completions`, {method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify({prompt: 'ab', max_tokens: 5, stream: true, parallel})}),
        ),
      )
      await eventually('both generations are admitted', () => s.engine.inProgress === 2)
      const stopped = s.server.shutdown(60_000)
      const late = await fetch(`${s.url}/v1/completions`, {method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify({prompt: 'a'})}).catch((error: unknown) => error)
      if (late instanceof Response) {
        assert.equal(late.status, 503)
        assert.equal(((await late.json()) as {error: {code: string}}).error.code, 'shutting_down')
      } else assert.ok(late instanceof Error, 'refused: 503 or the connection is refused')
      s.decoder.resume()
      for (const response of responses) {
        const events = await sseEvents(response)
        assert.equal(events.at(-1), '[DONE]')
        const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as {choices: {text: string; finish_reason: string | null}[]})
        assert.equal(chunks.map((c) => c.choices[0].text).join(''), 'aaaaa')
        assert.equal(chunks.at(-1)?.choices[0].finish_reason, 'length')
      }
      await stopped
      assert.ok(s.decoder.released, 'the model is released')
    }))

  test('shutdown past its timeout ends running streams with finish_reason "abort" and [DONE]', () =>
    withFakeServer({}, async (s) => {
      const response = await fetch(`${s.url}/v1/chat/completions`, {
        method: 'POST',
        headers: {'content-type': 'application/json'},
        body: JSON.stringify({messages: [{role: 'user', content: 'a'}], max_tokens: 90_000, stream: true}),
      })
      await eventually('the generation runs', () => s.engine.inProgress === 1)
      await s.server.shutdown(50)
      const events = await sseEvents(response)
      assert.equal(events.at(-1), '[DONE]')
      const last = JSON.parse(events.at(-2)!) as {choices: {finish_reason: string}[]}
      assert.equal(last.choices[0].finish_reason, 'abort')
    }))

  test('with --api-key: a missing or wrong bearer token gets 401; /health and /metrics stay open', () =>
    withFakeServer({apiKey: 'sesame'}, async (s) => {
      const attempts: Record<string, string>[] = [{}, {authorization: 'Bearer open'}, {authorization: 'Basic c2VzYW1l'}, {authorization: 'Bearer '}]
      for (const headers of attempts) {
        const response = await fetch(`${s.url}/v1/models`, {headers})
        assert.equal(response.status, 401, JSON.stringify(headers))
        assert.equal(((await response.json()) as {error: {type: string}}).error.type, 'authentication_error')
      }
      const wrong = new OpenAI({baseURL: `${s.url}/v1`, apiKey: 'wrong', maxRetries: 0})
      await assert.rejects(wrong.models.list(), OpenAI.AuthenticationError)
      const models = await s.client.models.list()
      assert.deepEqual(models.data.map((m) => m.id), ['fake-model'])
      const answer = await s.client.completions.create({model: 'fake-model', prompt: 'a', max_tokens: 1})
      assert.equal(answer.choices[0].text, 'a')
      assert.equal((await fetch(`${s.url}/health`)).status, 200)
      assert.equal((await fetch(`${s.url}/metrics`)).status, 200)
    }))

  test('nothing a client sends crashes the server or reaches a file', () =>
    withFakeServer({}, async (s) => {
      const post = (body: string | Blob, type = 'application/json', path = '/v1/chat/completions') =>
        fetch(`${s.url}${path}`, {method: 'POST', headers: {'content-type': type}, body})
      const cases: [string | Blob, number, string?, string?][] = [
        ['', 400],
        ['null', 400],
        ['[]', 400],
        ['"text"', 400],
        ['{', 400],
        ['{"messages": [{"role": "user", "content": "a"}]', 400],
        [JSON.stringify({messages: 'hello'}), 400],
        [JSON.stringify({messages: [{role: 'user', content: 5}]}), 400],
        [JSON.stringify({messages: [{role: 'user', content: [{type: 'image_url', image_url: {url: 'file:///etc/passwd'}}]}]}), 400],
        [JSON.stringify({messages: [{role: 'user', content: 'a'}], max_tokens: '5'}), 400],
        [JSON.stringify({messages: [{role: 'user', content: 'a'}], max_tokens: -1}), 400],
        [JSON.stringify({messages: [{role: 'user', content: 'a'}], max_tokens: 1.5}), 400],
        [JSON.stringify({messages: [{role: 'user', content: 'a'}], temperature: 'hot'}), 400],
        ['{"messages": [{"role": "user", "content": "a"}], "temperature": 1e309}', 400],
        [JSON.stringify({messages: [{role: 'user', content: 'a'}], stop: [1, 2]}), 400],
        [JSON.stringify({messages: [{role: 'user', content: 'a'}], stream: 'yes'}), 400],
        [JSON.stringify({messages: [{role: 'user', content: 'a'}], n: 3}), 400],
        [JSON.stringify({messages: [{role: 'user', content: 'a'}], parallel: 0}), 400],
        [JSON.stringify({messages: [{role: 'user', content: 'a'}], parallel: 3}), 400],
        [JSON.stringify({messages: [{role: 'user', content: 'a'}], seed: 'x'}), 400],
        ['{"__proto__": {"polluted": true}, "messages": [{"role": "user", "content": "a"}]}', 400],
        ['{"constructor": {"prototype": {"polluted": true}}, "messages": [{"role": "user", "content": "a"}]}', 400],
        ['[' .repeat(100_000) + ']'.repeat(100_000), 400],
        [JSON.stringify({messages: [{role: 'user', content: 'a'.repeat(2 << 20)}]}), 413],
        [new Blob([new Uint8Array([0xff, 0xfe, 0x00, 0x7b])]), 400],
        ['messages=a', 415, 'application/x-www-form-urlencoded'],
        [JSON.stringify({model: '../../../../etc/passwd', messages: [{role: 'user', content: 'a'}]}), 404],
        [JSON.stringify({model: '/etc/passwd', prompt: 'a'}), 404, 'application/json', '/v1/completions'],
        [JSON.stringify({prompt: [[1, 2, 3]]}), 400, 'application/json', '/v1/completions'],
        [JSON.stringify({prompt: 'a', echo: true}), 400, 'application/json', '/v1/completions'],
        [JSON.stringify({prompt: ''}), 400, 'application/json', '/v1/completions'],
      ]
      for (const [body, status, type, path] of cases) {
        const response = await post(body, type, path)
        const text = await response.text()
        const shown = typeof body === 'string' ? body.slice(0, 80) : `${body.size} bytes`
        assert.equal(response.status, status, `${shown} → ${text}`)
        const error = (JSON.parse(text) as {error: {message: string; type: string}}).error
        assert.equal(typeof error.message, 'string', shown)
        assert.doesNotMatch(error.message, /root:|\/work\/|at .*\.js/, 'no file content or stack in the message')
      }
      assert.equal(({} as Record<string, unknown>).polluted, undefined)
      const health = await fetch(`${s.url}/health`)
      assert.equal(health.status, 200)
      const fine = await s.client.completions.create({model: 'fake-model', prompt: 'a', max_tokens: 2})
      assert.equal(fine.choices[0].text, 'aa')
    }))
})

describe('serve: access log (fake model)', () => {
  test('requestLog: one JSON line per request (method, path, status, ms; P and tokens for generations), 499 for a client that left', async () => {
    const log = new PassThrough()
    let written = ''
    log.on('data', (d: Buffer) => (written += d.toString()))
    const lines = () => written.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>)
    await withFakeServer({requestLog: log}, async (s) => {
      assert.equal((await fetch(`${s.url}/health?probe=1`)).status, 200)
      await s.client.completions.create({model: 'fake-model', prompt: 'abc', max_tokens: 3, parallel: 2} as OpenAI.CompletionCreateParamsNonStreaming)
      const stream = await s.client.chat.completions.create({model: 'fake-model', messages: [{role: 'user', content: 'ab'}], max_tokens: 4, stream: true})
      for await (const _chunk of stream) {
        // read to the end
      }
      assert.equal((await fetch(`${s.url}/v1/chat/completions`)).status, 405)
      // A client that leaves mid-stream (after the chunk with the role, sent before any step).
      s.decoder.hold()
      const controller = new AbortController()
      const leaving = await fetch(`${s.url}/v1/chat/completions`, {
        method: 'POST',
        headers: {'content-type': 'application/json'},
        body: JSON.stringify({messages: [{role: 'user', content: 'a'}], max_tokens: 50, stream: true}),
        signal: controller.signal,
      })
      await leaving.body!.getReader().read()
      controller.abort()
      await eventually('the departed request is logged', () => lines().length === 5)
      s.decoder.resume()
    })
    const [health, completion, chat, wrongMethod, departed] = lines()
    for (const line of lines()) {
      assert.equal(line.level, 'info')
      assert.equal(line.msg, 'request')
      assert.match(String(line.time), /^\d{4}-\d\d-\d\dT/)
      assert.equal(typeof line.ms, 'number')
      assert.match(String(line.reqId), /^req-/)
    }
    assert.deepEqual({...health, time: 0, ms: 0, reqId: ''}, {level: 'info', time: 0, reqId: '', method: 'GET', path: '/health', status: 200, ms: 0, msg: 'request'})
    assert.deepEqual(
      [completion.method, completion.path, completion.status, completion.parallel, completion.prompt_tokens, completion.completion_tokens],
      ['POST', '/v1/completions', 200, 2, 3, 3],
    )
    assert.deepEqual([chat.path, chat.status, chat.parallel, chat.prompt_tokens, chat.completion_tokens], ['/v1/chat/completions', 200, 1, 2, 4])
    assert.deepEqual([wrongMethod.method, wrongMethod.status, wrongMethod.parallel], ['GET', 405, undefined])
    assert.deepEqual([departed.path, departed.status], ['/v1/chat/completions', 499])
  })
})
