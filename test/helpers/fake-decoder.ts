// A fake decoder for generation tests: its "cache" is the real tokens of each row, so a
// wrong attention mask, a lost row or a re-fed token changes what it predicts.
import assert from 'node:assert/strict'

import type {Decoder} from '../../src/core/run/generation.js'

export interface FakeCache {
  pastLength: number
  rows: number[][]
}

export interface FakeCall {
  batch: number
  seq: number
  past: number
}

/** Deterministic logits from a row's whole history (FNV-style hash → pseudo-random vector). */
export function hashLogits(history: number[], vocab: number): Float32Array {
  let h = 2166136261
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
    readonly parallel = 1,
  ) {}

  emptyCache(batch: number): FakeCache {
    return {pastLength: 0, rows: Array.from({length: batch}, () => [])}
  }

  async forward(inputIds: number[][], attentionMask: number[][], past: FakeCache, numLogitsToKeep: number) {
    const batch = inputIds.length
    const seq = inputIds[0].length
    assert.equal(numLogitsToKeep, 1)
    assert.equal(past.rows.length, batch, 'cache rows = batch')
    assert.ok(inputIds.every((r) => r.length === seq))
    assert.ok(attentionMask.every((m) => m.length === past.pastLength + seq), 'mask covers past + new')
    this.calls.push({batch, seq, past: past.pastLength})
    const rows = past.rows.map((r, b) => [...r, ...inputIds[b].filter((_, j) => attentionMask[b][past.pastLength + j] === 1)])
    const logits = new Float32Array(batch * this.vocab)
    rows.forEach((history, b) => {
      // left padding only: once a row has a real token, the rest must be real too
      const m = attentionMask[b]
      assert.ok(m.indexOf(1) >= 0 && m.slice(m.indexOf(1)).every((x) => x === 1), 'left padding only')
      const row = hashLogits(history, this.vocab)
      const forced = this.script(history)
      if (forced !== undefined) row[forced] = 100
      logits.set(row, b * this.vocab)
    })
    return {logits, dims: [batch, 1, this.vocab] as [number, number, number], present: {pastLength: past.pastLength + seq, rows}}
  }

  selectRows(cache: FakeCache, rows: number[]): FakeCache {
    return {pastLength: cache.pastLength, rows: rows.map((r) => cache.rows[r])}
  }
}

/** A character-level tokenizer over a small alphabet; `|` is the special end token. */
export const ALPHABET = 'abcdefghijklmnopqrstuvwxyz :;|'
export const END = ALPHABET.indexOf('|')

export const charTokenizer = {
  encode: (text: string): number[] =>
    [...text].map((c) => {
      const id = ALPHABET.indexOf(c)
      assert.ok(id >= 0, `no token for ${JSON.stringify(c)}`)
      return id
    }),
  decode: (ids: number[]): string => ids.map((id) => (id === END ? '' : (ALPHABET[id] ?? ''))).join(''),
  decodeWithSpecial: (ids: number[]): string => ids.map((id) => ALPHABET[id] ?? '').join(''),
}
