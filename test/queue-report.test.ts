// The worker's log off a terminal: one line per batch once this worker holds none of its lines.
import assert from 'node:assert/strict'
import {describe, it} from 'node:test'

import {BatchLog, batchLogLine} from '../src/ui/queue-report.js'

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

describe('BatchLog', () => {
  it('writes one line per batch when its lines in hand run out and stay out', async () => {
    const lines: string[] = []
    let clock = 0
    const log = new BatchLog((line) => lines.push(line), 30, () => clock)
    log.started('a', 'the default model')
    log.started('a', 'the default model')
    log.started('b', 'm2')
    clock = 1000
    log.finished('a', true, 10)
    log.finished('a', true, 12)
    // A new line of `a` joins before it settles: still one report for `a`.
    log.started('a', 'the default model')
    await sleep(60)
    assert.deepEqual(lines, [])
    clock = 2000
    log.finished('a', false, 0)
    log.finished('b', true, 5)
    await sleep(60)
    assert.deepEqual(lines.sort(), [
      'batch a: 2 lines done, 1 failed · 22 tokens in 2.0 s (11.0 tokens/s) · the default model',
      'batch b: 1 line done · 5 tokens in 2.0 s (2.5 tokens/s) · m2',
    ])
  })

  it('flush reports what is open at once, once', () => {
    const lines: string[] = []
    const log = new BatchLog((line) => lines.push(line), 60_000, () => 0)
    log.started('c', 'm')
    log.finished('c', true, 3)
    log.flush()
    log.flush()
    assert.deepEqual(lines, [batchLogLine('c', {model: 'm', done: 1, failed: 0, tokens: 3}, 0)])
    assert.equal(lines[0], 'batch c: 1 line done · 3 tokens in 0.0 s · m')
  })
})
