import assert from 'node:assert/strict'
import {execFile} from 'node:child_process'
import {existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync} from 'node:fs'
import {tmpdir} from 'node:os'
import {dirname, join, resolve} from 'node:path'
import {after, before, describe, it} from 'node:test'
import {fileURLToPath} from 'node:url'

import {startHubServer, type HubServer} from './helpers/hub-server.js'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
const RUN = join(ROOT, 'bin/run.js')
const P4 = join(ROOT, 'fixtures/golden/tiny-p4')
const P1 = join(ROOT, 'fixtures/golden/tiny-p1')

interface CliResult {
  code: number
  stdout: string
  stderr: string
}

let server: HubServer
let tmp: string

/** Runs the CLI as a child process (asynchronously: the hub server lives in this process). */
function cli(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
  const base: Record<string, string> = {}
  for (const [k, v] of Object.entries(process.env)) {
    if (v !== undefined && !/^(HF_|HUGGING|PARSCALE_|XDG_CACHE)/.test(k)) base[k] = v
  }
  return new Promise((resolvePromise) => {
    execFile(
      process.execPath,
      [RUN, ...args],
      {
        env: {
          ...base,
          HF_ENDPOINT: server.url,
          HF_HUB_CACHE: join(tmp, 'hub'),
          HF_HOME: join(tmp, 'hf-home'),
          PARSCALE_CACHE: join(tmp, 'parscale'),
          ...env,
        },
        timeout: 20_000,
      },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0
        resolvePromise({code, stdout: String(stdout), stderr: String(stderr)})
      },
    )
  })
}

function assertOneLineError(r: CliResult, pattern: RegExp): void {
  assert.equal(r.code, 1, `exit code (stderr: ${r.stderr})`)
  assert.equal(r.stdout, '')
  assert.match(r.stderr, /^parscale: [^\n]+\n$/, `one line on stderr: ${JSON.stringify(r.stderr)}`)
  assert.match(r.stderr, pattern)
}

