// The page's side of the server's API: JSON requests with the API key (when the server wants
// one), and chat completions streamed as server-sent events read from fetch's body stream.

/** The server refused the key (or none was given): the page asks for it. */
export class KeyNeeded extends Error {}

/** An error answer of the API, with OpenAI's message. */
export class ApiError extends Error {
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

  setKey(key) {
    this.key = key
    if (key) sessionStorage.setItem(KEY_ITEM, key)
    else sessionStorage.removeItem(KEY_ITEM)
  }

  headers(extra = {}) {
    return this.key ? {...extra, Authorization: `Bearer ${this.key}`} : extra
  }

  async get(path) {
    const response = await fetch(path, {headers: this.headers()})
    await this.check(response)
    return response
  }

  async json(path) {
    return (await this.get(path)).json()
  }

  async check(response) {
    if (response.ok) return
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
   * POSTs a streamed chat completion and yields each chunk object as it arrives. `signal` stops
   * it: the server sees the connection close and ends the generation at its next step.
   */
  async *streamChat(body, signal) {
    const response = await fetch('/v1/chat/completions', {
      method: 'POST',
      headers: this.headers({'Content-Type': 'application/json', Accept: 'text/event-stream'}),
      body: JSON.stringify({...body, stream: true}),
      signal,
    })
    await this.check(response)
    for await (const data of sseData(response.body)) {
      if (data === '[DONE]') return
      const chunk = JSON.parse(data)
      // Once the stream has begun, an error travels as an event, as OpenAI sends it.
      if (chunk.error) throw new ApiError(chunk.error.message, 500, chunk.error.code ?? null)
      yield chunk
    }
  }
}

/** The `data:` payloads of a server-sent event stream, in order (events end at a blank line). */
export async function* sseData(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader()
  let buffer = ''
  for (;;) {
    const {value, done} = await reader.read()
    if (done) break
    buffer += value
    const events = buffer.split(/\r?\n\r?\n/)
    buffer = events.pop()
    for (const event of events) {
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(line.startsWith('data: ') ? 6 : 5))
      if (data.length > 0) yield data.join('\n')
    }
  }
}
