/**
 * The HTTP server (fastify): OpenAI's chat/completions, completions and models endpoints,
 * /health and /metrics, over a ServeEngine. Bodies are checked against JSON schemas before a
 * handler runs; every error leaves as an OpenAI-style JSON body. A client that disconnects
 * aborts its generations, which frees their rows in the batch at the next step.
 */
import {createHash, randomUUID, timingSafeEqual} from 'node:crypto'
import type {ServerResponse} from 'node:http'

import Fastify, {type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest} from 'fastify'

import {UserError} from '../errors.js'
import type {GenerationResult} from '../generation/generation.js'
import {roundedWeights} from '../run/json-result.js'
import {ApiError, internalError, invalidRequest, methodNotAllowed, shuttingDown, unauthorized} from './api-error.js'
import type {ServeEngine} from './engine.js'
import {prepareChat, prepareCompletion, type PreparedRequest} from './openai-requests.js'
import {chatChunk, chatCompletion, modelList, textChunk, textCompletion, usageChunk, usageOf, type CompletionHeader, type ModelCard, type TokenWeights} from './responses.js'
import {chatCompletionSchema, completionSchema, type ChatCompletionBody, type CompletionBody} from './schemas.js'
import {SseStream} from './sse.js'
import {PAGE_OPEN_PATHS, registerPage, type PageOptions} from './ui/page.js'

export interface ServerOptions {
  /** Clients must send `Authorization: Bearer <apiKey>` (not needed for /health and /metrics). */
  apiKey?: string
  /** Largest request body in bytes (default 1 MiB). */
  bodyLimit?: number
  /** Internal errors (not the client's) are reported here, not to the client. */
  onInternalError?: (error: unknown) => void
  /**
   * The access log: one JSON line per answered request (method, path, status, ms; P and tokens
   * for generations), written by fastify's logger (pino). None when left out.
   */
  requestLog?: NodeJS.WritableStream
  /** Serve the chat page at `/` (`serve --no-ui` leaves it out). */
  page?: PageOptions
}

/** What the access log adds for a request that generated. */
interface GenerationLog {
  parallel: number
  prompt_tokens: number
  completion_tokens: number
}

/** After the last generation ends, how long its answer may take to reach a slow client. */
const FLUSH_GRACE_MS = 5000

/** Paths an orchestrator probes without the API key: they reveal no request content. */
const OPEN_PATHS = new Set(['/health', '/metrics'])

export interface ListenOptions extends ServerOptions {
  host: string
  port: number
}

/**
 * A listening server. `shutdown` stops accepting (new requests get 503, the listening socket
 * closes), lets admitted generations finish for up to `timeoutMs`, then aborts the rest;
 * aborted streams still end properly (finish reason `abort`, then [DONE]).
 */
export class RunningServer {
  private stopping: Promise<void> | undefined

  private constructor(
    private readonly app: FastifyInstance,
    private readonly engine: ServeEngine,
    readonly url: string,
  ) {}

  static async listen(engine: ServeEngine, options: ListenOptions): Promise<RunningServer> {
    const app = createServer(engine, options)
    try {
      await app.listen({host: options.host, port: options.port})
    } catch (error) {
      await app.close()
      throw listenError(error, options)
    }
    const address = app.server.address()
    const port = typeof address === 'object' && address ? address.port : options.port
    const host = options.host.includes(':') ? `[${options.host}]` : options.host
    return new RunningServer(app, engine, `http://${host}:${port}`)
  }

  /** Generations still running (for messages). */
  get inProgress(): number {
    return this.engine.inProgress
  }

  shutdown(timeoutMs: number): Promise<void> {
    this.stopping ??= this.stop(timeoutMs)
    return this.stopping
  }

  /** Stop waiting: abort what is still generating now (a second Ctrl-C). */
  hurry(): void {
    this.engine.abortAll()
  }

  private async stop(timeoutMs: number): Promise<void> {
    this.engine.stopAccepting()
    const closed = this.app.close()
    const timer = setTimeout(() => this.engine.abortAll(), timeoutMs)
    await this.engine.idle()
    clearTimeout(timer)
    // Keep-alive connections whose last answer is out would hold close() open: sweep them as
    // they turn idle, and cut whatever is left (a client not reading) after a grace period.
    const sweep = setInterval(() => this.app.server.closeIdleConnections(), 100)
    const cut = setTimeout(() => this.app.server.closeAllConnections(), FLUSH_GRACE_MS)
    try {
      await closed
    } finally {
      clearInterval(sweep)
      clearTimeout(cut)
    }
    await this.engine.close()
  }
}

