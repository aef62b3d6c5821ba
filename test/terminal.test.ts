// What a terminal shows, in a real pseudo-terminal: Ctrl-C while a spinner shows (the spinner
// must leave the terminal's Ctrl-C alone: ora's default put stdin in raw mode, `stty -isig`, and
// Ctrl-C did nothing), and progress on stderr while stdout goes to a file.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, test} from 'node:test'

import {redisForSuite} from './helpers/redis-server.js'
import {makeTempDir} from './helpers/safetensors-writer.js'
import {inTerminal} from './helpers/terminal.js'

const tmp = makeTempDir('parscale-terminal-')
after(() => fs.rmSync(tmp, {recursive: true, force: true}))

describe('Ctrl-C while a spinner shows', () => {
  test('bench: Ctrl-C during the (synchronous) conversion and during a measurement stops it at once', async () => {
    const env = {PARSCALE_CACHE: path.join(tmp, 'bench-cache')}
    const args = ['bench', '--parallel', '1', '--prompt-len', '8', '--new-tokens', '200', '--repeat', '50', '--no-roofline']
    for (const [moment, shown] of [['converting', /converting P=/], ['measuring', /running P=1, batch 1/]] as const) {
      const session = inTerminal(args, env)
      try {
        await session.waitFor(shown, 120_000)
        session.ctrlC()
        assert.equal(await session.exitWithin(5000), 130, `${moment}: still running 5 s after Ctrl-C: ${JSON.stringify(session.screen().slice(-300))}`)
      } finally {
        session.close()
      }
    }
  })

  describe('worker', () => {
    const redis = redisForSuite()

    test('Ctrl-C stops a waiting worker (as worker --help promises), exit 0', async () => {
      const session = inTerminal(['worker', '--queue', redis().url], {PARSCALE_CACHE: path.join(tmp, 'worker-cache')})
      try {
        await session.waitFor(/waiting for batches/)
        session.ctrlC()
        assert.equal(await session.exitWithin(5000), 0, `still running 5 s after Ctrl-C: ${JSON.stringify(session.screen().slice(-300))}`)
      } finally {
        session.close()
      }
    })
  })
})

describe('long work shows progress on a terminal', () => {
  test('run --batch --json > FILE: lines done and tokens/s on stderr while it runs, then a summary line', async () => {
    const file = path.join(tmp, 'progress.jsonl')
    fs.writeFileSync(file, Array.from({length: 12}, (_, i) => JSON.stringify({id: i, prompt: `def f${i}(x):`})).join('\n') + '\n')
    const out = path.join(tmp, 'progress.out.jsonl')
    const session = inTerminal(['run', '--batch', file, '--json', '--batch-size', '4', '-n', '48', '--parallel', '2'], {PARSCALE_CACHE: path.join(tmp, 'bench-cache')}, out)
    try {
      await session.waitFor(/generating: \d+\/12 lines done · \d+ tokens · [\d.]+ tokens\/s/, 120_000)
      assert.equal(await session.exitWithin(120_000), 0, session.screen().slice(-300))
      assert.match(session.screen(), /12 prompts · \d+ tokens in [\d.]+ s \([\d.]+ tokens\/s overall\) · P=2\r?\n$/)
      const lines = fs.readFileSync(out, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as {id: number})
      assert.deepEqual(lines.map((l) => l.id), [...Array(12).keys()], 'stdout holds only the results')
    } finally {
      session.close()
    }
  })
})
