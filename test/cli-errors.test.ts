// How the CLI ends when something is wrong: one `parscale: …` line on stderr, exit 2 for a
// command line that is wrong anywhere (usage), 1 for what fails at run time; help and version.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, it} from 'node:test'

import {type CliResult, runCli} from './helpers/cli.js'
import {copyCheckpointWith, goldenDir, makeTempDir} from './helpers/safetensors-writer.js'

const tmp = makeTempDir('parscale-cli-errors-')
after(() => fs.rmSync(tmp, {recursive: true, force: true}))
const env = {PARSCALE_CACHE: path.join(tmp, 'cache')}

/** Exactly one stderr line `parscale: …` holding every part, the exit code, nothing on stdout. */
function oneLine(r: CliResult, code: number, ...parts: (string | RegExp)[]): string {
  assert.equal(r.code, code, `exit code; stderr: ${r.stderr}`)
  assert.equal(r.stdout, '')
  assert.match(r.stderr, /^parscale: [^\n]+\n$/, `one line on stderr: ${JSON.stringify(r.stderr)}`)
  for (const part of parts) {
    if (typeof part === 'string') assert.ok(r.stderr.includes(part), `${JSON.stringify(r.stderr)} lacks ${JSON.stringify(part)}`)
    else assert.match(r.stderr, part)
  }
  return r.stderr
}

describe('unknown commands', () => {
  it('a command that does not exist is a usage error naming it, with the closest ones', async () => {
    oneLine(await runCli(['bogus']), 2, 'unknown command "bogus"', '`parscale --help` lists the commands')
    oneLine(await runCli(['rnu', 'hello']), 2, 'unknown command "rnu"', 'did you mean', '`parscale run`')
  })

  it('inside a topic, it points at the topic and spells commands with spaces', async () => {
    const r = oneLine(await runCli(['batch', 'foo']), 2, 'unknown command "batch foo"', '`parscale batch --help`')
    assert.doesNotMatch(r, /batch:/)
    oneLine(await runCli(['batch', 'sumbit', 'x.jsonl']), 2, 'did you mean `parscale batch submit`?')
  })

  it('a parser error names the command as it is typed (batch submit, not batch:submit)', async () => {
    const r = oneLine(await runCli(['batch', 'submit', 'x.jsonl', '--queue', 'redis://127.0.0.1:9', '--bogus']), 2, 'Nonexistent flag: --bogus', '`parscale batch submit --help`')
    assert.doesNotMatch(r, /batch:submit/)
  })
})

describe('usage errors exit 2, runtime failures 1', () => {
  it('bad flag values of every kind are usage errors', async () => {
    oneLine(await runCli(['run', '--parallel', '0', 'hi'], {env}), 2, '--parallel must be a whole number >= 1 or auto (got "0")')
    oneLine(await runCli(['serve', '--port', 'eighty'], {env}), 2, '--port must be')
    oneLine(await runCli(['serve', '--max-batch', '0'], {env}), 2, '--max-batch')
    oneLine(await runCli(['worker', '--queue', 'redis://127.0.0.1:9', '--batch-size', '0'], {env}), 2, '--batch-size')
    oneLine(await runCli(['worker', '--queue', 'http://127.0.0.1:9'], {env}), 2, '--queue must be a redis:// or rediss:// URL')
    oneLine(await runCli(['bench', '--parallel', '1,x'], {env}), 2, '--parallel must be a comma-separated list')
    oneLine(await runCli(['bench', '--vs-params'], {env}), 2, '--vs-params needs a synthetic shape')
    oneLine(await runCli(['bench', '--synthetic', 'huge'], {env}), 2, 'unknown synthetic shape "huge"')
    oneLine(await runCli(['convert', goldenDir('tiny-p1'), '--quant', 'int4', '--dtype', 'fp16', '--out', path.join(tmp, 'never')], {env}), 2, '--quant and --dtype fp16')
    oneLine(await runCli(['pull', 'ParScale/x@'], {env}), 2, 'empty revision')
    oneLine(await runCli(['eval'], {env}), 2, 'Missing required flag text-file')
    assert.ok(!fs.existsSync(env.PARSCALE_CACHE), 'nothing was converted')
  })

  it('what depends on the machine is a runtime failure', async () => {
    oneLine(await runCli(['run', path.join(tmp, 'no-such-model'), 'hi'], {env}), 1, 'no-such-model')
    oneLine(await runCli(['eval', '--text-file', path.join(tmp, 'missing.txt')], {env}), 1, 'missing.txt: cannot read the text file (no such file)')
  })
})

describe('errors that used to span lines', () => {
  it('PARSCALE_CACHE naming a file is one line naming the variable', async () => {
    const file = path.join(tmp, 'a-file')
    fs.writeFileSync(file, 'x')
    oneLine(await runCli(['run', '--prompt', 'hi', '-n', '1'], {env: {PARSCALE_CACHE: file}}), 1, `PARSCALE_CACHE=${file} is a file, not a folder`)
    oneLine(await runCli(['list'], {env: {PARSCALE_CACHE: file}}), 1, 'PARSCALE_CACHE')
  })

  it('a config.json parse error whose message quotes a newline stays on one line', async () => {
    const checkpoint = copyCheckpointWith(goldenDir('tiny-p1'), path.join(tmp, 'broken-config'), (dir) => fs.writeFileSync(path.join(dir, 'config.json'), 'hello\nworld'))
    oneLine(await runCli(['run', checkpoint, 'hi'], {env}), 1, 'config.json: is not valid JSON', '"hello\\nworld"')
  })
})

describe('help and version', () => {
  it('-h, --help and `help` show the command list; `help CMD` and `CMD -h` a command\'s help', async () => {
    for (const args of [['-h'], ['--help'], ['help'], []]) {
      const r = await runCli(args)
      assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`)
      for (const s of ['USAGE', 'COMMANDS', 'run', 'batch', 'serve']) assert.ok(r.stdout.includes(s), `${args.join(' ')}: no ${s}`)
    }
    for (const args of [['help', 'run'], ['run', '-h'], ['run', '--help']]) {
      const r = await runCli(args)
      assert.equal(r.code, 0, r.stderr)
      assert.match(r.stdout, /\$ parscale run \[MODEL\] \[PROMPT\]/)
    }
    const nested = await runCli(['help', 'batch', 'submit'])
    assert.equal(nested.code, 0, nested.stderr)
    assert.match(nested.stdout, /\$ parscale batch submit FILE/)
    oneLine(await runCli(['help', 'bogus']), 2, 'unknown command "bogus"')
  })

  it('-v and --version print the version', async () => {
    for (const flag of ['-v', '--version']) {
      const r = await runCli([flag])
      assert.equal(r.code, 0, r.stderr)
      assert.match(r.stdout, /^parscale\/\d+\.\d+\.\d+ /)
    }
  })
})
