// Ctrl-C in a real pseudo-terminal while a spinner shows: the spinner must leave the terminal's
// Ctrl-C alone (ora's default put stdin in raw mode, `stty -isig`, and Ctrl-C did nothing).
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, before, describe, test} from 'node:test'

import {type RedisServer, startRedis} from './helpers/redis-server.js'
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
    let redis: RedisServer
    before(async () => {
      redis = await startRedis()
    })
    after(async () => {
      await redis?.stop()
    })

    test('Ctrl-C stops a waiting worker (as worker --help promises), exit 0', async () => {
      const session = inTerminal(['worker', '--queue', redis.url], {PARSCALE_CACHE: path.join(tmp, 'worker-cache')})
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