function listenError(error: unknown, {host, port}: ListenOptions): Error {
  const code = (error as NodeJS.ErrnoException).code
  if (code === 'EADDRINUSE') return new UserError(`cannot listen on ${host}:${port}: the port is in use (--port picks another)`)
  if (code === 'EACCES') return new UserError(`cannot listen on ${host}:${port}: permission denied (ports below 1024 need privileges)`)
  if (code === 'EADDRNOTAVAIL' || code === 'ENOTFOUND' || code === 'EAI_AGAIN') return new UserError(`cannot listen on ${host}: no such address on this machine (--host)`)
  return error instanceof Error ? error : new Error(String(error))
}

/** Methods a route may be asked with: any of them on a known URL that does not take it is a 405. */
const HTTP_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const

export function createServer(engine: ServeEngine, options: ServerOptions = {}): FastifyInstance {
  const bodyLimit = options.bodyLimit ?? 1 << 20
  const app = Fastify({
    // Fastify's own lines (at info: a request's start and end) are left out below warn; the
    // access log is a child logger at info, one line per request, 499s included.
    logger: options.requestLog
      ? {
          level: 'warn',
          stream: options.requestLog,
          base: null,
          timestamp: () => `,"time":"${new Date().toISOString()}"`,
          formatters: {level: (label: string) => ({level: label})},
        }
      : false,
    bodyLimit,
    // Shutdown answers in the OpenAI shape (see the onRequest hook) instead of fastify's 503.
    return503OnClosing: false,
    // Wrong types must be refused, not coerced ("5" is not a number of tokens).
    ajv: {customOptions: {coerceTypes: false, useDefaults: false, removeAdditional: false, allErrors: false}},
    // Errors met before routing (a malformed URL) in the OpenAI shape too.
    frameworkErrors: (error, request, reply) => {
      observe(request, reply)
      const apiError = toApiError(error, {bodyLimit, contentType: request.headers['content-type']})
      void (reply as FastifyReply).code(apiError.status).headers(apiError.headers).send(apiError.body)
    },
  })
  // Bodies are JSON only: fastify would also take text/plain as a string (then "must be object").
  app.removeContentTypeParser('text/plain')
  // Each URL's methods, for the 405s registered once every route is known.
  const routeMethods = new Map<string, Set<string>>()
  app.addHook('onRoute', (route) => {
    if ((route.config as RouteConfig | undefined)?.allow !== undefined) return
    const methods = routeMethods.get(route.url) ?? new Set<string>()
    for (const method of [route.method].flat()) methods.add(method)
    routeMethods.set(route.url, methods)
  })
  const created = Math.floor(Date.now() / 1000)
  const served = engine.served
  const card: ModelCard = {
    id: served.id,
    created,
    parallel: served.parallelValues,
    default_parallel: served.autoParallel ? 'auto' : served.defaultParallel,
    context_length: served.context,
    chat_template: served.tokenizer.hasChatTemplate,
  }
  const keyDigest = options.apiKey === undefined ? undefined : sha256(options.apiKey)
  const openPaths = new Set([...OPEN_PATHS, ...(options.page ? PAGE_OPEN_PATHS : [])])

  const accessLog = options.requestLog ? app.log.child({}, {level: 'info'}) : undefined
  /** P and token counts of the requests that generated, for their access log line. */
  const generations = new WeakMap<FastifyRequest, GenerationLog>()
  const noteGeneration = (request: FastifyRequest, prepared: PreparedRequest, results: GenerationResult[]) => {
    const {prompt_tokens: promptTokens, completion_tokens: completionTokens} = usageOf(results)
    generations.set(request, {parallel: prepared.parallel, prompt_tokens: promptTokens, completion_tokens: completionTokens})
  }

  /** Counts the request in the metrics and the access log once its connection is done with it. */
  function observe(request: FastifyRequest, reply: FastifyReply): void {
    const start = performance.now()
    reply.raw.once('close', () => {
      // 499 (nginx's "client closed request"): the client left before the answer was complete.
      const status = reply.raw.writableFinished ? reply.raw.statusCode : 499
      engine.metrics.request(request.routeOptions.url ?? 'unknown', status)
      const ms = Math.round((performance.now() - start) * 10) / 10
      accessLog?.info({reqId: request.id, method: request.method, path: request.url.split('?')[0], status, ms, ...generations.get(request)}, 'request')
    })
  }

  app.addHook('onRequest', async (request, reply) => {
    const path = request.url.split('?')[0]
    observe(request, reply)
    if (engine.isClosing && path !== '/metrics') throw shuttingDown()
    if (keyDigest && !openPaths.has(path)) checkBearer(request, keyDigest)
    // Before the body is read: a wrong method is answered as such whatever the body holds.
    const allow = (request.routeOptions.config as RouteConfig).allow
    if (allow !== undefined) throw methodNotAllowed(request.method, path, allow)
  })

  app.setErrorHandler((error: FastifyError | ApiError | Error, request, reply) => {
    const apiError = toApiError(error, {bodyLimit, contentType: request.headers['content-type']})
    if (apiError.status >= 500 && !(error instanceof ApiError)) options.onInternalError?.(error)
    return reply.code(apiError.status).headers(apiError.headers).send(apiError.body)
  })

  app.setNotFoundHandler((request, reply) => {
    const error = new ApiError(404, `Unknown request URL: ${request.method} ${request.url.split('?')[0]}`, 'invalid_request_error', null, 'unknown_url')
    return reply.code(404).send(error.body)
  })

  app.get('/health', async () => ({status: 'ok'}))

  app.get('/metrics', async (_request, reply) => reply.type(engine.metrics.contentType).send(await engine.metrics.text()))

  app.get('/v1/models', async () => modelList(card))

  app.get<{Params: {model: string}}>('/v1/models/:model', async (request) => {
    if (request.params.model !== served.id) throw new ApiError(404, `The model "${request.params.model}" does not exist`, 'not_found_error', 'model', 'model_not_found')
    return modelList(card).data[0]
  })

  app.post<{Body: ChatCompletionBody}>('/v1/chat/completions', {schema: {body: chatCompletionSchema}}, async (request, reply) => {
    const prepared = prepareChat(served, request.body)
    const header = completionHeader('chatcmpl', prepared)
    const done = (results: GenerationResult[]) => noteGeneration(request, prepared, results)
    if (!prepared.stream) {
      const {results, weights} = await generateWhole(engine, prepared, reply.raw, done)
      return chatCompletion(header, results, weights)
    }
    await streamGeneration(engine, prepared, reply, options, done, {
      first: (choice) => chatChunk(header, choice, {role: 'assistant', content: ''}),
      text: (choice, text, weights) => chatChunk(header, choice, {content: text}, null, weights),
      last: (choice, result, rest) => chatChunk(header, choice, rest === '' ? {} : {content: rest}, result.finishReason),
      usage: (results) => usageChunk(header, 'chat.completion.chunk', results),
    })
  })

  app.post<{Body: CompletionBody}>('/v1/completions', {schema: {body: completionSchema}}, async (request, reply) => {
    const prepared = prepareCompletion(served, request.body)
    const header = completionHeader('cmpl', prepared)
    const done = (results: GenerationResult[]) => noteGeneration(request, prepared, results)
    if (!prepared.stream) {
      const {results, weights} = await generateWhole(engine, prepared, reply.raw, done)
      return textCompletion(header, results, weights)
    }
    await streamGeneration(engine, prepared, reply, options, done, {
      text: (choice, text, weights) => textChunk(header, choice, text, null, weights),
      last: (choice, result, rest) => textChunk(header, choice, rest, result.finishReason),
      usage: (results) => usageChunk(header, 'text_completion', results),
    })
  })

  // Every other method on a known URL: 405 with Allow, as OpenAI answers (HEAD comes with GET).
  for (const [url, methods] of routeMethods) {
    if (methods.has('GET')) methods.add('HEAD')
    const allow = [...methods].join(', ')
    const others = HTTP_METHODS.filter((method) => !methods.has(method))
    const config: RouteConfig = {allow}
    app.route({method: others, url, config, handler: async (request) => {
      throw methodNotAllowed(request.method, url, allow)
    }})
  }

  if (options.page) registerPage(app, engine.figures, served, options.page)

  function completionHeader(prefix: string, prepared: PreparedRequest): CompletionHeader {
    const id = `${prefix}-${randomUUID().replaceAll('-', '')}`
    // Read when each body or chunk is made: with --parallel auto the P is chosen at admission, after this header.
    return {id, created: Math.floor(Date.now() / 1000), model: served.id, get parallel() {
      return prepared.parallel
    }}
  }

  return app
}

