import assert from 'node:assert/strict'
import {describe, it} from 'node:test'

import {IncrementalDetokenizer, readGenerationDefaults, TextTokenizer} from '../src/core/generation/tokenizer.js'
import {goldenDir, makeTempDir} from './helpers/safetensors-writer.js'
import fs from 'node:fs'
import path from 'node:path'

describe('tokenizer', async () => {
  const tok = await TextTokenizer.load(goldenDir('tiny-p4'))

  it('encodes raw text without special tokens, like the golden prompt ids', () => {
    const golden = JSON.parse(fs.readFileSync(path.join(goldenDir('tiny-p4'), 'golden.json'), 'utf8')) as {greedy: {prompt: string; prompt_ids: number[]}[]}
    for (const g of golden.greedy) assert.deepEqual(tok.encode(g.prompt), g.prompt_ids)
  })

  it('applies the chat template with a system message', () => {
    assert.ok(tok.hasChatTemplate)
    const text = tok.renderChat([{role: 'system', content: 'S'}, {role: 'user', content: 'hi'}], true)
    assert.equal(text, '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n')
    const ids = tok.encodeChat([{role: 'user', content: 'hi'}])
    assert.equal(ids[0], 257)
    assert.equal(tok.decodeWithSpecial(ids), '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n')
  })

  it('decodes without special tokens and ignores ids past its vocabulary', () => {
    assert.equal(tok.decode([104, 105, 258, 270]), 'hi')
  })

  it('streams multi-byte characters only once complete', () => {
    const text = 'héllo 日本 🙂!'
    const ids = tok.encode(text)
    assert.ok(ids.length > [...text].length, 'byte-level: more ids than characters')
    const detok = new IncrementalDetokenizer((x) => tok.decode(x))
    const pieces = ids.map((id) => detok.push(id))
    pieces.push(detok.flush())
    assert.equal(pieces.join(''), text)
    assert.ok(pieces.every((p) => !p.includes('\uFFFD')), JSON.stringify(pieces))
    // "日" is 3 bytes: nothing until its last byte, then the whole character
    const at = Buffer.byteLength('héllo ')
    assert.deepEqual(pieces.slice(at, at + 3), ['', '', '日'])
  })

  it('flushes an incomplete character as U+FFFD at the end', () => {
    const detok = new IncrementalDetokenizer((x) => tok.decode(x))
    assert.equal(detok.push(97), 'a')
    assert.equal(detok.push(230), '')
    assert.equal(detok.flush(), '\uFFFD')
  })

  it('reads generation defaults: an EOS list and the context', async () => {
    const d = await readGenerationDefaults(goldenDir('tiny-p4'))
    assert.deepEqual(d.eosTokenIds, [258, 256])
    assert.equal(d.contextLength, 4096)
    assert.equal(d.doSample, false)
    const tmp = makeTempDir()
    try {
      fs.writeFileSync(path.join(tmp, 'generation_config.json'), JSON.stringify({eos_token_id: 7, do_sample: true, temperature: 0.7, top_k: 20, top_p: 0.8, repetition_penalty: 1.05, max_new_tokens: 64}))
      assert.deepEqual(await readGenerationDefaults(tmp), {
        eosTokenIds: [7],
        maxNewTokens: 64,
        doSample: true,
        temperature: 0.7,
        topK: 20,
        topP: 0.8,
        repetitionPenalty: 1.05,
        contextLength: undefined,
      })
      fs.writeFileSync(path.join(tmp, 'generation_config.json'), '{nope')
      await assert.rejects(readGenerationDefaults(tmp), /generation_config\.json: not valid JSON/)
    } finally {
      fs.rmSync(tmp, {recursive: true, force: true})
    }
  })
})
