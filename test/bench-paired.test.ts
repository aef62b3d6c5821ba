import assert from 'node:assert/strict'
import {test} from 'node:test'

import {loadLine, pairedRounds, perRound, quietFromEnv, targetLine, waitForQuiet} from '../src/core/bench/paired.js'

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

test('a quiet rule holds each round until the load falls, or until its wait runs out', async () => {
  // the load falls by one per poll: 3.5 → 2.5 → 1.5 → 0.5, then stays
  let load = 3.5
  const slept: number[] = []
  const rule = {maxLoad: 1, maxWaitS: 100, pollS: 10, loadNow: () => load, sleep: async (s: number) => void (slept.push(s), (load = Math.max(0.5, load - 1)))}
  const ran: number[] = []
  const rounds = await pairedRounds(2, [{name: 'a', run: async () => (ran.push(load), 1)}], undefined, rule)
  assert.deepEqual(slept, [10, 10, 10])
  assert.deepEqual(rounds.map((r) => r.waitedS), [30, 0])
  assert.deepEqual(rounds.map((r) => r.load), [0.5, 0.5])
  assert.deepEqual(ran, [0.5, 0.5])
  assert.match(loadLine(rounds), /waited for a quieter machine \(s\): 30, 0/)

  // a machine that never gets quiet: the round starts after maxWaitS, the last sleep cut to fit
  const busy: number[] = []
  const waited = await waitForQuiet({maxLoad: 1, maxWaitS: 25, pollS: 10, loadNow: () => 6, sleep: async (s) => void busy.push(s)})
  assert.equal(waited, 25)
  assert.deepEqual(busy, [10, 10, 5])

  assert.equal(quietFromEnv({}), undefined)
  assert.deepEqual(quietFromEnv({BENCH_MAX_LOAD: '1.5'}), {maxLoad: 1.5, maxWaitS: 600})
  assert.deepEqual(quietFromEnv({BENCH_MAX_LOAD: '2', BENCH_MAX_WAIT: '30'}), {maxLoad: 2, maxWaitS: 30})
  assert.throws(() => quietFromEnv({BENCH_MAX_LOAD: 'x'}), /BENCH_MAX_LOAD/)
})