/** The chunks of one streamed endpoint. */
interface ChunkShapes {
  /** Sent for each choice before any text (chat sends the role). */
  first?: (choice: number) => unknown
  /** New text; with `stream_weights`, one chunk per token (its text may be empty) and its weights. */
  text: (choice: number, text: string, weights?: TokenWeights) => unknown
  /** The finish reason, with text generated but not streamed yet (cut off by an abort). */
  last: (choice: number, result: GenerationResult, rest: string) => unknown
  usage: (results: GenerationResult[]) => unknown
}

/** An AbortSignal that fires when the client closes the connection before the response is complete. */
function clientGone(response: ServerResponse): AbortSignal {
  const controller = new AbortController()
  response.once('close', () => {
    if (!response.writableFinished) controller.abort()
  })
  return controller.signal
}

async function generateWhole(
  engine: ServeEngine,
  prepared: PreparedRequest,
  response: ServerResponse,
  done: (results: GenerationResult[]) => void,
): Promise<{results: GenerationResult[]; weights?: TokenWeights[]}> {
  const admission = await engine.admitRequest(prepared)
  const weights: TokenWeights[] | undefined = prepared.streamWeights ? prepared.requests.map(() => []) : undefined
  const results = await engine.generate(admission, prepared.requests, {
    signal: clientGone(response),
    onToken: (choice, {streamWeights}) => {
      if (weights && streamWeights) weights[choice].push(roundedWeights(streamWeights))
    },
  })
  done(results)
  return weights ? {results, weights} : {results}
}

