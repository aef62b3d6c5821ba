import assert from 'node:assert/strict'
import {test} from 'node:test'

import {pairedRounds, perRound, targetLine} from '../src/core/bench/paired.js'

test('paired rounds alternate the order of the sides and judge each round', async () => {
  const order: string[] = []
  const figures: Record<string, number[]> = {a: [10, 12, 11], b: [9, 15, 10]}
  const side = (name: string) => ({name, run: async () => (order.push(name), figures[name]![order.filter((n) => n === name).length - 1]!)})
  const rounds = await pairedRounds(3, [side('a'), side('b')])
  assert.deepEqual(order, ['a', 'b', 'b', 'a', 'a', 'b'])
  const ratio = perRound(rounds, (r) => r.b! / r.a!)!
  assert.deepEqual(ratio.values.map((v) => +v.toFixed(3)), [0.9, 1.25, 0.909])
  assert.equal(+ratio.median.toFixed(3), 0.909)
  assert.equal(ratio.min, 0.9)
  assert.equal(ratio.max, 1.25)
  assert.match(targetLine({name: 'b / a (≤ 1.0)', figure: ratio, limit: 1}), /^MET +b \/ a \(≤ 1\.0\): median 0\.91 \(0\.90–1\.25, 3 rounds/)
  assert.match(targetLine({name: 'b / a (≤ 1.0)', figure: ratio, limit: 1, rule: 'every round'}), /^MISSED b \/ a \(≤ 1\.0\) in every round/)
  assert.match(targetLine({name: 'b / a', figure: ratio, limit: 1.0, atLeast: true}), /^MISSED/)
  assert.match(targetLine({name: 'none', figure: undefined, limit: 1}), /^SKIPPED none/)
})
