import assert from 'node:assert/strict'
import {describe, it} from 'node:test'

import {applyRepetitionPenalty, argmax, candidateDistribution, createRng, Sampler} from '../src/core/generation/sampling.js'

const logits = (...v: number[]) => Float32Array.from(v)

function draws(sampler: Sampler, row: Float32Array, n: number): number[] {
  return Array.from({length: n}, () => sampler.next(row))
}

describe('sampling', () => {
  it('greedy picks the largest logit, the first one on ties', () => {
    const s = new Sampler({temperature: 0})
    assert.equal(s.next(logits(0.1, 3, -2, 2.9)), 1)
    assert.equal(argmax(logits(1, 5, 5, 2)), 1)
  })

  it('the PRNG is deterministic per seed and uniform enough', () => {
    const a = createRng(42)
    const b = createRng(42)
    const xs = Array.from({length: 1000}, () => a())
    assert.deepEqual(xs, Array.from({length: 1000}, () => b()))
    assert.notDeepEqual(xs.slice(0, 10), Array.from({length: 10}, createRng(43)))
    assert.ok(xs.every((x) => x >= 0 && x < 1))
    const mean = xs.reduce((p, q) => p + q, 0) / xs.length
    assert.ok(Math.abs(mean - 0.5) < 0.05, `mean ${mean}`)
  })

  it('same seed, same samples; another seed, other samples', () => {
    const row = logits(...Array.from({length: 50}, (_, i) => Math.sin(i)))
    const one = draws(new Sampler({temperature: 1, seed: 7}), row, 40)
    assert.deepEqual(draws(new Sampler({temperature: 1, seed: 7}), row, 40), one)
    assert.notDeepEqual(draws(new Sampler({temperature: 1, seed: 8}), row, 40), one)
  })

  it('follows the softmax distribution at temperature 1', () => {
    const row = logits(Math.log(0.5), Math.log(0.3), Math.log(0.2))
    const s = new Sampler({temperature: 1, seed: 1})
    const counts = [0, 0, 0]
    for (let i = 0; i < 20000; i++) counts[s.next(row)]++
    assert.ok(Math.abs(counts[0] / 20000 - 0.5) < 0.02, String(counts))
    assert.ok(Math.abs(counts[1] / 20000 - 0.3) < 0.02, String(counts))
  })

  it('low temperature concentrates on the best token', () => {
    const row = logits(1, 2, 1.5)
    const picks = draws(new Sampler({temperature: 0.01, seed: 3}), row, 200)
    assert.ok(picks.every((p) => p === 1))
  })

  it('top-k keeps only the k best tokens', () => {
    const row = logits(5, 1, 4, 3, 2)
    const {ids, probs} = candidateDistribution(row, 2)
    assert.deepEqual(ids, [0, 2])
    assert.ok(Math.abs(probs[0] + probs[1] - 1) < 1e-9)
    const picks = new Set(draws(new Sampler({temperature: 5, topK: 2, seed: 9}), row, 500))
    assert.deepEqual([...picks].sort(), [0, 2])
  })

  it('top-p keeps the smallest set reaching p', () => {
    const row = logits(Math.log(0.5), Math.log(0.25), Math.log(0.15), Math.log(0.1))
    assert.deepEqual(candidateDistribution(row, 0, 0.6).ids, [0, 1])
    assert.deepEqual(candidateDistribution(row, 0, 0.5).ids, [0])
    assert.deepEqual(candidateDistribution(row, 0, 0.8).ids, [0, 1, 2])
    assert.deepEqual(candidateDistribution(row, 0, 0.01).ids, [0])
    const {probs} = candidateDistribution(row, 0, 0.8)
    assert.ok(Math.abs(probs[0] - 0.5 / 0.9) < 1e-6)
    const picks = new Set(draws(new Sampler({temperature: 1, topP: 0.6, seed: 2}), row, 500))
    assert.deepEqual([...picks].sort(), [0, 1])
  })

  it('top-k then top-p', () => {
    const row = logits(Math.log(0.4), Math.log(0.3), Math.log(0.2), Math.log(0.1))
    // top-2 renormalises to 0.571 / 0.429: p = 0.5 keeps the best only
    assert.deepEqual(candidateDistribution(row, 2, 0.5).ids, [0])
    assert.deepEqual(candidateDistribution(row, 3, 0.95).ids, [0, 1, 2])
  })

  it('repetition penalty divides positive and multiplies negative logits of seen tokens', () => {
    const row = logits(2, -1, 1.9, 0.5)
    applyRepetitionPenalty(row, [0, 1, 0], 2)
    assert.deepEqual([...row], [1, -2, 1.899999976158142, 0.5])
    const s = new Sampler({temperature: 0, repetitionPenalty: 2})
    const fresh = logits(2, -1, 1.9, 0.5)
    assert.equal(s.next(fresh, [0]), 2)
    assert.equal(fresh[0], 2, 'the caller\'s logits are left alone')
    assert.equal(new Sampler({temperature: 0, repetitionPenalty: 2}).next(logits(2, -1, 1.9)), 0)
  })

  it('refuses invalid options', () => {
    assert.throws(() => new Sampler({temperature: -1}), RangeError)
    assert.throws(() => new Sampler({temperature: 1, topP: 0}), RangeError)
    assert.throws(() => new Sampler({temperature: 1, topP: 1.5}), RangeError)
    assert.throws(() => new Sampler({temperature: 1, topK: 1.5}), RangeError)
    assert.throws(() => new Sampler({temperature: 1, repetitionPenalty: 0}), RangeError)
  })

  it('handles a large vocabulary quickly', () => {
    const row = new Float32Array(151936).map((_, i) => Math.sin(i * 0.37) * 8)
    const s = new Sampler({temperature: 0.8, topK: 50, topP: 0.9, seed: 5})
    const t0 = performance.now()
    for (let i = 0; i < 10; i++) s.next(row)
    assert.ok(performance.now() - t0 < 2000)
  })
})
