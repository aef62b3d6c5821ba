import {createHash} from 'node:crypto'
import {readdirSync, readFileSync, statSync} from 'node:fs'
import {createServer, type IncomingMessage, type ServerResponse} from 'node:http'
import type {AddressInfo} from 'node:net'
import {join} from 'node:path'

/**
 * A loopback server that answers like the Hugging Face Hub for the requests `@huggingface/hub`
 * and `huggingface_hub` make when downloading a model:
 *
 * - `GET /api/models/{org}/{name}[/revision/{rev}]`: repo info with `sha` and `siblings`
 * - `POST /api/models/{org}/{name}/paths-info/{rev}` (`{paths, expand}`): the same entries for
 *   the named paths (what `downloadFileToCacheDir` asks)
 * - `GET /api/models/{org}/{name}/tree/{rev}[/{path}]?recursive=`: the listing, with `oid`,
 *   `size` and `lfs: {oid (sha256), size, pointerSize}` for LFS files, paginated with
 *   `Link: <…>; rel="next"` when `pageSize` is set
 * - `GET|HEAD /{org}/{name}/resolve/{rev}/{path}`: the file with `ETag`, `X-Repo-Commit`,
 *   `Accept-Ranges` and Range support; LFS files also carry `X-Linked-Etag`/`X-Linked-Size` and,
 *   with `lfsRedirect`, answer 302 to `/cdn-lfs/{sha256}` as the Hub redirects to its CDN
 * - errors with `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`,
 *   `GatedRepo`) and a JSON `{error}` body
 *
 * Fault injection for tests: drop a connection mid-file, serve corrupt bytes, add names to
 * the listing, require a token.
 */

export interface RepoSpec {
  /** Folder whose files make up the repo (top level only). */
  dir?: string
  /** Files to leave out of `dir`. */
  exclude?: string[]
  /** Extra files, by repo path. */
  files?: Record<string, string | Buffer>
  /** Entries added to the tree listing as they are (e.g. unsafe names); not downloadable. */
  extraTreeEntries?: {type: string; path: string; size: number; oid: string; lfs?: {oid: string; size: number; pointerSize: number}}[]
  /** `gated`: 401 without the token, 403 with a wrong one. `private`: 401 RepoNotFound. */
  access?: 'public' | 'gated' | 'private'
  /** Other revision names (tags/branches) that resolve to the same commit. */
  aliases?: string[]
}

export interface HubServerOptions {
  repos: Record<string, RepoSpec>
  /** The token that opens gated and private repos. */
  token?: string
  /** Which files are stored with LFS (default: *.safetensors). */
  isLfs?: (path: string) => boolean
  /** Answer LFS resolves with a 302 to a CDN-like path on this server. */
  lfsRedirect?: boolean
  /** The first full GET of `path` sends its headers and `afterBytes` bytes, then drops the socket. */
  dropOnce?: {repo?: string; path: string; afterBytes: number}
  /** Serve these repo paths with one byte flipped (the listing keeps the true hashes). */
  corrupt?: string[]
  /** Listing page size (adds `Link: rel="next"`); default: everything at once. */
  pageSize?: number
  /** Delay each body chunk of file downloads by this many ms. */
  chunkDelayMs?: number
  /** The first `times` requests whose path contains `match` get `status` (all of them when `times` is absent). */
  fail?: {match: string; status: number; times?: number}
}

export interface LoggedRequest {
  method: string
  path: string
  range?: string
  authorization?: string
}

export interface HubServer {
  url: string
  requests: LoggedRequest[]
  /** The commit hash the server gives a repo. */
  commitOf(repo: string): string
  /** The sha256 of a repo file. */
  sha256Of(repo: string, path: string): string
  close(): Promise<void>
}

interface RepoFile {
  path: string
  data: Buffer
  sha256: string
  gitOid: string
  lfs: boolean
  pointer: Buffer
}

interface Repo {
  id: string
  spec: RepoSpec
  files: Map<string, RepoFile>
  commit: string
}

