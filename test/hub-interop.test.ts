import assert from 'node:assert/strict'
import {mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync} from 'node:fs'
import {tmpdir} from 'node:os'
import {dirname, join, resolve} from 'node:path'
import {after, before, describe, it} from 'node:test'
import {fileURLToPath} from 'node:url'

import {scanCacheDir, snapshotDownload} from '@huggingface/hub'

import {findCachedSnapshot, repoCachePaths} from '../src/core/hub/cache.js'
import {pullModel} from '../src/core/hub/pull.js'
import {startHubServer, type HubServer} from './helpers/hub-server.js'

/**
 * The cache layout against an implementation we did not write: @huggingface/hub's own
 * `snapshotDownload` (which also exercises the test server as a client other than ours) and
 * `scanCacheDir`.
 */

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
const P4 = join(ROOT, 'fixtures/golden/tiny-p4')
const REPO = 'ParScale/tiny-p4'
const ENV_KEYS = ['HF_HUB_CACHE', 'HF_HOME', 'HF_ENDPOINT', 'HF_TOKEN', 'HF_HUB_OFFLINE'] as const

let server: HubServer
let tmp: string
let saved: Record<string, string | undefined>

describe('cache interop with @huggingface/hub', () => {
  before(async () => {
    saved = Object.fromEntries(ENV_KEYS.map((k) => [k, process.env[k]]))
    for (const k of ENV_KEYS) delete process.env[k]
    tmp = mkdtempSync(join(tmpdir(), 'parscale-interop-'))
    process.env.HF_HOME = join(tmp, 'hf-home')
    server = await startHubServer({repos: {[REPO]: {dir: P4, exclude: ['golden.json']}}, lfsRedirect: true})
    process.env.HF_ENDPOINT = server.url
  })

  after(async () => {
    await server.close()
    for (const k of ENV_KEYS) {
      if (saved[k] === undefined) delete process.env[k]
      else process.env[k] = saved[k]
    }
    rmSync(tmp, {recursive: true, force: true})
  })

  it("finds and reuses a snapshot written by @huggingface/hub's snapshotDownload", async () => {
    const cacheDir = join(tmp, 'theirs')
    const debug = console.debug
    console.debug = () => undefined // it logs every file it downloads
    let theirs: string
    try {
      theirs = await snapshotDownload({repo: REPO, cacheDir, hubUrl: server.url})
    } finally {
      console.debug = debug
    }
    process.env.HF_HUB_CACHE = cacheDir
    assert.equal(findCachedSnapshot(REPO), theirs)
    const before = server.requests.length
    const ours = await pullModel({repoId: REPO})
    assert.equal(ours.snapshotDir, theirs)
    assert.equal(ours.downloadedBytes, 0, 'nothing downloaded again')
    assert.ok(!server.requests.slice(before).some((r) => r.path.includes('/resolve/')), 'no file fetched')

    // Same blob names and links as ours would be.
    const mine = join(tmp, 'ours')
    process.env.HF_HUB_CACHE = mine
    const fresh = await pullModel({repoId: REPO})
    for (const f of readdirSync(P4).filter((n) => n !== 'golden.json')) {
      assert.equal(readlinkSync(join(fresh.snapshotDir, f)), readlinkSync(join(theirs, f)), f)
      assert.deepEqual(readFileSync(join(theirs, f)), readFileSync(join(P4, f)))
    }
    assert.equal(
      readFileSync(join(repoCachePaths(REPO, cacheDir).refsDir, 'main'), 'utf8'),
      readFileSync(join(repoCachePaths(REPO, mine).refsDir, 'main'), 'utf8'),
    )
  })

  it("is read by @huggingface/hub's scanCacheDir", async () => {
    const cacheDir = join(tmp, 'scan')
    process.env.HF_HUB_CACHE = cacheDir
    const pulled = await pullModel({repoId: REPO})
    const info = await scanCacheDir(cacheDir)
    assert.deepEqual(info.warnings, [])
    assert.equal(info.repos.length, 1)
    const repo = info.repos[0]
    assert.deepEqual(repo.id, {name: REPO, type: 'model'})
    assert.equal(repo.revisions.length, 1)
    assert.equal(repo.revisions[0].commitOid, pulled.commit)
    assert.deepEqual(repo.revisions[0].refs, ['main'])
    assert.equal(repo.revisions[0].files.length, pulled.files.length)
    assert.equal(repo.size, pulled.bytes)
  })
})
