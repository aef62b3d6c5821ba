// `parscale serve` on the embedded default model, driven by the official openai client: the
// answers equal `parscale run`'s, streaming, `parallel`, errors and metrics; then the CLI as
// a child process (SIGTERM mid-stream, bad flags).
import assert from 'node:assert/strict'
import fs from 'node:fs'
import net from 'node:net'
import path from 'node:path'
import {after, before, describe, test} from 'node:test'

import OpenAI from 'openai'

import {ServeEngine} from '../src/core/serve/engine.js'
import {RunningServer} from '../src/core/serve/server.js'
import {REPO_ROOT, runCli} from './helpers/cli.js'
import {makeTempDir} from './helpers/safetensors-writer.js'
import {metricValue, openaiClient, spawnServe, sseEvents} from './helpers/serve.js'

const cache = makeTempDir('parscale-serve-')
const env = {PARSCALE_CACHE: cache, HF_HUB_OFFLINE: '1'}
const PROMPTS = ['def fibonacci(n):', 'import os\n', 'class Parser:']
const PARALLEL = [1, 2, 4, 8]
const MAX_TOKENS = 24

interface RunResult {
  text: string
  token_ids: number[]
  finish_reason: string
  prompt_tokens: number
  generated_tokens: number
  parallel: number
}

/** `parscale run`'s greedy answers for every prompt at every P (one batch run: the same ids as single runs). */
const expected = new Map<string, RunResult>()
const key = (prompt: string, parallel: number) => `${parallel}:${prompt}`
let server: RunningServer
let client: OpenAI

before(async () => {
  process.env.PARSCALE_CACHE = cache
  const lines = PARALLEL.flatMap((parallel) => PROMPTS.map((prompt) => ({prompt, parallel})))
  const file = path.join(cache, 'prompts.jsonl')
  fs.writeFileSync(file, lines.map((l) => JSON.stringify(l)).join('\n') + '\n')
  const run = await runCli(['run', '--batch', file, '--temperature', '0', '--max-new-tokens', String(MAX_TOKENS), '--json'], {env})
  assert.equal(run.code, 0, run.stderr)
  run.stdout.trim().split('\n').forEach((line, i) => expected.set(key(lines[i].prompt, lines[i].parallel), JSON.parse(line) as RunResult))
  const engine = await ServeEngine.open(undefined, {maxBatch: 8, maxQueue: 64})
  server = await RunningServer.listen(engine, {host: '127.0.0.1', port: 0})
  client = openaiClient(server.url)
})

after(async () => {
  await server?.shutdown(10_000)
  delete process.env.PARSCALE_CACHE
  fs.rmSync(cache, {recursive: true, force: true})
})

