// Text read as bytes (stdin, --batch files, --text-file) is UTF-8 or refused in one line that
// names where the first bad byte is.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, it} from 'node:test'

import {decodeUtf8, invalidUtf8Offset, lineAt} from '../src/core/utf8.js'
import {UserError} from '../src/core/errors.js'
import {type CliResult, runCli} from './helpers/cli.js'
import {makeTempDir} from './helpers/safetensors-writer.js'

const bytes = (...parts: (string | number[])[]) => Buffer.concat(parts.map((p) => (typeof p === 'string' ? Buffer.from(p, 'utf8') : Buffer.from(p))))

describe('UTF-8 checks', () => {
  it('finds the offset of the first bad byte, past real U+FFFD characters and a BOM', () => {
    assert.equal(invalidUtf8Offset(bytes('plain ascii, é, ✓, 😀')), -1)
    assert.equal(invalidUtf8Offset(bytes([0xff, 0xfe])), 0)
    assert.equal(invalidUtf8Offset(bytes('ab', [0xc0, 0xaf])), 2, 'an overlong encoding')
    assert.equal(invalidUtf8Offset(bytes('\uFFFD x \uFFFD', [0x80])), 9, 'U+FFFD typed in the text is not the bad byte')
    assert.equal(invalidUtf8Offset(bytes([0xef, 0xbb, 0xbf], 'é', [0xff])), 5, 'offsets count the BOM')
    assert.equal(invalidUtf8Offset(bytes('abc', [0xe2, 0x82])), 3, 'a character cut at the end')
    assert.equal(invalidUtf8Offset(bytes([0xed, 0xa0, 0x80])), 0, 'a UTF-16 surrogate')
  })

  it('decodes valid text (BOM dropped) and refuses bad bytes naming the source', () => {
    assert.equal(decodeUtf8(bytes([0xef, 0xbb, 0xbf], 'hi'), () => 'x'), 'hi')
    const input = bytes('{"prompt": "a"}\n{"prompt": "b', [0xff], '"}\n')
    assert.equal(lineAt(input, invalidUtf8Offset(input)), 2)
    assert.throws(
      () => decodeUtf8(input, (offset) => `f.jsonl:${lineAt(input, offset)}`),
      (error: unknown) => error instanceof UserError && error.exitCode === 1 && error.message === 'f.jsonl:2: not valid UTF-8 (byte 0xFF at offset 29); parscale reads text as UTF-8',
    )
  })
})

describe('the CLI refuses bytes that are not UTF-8', () => {
  const tmp = makeTempDir('parscale-utf8-')
  after(() => fs.rmSync(tmp, {recursive: true, force: true}))
  const env = {PARSCALE_CACHE: path.join(tmp, 'cache')}
  const model = 'fixtures/golden/tiny-p1'

  function refused(r: CliResult, message: string): void {
    assert.equal(r.code, 1, r.stderr)
    assert.equal(r.stdout, '')
    assert.equal(r.stderr, `parscale: ${message}; parscale reads text as UTF-8\n`)
  }

  it('a prompt on stdin', async () => {
    refused(await runCli(['run', model, '--raw', '-n', '2'], {env, input: bytes([0xff, 0xfe])}), 'stdin: not valid UTF-8 (byte 0xFF at offset 0)')
    const ok = await runCli(['run', model, '--raw', '-n', '2', '--json'], {env, input: bytes('caf\u00e9 \uFFFD\n')})
    assert.equal(ok.code, 0, ok.stderr)
  })

  it('a --batch file, by line', async () => {
    const file = path.join(tmp, 'bad.jsonl')
    fs.writeFileSync(file, bytes('{"prompt": "fine"}\n{"prompt": "caf\u00e9"}\n{"prompt": "x', [0xc3], '"}\n'))
    refused(await runCli(['run', model, '--batch', file, '--json'], {env}), `${file}:3: not valid UTF-8 (byte 0xC3 at offset 52)`)
  })

  it('a --text-file, and the same from stdin', async () => {
    const file = path.join(tmp, 'bad.txt')
    fs.writeFileSync(file, bytes('def f():\n    return', [0x80]))
    refused(await runCli(['eval', model, '--text-file', file], {env}), `${file}: not valid UTF-8 (byte 0x80 at offset 19)`)
    refused(await runCli(['eval', model, '--text-file', '-'], {env, input: fs.readFileSync(file)}), 'stdin: not valid UTF-8 (byte 0x80 at offset 19)')
  })

  it('piped chat lines', async () => {
    const r = await runCli(['run', model, '--chat', '--raw', '-n', '2', '--json'], {env, input: bytes('hello\n', [0xff], '\n')})
    assert.equal(r.code, 1, r.stderr)
    assert.equal(r.stderr, 'parscale: stdin: not valid UTF-8 (byte 0xFF at offset 6); parscale reads text as UTF-8\n')
  })
})
