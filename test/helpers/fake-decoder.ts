// A fake decoder for generation tests: its "cache" is the real tokens of each slot, so a lost
// row, a slot mixed up in compaction or a re-fed token changes what it predicts. Its logits
// also depend on P, so a request run at the wrong P is caught.
import assert from 'node:assert/strict'

import type {Decoder, DecoderOutput, SequenceCache} from '../../src/core/engine/decoder.js'

export class FakeCache implements SequenceCache {
  slotTokens: number[][] = []
  capacity = 0
  constructor(readonly parallel: number) {}

  get slots(): number {
    return this.slotTokens.length
  }

  tokens(slot: number): number {
    return this.slotTokens[slot].length
  }

  reserve(slots: number, tokens: number): void {
    while (this.slotTokens.length < slots) this.slotTokens.push([])
    this.capacity = Math.max(this.capacity, tokens)
  }

  reset(slot: number): void {
    this.slotTokens[slot] = []
  }

  move(from: number, to: number): void {
    this.slotTokens[to] = [...this.slotTokens[from]]
  }
}

export interface FakeCall {
  parallel: number
  first: number
  rows: number
  seq: number
  /** Tokens each slot held before the call. */
  past: number[]
}

/** Deterministic logits from a row's whole history (FNV-style hash → pseudo-random vector). */
export function hashLogits(history: number[], vocab: number, parallel = 1): Float32Array {
  let h = 2166136261 ^ (parallel * 7919)
  for (const t of history) h = Math.imul(h ^ (t + 1), 16777619) >>> 0
  const out = new Float32Array(vocab)
  for (let i = 0; i < vocab; i++) {
    h = Math.imul(h ^ (h >>> 13), 0x5bd1e995) >>> 0
    out[i] = ((h >>> 8) / 0xffffff) * 4
  }
  return out
}

export class FakeDecoder implements Decoder<FakeCache> {
  readonly calls: FakeCall[] = []

  /** `script` may force the next token (return undefined to use the hash logits). */
  constructor(
    readonly vocab: number,
    private readonly script: (history: number[]) => number | undefined = () => undefined,
    readonly parallelValues: number[] = [1],
    /** Tokens per prefill call. */
    readonly chunk = 1000,
  ) {}

  newCache(parallel: number): FakeCache {
    assert.ok(this.parallelValues.includes(parallel), `no P = ${parallel}`)
    return new FakeCache(parallel)
  }

  prefillChunk(): number {
    return this.chunk
  }

  async forward(cache: FakeCache, first: number, inputIds: number[][], numLogitsToKeep: number): Promise<DecoderOutput> {
    const rows = inputIds.length
    const seq = inputIds[0].length
    assert.ok(inputIds.every((r) => r.length === seq), 'rows of one call are equally long')
    assert.ok(first >= 0 && first + rows <= cache.slots, 'slots exist')
    assert.ok(seq <= this.chunk, 'prefill respects the chunk size')
    this.calls.push({parallel: cache.parallel, first, rows, seq, past: inputIds.map((_, r) => cache.tokens(first + r))})
    const keep = numLogitsToKeep === 0 ? seq : numLogitsToKeep
    const logits = new Float32Array(rows * keep * this.vocab)
    const weights = new Float32Array(rows * keep * cache.parallel).fill(1 / cache.parallel)
    for (let r = 0; r < rows; r++) {
      const slot = first + r
      for (let j = 0; j < seq; j++) {
        cache.slotTokens[slot].push(inputIds[r][j])
        assert.ok(cache.tokens(slot) <= cache.capacity, 'the cache was reserved')
        const position = j - (seq - keep)
        if (position < 0) continue
        const history = cache.slotTokens[slot]
        const row = hashLogits(history, this.vocab, cache.parallel)
        const forced = this.script(history)
        if (forced !== undefined) row[forced] = 100
        logits.set(row, (r * keep + position) * this.vocab)
      }
    }
    return {logits, dims: [rows, keep, this.vocab], streamWeights: weights}
  }
}

/** A character-level tokenizer over a small alphabet; `|` is the special end token. */
export const ALPHABET = 'abcdefghijklmnopqrstuvwxyz :;|'
export const END = ALPHABET.indexOf('|')

/** A character-level tokenizer over `alphabet` (ids are positions in it; `|` decodes to nothing). */
export function charTokenizerOf(alphabet: string) {
  const end = alphabet.indexOf('|')
  return {
    encode: (text: string): number[] =>
      [...text].map((c) => {
        const id = alphabet.indexOf(c)
        assert.ok(id >= 0, `no token for ${JSON.stringify(c)}`)
        return id
      }),
    decode: (ids: number[]): string => ids.map((id) => (id === end ? '' : (alphabet[id] ?? ''))).join(''),
    decodeWithSpecial: (ids: number[]): string => ids.map((id) => alphabet[id] ?? '').join(''),
  }
}

export const charTokenizer = charTokenizerOf(ALPHABET)

/**
 * A FakeDecoder that also chains greedy steps "on its device" (`decodeGreedy`), as the
 * hand-written WebGPU kernels do: each step's argmax is the next input, tokens go to `accept`
 * one at a time, and the inputs past a stop are never fed. Counts the tokens made that way.
 */
export class ChainingFakeDecoder extends FakeDecoder {
  chainedTokens = 0
  chainedRuns = 0

  async decodeGreedy(cache: FakeCache, slot: number, token: number, count: number, accept: (token: number, streamWeights: Float32Array) => boolean): Promise<boolean> {
    this.chainedRuns++
    let input = token
    for (let i = 0; i < count; i++) {
      const out = await this.forward(cache, slot, [[input]], 1)
      let best = 0
      for (let v = 1; v < this.vocab; v++) if (out.logits[v]! > out.logits[best]!) best = v
      this.chainedTokens++
      if (accept(best, out.streamWeights!.subarray(0, cache.parallel))) return true
      input = best
    }
    return true
  }
}