describe('parscale serve on the default model (openai client)', () => {
  test('GET /v1/models lists the model with the P values it offers; /health answers', async () => {
    const models = await client.models.list()
    assert.equal(models.data.length, 1)
    const [model] = models.data as (OpenAI.Models.Model & {parallel: number[]; default_parallel: number; context_length: number})[]
    assert.equal(model.id, 'parscale-default')
    assert.deepEqual(model.parallel, PARALLEL)
    assert.equal(model.default_parallel, 8)
    assert.equal(model.context_length, 512)
    assert.equal((await client.models.retrieve('parscale-default')).id, 'parscale-default')
    const health = await fetch(`${server.url}/health`)
    assert.deepEqual(await health.json(), {status: 'ok'})
  })

  test('greedy chat at P = 1 and 8 equals `parscale run` for the same prompt (no template: the raw conversation)', async () => {
    for (const parallel of [1, 8]) {
      for (const prompt of PROMPTS) {
        const answer = await client.chat.completions.create({
          model: 'parscale-default',
          // A base model has no template: system messages are left out, as `run --chat` does it.
          messages: [{role: 'system', content: 'You write Python.'}, {role: 'user', content: prompt}],
          max_tokens: MAX_TOKENS,
          temperature: 0,
          parallel,
        } as OpenAI.Chat.ChatCompletionCreateParamsNonStreaming)
        const run = expected.get(key(prompt, parallel))!
        assert.equal(answer.choices[0].message.content, run.text, `P=${parallel} ${JSON.stringify(prompt)}`)
        assert.equal(answer.choices[0].finish_reason, run.finish_reason)
        assert.deepEqual(answer.usage, {prompt_tokens: run.prompt_tokens, completion_tokens: run.generated_tokens, total_tokens: run.prompt_tokens + run.generated_tokens})
        assert.equal((answer as unknown as {parallel: number}).parallel, parallel)
      }
    }
  })

  test('`parallel` per request: completions at P = 1, 2, 4 and 8 all at once, each equal to `parscale run`', async () => {
    const answers = await Promise.all(
      PARALLEL.flatMap((parallel) =>
        PROMPTS.map(async (prompt) => ({
          prompt,
          parallel,
          answer: await client.completions.create({model: 'parscale-default', prompt, max_tokens: MAX_TOKENS, temperature: 0, parallel} as OpenAI.CompletionCreateParamsNonStreaming),
        })),
      ),
    )
    for (const {prompt, parallel, answer} of answers) {
      const run = expected.get(key(prompt, parallel))!
      assert.equal(answer.object, 'text_completion')
      assert.equal(answer.choices[0].text, run.text, `P=${parallel} ${JSON.stringify(prompt)}`)
      assert.equal(answer.usage?.completion_tokens, run.generated_tokens)
      assert.equal((answer as unknown as {parallel: number}).parallel, parallel)
    }
  })

  test('streamed chat: the role first, text that joins to the whole answer, the finish reason, usage, [DONE]', async () => {
    const prompt = PROMPTS[1]
    const run = expected.get(key(prompt, 4))!
    const stream = await client.chat.completions.create({
      model: 'parscale-default',
      messages: [{role: 'user', content: prompt}],
      max_completion_tokens: MAX_TOKENS,
      temperature: 0,
      stream: true,
      stream_options: {include_usage: true},
      parallel: 4,
    } as OpenAI.Chat.ChatCompletionCreateParamsStreaming)
    const chunks: OpenAI.Chat.ChatCompletionChunk[] = []
    for await (const chunk of stream) chunks.push(chunk)
    assert.equal(chunks[0].choices[0].delta.role, 'assistant')
    assert.ok(chunks.every((c) => c.object === 'chat.completion.chunk' && c.id === chunks[0].id))
    const withChoice = chunks.filter((c) => c.choices.length > 0)
    assert.equal(withChoice.map((c) => c.choices[0].delta.content ?? '').join(''), run.text)
    assert.ok(withChoice.length > 3, 'text arrives token by token')
    assert.equal(withChoice.at(-1)?.choices[0].finish_reason, run.finish_reason)
    assert.ok(withChoice.slice(0, -1).every((c) => c.choices[0].finish_reason === null))
    assert.deepEqual(chunks.at(-1)?.choices, [])
    assert.equal(chunks.at(-1)?.usage?.completion_tokens, run.generated_tokens)
  })

  test('"stream_weights": one chunk per generated token with its P weights, equal to `run --streams --json`; the non-streamed answer carries them too', async () => {
    const prompt = PROMPTS[0]
    const run = await runCli(['run', '--prompt', prompt, '--parallel', '4', '--streams', '--temperature', '0', '--max-new-tokens', String(MAX_TOKENS), '--json'], {env})
    assert.equal(run.code, 0, run.stderr)
    const expectedRun = JSON.parse(run.stdout) as RunResult & {stream_weights: number[][]}
    const request = {model: 'parscale-default', messages: [{role: 'user', content: prompt}], max_tokens: MAX_TOKENS, temperature: 0, parallel: 4, stream_weights: true}
    const stream = await client.chat.completions.create({...request, stream: true} as OpenAI.Chat.ChatCompletionCreateParamsStreaming)
    const chunks: (OpenAI.Chat.ChatCompletionChunk & {parallel: number})[] = []
    for await (const chunk of stream) chunks.push(chunk as OpenAI.Chat.ChatCompletionChunk & {parallel: number})
    type WeightedChoice = {delta: {content?: string}; finish_reason: string | null; stream_weights?: number[][]}
    const choices = chunks.map((c) => c.choices[0] as unknown as WeightedChoice)
    assert.equal(choices[0].stream_weights, undefined, 'the role chunk carries no token')
    const tokens = choices.filter((c) => c.stream_weights !== undefined)
    assert.equal(tokens.length, expectedRun.generated_tokens, 'one chunk per generated token')
    assert.ok(tokens.every((c) => c.stream_weights!.length === 1 && c.stream_weights![0].length === 4))
    assert.deepEqual(tokens.map((c) => c.stream_weights![0]), expectedRun.stream_weights)
    for (const [weights] of tokens.map((c) => c.stream_weights!)) assert.ok(Math.abs(weights.reduce((a, b) => a + b, 0) - 1) < 1e-5)
    assert.equal(choices.map((c) => c.delta.content ?? '').join(''), expectedRun.text)
    assert.equal(choices.at(-1)?.finish_reason, expectedRun.finish_reason)
    assert.ok(chunks.every((c) => c.parallel === 4))

    const whole = await client.chat.completions.create(request as OpenAI.Chat.ChatCompletionCreateParamsNonStreaming)
    assert.equal(whole.choices[0].message.content, expectedRun.text)
    assert.deepEqual((whole.choices[0] as unknown as {stream_weights: number[][]}).stream_weights, expectedRun.stream_weights)
    const completion = await client.completions.create({model: 'parscale-default', prompt, max_tokens: 3, temperature: 0, parallel: 2, stream_weights: true} as OpenAI.CompletionCreateParamsNonStreaming)
    const completionWeights = (completion.choices[0] as unknown as {stream_weights: number[][]}).stream_weights
    assert.equal(completionWeights.length, completion.usage?.completion_tokens)
    assert.ok(completionWeights.every((w) => w.length === 2))

    // Without the field, the answer has exactly OpenAI's fields.
    const plain = await client.chat.completions.create({model: 'parscale-default', messages: request.messages as OpenAI.Chat.ChatCompletionMessageParam[], max_tokens: 4, stream: true})
    for await (const chunk of plain) for (const choice of chunk.choices) assert.deepEqual(Object.keys(choice).sort(), ['delta', 'finish_reason', 'index', 'logprobs'])
  })

  test('streamed completions end with data: [DONE]', async () => {
    const prompt = PROMPTS[2]
    const run = expected.get(key(prompt, 2))!
    const response = await fetch(`${server.url}/v1/completions`, {
      method: 'POST',
      headers: {'content-type': 'application/json'},
      body: JSON.stringify({model: 'parscale-default', prompt, max_tokens: MAX_TOKENS, temperature: 0, stream: true, parallel: 2}),
    })
    assert.equal(response.status, 200)
    assert.match(response.headers.get('content-type') ?? '', /^text\/event-stream/)
    const events = await sseEvents(response)
    assert.equal(events.at(-1), '[DONE]')
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as OpenAI.Completion)
    assert.equal(chunks.map((c) => c.choices[0].text).join(''), run.text)
    assert.equal(chunks.at(-1)?.choices[0].finish_reason, run.finish_reason)
  })

  test('errors: unknown model 404; a P the model lacks 400 naming the ones it has; a prompt over the context 400; bad JSON and wrong types 400', async () => {
    const messages: OpenAI.Chat.ChatCompletionMessageParam[] = [{role: 'user', content: 'x = 1'}]
    await assert.rejects(client.chat.completions.create({model: 'gpt-4o', messages}), (error: unknown) => {
      assert.ok(error instanceof OpenAI.NotFoundError)
      assert.equal((error.error as {code: string}).code, 'model_not_found')
      return true
    })
    await assert.rejects(client.chat.completions.create({model: 'parscale-default', messages, parallel: 3} as OpenAI.Chat.ChatCompletionCreateParamsNonStreaming), (error: unknown) => {
      assert.ok(error instanceof OpenAI.BadRequestError)
      assert.equal(error.param, 'parallel')
      assert.match(error.message, /parallel = 3; available: 1, 2, 4, 8/)
      return true
    })
    const long = 'x = 1\n'.repeat(400)
    await assert.rejects(client.completions.create({model: 'parscale-default', prompt: long, max_tokens: 1}), (error: unknown) => {
      assert.ok(error instanceof OpenAI.BadRequestError)
      assert.equal(error.code, 'context_length_exceeded')
      assert.match(error.message, /maximum context length is 512 tokens/)
      return true
    })
    await assert.rejects(client.chat.completions.create({model: 'parscale-default', messages, max_tokens: 'ten'} as unknown as OpenAI.Chat.ChatCompletionCreateParamsNonStreaming), (error: unknown) => {
      assert.ok(error instanceof OpenAI.BadRequestError)
      assert.equal(error.param, 'max_tokens')
      assert.match(error.message, /max_tokens must be integer or null/)
      return true
    })
    const malformed = await fetch(`${server.url}/v1/chat/completions`, {method: 'POST', headers: {'content-type': 'application/json'}, body: '{"messages": ['})
    assert.equal(malformed.status, 400)
    assert.equal(((await malformed.json()) as {error: {type: string}}).error.type, 'invalid_request_error')
  })

  test('max_tokens past the context: 400 naming the context length, the prompt and the completion (openai client), for chat and completions', async () => {
    const messages: OpenAI.Chat.ChatCompletionMessageParam[] = [{role: 'user', content: 'x = 1'}]
    const promptTokens = (await client.chat.completions.create({model: 'parscale-default', messages, max_tokens: 1})).usage!.prompt_tokens
    await assert.rejects(client.chat.completions.create({model: 'parscale-default', messages, max_tokens: 10_000_000}), (error: unknown) => {
      assert.ok(error instanceof OpenAI.BadRequestError)
      assert.equal(error.param, 'max_tokens')
      assert.equal(error.code, 'context_length_exceeded')
      assert.match(error.message, new RegExp(`maximum context length is 512 tokens\\. However, you requested ${10_000_000 + promptTokens} tokens \\(${promptTokens} in the messages, 10000000 in the completion\\)`))
      return true
    })
    // A prompt that fits, with a completion that does not.
    const long = 'x = 1\n'.repeat(80)
    await assert.rejects(client.completions.create({model: 'parscale-default', prompt: long, max_tokens: 500}), (error: unknown) => {
      assert.ok(error instanceof OpenAI.BadRequestError)
      assert.equal(error.param, 'max_tokens')
      assert.match(error.message, /maximum context length is 512 tokens\. However, you requested \d+ tokens \(\d+ in the prompt, 500 in the completion\)/)
      return true
    })
    // Up to the context is served: what is left of it, to the last position.
    const tokens = (await client.completions.create({model: 'parscale-default', prompt: long, max_tokens: 1, temperature: 0})).usage!.prompt_tokens
    const full = await client.completions.create({model: 'parscale-default', prompt: long, max_tokens: 512 - tokens, temperature: 0, parallel: 1} as OpenAI.CompletionCreateParamsNonStreaming)
    assert.equal(full.usage!.prompt_tokens + full.usage!.completion_tokens <= 512, true)
  })

  test('metrics: requests by status, tokens, queue depth, running rows per P, TTFT and per-token latency', async () => {
    const response = await fetch(`${server.url}/metrics`)
    assert.match(response.headers.get('content-type') ?? '', /^text\/plain/)
    const text = await response.text()
    assert.ok(metricValue(text, 'parscale_requests_total', {endpoint: '/v1/chat/completions', status: '200'}) >= 7)
    assert.ok(metricValue(text, 'parscale_requests_total', {endpoint: '/v1/chat/completions', status: '404'}) >= 1)
    assert.ok(metricValue(text, 'parscale_requests_total', {endpoint: '/v1/completions', status: '400'}) >= 1)
    assert.ok(metricValue(text, 'parscale_generated_tokens_total', {parallel: '8'}) > 0)
    assert.equal(metricValue(text, 'parscale_queue_depth'), 0)
    for (const parallel of PARALLEL) assert.match(text, new RegExp(`^parscale_running_rows\\{parallel="${parallel}"\\} 0$`, 'm'))
    assert.ok(metricValue(text, 'parscale_time_to_first_token_seconds_count', {parallel: '1'}) >= 6)
    assert.ok(metricValue(text, 'parscale_time_per_output_token_seconds_count', {parallel: '1'}) > 0)
    assert.match(text, /^parscale_process_resident_memory_bytes \d+/m)
  })
})

