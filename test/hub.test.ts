import assert from 'node:assert/strict'
import {spawnSync} from 'node:child_process'
import {createHash} from 'node:crypto'
import {existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync, writeFileSync} from 'node:fs'
import {hostname, tmpdir} from 'node:os'
import {dirname, join, resolve} from 'node:path'
import {afterEach, beforeEach, describe, it} from 'node:test'
import {fileURLToPath} from 'node:url'

import {UserError} from '../src/core/errors.js'
import {findCachedSnapshot, hubCacheDir, listCachedModels, repoCachePaths} from '../src/core/hub/cache.js'
import {pullModel, type PullProgress} from '../src/core/hub/pull.js'
import {toUserError} from '../src/core/hub/errors.js'
import {startHubServer, type HubServer, type HubServerOptions} from './helpers/hub-server.js'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
const P4 = join(ROOT, 'fixtures/golden/tiny-p4')
const P1 = join(ROOT, 'fixtures/golden/tiny-p1')
const REPO = 'ParScale/tiny-p4'
const FAST = {retry: {baseDelayMs: 5, maxDelayMs: 20}}
const ENV_KEYS = ['HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HF_HOME', 'HF_ENDPOINT', 'HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_HUB_OFFLINE', 'HF_TOKEN_PATH', 'XDG_CACHE_HOME']

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex')
const gitOid = (b: Buffer): string => createHash('sha1').update(`blob ${b.length}\0`).update(b).digest('hex')
const fixtureFiles = (dir: string): string[] => readdirSync(dir).filter((f) => f !== 'golden.json').sort()

let saved: Record<string, string | undefined>
let tmp: string
let server: HubServer | undefined

async function serve(opts: Partial<HubServerOptions> = {}): Promise<HubServer> {
  server = await startHubServer({
    repos: {[REPO]: {dir: P4, exclude: ['golden.json']}, 'ParScale/tiny-p1': {dir: P1, exclude: ['golden.json']}},
    ...opts,
  })
  process.env.HF_ENDPOINT = server.url
  return server
}

/** Every file under `dir`, relative, following nothing. */
function walk(dir: string, prefix = ''): string[] {
  if (!existsSync(dir)) return []
  return readdirSync(dir).flatMap((name) => {
    const full = join(dir, name)
    return lstatSync(full).isDirectory() ? walk(full, `${prefix}${name}/`) : [`${prefix}${name}`]
  })
}

async function rejectsUser(p: Promise<unknown>, ...patterns: RegExp[]): Promise<UserError> {
  let caught: unknown
  await p.catch((err) => (caught = err))
  assert.ok(caught instanceof UserError, `expected a UserError, got ${caught}`)
  assert.ok(!caught.message.includes('\n'), 'one line')
  for (const re of patterns) assert.match(caught.message, re)
  return caught
}

beforeEach(() => {
  saved = Object.fromEntries(ENV_KEYS.map((k) => [k, process.env[k]]))
  for (const k of ENV_KEYS) delete process.env[k]
  tmp = mkdtempSync(join(tmpdir(), 'parscale-hub-'))
  process.env.HF_HUB_CACHE = join(tmp, 'hub')
  process.env.HF_HOME = join(tmp, 'hf-home')
})

afterEach(async () => {
  await server?.close()
  server = undefined
  for (const k of ENV_KEYS) {
    if (saved[k] === undefined) delete process.env[k]
    else process.env[k] = saved[k]
  }
  rmSync(tmp, {recursive: true, force: true})
})

