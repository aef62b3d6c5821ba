// The page's side of the server's API: JSON requests with the API key (when the server wants
// one), and chat completions streamed as server-sent events read from fetch's body stream.

/**
 * @typedef {{id: string, parallel: number[], default_parallel: number | string, context_length: number, chat_template: boolean}} ModelCard
 * @typedef {{role: string, content: string}} Message
 * @typedef {{messages: Message[], stream_weights: boolean, parallel: number | 'auto', temperature?: number, max_tokens?: number}} ChatRequest
 * @typedef {{index: number, delta?: {role?: string, content?: string}, finish_reason: string | null, stream_weights?: number[][]}} ChunkChoice
 * @typedef {{parallel?: number, choices?: ChunkChoice[], error?: {message: string, code?: string | null}}} Chunk
 */

/** The server refused the key (or none was given): the page asks for it. */
export class KeyNeeded extends Error {}

/** An error answer of the API, with OpenAI's message. */
export class ApiError extends Error {
  /**
   * @param {string} message
   * @param {number} status
   * @param {string | null} code
   */
  constructor(message, status, code) {
    super(message)
    this.status = status
    this.code = code
  }
}

const KEY_ITEM = 'parscale-api-key'

export class Api {
  constructor() {
    // Kept for this tab only: closing it forgets the key.
    this.key = sessionStorage.getItem(KEY_ITEM) ?? ''
  }

  /** @param {string} key */
  setKey(key) {
    this.key = key
    if (key) sessionStorage.setItem(KEY_ITEM, key)
    else sessionStorage.removeItem(KEY_ITEM)
  }

  /**
   * @param {Record<string, string>} [extra]
   * @returns {Record<string, string>}
   */
  headers(extra = {}) {
    return this.key ? {...extra, Authorization: `Bearer ${this.key}`} : extra
  }

  /** @param {string} path */
  async get(path) {
    const response = await fetch(path, {headers: this.headers()})
    await this.check(response)
    return response
  }

  /**
   * @param {string} path
   * @returns {Promise<any>} the parsed body, as the API documents it
   */
  async json(path) {
    return (await this.get(path)).json()
  }

  /** @param {Response} response */
  async check(response) {
    if (response.ok) return
    /** @type {{error?: {message?: string, code?: string | null}} | undefined} */
    let body
    try {
      body = await response.json()
    } catch {
      body = undefined
    }
    const message = body?.error?.message ?? `${response.status} ${response.statusText}`
    if (response.status === 401) throw new KeyNeeded(message)
    throw new ApiError(message, response.status, body?.error?.code ?? null)
  }

  /**
   * POSTs a streamed chat completion at once (the request leaves before the caller's other work)
   * and returns its chunks as they arrive. `signal` stops it: the server sees the connection
   * close and ends the generation at its next step.
   * @param {ChatRequest} body
   * @param {AbortSignal} signal
   * @returns {AsyncGenerator<Chunk>}
   */
  streamChat(body, signal) {
    const response = fetch('/v1/chat/completions', {
      method: 'POST',
      headers: this.headers({'Content-Type': 'application/json', Accept: 'text/event-stream'}),
      body: JSON.stringify({...body, stream: true}),
      signal,
    })
    // Its failure is handled where the chunks are read; not an unhandled rejection meanwhile.
    response.catch(() => {})
    return this.chunks(response)
  }

  /**
   * @param {Promise<Response>} pending
   * @returns {AsyncGenerator<Chunk>}
   */
  async *chunks(pending) {
    const response = await pending
    await this.check(response)
    if (!response.body) throw new ApiError('the answer has no body', response.status, null)
    for await (const data of sseData(response.body)) {
      if (data === '[DONE]') return
      /** @type {Chunk} */
      const chunk = JSON.parse(data)
      // Once the stream has begun, an error travels as an event, as OpenAI sends it.
      if (chunk.error) throw new ApiError(chunk.error.message, 500, chunk.error.code ?? null)
      yield chunk
    }
  }
}

/**
 * The `data:` payloads of a server-sent event stream, in order (events end at a blank line).
 * @param {ReadableStream<Uint8Array>} stream
 * @returns {AsyncGenerator<string>}
 */
export async function* sseData(stream) {
  const reader = stream.getReader()
  const decoder = new TextDecoder()
  let buffer = ''
  for (;;) {
    const {value, done} = await reader.read()
    if (done) break
    // A character split between two reads waits for its second half.
    buffer += decoder.decode(value, {stream: true})
    const events = buffer.split(/\r?\n\r?\n/)
    buffer = events.pop() ?? ''
    for (const event of events) {
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(line.startsWith('data: ') ? 6 : 5))
      if (data.length > 0) yield data.join('\n')
    }
  }
}
