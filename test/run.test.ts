// `parscale run` end to end: the CLI as a user and a script call it.
import assert from 'node:assert/strict'
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, it} from 'node:test'

import {goldenDir, makeTempDir} from './helpers/safetensors-writer.js'

interface Golden {
  greedy: {prompt: string; prompt_ids: number[]; new_ids: number[]}[]
}

interface JsonResult {
  text: string
  token_ids: number[]
  finish_reason: string
  prompt_tokens: number
  generated_tokens: number
  parallel: number
  ttft_ms: number
  decode_tokens_per_s: number
  prefill_tokens?: number
  reused_tokens?: number
}

const CASES = ['tiny-p1', 'tiny-p4', 'tiny-p2-tied']
const root = path.resolve(goldenDir('tiny-p1'), '../../..')
const bin = path.join(root, 'bin', 'run.js')
const cacheDir = makeTempDir('parscale-run-')
const tmp = makeTempDir('parscale-run-files-')
after(() => {
  fs.rmSync(cacheDir, {recursive: true, force: true})
  fs.rmSync(tmp, {recursive: true, force: true})
})

function run(args: string[], input?: string) {
  const r = spawnSync(process.execPath, [bin, 'run', ...args], {
    cwd: root,
    input: input ?? '',
    encoding: 'utf8',
    env: {...process.env, PARSCALE_CACHE: cacheDir},
    timeout: 120_000,
  })
  return {status: r.status, stdout: r.stdout, stderr: r.stderr}
}

function jsonLines(stdout: string): JsonResult[] {
  return stdout.trim().split('\n').map((line) => JSON.parse(line) as JsonResult)
}

function golden(name: string): Golden {
  return JSON.parse(fs.readFileSync(path.join(goldenDir(name), 'golden.json'), 'utf8')) as Golden
}

function jsonl(name: string, lines: unknown[]): string {
  const file = path.join(tmp, name)
  fs.writeFileSync(file, lines.map((l) => (typeof l === 'string' ? l : JSON.stringify(l))).join('\n') + '\n')
  return file
}

/** One line on stderr, `parscale: …`, exit 1 (a runtime failure), nothing on stdout. */
function refused(r: ReturnType<typeof run>, ...parts: string[]): void {
  refusedWith(1, r, ...parts)
}

/** The same for a usage error: exit 2. */
function misused(r: ReturnType<typeof run>, ...parts: string[]): void {
  refusedWith(2, r, ...parts)
}

function refusedWith(status: number, r: ReturnType<typeof run>, ...parts: string[]): void {
  assert.equal(r.status, status, r.stderr)
  assert.equal(r.stdout, '')
  const lines = r.stderr.trim().split('\n')
  assert.equal(lines.length, 1, r.stderr)
  assert.ok(lines[0].startsWith('parscale: '), r.stderr)
  for (const p of parts) assert.ok(lines[0].includes(p), `"${lines[0]}" lacks "${p}"`)
}