describe('pullModel', () => {
  it('pulls into the Hugging Face cache layout, then resolves offline', async () => {
    const s = await serve({lfsRedirect: true, pageSize: 3})
    const events: PullProgress[] = []
    const result = await pullModel({repoId: REPO, onProgress: (p) => events.push(p), ...FAST})
    const commit = s.commitOf(REPO)
    const paths = repoCachePaths(REPO)

    assert.equal(result.commit, commit)
    assert.equal(result.snapshotDir, join(process.env.HF_HUB_CACHE!, 'models--ParScale--tiny-p4', 'snapshots', commit))
    assert.deepEqual([...result.files].sort(), fixtureFiles(P4))
    const total = fixtureFiles(P4).reduce((a, f) => a + readFileSync(join(P4, f)).length, 0)
    assert.equal(result.bytes, total)
    assert.equal(result.downloadedBytes, total)
    assert.equal(readFileSync(join(paths.refsDir, 'main'), 'utf8'), commit, 'refs/main holds the commit, no newline')

    for (const f of fixtureFiles(P4)) {
      const link = join(result.snapshotDir, f)
      const data = readFileSync(join(P4, f))
      assert.ok(lstatSync(link).isSymbolicLink(), `${f} is a symlink`)
      const blob = f.endsWith('.safetensors') ? sha256(data) : gitOid(data)
      assert.equal(readlinkSync(link), `../../blobs/${blob}`, `${f} links relatively to its blob`)
      assert.deepEqual(readFileSync(link), data)
    }
    assert.deepEqual(walk(paths.blobsDir).filter((b) => b.includes('.incomplete')), [])

    // Progress: resolving first, done last, bytes reach the total.
    assert.equal(events[0].phase, 'resolving')
    assert.equal(events.at(-1)!.phase, 'done')
    assert.equal(events.at(-1)!.bytes, total)
    assert.equal(events.at(-1)!.filesDone, fixtureFiles(P4).length)

    // Pagination and the CDN redirect were exercised.
    assert.ok(s.requests.some((r) => r.path.includes('cursor=3')))
    assert.ok(s.requests.some((r) => r.path.startsWith('/cdn-lfs/')))

    // A second pull downloads nothing.
    const again = await pullModel({repoId: REPO, ...FAST})
    assert.equal(again.downloadedBytes, 0)
    assert.equal(again.snapshotDir, result.snapshotDir)

    // Offline, with the server gone.
    await s.close()
    server = undefined
    process.env.HF_HUB_OFFLINE = '1'
    const offline = await pullModel({repoId: REPO})
    assert.equal(offline.offline, true)
    assert.equal(offline.snapshotDir, result.snapshotDir)
    assert.equal(offline.commit, commit)
    assert.equal(offline.bytes, total)
    assert.equal(findCachedSnapshot(REPO), result.snapshotDir)
    assert.equal(findCachedSnapshot(REPO, commit), result.snapshotDir)
    assert.equal(findCachedSnapshot(`${REPO}@main`), result.snapshotDir)
    assert.equal(findCachedSnapshot(REPO, 'v2'), undefined)
    const listed = listCachedModels()
    assert.equal(listed.length, 1)
    assert.deepEqual(
      {repoId: listed[0].repoId, revision: listed[0].revision, snapshotDir: listed[0].snapshotDir, sizeBytes: listed[0].sizeBytes},
      {repoId: REPO, revision: 'main', snapshotDir: result.snapshotDir, sizeBytes: total},
    )
  })

  it('resumes a connection dropped mid-file with a Range request', async () => {
    const file = 'model-00002-of-00002.safetensors'
    const s = await serve({dropOnce: {path: file, afterBytes: 100_000}})
    const result = await pullModel({repoId: REPO, ...FAST})
    const ranges = s.requests.filter((r) => r.path.endsWith(file) && r.range && r.range !== 'bytes=0-0')
    assert.equal(ranges.length, 1, 'one resume')
    const start = Number(/^bytes=(\d+)-$/.exec(ranges[0].range!)![1])
    assert.ok(start > 0 && start <= 100_000, `resumed at ${start}`)
    assert.deepEqual(readFileSync(join(result.snapshotDir, file)), readFileSync(join(P4, file)))
  })

  it('resumes a partial download left by an earlier process', async () => {
    const s = await serve()
    const file = 'model-00001-of-00002.safetensors'
    const data = readFileSync(join(P4, file))
    const {blobsDir} = repoCachePaths(REPO)
    mkdirSync(blobsDir, {recursive: true})
    writeFileSync(join(blobsDir, `${sha256(data)}.incomplete`), data.subarray(0, 70_000))
    const result = await pullModel({repoId: REPO, ...FAST})
    assert.ok(s.requests.some((r) => r.path.endsWith(file) && r.range === 'bytes=70000-'))
    assert.deepEqual(readFileSync(join(result.snapshotDir, file)), data)
  })

  it('starts over once when a resumed partial does not verify', async () => {
    await serve()
    const file = 'model-00001-of-00002.safetensors'
    const data = readFileSync(join(P4, file))
    const {blobsDir} = repoCachePaths(REPO)
    mkdirSync(blobsDir, {recursive: true})
    writeFileSync(join(blobsDir, `${sha256(data)}.incomplete`), Buffer.alloc(5000, 7))
    const result = await pullModel({repoId: REPO, ...FAST})
    assert.deepEqual(readFileSync(join(result.snapshotDir, file)), data)
  })

  it('refuses a file whose bytes do not match its sha256, leaving nothing in the snapshot', async () => {
    const file = 'model-00001-of-00002.safetensors'
    const s = await serve({corrupt: [file]})
    await rejectsUser(pullModel({repoId: REPO, ...FAST}), new RegExp(`^${file.replace(/\./g, '\\.')}: sha256 mismatch`), /discarded/)
    const paths = repoCachePaths(REPO)
    const snapshot = join(paths.snapshotsDir, s.commitOf(REPO))
    assert.equal(existsSync(join(snapshot, file)), false)
    assert.deepEqual(walk(snapshot), [], 'nothing left in the snapshot')
    assert.equal(existsSync(snapshot), false)
    assert.equal(existsSync(join(paths.blobsDir, s.sha256Of(REPO, file))), false)
    assert.deepEqual(walk(paths.blobsDir).filter((b) => b.includes('incomplete')), [], 'no stray partial file')
    assert.equal(existsSync(join(paths.refsDir, 'main')), false)
    assert.equal(findCachedSnapshot(REPO), undefined)
  })

  it('explains 401/403 for gated and private repos, and sends the token', async () => {
    const token = 'hf_testtoken'
    const s = await serve({
      token,
      repos: {[REPO]: {dir: P4, exclude: ['golden.json'], access: 'gated'}, 'ParScale/secret': {dir: P1, exclude: ['golden.json'], access: 'private'}},
    })
    await rejectsUser(pullModel({repoId: REPO, ...FAST}), /HTTP 401/, /gated/, /--token/, /HF_TOKEN/)
    await rejectsUser(pullModel({repoId: REPO, token: 'hf_wrong', ...FAST}), /HTTP 403/, /gated/, /--token/, /HF_TOKEN/)
    await rejectsUser(pullModel({repoId: 'ParScale/secret', ...FAST}), /ParScale\/secret was not found/, /private or gated/, /--token/, /HF_TOKEN/)

    process.env.HF_TOKEN = token
    const result = await pullModel({repoId: REPO, ...FAST})
    assert.deepEqual([...result.files].sort(), fixtureFiles(P4))
    const hubRequests = s.requests.filter((r) => !r.path.startsWith('/cdn-lfs/'))
    assert.ok(hubRequests.at(-1)!.authorization === `Bearer ${token}`)
    // --token wins over HF_TOKEN.
    process.env.HF_TOKEN = 'hf_other'
    rmSync(process.env.HF_HUB_CACHE!, {recursive: true})
    await pullModel({repoId: 'ParScale/secret', token, ...FAST})
  })

  it('names a missing repo or revision (404), with close published names', async () => {
    const s = await serve()
    await rejectsUser(pullModel({repoId: 'ParScale/nope', ...FAST}), new RegExp(`^repository ParScale/nope not found at ${s.url}$`))
    await rejectsUser(pullModel({repoId: 'ParScale/ParScale-1.8B-P4-Instt', ...FAST}), /not found/, /did you mean ParScale\/ParScale-1\.8B-P4-Inst\b/)
    await rejectsUser(pullModel({repoId: REPO, revision: 'v9', ...FAST}), /^revision "v9" not found in ParScale\/tiny-p4/)
    await rejectsUser(pullModel({repoId: `${REPO}@v9`, ...FAST}), /^revision "v9" not found/)
  })

  it('retries 5xx answers with backoff, and gives up with a clear message', async () => {
    const s = await serve({fail: {match: '/revision/', status: 503, times: 2}})
    await pullModel({repoId: REPO, ...FAST})
    assert.equal(s.requests.filter((r) => r.path.includes('/revision/')).length, 3)
    await s.close()
    const broken = await serve({fail: {match: '/tree/', status: 500}})
    await rejectsUser(pullModel({repoId: 'ParScale/tiny-p1', retry: {attempts: 3, baseDelayMs: 5}}), /HTTP 500/, /after several tries/)
    assert.equal(broken.requests.filter((r) => r.path.includes('/tree/')).length, 3)
  })

  it('HF_HUB_OFFLINE=1 without the cache: a clear error and no request', async () => {
    const s = await serve()
    process.env.HF_HUB_OFFLINE = '1'
    await rejectsUser(pullModel({repoId: REPO}), /not in the Hugging Face cache/, /HF_HUB_OFFLINE=1/, new RegExp(hubCacheDir().replace(/[/.]/g, '\\$&')))
    assert.equal(s.requests.length, 0)
  })

  it('names the endpoint when the network is down', async () => {
    const s = await serve()
    const url = s.url
    await s.close()
    server = undefined
    process.env.HF_ENDPOINT = url
    await rejectsUser(pullModel({repoId: REPO, ...FAST}), new RegExp(`cannot reach the hub at ${url.replace(/[/.]/g, '\\$&')} \\(ECONNREFUSED\\)`))
  })

  for (const bad of ['../../evil.safetensors', '/tmp/evil.json', 'a\\..\\..\\config.json', 'sub/../../config.json']) {
    it(`refuses a listing with the unsafe name ${JSON.stringify(bad)}`, async () => {
      await serve({
        repos: {[REPO]: {dir: P4, exclude: ['golden.json'], extraTreeEntries: [{type: 'file', path: bad, size: 3, oid: 'a'.repeat(40)}]}},
      })
      await rejectsUser(pullModel({repoId: REPO, ...FAST}), /unsafe file name/, /refusing/)
      assert.deepEqual(walk(tmp).filter((f) => f.includes('evil')), [])
      assert.equal(existsSync('/tmp/evil.json'), false)
      assert.equal(existsSync(repoCachePaths(REPO).snapshotsDir), false)
    })
  }

  it('takes what running needs plus --include globs, never pickles or code', async () => {
    const s = await serve({
      repos: {
        [REPO]: {
          dir: P4,
          exclude: ['golden.json'],
          files: {
            'README.md': '# tiny\n',
            'pytorch_model.bin': 'pickle',
            'modeling_qwen2_parscale.py': 'import os\n',
            'training_args.pt': 'pickle',
            'special_tokens_map.json': '{}',
            'extra/notes.txt': 'x',
          },
        },
      },
    })
    const result = await pullModel({repoId: REPO, include: ['README.md', '**'], ...FAST})
    assert.ok(result.files.includes('README.md'))
    assert.ok(result.files.includes('special_tokens_map.json'))
    assert.ok(result.files.includes('extra/notes.txt'))
    for (const never of ['pytorch_model.bin', 'modeling_qwen2_parscale.py', 'training_args.pt']) {
      assert.ok(!result.files.includes(never), never)
      assert.ok(!s.requests.some((r) => r.path.endsWith(never)), `${never} never requested`)
    }
    assert.equal(readFileSync(join(result.snapshotDir, 'extra/notes.txt'), 'utf8'), 'x')
    assert.equal(readlinkSync(join(result.snapshotDir, 'extra/notes.txt')).split('/').slice(0, 3).join('/'), '../../..')
  })

  it('finishes a snapshot that Python huggingface_hub started, reusing its files', async () => {
    const s = await serve()
    const commit = s.commitOf(REPO)
    const paths = repoCachePaths(REPO)
    const config = readFileSync(join(P4, 'config.json'))
    mkdirSync(paths.blobsDir, {recursive: true})
    mkdirSync(join(paths.snapshotsDir, commit), {recursive: true})
    mkdirSync(paths.refsDir, {recursive: true})
    writeFileSync(join(paths.blobsDir, gitOid(config)), config)
    symlinkSync(`../../blobs/${gitOid(config)}`, join(paths.snapshotsDir, commit, 'config.json'))
    writeFileSync(join(paths.refsDir, 'main'), commit)
    assert.equal(findCachedSnapshot(REPO), undefined, 'config alone is not a usable snapshot')
    await pullModel({repoId: REPO, ...FAST})
    assert.ok(!s.requests.some((r) => r.path.endsWith('/config.json')), 'config.json not downloaded again')
    assert.equal(findCachedSnapshot(REPO), join(paths.snapshotsDir, commit))
  })

  it('two concurrent pulls of one model share the work through a lock', async () => {
    const s = await serve({chunkDelayMs: 5})
    const [a, b] = await Promise.all([pullModel({repoId: REPO, ...FAST}), pullModel({repoId: REPO, ...FAST})])
    assert.equal(a.snapshotDir, b.snapshotDir)
    for (const f of fixtureFiles(P4)) {
      assert.deepEqual(readFileSync(join(a.snapshotDir, f)), readFileSync(join(P4, f)))
      const bodies = s.requests.filter((r) => r.path.endsWith(`/${f}`) && r.range !== 'bytes=0-0')
      assert.equal(bodies.length, 1, `${f} downloaded once`)
    }
    assert.equal(a.downloadedBytes + b.downloadedBytes, a.bytes)
    assert.deepEqual(readdirSync(repoCachePaths(REPO).locksDir), [], 'locks released')
  })

  it('takes over a lock left by a process that died', async () => {
    const s = await serve()
    const dead = spawnSync(process.execPath, ['-e', '']).pid!
    const file = 'model-00002-of-00002.safetensors'
    const {locksDir} = repoCachePaths(REPO)
    mkdirSync(locksDir, {recursive: true})
    writeFileSync(join(locksDir, `${s.sha256Of(REPO, file)}.parscale.lock`), JSON.stringify({pid: dead, host: hostname(), token: 'x'}))
    const started = Date.now()
    const result = await pullModel({repoId: REPO, ...FAST})
    assert.ok(Date.now() - started < 5000)
    assert.deepEqual(readFileSync(join(result.snapshotDir, file)), readFileSync(join(P4, file)))
  })

  it('stops on abort, keeping the partial file for a later resume', async () => {
    const file = 'model-00002-of-00002.safetensors'
    const s = await serve({chunkDelayMs: 20})
    const ctrl = new AbortController()
    const pending = pullModel({
      repoId: REPO,
      signal: ctrl.signal,
      concurrency: 1,
      onProgress: (p) => {
        if (p.file === file && (p.fileBytes ?? 0) > 40_000) ctrl.abort(new UserError('stop'))
      },
      ...FAST,
    })
    await rejectsUser(pending, /^stop$/)
    const paths = repoCachePaths(REPO)
    assert.deepEqual(walk(join(paths.snapshotsDir)), [])
    const partial = join(paths.blobsDir, `${s.sha256Of(REPO, file)}.incomplete`)
    assert.ok(existsSync(partial))
    const have = lstatSync(partial).size
    await pullModel({repoId: REPO, ...FAST})
    assert.ok(s.requests.some((r) => r.range === `bytes=${have}-`), 'resumed where it stopped')
  })

  it('refuses a repo without config.json or safetensors weights', async () => {
    await serve({
      repos: {
        'org/bin-only': {files: {'config.json': '{}', 'pytorch_model.bin': 'x'}},
        'org/no-config': {files: {'model.safetensors': 'x'}},
      },
    })
    await rejectsUser(pullModel({repoId: 'org/bin-only', ...FAST}), /no \*\.safetensors weights/)
    await rejectsUser(pullModel({repoId: 'org/no-config', ...FAST}), /no config\.json/)
  })

  it('rejects malformed repo ids and revisions before any request', async () => {
    const s = await serve()
    await rejectsUser(pullModel({repoId: '../etc'}), /not a Hugging Face repo id/)
    await rejectsUser(pullModel({repoId: 'a/b/c'}), /not a Hugging Face repo id/)
    await rejectsUser(pullModel({repoId: REPO, revision: '../../x'}), /not a valid revision/)
    assert.equal(s.requests.length, 0)
  })
})