const sha256 = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex')
const gitOid = (b: Buffer): string => createHash('sha1').update(`blob ${b.length}\0`).update(b).digest('hex')

function loadRepo(id: string, spec: RepoSpec, isLfs: (p: string) => boolean): Repo {
  const files = new Map<string, RepoFile>()
  const add = (path: string, data: Buffer): void => {
    const digest = sha256(data)
    const pointer = Buffer.from(`version https://git-lfs.github.com/spec/v1\noid sha256:${digest}\nsize ${data.length}\n`)
    const lfs = isLfs(path)
    files.set(path, {path, data, sha256: digest, gitOid: gitOid(lfs ? pointer : data), lfs, pointer})
  }
  if (spec.dir) {
    for (const name of readdirSync(spec.dir).sort()) {
      const full = join(spec.dir, name)
      if (statSync(full).isFile() && !(spec.exclude ?? []).includes(name)) add(name, readFileSync(full))
    }
  }
  for (const [path, data] of Object.entries(spec.files ?? {})) add(path, Buffer.isBuffer(data) ? data : Buffer.from(data))
  const commit = createHash('sha1')
    .update(id)
    .update([...files.values()].map((f) => `${f.path}:${f.gitOid}`).sort().join('\n'))
    .digest('hex')
  return {id, spec, files, commit}
}

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body)
  res.writeHead(status, {'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), ...headers})
  res.end(text)
}

function sendError(res: ServerResponse, status: number, code: string, message: string): void {
  sendJson(res, status, {error: message}, {'x-error-code': code, 'x-error-message': message})
}

export async function startHubServer(opts: HubServerOptions): Promise<HubServer> {
  const isLfs = opts.isLfs ?? ((p: string) => p.endsWith('.safetensors'))
  const repos = new Map<string, Repo>()
  for (const [id, spec] of Object.entries(opts.repos)) repos.set(id, loadRepo(id, spec, isLfs))
  const requests: LoggedRequest[] = []
  let dropped = false
  let failed = 0
  let baseUrl = ''

  /** Checks access; answers and returns false when denied. */
  const allowed = (repo: Repo, req: IncomingMessage, res: ServerResponse): boolean => {
    const access = repo.spec.access ?? 'public'
    if (access === 'public') return true
    const auth = req.headers.authorization
    if (auth === `Bearer ${opts.token}`) return true
    if (access === 'private') {
      sendError(res, 401, 'RepoNotFound', 'Repository not found')
    } else if (!auth) {
      sendError(res, 401, 'GatedRepo', `Access to model ${repo.id} is restricted. You must have access to it and be authenticated to access it. Please log in.`)
    } else {
      sendError(res, 403, 'GatedRepo', `Access to model ${repo.id} is restricted and you are not in the authorized list.`)
    }
    return false
  }

  const resolveRev = (repo: Repo, rev: string): boolean => rev === 'main' || rev === repo.commit || (repo.spec.aliases ?? []).includes(rev)

  const findRepo = (org: string, name: string, res: ServerResponse): Repo | undefined => {
    const repo = repos.get(`${org}/${name}`)
    if (!repo) sendError(res, 404, 'RepoNotFound', 'Repository not found')
    return repo
  }

  const serveFile = async (repo: Repo, file: RepoFile, req: IncomingMessage, res: ServerResponse, extra: Record<string, string>): Promise<void> => {
    let data = file.data
    if ((opts.corrupt ?? []).includes(file.path)) {
      data = Buffer.from(data)
      data[Math.floor(data.length / 2)] ^= 0xff
    }
    const total = data.length
    const headers: Record<string, string> = {
      'accept-ranges': 'bytes',
      'content-type': 'application/octet-stream',
      etag: `"${file.lfs ? file.sha256 : file.gitOid}"`,
      ...extra,
    }
    let start = 0
    let end = total - 1
    let status = 200
    const range = req.headers.range
    if (range) {
      const m = /^bytes=(\d*)-(\d*)$/.exec(range)
      if (!m || (m[1] === '' && m[2] === '')) {
        res.writeHead(416, {'content-range': `bytes */${total}`})
        res.end()
        return
      }
      if (m[1] === '') {
        start = Math.max(0, total - Number(m[2]))
      } else {
        start = Number(m[1])
        if (m[2] !== '') end = Math.min(total - 1, Number(m[2]))
      }
      if (start >= total || start > end) {
        res.writeHead(416, {'content-range': `bytes */${total}`})
        res.end()
        return
      }
      status = 206
      headers['content-range'] = `bytes ${start}-${end}/${total}`
    }
    const body = data.subarray(start, end + 1)
    headers['content-length'] = String(body.length)
    res.writeHead(status, headers)
    if (req.method === 'HEAD') return void res.end()

    const drop = opts.dropOnce
    if (drop && !dropped && drop.path === file.path && (!drop.repo || drop.repo === repo.id) && start === 0 && body.length === total) {
      dropped = true
      res.write(body.subarray(0, drop.afterBytes), () => {
        setTimeout(() => res.socket?.destroy(), 20)
      })
      return
    }
    if (opts.chunkDelayMs) {
      for (let off = 0; off < body.length; off += 16384) {
        res.write(body.subarray(off, off + 16384))
        await new Promise((r) => setTimeout(r, opts.chunkDelayMs))
      }
      res.end()
      return
    }
    res.end(body)
  }

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', baseUrl)
    const path = url.pathname
    requests.push({
      method: req.method ?? 'GET',
      path: `${path}${url.search}`,
      range: req.headers.range,
      authorization: req.headers.authorization,
    })
    const parts = path.split('/').filter(Boolean).map(decodeURIComponent)
    const fail = opts.fail
    if (fail && path.includes(fail.match) && (fail.times === undefined || failed < fail.times)) {
      failed++
      return sendError(res, fail.status, 'Injected', `injected HTTP ${fail.status}`)
    }

    // /api/models/{org}/{name}[/revision/{rev}] and /api/models/{org}/{name}/tree/{rev}[/path]
    if (parts[0] === 'api' && parts[1] === 'models' && parts.length >= 4) {
      const repo = findRepo(parts[2], parts[3], res)
      if (!repo || !allowed(repo, req, res)) return
      const kind = parts[4]
      if (kind === undefined || kind === 'revision') {
        const rev = kind === 'revision' ? (parts[5] ?? 'main') : 'main'
        if (rev !== 'HEAD' && !resolveRev(repo, rev)) return sendError(res, 404, 'RevisionNotFound', `Invalid rev id: ${rev}`)
        return sendJson(res, 200, {
          _id: `id-${repo.commit.slice(0, 24)}`,
          id: repo.id,
          modelId: repo.id,
          author: repo.id.split('/')[0],
          sha: repo.commit,
          private: repo.spec.access === 'private',
          gated: repo.spec.access === 'gated' ? 'auto' : false,
          disabled: false,
          downloads: 0,
          likes: 0,
          tags: ['safetensors'],
          pipeline_tag: 'text-generation',
          library_name: 'transformers',
          lastModified: '2025-05-16T00:00:00.000Z',
          createdAt: '2025-05-16T00:00:00.000Z',
          siblings: [...repo.files.keys(), ...(repo.spec.extraTreeEntries ?? []).map((e) => e.path)].map((rfilename) => ({rfilename})),
        })
      }
      if (kind === 'paths-info' && req.method === 'POST') {
        const rev = parts[5] ?? 'main'
        if (!resolveRev(repo, rev)) return sendError(res, 404, 'RevisionNotFound', `Invalid rev id: ${rev}`)
        const chunks: Buffer[] = []
        for await (const chunk of req) chunks.push(chunk as Buffer)
        const body = JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}') as {paths?: string[]; expand?: boolean}
        const out = (body.paths ?? []).flatMap((p) => {
          const f = repo.files.get(p)
          if (!f) return []
          return [
            {
              type: 'file',
              path: f.path,
              oid: f.gitOid,
              size: f.lfs ? f.pointer.length : f.data.length,
              ...(f.lfs ? {lfs: {oid: f.sha256, size: f.data.length, pointerSize: f.pointer.length}} : {}),
              ...(body.expand ? {lastCommit: {id: repo.commit, title: 'Upload', date: '2025-05-16T00:00:00.000Z'}} : {}),
            },
          ]
        })
        return sendJson(res, 200, out)
      }
      if (kind === 'tree') {
        const rev = parts[5] ?? 'main'
        if (!resolveRev(repo, rev)) return sendError(res, 404, 'RevisionNotFound', `Invalid rev id: ${rev}`)
        const sub = parts.slice(6).join('/')
        const recursive = url.searchParams.get('recursive') === 'true'
        const entries = [
          ...[...repo.files.values()].map((f) => ({
            type: 'file',
            oid: f.gitOid,
            size: f.lfs ? f.pointer.length : f.data.length,
            path: f.path,
            ...(f.lfs ? {lfs: {oid: f.sha256, size: f.data.length, pointerSize: f.pointer.length}} : {}),
          })),
          ...(repo.spec.extraTreeEntries ?? []),
        ].filter((e) => {
          if (sub && !e.path.startsWith(`${sub}/`)) return false
          const rest = sub ? e.path.slice(sub.length + 1) : e.path
          return recursive || !rest.includes('/')
        })
        const cursor = Number(url.searchParams.get('cursor') ?? 0)
        const size = opts.pageSize ?? entries.length
        const page = entries.slice(cursor, cursor + size)
        const headers: Record<string, string> = {}
        if (cursor + size < entries.length) {
          const next = new URL(url.href)
          next.searchParams.set('cursor', String(cursor + size))
          headers.link = `<${next.href}>; rel="next"`
        }
        return sendJson(res, 200, page, headers)
      }
      return sendError(res, 404, 'NotFound', 'Not found')
    }

    // /cdn-lfs/{sha256}
    if (parts[0] === 'cdn-lfs' && parts.length === 2) {
      for (const repo of repos.values()) {
        for (const f of repo.files.values()) {
          if (f.lfs && f.sha256 === parts[1]) return serveFile(repo, f, req, res, {})
        }
      }
      res.writeHead(404)
      return void res.end()
    }

    // /{org}/{name}/resolve/{rev}/{path}
    if (parts.length >= 5 && parts[2] === 'resolve') {
      const repo = findRepo(parts[0], parts[1], res)
      if (!repo || !allowed(repo, req, res)) return
      const rev = parts[3]
      if (!resolveRev(repo, rev)) return sendError(res, 404, 'RevisionNotFound', `Invalid rev id: ${rev}`)
      const file = repo.files.get(parts.slice(4).join('/'))
      if (!file) return sendError(res, 404, 'EntryNotFound', 'Entry not found')
      const extra: Record<string, string> = {'x-repo-commit': repo.commit}
      if (file.lfs) {
        extra['x-linked-etag'] = `"${file.sha256}"`
        extra['x-linked-size'] = String(file.data.length)
        if (opts.lfsRedirect) {
          res.writeHead(302, {...extra, etag: `"${file.sha256}"`, location: `/cdn-lfs/${file.sha256}`, 'content-length': '0'})
          return void res.end()
        }
      }
      return serveFile(repo, file, req, res, extra)
    }

    res.writeHead(404, {'content-type': 'text/plain'})
    res.end('not found')
  }

  const server = createServer((req, res) => {
    handle(req, res).catch((err: Error) => {
      if (!res.headersSent) res.writeHead(500)
      res.end(String(err.message))
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`

  return {
    url: baseUrl,
    requests,
    commitOf: (repo) => repos.get(repo)!.commit,
    sha256Of: (repo, path) => repos.get(repo)!.files.get(path)!.sha256,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections()
        server.close(() => resolve())
      }),
  }
}