async function streamGeneration(
  engine: ServeEngine,
  prepared: PreparedRequest,
  reply: FastifyReply,
  options: ServerOptions,
  done: (results: GenerationResult[]) => void,
  shapes: ChunkShapes,
): Promise<void> {
  // Admission first: a refusal (429, 503) is still an ordinary JSON error response.
  const admission = await engine.admitRequest(prepared)
  reply.hijack()
  const sse = new SseStream(reply.raw)
  sse.open(engine.isClosing ? {Connection: 'close'} : {})
  const streamed = prepared.requests.map(() => '')
  if (shapes.first) for (let choice = 0; choice < streamed.length; choice++) sse.send(shapes.first(choice))
  let results: GenerationResult[]
  try {
    const send = (choice: number, text: string, weights?: TokenWeights) => {
      streamed[choice] += text
      sse.send(shapes.text(choice, text, weights))
    }
    results = await engine.generate(admission, prepared.requests, {
      signal: clientGone(reply.raw),
      ...(prepared.streamWeights
        ? {onToken: (choice, {text, streamWeights}) => send(choice, text, streamWeights ? [roundedWeights(streamWeights)] : undefined)}
        : {onText: (choice, text) => send(choice, text)}),
    })
  } catch (error) {
    // Headers are gone already: the error travels as an event, as OpenAI sends it.
    const apiError = toApiError(error)
    if (!(error instanceof ApiError) && apiError.status >= 500) options.onInternalError?.(error)
    sse.send(apiError.body)
    sse.end()
    return
  }
  done(results)
  results.forEach((result, choice) => sse.send(shapes.last(choice, result, result.text.slice(streamed[choice].length))))
  if (prepared.includeUsage) sse.send(shapes.usage(results))
  sse.end()
}

function checkBearer(request: FastifyRequest, keyDigest: Buffer): void {
  const header = request.headers.authorization
  if (header === undefined) throw unauthorized('Missing API key: send "Authorization: Bearer <key>"')
  const match = /^Bearer\s+(.+)$/i.exec(header)
  // Digests have equal lengths, so the comparison takes the same time whatever was sent.
  if (!match || !timingSafeEqual(sha256(match[1].trim()), keyDigest)) throw unauthorized('Incorrect API key provided')
}

function sha256(text: string): Buffer {
  return createHash('sha256').update(text).digest()
}

/** A route's own settings: `allow` marks the routes that answer 405 (the methods the URL takes). */
interface RouteConfig {
  allow?: string
}