describe('hub errors and cache location', () => {
  it('maps disk-full and permission errors to one line naming the path', () => {
    const ctx = {repoId: REPO, revision: 'main', endpoint: 'https://hub.example'}
    const full = toUserError(Object.assign(new Error('write ENOSPC'), {code: 'ENOSPC', path: '/cache/blobs/x.incomplete'}), ctx)
    assert.ok(full instanceof UserError)
    assert.match(full.message, /^disk full while writing \/cache\/blobs\/x\.incomplete/)
    const denied = toUserError(Object.assign(new Error('EACCES'), {code: 'EACCES', path: '/cache'}), ctx)
    assert.match(denied.message, /cannot write \/cache \(EACCES\)/)
    const dns = toUserError(new TypeError('fetch failed', {cause: Object.assign(new Error('getaddrinfo'), {code: 'ENOTFOUND'})}), ctx)
    assert.match(dns.message, /cannot reach the hub at https:\/\/hub\.example \(ENOTFOUND\)/)
  })

  it('finds the cache as huggingface_hub does: HF_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME, ~/.cache', () => {
    process.env.HF_HUB_CACHE = '/a/hub-cache'
    assert.equal(hubCacheDir(), '/a/hub-cache')
    delete process.env.HF_HUB_CACHE
    process.env.HF_HOME = '/b/hf'
    assert.equal(hubCacheDir(), '/b/hf/hub')
    delete process.env.HF_HOME
    process.env.XDG_CACHE_HOME = '/c/xdg'
    assert.equal(hubCacheDir(), '/c/xdg/huggingface/hub')
    delete process.env.XDG_CACHE_HOME
    assert.match(hubCacheDir(), /\.cache\/huggingface\/hub$/)
  })
})
