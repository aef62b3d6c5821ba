// The step statistics `eval --parallel LIST` prints: a clear gain is "in order", a clear loss
// "reversed", equal means with independent noise "within noise", and the bootstrap's standard
// error is the textbook one on independent tokens.
import assert from 'node:assert/strict'
import {describe, test} from 'node:test'

import {createRng} from '../src/core/generation/sampling.js'
import {blockBootstrapSe, pairedSteps} from '../src/core/run/paired-steps.js'

/** Standard normal draws (Box–Muller) from a seeded generator. */
function normals(n: number, seed: number): number[] {
  const rng = createRng(seed)
  return Array.from({length: n}, () => Math.sqrt(-2 * Math.log(1 - rng())) * Math.cos(2 * Math.PI * rng()))
}

describe('paired steps between P', () => {
  test('block bootstrap standard error on independent tokens is σ/√n (within 15 %)', () => {
    const values = normals(4000, 1).map((v) => 0.2 * v)
    const se = blockBootstrapSe(values, createRng(2))
    const expected = 0.2 / Math.sqrt(values.length)
    assert.ok(Math.abs(se / expected - 1) < 0.15, `se ${se} vs ${expected}`)
  })

  test('correlated tokens: blocks widen the error that single tokens would understate', () => {
    // each value repeated 16 times: 256 independent draws, 4096 tokens
    const values = normals(256, 3).flatMap((v) => Array.from({length: 16}, () => v))
    const blocks = blockBootstrapSe(values, createRng(4))
    const single = blockBootstrapSe(values, createRng(4), 1)
    assert.ok(blocks > 2.5 * single, `blocks ${blocks} vs single tokens ${single}`)
    assert.ok(Math.abs(blocks / (1 / Math.sqrt(256)) - 1) < 0.25, `blocks ${blocks}`)
  })

  test('verdicts: in order, reversed, within noise; seeded; gains are mean differences', () => {
    const base = normals(600, 5).map((v) => 2 + 0.5 * v)
    const better = base.map((v, i) => v - 0.05 + 0.1 * normals(600, 6)[i])
    const steps = pairedSteps([{parallel: 1, tokenNll: base}, {parallel: 2, tokenNll: better}, {parallel: 4, tokenNll: base}])
    assert.deepEqual(steps.map((s) => [s.from, s.to, s.verdict]), [[1, 2, 'in order'], [2, 4, 'reversed']])
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length
    assert.ok(Math.abs(steps[0].gain - (mean(base) - mean(better))) < 1e-12)
    assert.ok(steps[0].ci95[0] < steps[0].gain && steps[0].gain < steps[0].ci95[1])
    const noise = pairedSteps([{parallel: 4, tokenNll: normals(300, 7)}, {parallel: 8, tokenNll: normals(300, 8)}])
    assert.equal(noise[0].verdict, 'within noise')
    assert.deepEqual(pairedSteps([{parallel: 1, tokenNll: base}, {parallel: 2, tokenNll: better}]), pairedSteps([{parallel: 1, tokenNll: base}, {parallel: 2, tokenNll: better}]))
    assert.throws(() => pairedSteps([{parallel: 1, tokenNll: [1, 2, 3]}, {parallel: 2, tokenNll: [1, 2]}]), /different tokens/)
  })
})