describe('parscale run: golden greedy ids', () => {
  for (const name of CASES) {
    it(`${name}: each prompt alone gives golden new_ids`, () => {
      for (const g of golden(name).greedy) {
        const r = run([`fixtures/golden/${name}`, '--raw', '--prompt', g.prompt, '--max-new-tokens', '24', '--temperature', '0', '--json'])
        assert.equal(r.status, 0, r.stderr)
        const [out] = jsonLines(r.stdout)
        assert.deepEqual(out.token_ids, g.new_ids, `${name}: ${g.prompt}`)
        assert.equal(out.prompt_tokens, g.prompt_ids.length)
        assert.equal(out.generated_tokens, g.new_ids.length)
        assert.equal(out.finish_reason, g.new_ids.length < 24 ? 'stop' : 'length')
        assert.ok(out.parallel >= 1)
        assert.equal(typeof out.ttft_ms, 'number')
        assert.equal(typeof out.decode_tokens_per_s, 'number')
        assert.equal(typeof out.text, 'string')
      }
    })

    it(`${name}: --batch with all prompts in one batch gives the same ids, in order`, () => {
      const g = golden(name).greedy
      const file = jsonl(`${name}.jsonl`, g.map((x) => ({prompt: x.prompt})))
      const r = run([`fixtures/golden/${name}`, '--batch', file, '--raw', '--max-new-tokens', '24', '--temperature', '0', '--json'])
      assert.equal(r.status, 0, r.stderr)
      const out = jsonLines(r.stdout)
      assert.deepEqual(out.map((o) => o.token_ids), g.map((x) => x.new_ids))
      assert.deepEqual(out.map((o) => o.prompt_tokens), g.map((x) => x.prompt_ids.length))
    })
  }

  it('P > 1 with left padding: batch sizes 2 and 3 agree with one at a time, stdin prompt too', () => {
    const g = golden('tiny-p4').greedy
    assert.ok(jsonLines(run(['fixtures/golden/tiny-p4', '--raw', '-n', '1', '--temperature', '0', '--json', '--prompt', 'x']).stdout)[0].parallel === 4)
    const file = jsonl('p4-twice.jsonl', [...g, ...g].map((x) => ({prompt: x.prompt})))
    const r = run(['fixtures/golden/tiny-p4', '--batch', file, '--batch-size', '2', '--raw', '-n', '24', '--temperature', '0', '--json'])
    assert.equal(r.status, 0, r.stderr)
    assert.deepEqual(jsonLines(r.stdout).map((o) => o.token_ids), [...g, ...g].map((x) => x.new_ids))
    const piped = run(['fixtures/golden/tiny-p4', '--raw', '-n', '24', '--temperature', '0', '--json'], g[2].prompt + '\n')
    assert.equal(piped.status, 0, piped.stderr)
    assert.deepEqual(jsonLines(piped.stdout)[0].token_ids, g[2].new_ids)
  })
})