describe('parscale serve on a model with a chat template (golden tiny-p4)', () => {
  test('chat goes through the template and equals `parscale run --system`; /v1/completions sends the prompt raw', async () => {
    const model = path.join(REPO_ROOT, 'fixtures', 'golden', 'tiny-p4')
    const run = await runCli(['run', model, '--system', 'be brief', '--prompt', 'hello', '--temperature', '0', '--max-new-tokens', '8', '--json'], {env})
    assert.equal(run.code, 0, run.stderr)
    const raw = await runCli(['run', model, '--raw', '--prompt', 'hello', '--temperature', '0', '--max-new-tokens', '8', '--json'], {env})
    assert.equal(raw.code, 0, raw.stderr)
    const engine = await ServeEngine.open(model, {maxBatch: 4, maxQueue: 8})
    const templated = await RunningServer.listen(engine, {host: '127.0.0.1', port: 0})
    try {
      const tinyClient = openaiClient(templated.url)
      const [card] = (await tinyClient.models.list()).data as (OpenAI.Models.Model & {chat_template: boolean})[]
      assert.equal(card.id, 'tiny-p4')
      assert.equal(card.chat_template, true)
      const chat = await tinyClient.chat.completions.create({
        model: 'tiny-p4',
        messages: [{role: 'developer', content: 'be brief'}, {role: 'user', content: [{type: 'text', text: 'hel'}, {type: 'text', text: 'lo'}]}],
        max_tokens: 8,
        temperature: 0,
      })
      const expectedChat = JSON.parse(run.stdout) as RunResult
      assert.equal(chat.choices[0].message.content, expectedChat.text)
      assert.equal(chat.usage?.prompt_tokens, expectedChat.prompt_tokens)
      const completion = await tinyClient.completions.create({model: 'tiny-p4', prompt: 'hello', max_tokens: 8, temperature: 0})
      const expectedRaw = JSON.parse(raw.stdout) as RunResult
      assert.equal(completion.choices[0].text, expectedRaw.text)
      assert.equal(completion.usage?.prompt_tokens, expectedRaw.prompt_tokens)
    } finally {
      await templated.shutdown(10_000)
    }
  })
})

