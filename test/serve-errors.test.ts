// serve's refusals over real HTTP (fastify on 127.0.0.1, the fake decoder behind it): every one
// in OpenAI's error shape with the API's own code, never the framework's FST_ERR_* names; a body
// that is not JSON is 415 whatever it holds; a known URL asked with another method is 405 with
// Allow.
import assert from 'node:assert/strict'
import {after, before, describe, test} from 'node:test'

import {type FakeServer, startFakeServer} from './helpers/serve.js'

const BODY_LIMIT = 4096
let fake: FakeServer

before(async () => {
  fake = await startFakeServer({bodyLimit: BODY_LIMIT})
})
after(async () => {
  await fake?.close()
})

interface ErrorBody {
  error: {message: string; type: string; param: string | null; code: string | null}
}

/** Sends a request; checks the answer is an OpenAI error body with `status` and `code`, and returns it with its headers. */
async function refused(init: RequestInit & {path?: string}, status: number, code: string): Promise<{body: ErrorBody; headers: Headers}> {
  const response = await fetch(`${fake.url}${init.path ?? '/v1/completions'}`, init)
  const text = await response.text()
  assert.equal(response.status, status, text)
  if (init.method === 'HEAD') return {body: {error: {message: '', type: '', param: null, code}}, headers: response.headers}
  const body = JSON.parse(text) as ErrorBody
  assert.deepEqual(Object.keys(body.error).sort(), ['code', 'message', 'param', 'type'])
  assert.equal(body.error.type, 'invalid_request_error')
  assert.equal(body.error.code, code)
  assert.doesNotMatch(text, /FST_/)
  return {body, headers: response.headers}
}

const VALID = JSON.stringify({prompt: 'ab', max_tokens: 2})

describe('serve: errors over HTTP', () => {
  test('a body that is not sent as JSON is 415, even when it holds valid JSON; the message names what came', async () => {
    const plain = await refused({method: 'POST', headers: {'content-type': 'text/plain'}, body: VALID}, 415, 'unsupported_media_type')
    assert.equal(plain.body.error.message, 'The body must be JSON sent with "Content-Type: application/json" (got "text/plain")')
    const form = await refused({method: 'POST', headers: {'content-type': 'application/x-www-form-urlencoded'}, body: VALID}, 415, 'unsupported_media_type')
    assert.match(form.body.error.message, /got "application\/x-www-form-urlencoded"/)
    // The same body as JSON is answered.
    const ok = await fetch(`${fake.url}/v1/completions`, {method: 'POST', headers: {'content-type': 'application/json; charset=utf-8'}, body: VALID})
    assert.equal(ok.status, 200, await ok.clone().text())
    assert.equal(((await ok.json()) as {choices: {text: string}[]}).choices[0].text, 'aa')
  })

  test('empty, malformed, non-object and oversized bodies: 400 / 413 with the API\'s codes', async () => {
    const json = {'content-type': 'application/json'}
    const empty = await refused({method: 'POST', headers: json, body: ''}, 400, 'invalid_json')
    assert.equal(empty.body.error.message, 'The request body is empty: send a JSON object')
    const missing = await refused({method: 'POST'}, 400, 'invalid_value')
    assert.equal(missing.body.error.message, 'The request body must be a JSON object')
    const array = await refused({method: 'POST', headers: json, body: '[1, 2]'}, 400, 'invalid_value')
    assert.equal(array.body.error.message, 'The request body must be a JSON object')
    const malformed = await refused({method: 'POST', headers: json, body: '{"prompt": '}, 400, 'invalid_json')
    assert.match(malformed.body.error.message, /not valid JSON/)
    const large = await refused({method: 'POST', headers: json, body: JSON.stringify({prompt: 'a'.repeat(BODY_LIMIT)})}, 413, 'body_too_large')
    assert.equal(large.body.error.message, `The request body is over this server's limit of ${BODY_LIMIT} bytes`)
    const badUrl = await refused({path: '/v1/models/%zz'}, 400, 'invalid_url')
    assert.match(badUrl.body.error.message, /URL is malformed/)
  })

  test('a known URL asked with another method: 405 with Allow; an unknown URL stays 404', async () => {
    const get = await refused({path: '/v1/chat/completions'}, 405, 'method_not_allowed')
    assert.equal(get.headers.get('allow'), 'POST')
    assert.equal(get.body.error.message, 'Invalid method for URL (GET /v1/chat/completions): it takes POST')
    assert.equal((await refused({path: '/v1/completions', method: 'HEAD'}, 405, 'method_not_allowed')).headers.get('allow'), 'POST')
    // The method is refused before the body is read: a text/plain body does not turn it into 415.
    const post = await refused({path: '/v1/models', method: 'POST', headers: {'content-type': 'text/plain'}, body: 'x'}, 405, 'method_not_allowed')
    assert.equal(post.headers.get('allow'), 'GET, HEAD')
    assert.equal(post.body.error.message, 'Invalid method for URL (POST /v1/models): it takes GET')
    assert.equal((await refused({path: '/v1/models/fake-model', method: 'DELETE'}, 405, 'method_not_allowed')).headers.get('allow'), 'GET, HEAD')
    assert.equal((await refused({path: '/health', method: 'PUT'}, 405, 'method_not_allowed')).headers.get('allow'), 'GET, HEAD')
    assert.equal((await fetch(`${fake.url}/health`, {method: 'HEAD'})).status, 200, 'HEAD comes with GET')
    const unknown = await refused({path: '/v1/embeddings', method: 'POST', headers: {'content-type': 'application/json'}, body: '{}'}, 404, 'unknown_url')
    assert.equal(unknown.body.error.message, 'Unknown request URL: POST /v1/embeddings')
  })

  test('405s and 415s are counted in the metrics under their endpoint', async () => {
    const metrics = await (await fetch(`${fake.url}/metrics`)).text()
    assert.match(metrics, /^parscale_requests_total\{endpoint="\/v1\/chat\/completions",status="405"\} [1-9]/m)
    assert.match(metrics, /^parscale_requests_total\{endpoint="\/v1\/completions",status="415"\} [1-9]/m)
  })
})