describe('parscale run: modes and output', () => {
  const model = 'fixtures/golden/tiny-p4'

  it('one-shot streams text to stdout and a timing line to stderr; --quiet drops it', () => {
    const args = [model, '--raw', '--prompt', 'P=8', '-n', '10', '--temperature', '0']
    const json = jsonLines(run([...args, '--json']).stdout)[0]
    const r = run(args)
    assert.equal(r.status, 0, r.stderr)
    assert.equal(r.stdout, json.text + '\n')
    assert.match(r.stderr, /P=4 .*TTFT \d+ ms .*10 tokens at [\d.]+ tokens\/s/)
    const q = run([...args, '--quiet'])
    assert.equal(q.stderr, '')
    assert.equal(q.stdout, r.stdout)
  })

  it('a single argument that is not a model is the prompt (for the default model)', () => {
    const r = run(['no such model, a prompt', '--json', '-n', '1'])
    // The default model may not be built yet; either it runs or it names the default model.
    if (r.status === 0) assert.equal(jsonLines(r.stdout)[0].prompt_tokens > 0, true)
    else assert.doesNotMatch(r.stderr, /unknown model/)
  })

  it('the chat template wraps the prompt unless --raw; --system adds a message', () => {
    const raw = jsonLines(run([model, '--raw', '--prompt', 'hi', '-n', '1', '--temperature', '0', '--json']).stdout)[0]
    const chat = jsonLines(run([model, '--prompt', 'hi', '-n', '1', '--temperature', '0', '--json']).stdout)[0]
    const sys = jsonLines(run([model, '--prompt', 'hi', '--system', 'S', '-n', '1', '--temperature', '0', '--json']).stdout)[0]
    assert.equal(raw.prompt_tokens, 2)
    // <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n
    assert.equal(chat.prompt_tokens, 1 + 5 + 2 + 1 + 1 + 1 + 10)
    // + <|im_start|>system\nS<|im_end|>\n
    assert.equal(sys.prompt_tokens, chat.prompt_tokens + 1 + 7 + 1 + 1 + 1)
  })

  it('seeded sampling: same seed, same output; stop strings cut the text', () => {
    const args = [model, '--raw', '--prompt', 'The quick brown fox', '-n', '20', '--temperature', '1.5', '--top-k', '50', '--top-p', '0.95', '--json']
    const a = jsonLines(run([...args, '--seed', '7']).stdout)[0]
    const b = jsonLines(run([...args, '--seed', '7']).stdout)[0]
    const c = jsonLines(run([...args, '--seed', '8']).stdout)[0]
    assert.deepEqual(a.token_ids, b.token_ids)
    assert.notDeepEqual(a.token_ids, c.token_ids)
    // golden continuation of "The quick brown fox" begins "Dc"
    const s = jsonLines(run([model, '--raw', '--prompt', 'The quick brown fox', '-n', '24', '--temperature', '0', '--stop', 'c', '--json']).stdout)[0]
    assert.equal(s.text, 'D')
    assert.equal(s.finish_reason, 'stop')
    assert.deepEqual(s.token_ids, [68, 99])
  })

  it('chat keeps the cache: the second turn prefills only its own new tokens', () => {
    const r = run([model, '--chat', '--json', '-n', '6', '--temperature', '0'], 'hello\nhow are you\n')
    assert.equal(r.status, 0, r.stderr)
    const [t1, t2] = jsonLines(r.stdout)
    assert.equal(t1.reused_tokens, 0)
    assert.equal(t1.prefill_tokens, t1.prompt_tokens)
    // the cache holds turn 1's prompt and answer except its last token, not fed yet
    assert.equal(t2.reused_tokens, t1.prompt_tokens + t1.generated_tokens - 1)
    assert.equal(t2.prefill_tokens, t2.prompt_tokens - t2.reused_tokens)
    // that last token, <|im_end|>\n closing the answer, then the new turn:
    // <|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\n
    assert.equal(t2.prefill_tokens, 1 + 2 + (1 + 5 + 11 + 1 + 1 + 1 + 10))
  })

  it('piped chat text is a transcript: each line sent after "> ", its answer, a blank line', () => {
    const answer = (text: string) => jsonLines(run([model, '--chat', '--json', '-n', '4', '--temperature', '0'], `${text}\n`).stdout)[0].text
    const r = run([model, '--chat', '-n', '4', '--temperature', '0'], 'hello\n\n/reset\nhow are you\n')
    assert.equal(r.status, 0, r.stderr)
    assert.equal(r.stdout, `> hello\n${answer('hello')}\n\n> /reset\n> how are you\n${answer('how are you')}\n\n`)
  })

  it('chat commands: /reset starts over, /parallel needs a P the model has', () => {
    const r = run([model, '--chat', '--json', '-n', '3', '--temperature', '0'], 'hello\n/reset\nhello\n/parallel 3\n/nope\n/exit\nnever sent\n')
    assert.equal(r.status, 0, r.stderr)
    const [t1, t2] = jsonLines(r.stdout)
    assert.deepEqual(t2, {...t2, reused_tokens: 0, token_ids: t1.token_ids, prompt_tokens: t1.prompt_tokens})
    assert.equal(jsonLines(r.stdout).length, 2, '/exit ends the chat')
    assert.match(r.stderr, /conversation cleared/)
    assert.match(r.stderr, /\/parallel takes one of 4/)
    assert.match(r.stderr, /unknown command \/nope/)
  })

  it('--help teaches: description, flags and examples', () => {
    const r = spawnSync(process.execPath, [bin, 'run', '--help'], {cwd: root, encoding: 'utf8'})
    assert.equal(r.status, 0)
    for (const s of ['USAGE', 'MODEL', 'PROMPT', '--batch', '--parallel', '--temperature', '--stop', 'DESCRIPTION', 'EXAMPLES', 'chat', 'JSONL']) {
      assert.ok(r.stdout.includes(s), `help lacks ${s}`)
    }
    assert.ok((r.stdout.match(/\$ parscale run/g) ?? []).length >= 4, 'several examples')
  })
})

