/** Stop strings over streamed text. */

/**
 * Streams text while watching for stop strings: text that could be the start of a stop
 * string is held back until it is known not to be one; on a match the text ends before it.
 */
export class StopStringMatcher {
  private pending = ''
  matched = false

  constructor(private readonly stops: string[]) {}

  /** Returns the text that is safe to emit now. */
  push(text: string): string {
    if (this.matched) return ''
    const s = this.pending + text
    let cut = -1
    for (const stop of this.stops) {
      const at = stop === '' ? -1 : s.indexOf(stop)
      if (at >= 0 && (cut < 0 || at < cut)) cut = at
    }
    if (cut >= 0) {
      this.matched = true
      this.pending = ''
      return s.slice(0, cut)
    }
    const hold = this.heldSuffixLength(s)
    this.pending = s.slice(s.length - hold)
    return s.slice(0, s.length - hold)
  }

  /** Releases held-back text at the end of generation. */
  flush(): string {
    const s = this.matched ? '' : this.pending
    this.pending = ''
    return s
  }

  /** Length of the longest suffix of `s` that is a proper prefix of some stop string. */
  private heldSuffixLength(s: string): number {
    let best = 0
    for (const stop of this.stops) {
      for (let n = Math.min(stop.length - 1, s.length); n > best; n--) {
        if (s.endsWith(stop.slice(0, n))) {
          best = n
          break
        }
      }
    }
    return best
  }
}
