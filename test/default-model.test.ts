// The embedded default model works offline at every P, and more streams predict held-out
// Python better than one.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, test} from 'node:test'

import {runCli, REPO_ROOT} from './helpers/cli.js'
import {makeTempDir} from './helpers/safetensors-writer.js'

const cache = makeTempDir()
after(() => fs.rmSync(cache, {recursive: true, force: true}))
const env = {PARSCALE_CACHE: cache, HF_HUB_OFFLINE: '1'}
const heldOut = path.join(REPO_ROOT, 'fixtures', 'default-model', 'heldout.py')

describe('embedded default model', () => {
  for (const parallel of [1, 2, 4, 8]) {
    test(`run with no MODEL at --parallel ${parallel} completes Python`, async () => {
      const result = await runCli(['run', '--prompt', 'def fibonacci(n):', '--max-new-tokens', '24', '--parallel', String(parallel), '--json'], {env})
      assert.equal(result.code, 0, result.stderr)
      const json = JSON.parse(result.stdout) as {text: string; parallel: number; generated_tokens: number; prompt_tokens: number}
      assert.equal(json.parallel, parallel)
      assert.ok(json.generated_tokens > 0)
      assert.ok(json.prompt_tokens > 0 && json.prompt_tokens < 17, 'raw prompt: the base model has no chat template')
      assert.match(json.text, /\S/)
    })
  }

  test('held-out loss at P = 8 is lower than at P = 1', async () => {
    const loss = async (parallel: number) => {
      const result = await runCli(['eval', '--text-file', heldOut, '--parallel', String(parallel), '--json'], {env})
      assert.equal(result.code, 0, result.stderr)
      return (JSON.parse(result.stdout) as {mean_nll: number}).mean_nll
    }
    const [p1, p8] = [await loss(1), await loss(8)]
    assert.ok(p8 < p1, `P=8 ${p8} should be below P=1 ${p1}`)
  })

  test('works when the variant folders lost their links to the shared files (as npm packs it)', async () => {
    const copy = path.join(cache, 'packed', 'default-model')
    fs.cpSync(path.join(REPO_ROOT, 'fixtures', 'default-model'), copy, {recursive: true, verbatimSymlinks: true})
    for (const variant of ['p1', 'p2', 'p4', 'p8']) {
      for (const name of fs.readdirSync(path.join(copy, variant))) {
        if (fs.lstatSync(path.join(copy, variant, name)).isSymbolicLink()) fs.rmSync(path.join(copy, variant, name))
      }
    }
    const result = await runCli(['run', copy, '--prompt', 'def fibonacci(n):', '--max-new-tokens', '8', '--parallel', '2', '--json'], {env})
    assert.equal(result.code, 0, result.stderr)
    const fromRepo = await runCli(['run', '--prompt', 'def fibonacci(n):', '--max-new-tokens', '8', '--parallel', '2', '--json'], {env})
    const ids = (out: string) => (JSON.parse(out) as {token_ids: number[]}).token_ids
    assert.deepEqual(ids(result.stdout), ids(fromRepo.stdout))
  })

  test('a P the model lacks lists the ones it has', async () => {
    const result = await runCli(['run', '--prompt', 'x', '--parallel', '3'], {env})
    assert.equal(result.code, 1)
    assert.match(result.stderr, /^parscale: .*--parallel 3.*1, 2, 4, 8/)
  })
})
