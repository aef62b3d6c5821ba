import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, it} from 'node:test'

import {parseBatchFile, readBatchFile} from '../src/core/run/batch-file.js'
import {FileFormatError} from '../src/core/errors.js'
import {makeTempDir} from './helpers/safetensors-writer.js'

const F = 'prompts.jsonl'

function refuses(text: string, where: string, ...parts: string[]): void {
  assert.throws(() => parseBatchFile(text, F), (err: unknown) => {
    assert.ok(err instanceof FileFormatError, String(err))
    assert.ok(err.message.startsWith(`${where}: `), err.message)
    for (const p of parts) assert.ok(err.message.includes(p), `"${err.message}" lacks "${p}"`)
    assert.ok(!err.message.includes('\n'))
    return true
  })
}

describe('batch file', () => {
  const tmp = makeTempDir()
  after(() => fs.rmSync(tmp, {recursive: true, force: true}))

  it('parses prompts and messages with per-line options, skipping blank lines', () => {
    const text = [
      '{"prompt": "The quick brown fox"}',
      '',
      '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "max_new_tokens": 5}',
      '{"prompt": "P=8", "temperature": 0.7}\r',
      '',
      '{"prompt": "at two streams", "parallel": 2}',
    ].join('\n')
    const items = parseBatchFile(text, F)
    assert.equal(items.length, 4)
    assert.deepEqual(items[0], {line: 1, input: {kind: 'prompt', text: 'The quick brown fox'}})
    assert.deepEqual(items[1], {
      line: 3,
      input: {kind: 'messages', messages: [{role: 'system', content: 'be brief'}, {role: 'user', content: 'hi'}]},
      maxNewTokens: 5,
    })
    assert.deepEqual(items[2], {line: 4, input: {kind: 'prompt', text: 'P=8'}, temperature: 0.7})
    assert.deepEqual(items[3], {line: 6, input: {kind: 'prompt', text: 'at two streams'}, parallel: 2})
  })

  it('reports the first bad line as FILE:LINE', () => {
    refuses('{"prompt": "a"}\n{"prompt": "b"\n', `${F}:2`, 'not valid JSON')
    refuses('{"prompt": "a"}\n\n[1, 2]', `${F}:3`, 'JSON object')
    refuses('{"prompt": "a", "messages": []}', `${F}:1`, 'exactly one')
    refuses('{"max_new_tokens": 3}', `${F}:1`, 'exactly one')
    refuses('{"prompt": ""}', `${F}:1`, '"prompt"')
    refuses('{"prompt": 3}', `${F}:1`, '"prompt"')
    refuses('{"messages": []}', `${F}:1`, '"messages"')
    refuses('{"messages": [{"role": "user"}]}', `${F}:1`, 'messages[0]')
    refuses('{"prompt": "a", "max_new_tokens": 0}', `${F}:1`, 'max_new_tokens')
    refuses('{"prompt": "a", "max_new_tokens": 2.5}', `${F}:1`, 'max_new_tokens')
    refuses('{"prompt": "a", "temperature": -1}', `${F}:1`, 'temperature')
    refuses('{"prompt": "a", "temperature": "hot"}', `${F}:1`, 'temperature')
    refuses('{"prompt": "a", "top_k": 3}', `${F}:1`, 'unknown field "top_k"', 'max_new_tokens (or max_tokens)', 'id')
    refuses('{"prompt": "a", "max_tokens": 3, "max_new_tokens": 4}', `${F}:1`, '"max_new_tokens" (4) and "max_tokens" (3) differ')
    refuses('{"prompt": "a", "max_tokens": 0}', `${F}:1`, '"max_tokens" must be a whole number >= 1')
    refuses('{"prompt": "a", "id": null}', `${F}:1`, '"id" must be a string or a number')
    refuses('{"prompt": "a", "id": {"x": 1}}', `${F}:1`, '"id" must be a string or a number')
    refuses('{"prompt": "a", "parallel": 0}', `${F}:1`, '"parallel" must be a whole number >= 1')
    refuses('{"prompt": "a", "parallel": "8"}', `${F}:1`, '"parallel"')
  })

  it('takes max_tokens (serve\'s name) for max_new_tokens, both when they agree, and an id', () => {
    const items = parseBatchFile(['{"prompt": "a", "max_tokens": 7}', '{"prompt": "b", "max_tokens": 5, "max_new_tokens": 5, "id": "q2"}', '{"id": 3, "prompt": "c"}'].join('\n'), F)
    assert.deepEqual(items, [
      {line: 1, input: {kind: 'prompt', text: 'a'}, maxNewTokens: 7},
      {line: 2, id: 'q2', input: {kind: 'prompt', text: 'b'}, maxNewTokens: 5},
      {line: 3, id: 3, input: {kind: 'prompt', text: 'c'}},
    ])
  })

  it('refuses an empty file', () => {
    refuses('\n\n', F, 'no prompts')
  })

  it('reads from disk and names a missing file', async () => {
    const file = path.join(tmp, 'ok.jsonl')
    fs.writeFileSync(file, '{"prompt": "x"}\n')
    assert.equal((await readBatchFile(file)).length, 1)
    await assert.rejects(readBatchFile(path.join(tmp, 'missing.jsonl')), /missing\.jsonl: no such file/)
  })
})
