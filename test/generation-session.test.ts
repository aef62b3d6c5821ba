// The decode loop over the real ONNX session of converted golden checkpoints.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, before, describe, it} from 'node:test'

import {ChatSession} from '../src/core/run/chat.js'
import {generateAll} from '../src/core/generation/batcher.js'
import type {GenerationOptions} from '../src/core/generation/generation.js'
import {resolveModel} from '../src/core/package/resolve.js'
import {ParScaleModel} from '../src/core/engine/model.js'
import {readGenerationDefaults, TextTokenizer} from '../src/core/generation/tokenizer.js'
import {goldenDir, makeTempDir} from './helpers/safetensors-writer.js'

interface Golden {
  greedy: {prompt: string; prompt_ids: number[]; new_ids: number[]}[]
}

const cacheDir = makeTempDir('parscale-gen-')
const previousCache = process.env.PARSCALE_CACHE
process.env.PARSCALE_CACHE = cacheDir
after(() => {
  if (previousCache === undefined) delete process.env.PARSCALE_CACHE
  else process.env.PARSCALE_CACHE = previousCache
  fs.rmSync(cacheDir, {recursive: true, force: true})
})

async function open(name: string) {
  const {packageDir, parallel} = resolveModel(goldenDir(name))
  const session = await ParScaleModel.open(packageDir)
  const tokenizer = await TextTokenizer.load(packageDir)
  const defaults = await readGenerationDefaults(packageDir)
  const options: GenerationOptions = {eosTokenIds: defaults.eosTokenIds, decode: (ids) => tokenizer.decode(ids), contextLength: session.maxPositions}
  return {session, parallel, tokenizer, options}
}

for (const name of ['tiny-p1', 'tiny-p4', 'tiny-p2-tied']) {
  describe(`generation over ${name}`, () => {
    let model: Awaited<ReturnType<typeof open>>
    const golden = JSON.parse(fs.readFileSync(path.join(goldenDir(name), 'golden.json'), 'utf8')) as Golden
    before(async () => {
      model = await open(name)
    })
    after(async () => {
      await model.session.release()
    })

    it('one batch of prompts of different lengths gives the golden greedy ids, as one at a time does', async () => {
      const requests = golden.greedy.map((g) => ({promptIds: g.prompt_ids, maxNewTokens: 24, sampling: {temperature: 0}, parallel: model.parallel}))
      assert.ok(new Set(requests.map((r) => r.promptIds.length)).size > 1)
      const batched = await generateAll(model.session, requests, requests.length, model.options)
      assert.deepEqual(batched.map((r) => r.tokenIds), golden.greedy.map((g) => g.new_ids))
      const alone = await generateAll(model.session, requests, 1, model.options)
      assert.deepEqual(alone.map((r) => r.tokenIds), golden.greedy.map((g) => g.new_ids))
    })

    it('a chat turn over the kept cache equals a fresh run over the same tokens', async () => {
      const chat = new ChatSession(model.session, model.parallel, model.tokenizer, {...model.options, system: 'You are a test.'})
      const req = {maxNewTokens: 6, sampling: {temperature: 0}}
      const t1 = await chat.send('hello', req)
      assert.equal(t1.reusedTokens, 0)
      const t2 = await chat.send('and again', req)
      assert.ok(t2.reusedTokens > 0, 'the cache was reused')
      assert.equal(t2.prefillTokens, t2.promptIds.length - t2.reusedTokens)
      // turn 1's prompt and answer (all but its unfed last token) are the reused part
      assert.deepEqual(t2.promptIds.slice(0, t2.reusedTokens), [...t1.promptIds, ...t1.tokenIds].slice(0, t2.reusedTokens))
      assert.equal(t2.reusedTokens, t1.promptIds.length + t1.tokenIds.length - 1)
      const [fresh] = await generateAll(model.session, [{promptIds: t2.promptIds, maxNewTokens: 6, sampling: {temperature: 0}, parallel: model.parallel}], 1, model.options)
      assert.deepEqual(t2.tokenIds, fresh.tokenIds)
    })

    it('chat reuse across prefill chunk boundaries gives the answer of an unchunked run', async () => {
      const {packageDir} = resolveModel(goldenDir(name))
      const chunked = await ParScaleModel.open(packageDir, {maxPrefillChunk: 4})
      try {
        const chat = new ChatSession(chunked, model.parallel, model.tokenizer, {...model.options, system: 'You are a test.'})
        const req = {maxNewTokens: 6, sampling: {temperature: 0}}
        await chat.send('hello there', req)
        const t2 = await chat.send('and once more, longer', req)
        assert.ok(t2.reusedTokens > 4 && t2.prefillTokens > 4, 'both the reused part and the new part span chunks')
        const [fresh] = await generateAll(model.session, [{promptIds: t2.promptIds, maxNewTokens: 6, sampling: {temperature: 0}, parallel: model.parallel}], 1, model.options)
        assert.deepEqual(t2.tokenIds, fresh.tokenIds)
      } finally {
        await chunked.release()
      }
    })
  })
}
