/**
 * Text that comes in as bytes (stdin, `--batch` files, `--text-file`) is UTF-8 or refused:
 * decoding with replacement would generate from U+FFFD characters nobody typed. The refusal
 * names where the first bad byte is.
 */
import {UserError} from './errors.js'

const strict = new TextDecoder('utf-8', {fatal: true})
const lossy = new TextDecoder('utf-8')
const REPLACEMENT = '\uFFFD'

/**
 * Offset of the first byte that is not part of valid UTF-8, or -1. The text before the first bad
 * sequence decodes and re-encodes to the same bytes, so the lossy decoding's first U+FFFD that the
 * input does not spell out itself (EF BF BD) is where the bad bytes start.
 */
export function invalidUtf8Offset(bytes: Uint8Array): number {
  try {
    strict.decode(bytes)
    return -1
  } catch {
    const text = lossy.decode(bytes)
    const bom = bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf ? 3 : 0
    for (let at = text.indexOf(REPLACEMENT); at >= 0; at = text.indexOf(REPLACEMENT, at + 1)) {
      const offset = bom + Buffer.byteLength(text.slice(0, at), 'utf8')
      if (!(bytes[offset] === 0xef && bytes[offset + 1] === 0xbf && bytes[offset + 2] === 0xbd)) return offset
    }
    return bytes.length // unreachable: the strict decoder found something
  }
}

/** 1-based line of a byte offset (lines end at \n). */
export function lineAt(bytes: Uint8Array, offset: number): number {
  let line = 1
  for (let i = 0; i < offset; i++) if (bytes[i] === 0x0a) line++
  return line
}

/**
 * The bytes as text (a leading byte-order mark dropped), or one line: `<where>: not valid UTF-8
 * (byte 0xFF at offset N)`. `where` names the source for that offset (`stdin`, `FILE:LINE`).
 */
export function decodeUtf8(bytes: Uint8Array, where: (offset: number) => string): string {
  const offset = invalidUtf8Offset(bytes)
  if (offset < 0) return strict.decode(bytes)
  throw notUtf8(where(offset), bytes[offset], offset)
}

/** The one-line refusal: where, the byte, its offset from the start of the input. */
export function notUtf8(where: string, byte: number | undefined, offset: number): UserError {
  const shown = byte === undefined ? 'the input ends inside a character' : `byte 0x${byte.toString(16).toUpperCase().padStart(2, '0')}`
  return new UserError(`${where}: not valid UTF-8 (${shown} at offset ${offset}); parscale reads text as UTF-8`)
}