describe('parscale serve (the CLI)', () => {
  test('SIGTERM mid-stream: the stream finishes with [DONE], new connections are refused, exit 0', async () => {
    const serve = await spawnServe([], env)
    try {
      const response = await fetch(`${serve.url}/v1/completions`, {
        method: 'POST',
        headers: {'content-type': 'application/json'},
        // Greedy from "import os" at P = 8 runs the full length, so the signal lands mid-stream.
        body: JSON.stringify({prompt: PROMPTS[1], max_tokens: 96, parallel: 8, stream: true}),
      })
      const reader = response.body!.getReader()
      const decoder = new TextDecoder()
      let text = decoder.decode((await reader.read()).value)
      assert.match(text, /^data: \{/, 'the stream has begun')
      serve.child.kill('SIGTERM')
      for (let part = await reader.read(); !part.done; part = await reader.read()) text += decoder.decode(part.value)
      const events = text.split('\n\n').filter((e) => e.startsWith('data: ')).map((e) => e.slice(6))
      assert.equal(events.at(-1), '[DONE]')
      const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as OpenAI.Completion)
      assert.equal(chunks.at(-1)?.choices[0].finish_reason, 'length', 'it ran to its end, not cut off')
      assert.ok(chunks.filter((c) => c.choices[0].text !== '').length > 48, 'the whole answer arrived')
      assert.equal(await serve.exited, 0, serve.stderr())
      assert.match(serve.stderr(), /SIGTERM: stopping; 1 generation finishing/)
      assert.match(serve.stderr(), /stopped\n$/)
      assert.equal(serve.stdout(), '', 'no access log without --log-requests')
      await assert.rejects(fetch(`${serve.url}/health`), 'nothing listens any more')
    } finally {
      serve.kill()
    }
  })

  test('--log-requests: one JSON line per request on stdout, with P and tokens for a generation; serve --help tells of it', async () => {
    const serve = await spawnServe(['--log-requests', '--parallel', '2'], env)
    try {
      const answer = await openaiClient(serve.url).chat.completions.create({model: 'parscale-default', messages: [{role: 'user', content: PROMPTS[0]}], max_tokens: 6, temperature: 0})
      assert.equal((await fetch(`${serve.url}/v1/completions`)).status, 405)
      serve.child.kill('SIGTERM')
      assert.equal(await serve.exited, 0, serve.stderr())
      const lines = serve.stdout().trim().split('\n').map((line) => JSON.parse(line) as Record<string, unknown>)
      assert.equal(lines.length, 2, serve.stdout())
      const {time, ms, reqId, ...chat} = lines[0]
      assert.match(String(time), /^\d{4}-\d\d-\d\dT[\d:.]+Z$/)
      assert.ok(typeof ms === 'number' && ms > 0)
      assert.match(String(reqId), /^req-\w+$/)
      assert.deepEqual(chat, {
        level: 'info',
        method: 'POST',
        path: '/v1/chat/completions',
        status: 200,
        parallel: 2,
        prompt_tokens: answer.usage!.prompt_tokens,
        completion_tokens: answer.usage!.completion_tokens,
        msg: 'request',
      })
      assert.deepEqual([lines[1].method, lines[1].path, lines[1].status], ['GET', '/v1/completions', 405])
    } finally {
      serve.kill()
    }
    const help = await runCli(['serve', '--help'], {env})
    assert.match(help.stdout, /--log-requests\s+an access log: one JSON line per request on\s+stdout/)
  })

  test('bad flags and a busy port: one line on stderr; exit 2 for a bad value, 1 for what the machine lacks', async () => {
    const badPort = await runCli(['serve', '--port', '70000'], {env})
    assert.equal(badPort.code, 2)
    assert.equal(badPort.stderr, 'parscale: --port must be a whole number from 0 to 65535 (got "70000")\n')
    const badParallel = await runCli(['serve', '--parallel', '3', '--port', '0'], {env})
    assert.equal(badParallel.code, 1)
    assert.match(badParallel.stderr, /^parscale: the default model has no --parallel 3; available: 1, 2, 4, 8\n$/)
    const busy = net.createServer()
    await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve))
    try {
      const port = (busy.address() as net.AddressInfo).port
      const inUse = await runCli(['serve', '--port', String(port)], {env})
      assert.equal(inUse.code, 1)
      assert.equal(inUse.stderr, `parscale: cannot listen on 127.0.0.1:${port}: the port is in use (--port picks another)\n`)
    } finally {
      busy.close()
    }
  })
})
