/**
 * Server-sent events as OpenAI streams them: one `data: <json>` event per chunk and a last
 * `data: [DONE]`. Writes go straight to Node's response (fastify hands it over with
 * `reply.hijack()`); once the client has gone, further writes are dropped.
 */
import type {ServerResponse} from 'node:http'

export class SseStream {
  constructor(private readonly response: ServerResponse) {}

  open(headers: Record<string, string> = {}): void {
    this.response.writeHead(200, {
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-cache',
      // Reverse proxies (nginx) would otherwise hold tokens back in their buffers.
      'X-Accel-Buffering': 'no',
      ...headers,
    })
    this.response.flushHeaders()
  }

  /** The client disconnected or the stream ended. */
  get closed(): boolean {
    return this.response.destroyed || this.response.writableEnded
  }

  send(data: unknown): void {
    // JSON.stringify escapes newlines, so one chunk is always one event.
    if (!this.closed) this.response.write(`data: ${JSON.stringify(data)}\n\n`)
  }

  end(): void {
    if (this.closed) return
    this.response.write('data: [DONE]\n\n')
    this.response.end()
  }
}
