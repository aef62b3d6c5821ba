/**
 * Positioned reads of weight files. `readSync` may return fewer bytes than asked (large reads,
 * network file systems), so every reader loops; this is that loop, once. Callers say what a
 * short file means to them (a damaged package, a truncated checkpoint) in their own error.
 */
import {readSync} from 'node:fs'

/** Fills `into` from `fd` at `position`; the bytes read, fewer than `into.byteLength` only where the file ends first. */
export function readAt(fd: number, into: Uint8Array, position: number): number {
  let done = 0
  while (done < into.byteLength) {
    const n = readSync(fd, into, done, into.byteLength - done, position + done)
    if (n === 0) break
    done += n
  }
  return done
}