describe('parscale run: bad input', () => {
  const model = 'fixtures/golden/tiny-p1'

  it('a bad batch line is reported by FILE:LINE and nothing is generated', () => {
    const file = jsonl('bad.jsonl', [{prompt: 'fine'}, {prompt: 'fine'}, '{"prompt": "oops"', {prompt: 'fine'}])
    refused(run([model, '--batch', file, '--json']), `${file}:3: not valid JSON`)
    const keys = jsonl('keys.jsonl', [{prompt: 'a', max_tokens: 3, max_new_tokens: 4}])
    refused(run([model, '--batch', keys]), `${keys}:1:`, '"max_new_tokens" (4) and "max_tokens" (3) differ')
  })

  it('a batch line may say max_tokens, as serve does, and its id comes back on its result', () => {
    const file = jsonl('ids.jsonl', [{id: 'first', prompt: 'The quick', max_tokens: 3}, {prompt: 'brown fox', max_new_tokens: 3}, {id: 7, prompt: 'jumps', max_tokens: 2}])
    const r = run([model, '--batch', file, '--raw', '--temperature', '0', '--json'])
    assert.equal(r.status, 0, r.stderr)
    assert.equal(r.stderr, '', 'with --json and stderr not a terminal: no progress, no summary')
    const out = jsonLines(r.stdout) as (JsonResult & {id?: string | number})[]
    assert.deepEqual(out.map((o) => o.id), ['first', undefined, 7])
    assert.deepEqual(out.map((o) => o.generated_tokens), [3, 3, 2])
    assert.equal(Object.keys(out[0])[0], 'id', 'the id leads the object')
    const text = run([model, '--batch', file, '--raw', '--temperature', '0'])
    assert.match(text.stdout, new RegExp(`^\\[${file}:1 id first\\]\n`))
    assert.ok(text.stdout.includes(`[${file}:3 id 7]\n`))
  })

  it('a prompt longer than the context fails, --truncate keeps the tail', () => {
    const long = 'x'.repeat(5000)
    refused(run([model, '--raw', '--prompt', long, '-n', '4']), '5000 tokens', 'context is 4096', '--truncate')
    const r = run([model, '--raw', '--prompt', long, '-n', '4', '--truncate', '--temperature', '0', '--json'])
    assert.equal(r.status, 0, r.stderr)
    assert.equal(jsonLines(r.stdout)[0].prompt_tokens, 4092)
  })

  it('invalid flags and combinations are one clear line, exit 2 (usage)', () => {
    misused(run([model, '--prompt', 'a', '--temperature', '-1']), '--temperature')
    misused(run([model, '--prompt', 'a', '--top-p', '1.5']), '--top-p')
    misused(run([model, '--prompt', 'a', '-n', '0']), '--max-new-tokens')
    misused(run([model, '--prompt', 'a', '--parallel', '0']), '--parallel must be a whole number >= 1')
    misused(run([model, '--prompt', 'a', '--temperature', '0', '--top-k', '5']), '--top-k')
    misused(run([model, 'a', '--prompt', 'b']), 'once')
    misused(run([model, '--prompt', 'a', '--batch', 'x.jsonl']), '--batch')
    misused(run([model, '--chat', '--batch', 'x.jsonl']), '--batch')
    misused(run([model, '--chat', '--prompt', 'a']), '--chat')
    misused(run([model, '--raw', '--system', 'S', '--prompt', 'a']), '--system', '--raw')
    misused(run([model, '--prompt', '']), 'empty')
    misused(run([model, '--prompt', 'a', '--no-such-flag']), 'Nonexistent flag: --no-such-flag', '`parscale run --help`')
    misused(run([model, '--prompt', 'a', '--device', 'tpu']), '--device')
  })

  it('what the machine lacks is a runtime failure, exit 1', () => {
    refused(run(['fixtures/golden/tiny-p4', '--prompt', 'a', '--parallel', '3']), '--parallel 3', '4')
    refused(run(['./no/such/folder', 'hi']), 'no/such/folder')
    refused(run([model], ''), 'no prompt')
  })
})
