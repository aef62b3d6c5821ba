import {Transform, type Readable} from 'node:stream'

import {decodeUtf8, invalidUtf8Offset, notUtf8} from '../core/utf8.js'

/** All of stdin as text, for a piped prompt; bytes that are not UTF-8 are refused in one line. */
export async function readStdin(): Promise<string> {
  const chunks: Buffer[] = []
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer)
  // `echo prompt |` adds one newline that is not part of the prompt
  return decodeUtf8(Buffer.concat(chunks), () => 'stdin').replace(/\r?\n$/, '')
}

/**
 * Piped stdin as a stream of text for the chat's line reader, decoded as it comes; the first
 * bytes that are not UTF-8 end it with the same one-line error as `readStdin`.
 */
export function strictUtf8Text(input: Readable, where = 'stdin'): Transform {
  const decoder = new TextDecoder('utf-8', {fatal: true, ignoreBOM: true})
  let consumed = 0
  let held = Buffer.alloc(0) // bytes of a character split between chunks
  let first = true
  const decode = (chunk: Buffer, end: boolean): string => {
    const bytes = Buffer.concat([held, chunk])
    let text: string
    try {
      text = end ? decoder.decode(chunk) : decoder.decode(chunk, {stream: true})
    } catch {
      const offset = Math.max(0, invalidUtf8Offset(bytes))
      throw notUtf8(where, bytes[offset], consumed + offset)
    }
    const used = Buffer.byteLength(text, 'utf8')
    consumed += used
    held = bytes.subarray(used)
    if (first && text !== '') {
      first = false
      if (text.startsWith('\uFEFF')) text = text.slice(1)
    }
    return text
  }
  const stream = new Transform({
    transform(chunk: Buffer, _encoding, done) {
      try {
        done(null, decode(chunk, false))
      } catch (error) {
        done(error as Error)
      }
    },
    flush(done) {
      try {
        done(null, decode(Buffer.alloc(0), true))
      } catch (error) {
        done(error as Error)
      }
    },
  })
  return input.pipe(stream)
}