/** What an error's message may say about the request. */
export interface ErrorContext {
  bodyLimit?: number
  contentType?: string
}

/**
 * Any error → what the client sees. Only the client's own mistakes carry a message; the
 * framework's errors get the API's own messages and codes (never fastify's FST_ERR_* names).
 */
export function toApiError(error: unknown, context: ErrorContext = {}): ApiError {
  if (error instanceof ApiError) return error
  if (error instanceof UserError) return invalidRequest(error.message)
  const fastifyError = error as Partial<FastifyError>
  if (fastifyError.validation && fastifyError.validation.length > 0) return validationError(fastifyError.validation)
  const status = fastifyError.statusCode
  if (typeof status !== 'number' || status < 400 || status >= 500) return internalError()
  if (error instanceof SyntaxError && /prototype property/.test(error.message)) {
    return invalidRequest('The body contains a forbidden key ("__proto__" or "constructor.prototype")', null, 'invalid_json')
  }
  switch (fastifyError.code) {
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE': {
      const got = context.contentType ? `"${context.contentType.split(';')[0].trim()}"` : 'no Content-Type'
      return new ApiError(415, `The body must be JSON sent with "Content-Type: application/json" (got ${got})`, 'invalid_request_error', null, 'unsupported_media_type')
    }
    case 'FST_ERR_CTP_BODY_TOO_LARGE': {
      const limit = context.bodyLimit === undefined ? '' : ` of ${context.bodyLimit} bytes`
      return new ApiError(413, `The request body is over this server's limit${limit}`, 'invalid_request_error', null, 'body_too_large')
    }
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return invalidRequest('The request body is empty: send a JSON object', null, 'invalid_json')
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return invalidRequest('The request body\'s length does not match its Content-Length header', null, 'invalid_body')
    case 'FST_ERR_BAD_URL':
      return invalidRequest('The request URL is malformed (a bad %-escape?)', null, 'invalid_url')
  }
  if (error instanceof SyntaxError || fastifyError.code === 'FST_ERR_CTP_INVALID_JSON_BODY') {
    return invalidRequest('We could not parse the JSON body of your request: it is not valid JSON', null, 'invalid_json')
  }
  // Another of the framework's refusals: its status and message, without its internal code.
  return new ApiError(status, fastifyError.message ?? 'Bad request', 'invalid_request_error')
}

/** What a field with several accepted shapes takes, by its parameter name (indices removed). */
const SHAPES: Record<string, string> = {
  stop: 'a string, an array of up to 16 non-empty strings, or null',
  prompt: 'a string or an array of strings',
  'messages[].content': 'a string, an array of text parts, or null',
}

/** Ajv's first complaint as one sentence naming the parameter (`max_tokens must be integer or null`). */
function validationError(errors: NonNullable<FastifyError['validation']>): ApiError {
  // A value that fits none of a field's shapes: Ajv lists each shape's complaint, then the anyOf.
  const anyOf = [...errors].reverse().find((e) => e.keyword === 'anyOf')
  const error = anyOf ?? errors[0]
  const param = jsonPointerToParam(error.instancePath)
  // No body, or JSON that is not an object (an array, a string).
  if (!param && error.keyword === 'type') return invalidRequest('The request body must be a JSON object', null, 'invalid_value')
  const name = param || 'the body'
  let problem = error.message ?? 'is invalid'
  if (anyOf) problem = `must be ${SHAPES[param.replace(/\[\d+\]/g, '[]')] ?? 'of another type'}`
  else if (error.keyword === 'type') problem = `must be ${String(error.params.type).split(',').join(' or ')}`
  else if (error.keyword === 'enum') problem = `must be one of: ${(error.params.allowedValues as unknown[]).join(', ')}`
  return invalidRequest(`${name} ${problem}`, param || null, 'invalid_value')
}

/** `/messages/0/role` → `messages[0].role`, as OpenAI names parameters. */
function jsonPointerToParam(pointer: string | undefined): string {
  if (!pointer) return ''
  return pointer
    .split('/')
    .slice(1)
    .map((part) => part.replaceAll('~1', '/').replaceAll('~0', '~'))
    .reduce((path, part) => (/^\d+$/.test(part) ? `${path}[${part}]` : path ? `${path}.${part}` : part), '')
}