describe('parscale pull / list / rm (CLI)', () => {
  before(async () => {
    tmp = mkdtempSync(join(tmpdir(), 'parscale-hub-cli-'))
    server = await startHubServer({
      token: 'hf_cli',
      lfsRedirect: true,
      repos: {
        'ParScale/tiny-p4': {dir: P4, exclude: ['golden.json']},
        'ParScale/tiny-p1': {dir: P1, exclude: ['golden.json']},
        'ParScale/gated': {dir: P1, exclude: ['golden.json'], access: 'gated'},
      },
    })
  })

  after(async () => {
    await server.close()
    rmSync(tmp, {recursive: true, force: true})
  })

  it('pull: a --json summary, a human summary, --token for a gated repo; nothing on stderr without a TTY', async () => {
    const [json, human, gated] = await Promise.all([
      cli(['pull', 'ParScale/tiny-p4', '--json']),
      cli(['pull', 'ParScale/tiny-p1@main']),
      cli(['pull', 'ParScale/gated', '--token', 'hf_cli', '--json']),
    ])
    for (const r of [json, human, gated]) {
      assert.equal(r.code, 0, r.stderr)
      assert.equal(r.stderr, '')
    }
    const summary = JSON.parse(json.stdout) as {repo_id: string; revision: string; commit: string; snapshot_dir: string; files: string[]; bytes: number; downloaded_bytes: number; seconds: number; offline: boolean}
    assert.deepEqual(Object.keys(summary), ['repo_id', 'revision', 'commit', 'snapshot_dir', 'files', 'bytes', 'downloaded_bytes', 'seconds', 'offline'], 'snake_case, as every JSON parscale prints')
    assert.equal(summary.repo_id, 'ParScale/tiny-p4')
    assert.equal(summary.revision, 'main')
    assert.equal(summary.commit, server.commitOf('ParScale/tiny-p4'))
    assert.ok(summary.files.includes('model-00002-of-00002.safetensors'))
    assert.ok(summary.bytes > 400_000)
    assert.equal(typeof summary.seconds, 'number')
    assert.equal(summary.offline, false)
    assert.deepEqual(readFileSync(join(summary.snapshot_dir, 'config.json')), readFileSync(join(P4, 'config.json')))

    const lines = human.stdout.trimEnd().split('\n')
    assert.equal(lines.length, 2)
    assert.match(lines[0], /^ParScale\/tiny-p1@main \([0-9a-f]{7}\): 5 files, [\d.]+ kB, [\d.]+ kB downloaded in /)
    assert.ok(existsSync(join(lines[1], 'model.safetensors')))

    assert.ok(server.requests.some((q) => q.path.startsWith('/api/models/ParScale/gated') && q.authorization === 'Bearer hf_cli'))
  })

  it('HF_HUB_OFFLINE=1 resolves a pulled model from the cache, and fails clearly for others', async () => {
    const [ok, missing] = await Promise.all([
      cli(['pull', 'ParScale/tiny-p4', '--json'], {HF_HUB_OFFLINE: '1', HF_ENDPOINT: 'http://127.0.0.1:9'}),
      cli(['pull', 'ParScale/other'], {HF_HUB_OFFLINE: '1'}),
    ])
    assert.equal(ok.code, 0, ok.stderr)
    assert.equal((JSON.parse(ok.stdout) as {offline: boolean}).offline, true)
    assertOneLineError(missing, /ParScale\/other is not in the Hugging Face cache .* HF_HUB_OFFLINE=1/)
  })

  it('after a pull, run, eval and convert take the repo id and work offline', async () => {
    const offline = {HF_HUB_OFFLINE: '1', HF_ENDPOINT: 'http://127.0.0.1:9', PARSCALE_CACHE: join(tmp, 'parscale-offline')}
    const golden = JSON.parse(readFileSync(join(P4, 'golden.json'), 'utf8')) as {greedy: {prompt: string; new_ids: number[]}[]; eval: {text: string; mean_nll: number}}
    const run = await cli(['run', 'ParScale/tiny-p4', '--raw', '--prompt', golden.greedy[0].prompt, '--max-new-tokens', '24', '--temperature', '0', '--json'], offline)
    assert.equal(run.code, 0, run.stderr)
    assert.deepEqual((JSON.parse(run.stdout) as {token_ids: number[]}).token_ids, golden.greedy[0].new_ids)
    const textFile = join(tmp, 'eval.txt')
    writeFileSync(textFile, golden.eval.text)
    const evaluated = await cli(['eval', 'ParScale/tiny-p4', '--text-file', textFile, '--json'], offline)
    assert.equal(evaluated.code, 0, evaluated.stderr)
    assert.ok(Math.abs((JSON.parse(evaluated.stdout) as {mean_nll: number}).mean_nll - golden.eval.mean_nll) < 1e-3)
    const out = join(tmp, 'tiny-p4-onnx')
    const converted = await cli(['convert', 'ParScale/tiny-p4', '--out', out, '--json'], offline)
    assert.equal(converted.code, 0, converted.stderr)
    assert.deepEqual((JSON.parse(readFileSync(join(out, 'parscale.json'), 'utf8')) as {parallel: number[]}).parallel, [4])
  })

  it('errors are one line with exit 1: 404, 401, --parallel, network down', async () => {
    const down = await startHubServer({repos: {}})
    await down.close()
    const [notFound, gated, parallel, offline] = await Promise.all([
      cli(['pull', 'ParScale/nope']),
      cli(['pull', 'ParScale/gated']),
      cli(['pull', 'ParScale/ParScale-1.8B-P1-Inst', '--parallel', '3']),
      cli(['pull', 'ParScale/tiny-p4'], {HF_ENDPOINT: down.url}),
    ])
    assertOneLineError(notFound, /^parscale: repository ParScale\/nope not found at http:\/\/127\.0\.0\.1:\d+\n$/)
    assertOneLineError(gated, /HTTP 401.*gated.*--token.*HF_TOKEN/)
    assertOneLineError(parallel, /ParScale\/ParScale-1\.8B-Inst is published for P = 1, 2, 4, 8, not P = 3/)
    assertOneLineError(offline, new RegExp(`cannot reach the hub at ${down.url.replace(/[/.]/g, '\\$&')} \\(ECONNREFUSED\\)`))
  })

  it('list shows checkpoints (P, dtype) and converted packages; rm removes them', async () => {
    const pkg = join(tmp, 'parscale', 'converted', 'tiny-p4-abc123')
    mkdirSync(pkg, {recursive: true})
    writeFileSync(join(pkg, 'parscale.json'), JSON.stringify({format: 'parscale-onnx', source: 'ParScale/tiny-p4', parallel: [4], dtype: 'float32'}))
    writeFileSync(join(pkg, 'model_p4.onnx'), Buffer.alloc(1000))

    const listed = await cli(['list', '--json'])
    assert.equal(listed.code, 0, listed.stderr)
    const inv = JSON.parse(listed.stdout) as {
      hub_cache: string
      converted_cache: string
      checkpoints: {repo_id: string; revision: string; parallel: number; dtype: string; size_bytes: number; path: string; complete: boolean}[]
      packages: {name: string; source: string; parallel: number[]; dtype: string; size_bytes: number}[]
    }
    assert.deepEqual(Object.keys(inv), ['hub_cache', 'checkpoints', 'converted_cache', 'packages'])
    const byRepo = Object.fromEntries(inv.checkpoints.map((c) => [c.repo_id, c]))
    assert.deepEqual(Object.keys(byRepo).sort(), ['ParScale/gated', 'ParScale/tiny-p1', 'ParScale/tiny-p4'])
    assert.equal(byRepo['ParScale/tiny-p4'].parallel, 4)
    assert.equal(byRepo['ParScale/tiny-p4'].dtype, 'bfloat16')
    assert.equal(byRepo['ParScale/tiny-p4'].revision, 'main')
    assert.equal(byRepo['ParScale/tiny-p4'].complete, true)
    assert.equal(byRepo['ParScale/tiny-p1'].parallel, 1)
    assert.equal(byRepo['ParScale/tiny-p1'].dtype, 'float32')
    assert.deepEqual(inv.packages.map((p) => [p.name, p.source, p.parallel, p.dtype]), [['tiny-p4-abc123', 'ParScale/tiny-p4', [4], 'float32']])
    assert.ok(inv.packages[0].size_bytes >= 1000)

    const table = await cli(['list'])
    assert.equal(table.code, 0, table.stderr)
    assert.match(table.stdout, /ParScale\/tiny-p4\s+main \([0-9a-f]{7}\)\s+[\d.]+ kB\s+4\s+bfloat16\s+\//)
    assert.match(table.stdout, /tiny-p4-abc123\s+ParScale\/tiny-p4\s+4\s+float32/)

    const rm = await cli(['rm', 'parscale/tiny-p4', '--json'])
    assert.equal(rm.code, 0, rm.stderr)
    const removed = JSON.parse(rm.stdout) as {removed: {kind: string; name: string; path: string}[]; bytes: number}
    assert.deepEqual(removed.removed.map((x) => [x.kind, x.name]), [
      ['checkpoint', 'ParScale/tiny-p4'],
      ['converted', 'tiny-p4-abc123'],
    ])
    assert.ok(removed.bytes > 400_000)
    assert.equal(existsSync(join(tmp, 'hub', 'models--ParScale--tiny-p4')), false)
    assert.equal(existsSync(pkg), false)

    assert.ok(existsSync(join(tmp, 'hub', 'models--ParScale--tiny-p1')), 'other repos stay')

    assertOneLineError(await cli(['rm', 'ParScale/tiny-p4']), /nothing to remove: ParScale\/tiny-p4 is not in the Hugging Face cache/)
    const plain = await cli(['rm', 'ParScale/tiny-p1@main'])
    assert.equal(plain.code, 0, plain.stderr)
    assert.match(plain.stdout, /^removed checkpoint ParScale\/tiny-p1@main \([\d.]+ kB\): \//)
    assert.equal(existsSync(join(tmp, 'hub', 'models--ParScale--tiny-p1')), false, 'last snapshot gone: the repo folder goes too')
  })
})
