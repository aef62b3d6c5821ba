// A converted package with a truncated or missing file: converted again by itself when its
// checkpoint is here (the embedded model, a folder it records), one line on stderr saying so;
// else one line naming the `parscale rm …` (or folder) that clears it.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, it} from 'node:test'

import {runCli} from './helpers/cli.js'
import {copyCheckpointWith, goldenDir, makeTempDir} from './helpers/safetensors-writer.js'

const tmp = makeTempDir('parscale-damaged-')
after(() => fs.rmSync(tmp, {recursive: true, force: true}))

function truncate(file: string, bytes: number): void {
  fs.truncateSync(file, bytes)
}

function tokens(stdout: string): number[] {
  return (JSON.parse(stdout) as {token_ids: number[]}).token_ids
}

describe('a damaged converted package', () => {
  it('of the embedded default model is converted again by itself, saying so in one line', async () => {
    const env = {PARSCALE_CACHE: path.join(tmp, 'cache-default')}
    const args = ['run', '--prompt', 'def fibonacci(n):', '-n', '4', '--parallel', '2', '--json']
    const first = await runCli(args, {env})
    assert.equal(first.code, 0, first.stderr)
    const converted = path.join(env.PARSCALE_CACHE, 'converted')
    const [name] = fs.readdirSync(converted)
    const backbone = path.join(converted, name!, 'backbone.weights')
    const size = fs.statSync(backbone).size
    truncate(backbone, 1000)
    const repaired = await runCli(args, {env})
    assert.equal(repaired.code, 0, repaired.stderr)
    assert.equal(repaired.stderr, `parscale: ${backbone}: is 1000 bytes, the manifest says ${size}; the package is damaged; converting the default model again\n`)
    assert.deepEqual(tokens(repaired.stdout), tokens(first.stdout))
    assert.equal(fs.statSync(backbone).size, size)
    const again = await runCli(args, {env})
    assert.equal(again.stderr, '', 'repaired once, for good')
  })

  it('given by its folder, is converted again in place from the checkpoint its manifest records', async () => {
    const env = {PARSCALE_CACHE: path.join(tmp, 'cache-folder')}
    const out = path.join(tmp, 'tiny-p4-onnx')
    assert.equal((await runCli(['convert', goldenDir('tiny-p4'), '--out', out], {env})).code, 0)
    const args = ['run', out, '--raw', '--prompt', 'The quick brown fox', '-n', '6', '--temperature', '0', '--json']
    const first = await runCli(args, {env})
    assert.equal(first.code, 0, first.stderr)
    fs.rmSync(path.join(out, 'p4.weights'))
    const repaired = await runCli(args, {env})
    assert.equal(repaired.code, 0, repaired.stderr)
    assert.match(repaired.stderr, /^parscale: .*p4\.weights: missing from the model package; the package is damaged; converting it again from .*tiny-p4\n$/)
    assert.deepEqual(tokens(repaired.stdout), tokens(first.stdout))
  })

  it('whose checkpoint is gone: one line naming the exact `parscale rm` that clears it (or the folder to delete)', async () => {
    const env = {PARSCALE_CACHE: path.join(tmp, 'cache-gone')}
    const checkpoint = copyCheckpointWith(goldenDir('tiny-p1'), path.join(tmp, 'short-lived'))
    assert.equal((await runCli(['run', checkpoint, '--raw', '--prompt', 'a', '-n', '1'], {env})).code, 0)
    const converted = path.join(env.PARSCALE_CACHE, 'converted')
    const [name] = fs.readdirSync(converted)
    const cached = path.join(converted, name!)
    const out = path.join(tmp, 'short-lived-onnx')
    assert.equal((await runCli(['convert', checkpoint, '--out', out], {env})).code, 0)
    fs.rmSync(checkpoint, {recursive: true})
    for (const dir of [cached, out]) truncate(path.join(dir, 'model.onnx'), 10)

    const inCache = await runCli(['run', cached, '--raw', '--prompt', 'a', '-n', '1'], {env})
    assert.equal(inCache.code, 1)
    assert.equal(inCache.stdout, '')
    const rm = `parscale rm ${name} --converted`
    assert.match(inCache.stderr, /^parscale: .*model\.onnx: is 10 bytes, the manifest says \d+; the package is damaged, and its checkpoint is not on this machine: remove it with `parscale rm \S+ --converted`, then convert the checkpoint again\n$/)
    assert.ok(inCache.stderr.includes(`\`${rm}\``), inCache.stderr)
    const removed = await runCli(rm.split(' ').slice(1), {env})
    assert.equal(removed.code, 0, removed.stderr)
    assert.ok(!fs.existsSync(cached), 'the command it names clears it')

    const outside = await runCli(['run', out, '--raw', '--prompt', 'a', '-n', '1'], {env})
    assert.equal(outside.code, 1)
    assert.match(outside.stderr, new RegExp(`^parscale: .*the package is damaged, and its checkpoint is not on this machine: delete ${out.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}, then convert the checkpoint again\\n$`))
  })

  it('with a manifest that cannot be read: converted again from the checkpoint given, else `parscale rm` finds and clears it', async () => {
    const env = {PARSCALE_CACHE: path.join(tmp, 'cache-manifest')}
    const checkpoint = copyCheckpointWith(goldenDir('tiny-p1'), path.join(tmp, 'manifest-source'))
    const args = ['run', checkpoint, '--raw', '--prompt', 'a', '-n', '1', '--json']
    assert.equal((await runCli(args, {env})).code, 0)
    const converted = path.join(env.PARSCALE_CACHE, 'converted')
    const [name] = fs.readdirSync(converted)
    const manifest = path.join(converted, name!, 'parscale.json')
    fs.writeFileSync(manifest, '{"format": "parscale-onnx", ')
    const fixed = await runCli(args, {env})
    assert.equal(fixed.code, 0, fixed.stderr)
    assert.match(fixed.stderr, /^parscale: .*parscale\.json: not valid JSON .*; the package is damaged; converting .*manifest-source again\n$/)

    fs.writeFileSync(manifest, '{"format": "parscale-onnx", ')
    const r = await runCli(['run', path.join(converted, name!), '--raw', '--prompt', 'a', '-n', '1'], {env})
    assert.equal(r.code, 1)
    assert.ok(r.stderr.includes(`remove it with \`parscale rm ${name} --converted\``), r.stderr)
    assert.equal(r.stderr.split('\n').length, 2, 'one line')
    const removed = await runCli(['rm', name!, '--converted'], {env})
    assert.equal(removed.code, 0, removed.stderr)
    assert.deepEqual(fs.readdirSync(converted), [])
  })
})
