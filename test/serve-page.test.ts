// serve's chat page over HTTP, on the fake decoder: the page and its files, their security
// headers and size, the API key (the page is open, its data and the API are not), the figures
// and their chart, `stream_weights` with output that is markup, and `--no-ui` / `--bench-json` on
// the real CLI.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {describe, test} from 'node:test'

import {XMLParser} from 'fast-xml-parser'

import {readBenchFigures} from '../src/core/serve/ui/bench-figures.js'
import {PAGE_CSP, PAGE_OPEN_PATHS} from '../src/core/serve/ui/page.js'
import {runCli} from './helpers/cli.js'
import {answersPayload, MARKUP_ALPHABET, PAYLOAD} from './helpers/browser.js'
import {makeTempDir} from './helpers/safetensors-writer.js'
import {spawnServe, sseEvents, withFakeServer} from './helpers/serve.js'

/** The Content-Security-Policy's directives by name. */
function directives(csp: string | null): Map<string, string[]> {
  assert.ok(csp, 'a Content-Security-Policy header')
  return new Map(csp.split(';').map((d) => d.trim().split(/\s+/)).map(([name, ...values]) => [name, values]))
}

describe('serve: the chat page (fake model)', () => {
  test('/ is the page: a CSP with script from this origin only and nothing inline; its files are served with their types', () =>
    withFakeServer({page: {}}, async (s) => {
      const response = await fetch(`${s.url}/`)
      assert.equal(response.status, 200)
      assert.match(response.headers.get('content-type') ?? '', /^text\/html/)
      const csp = directives(response.headers.get('content-security-policy'))
      assert.deepEqual(csp.get('script-src'), ["'self'"])
      assert.deepEqual(csp.get('default-src'), ["'none'"])
      assert.deepEqual(csp.get('connect-src'), ["'self'"])
      assert.deepEqual(csp.get('frame-ancestors'), ["'none'"])
      assert.equal(response.headers.get('x-content-type-options'), 'nosniff')
      const html = await response.text()
      // No inline script for the CSP to allow: every <script> has a src, no on* handler attributes.
      for (const tag of html.match(/<script\b[^>]*>/g) ?? []) assert.match(tag, /\ssrc="\/ui\/[^"]+"/)
      assert.doesNotMatch(html, /\son[a-z]+\s*=/i)
      assert.doesNotMatch(html, /style="/, 'no inline style either')
      for (const url of PAGE_OPEN_PATHS) {
        const asset = await fetch(`${s.url}${url}`)
        assert.equal(asset.status, 200, url)
        assert.equal(asset.headers.get('content-security-policy'), PAGE_CSP, url)
        const type = asset.headers.get('content-type') ?? ''
        if (url.endsWith('.js')) assert.match(type, /^text\/javascript/)
        if (url.endsWith('.css')) assert.match(type, /^text\/css/)
        if (url.endsWith('.svg')) assert.match(type, /^image\/svg\+xml/)
        // Offline: nothing the page loads names another origin.
        assert.doesNotMatch(await asset.text(), /(src|href)=["']?(https?:)?\/\//i, url)
      }
      assert.equal((await fetch(`${s.url}/ui/../package.json`)).status, 404)
      assert.equal((await fetch(`${s.url}/ui/nothing.js`)).status, 404)
    }))

  test("the page's files and its chart weigh at most 200 kB together", () =>
    withFakeServer({page: {}}, async (s) => {
      for (const parallel of [1, 2]) await s.client.completions.create({model: 'fake-model', prompt: 'ab', max_tokens: 3, parallel} as Parameters<typeof s.client.completions.create>[0])
      let total = 0
      for (const url of [...PAGE_OPEN_PATHS, '/ui/figures.json', '/ui/figures.svg']) total += (await (await fetch(`${s.url}${url}`)).arrayBuffer()).byteLength
      assert.ok(total > 0 && total <= 200_000, `${total} bytes`)
    }))

  test('without the page option (serve --no-ui) / is a 404 and the API still answers', () =>
    withFakeServer({}, async (s) => {
      assert.equal((await fetch(`${s.url}/`)).status, 404)
      assert.equal((await fetch(`${s.url}/ui/app.js`)).status, 404)
      assert.equal((await s.client.models.list()).data[0].id, 'fake-model')
    }))

  test('with an API key: the page and its files load without it; the figures and the API do not', () =>
    withFakeServer({page: {}, apiKey: 'sesame'}, async (s) => {
      for (const url of PAGE_OPEN_PATHS) assert.equal((await fetch(`${s.url}${url}`)).status, 200, url)
      for (const url of ['/ui/figures.json', '/ui/figures.svg', '/v1/models']) {
        assert.equal((await fetch(`${s.url}${url}`)).status, 401, url)
        assert.equal((await fetch(`${s.url}${url}`, {headers: {authorization: 'Bearer wrong'}})).status, 401, url)
        assert.equal((await fetch(`${s.url}${url}`, {headers: {authorization: 'Bearer sesame'}})).status, 200, url)
      }
    }))

  test('figures per P: none before any request; after requests at P = 1 and 2, their medians, and a chart without script', () =>
    withFakeServer({page: {}}, async (s) => {
      const before = (await (await fetch(`${s.url}/ui/figures.json`)).json()) as {parallel: number[]; live: unknown[]; bench: unknown}
      assert.deepEqual(before, {parallel: [1, 2], live: [], bench: null})
      for (const parallel of [1, 2, 2]) {
        await s.client.completions.create({model: 'fake-model', prompt: 'ab', max_tokens: 5, parallel} as Parameters<typeof s.client.completions.create>[0])
      }
      const after = (await (await fetch(`${s.url}/ui/figures.json`)).json()) as {live: {parallel: number; generations: number; ttft_ms: number; decode_ms_per_token: number; peak_rss_bytes: number}[]}
      assert.deepEqual(after.live.map((f) => [f.parallel, f.generations]), [[1, 1], [2, 2]])
      for (const f of after.live) {
        assert.ok(f.ttft_ms > 0 && f.decode_ms_per_token > 0, JSON.stringify(f))
        assert.ok(f.peak_rss_bytes > 10e6, 'the process RSS')
      }
      const svg = await fetch(`${s.url}/ui/figures.svg`)
      assert.match(svg.headers.get('content-type') ?? '', /^image\/svg\+xml/)
      assert.equal(directives(svg.headers.get('content-security-policy')).get('default-src')?.[0], "'none'")
      const text = await svg.text()
      assert.doesNotMatch(text, /<script|\son[a-z]+\s*=|javascript:/i)
      const parsed = new XMLParser({ignoreAttributes: false}).parse(text) as {svg: unknown}
      assert.ok(parsed.svg, 'well-formed SVG')
      // Each measured point is a mark labelled with its figures (vega writes them as aria-labels).
      assert.match(text, /this server \(its requests\), P=2: time to first token [\d.]+ ms/)
      assert.match(text, /this server \(its requests\), P=1: decode [\d.]+ ms\/token/)
    }))

  test('"stream_weights" on output that is markup: the chunks carry it as JSON text, one chunk per token with P weights', () =>
    withFakeServer({page: {}, alphabet: MARKUP_ALPHABET, script: answersPayload}, async (s) => {
      const prompt = 'say:'
      const response = await fetch(`${s.url}/v1/chat/completions`, {
        method: 'POST',
        headers: {'content-type': 'application/json'},
        body: JSON.stringify({messages: [{role: 'user', content: prompt}], stream: true, stream_weights: true, parallel: 2, max_tokens: 100}),
      })
      const events = await sseEvents(response)
      assert.equal(events.at(-1), '[DONE]')
      type Chunk = {choices: {delta: {content?: string}; stream_weights?: number[][]; finish_reason: string | null}[]}
      const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as Chunk)
      const tokens = chunks.filter((c) => c.choices[0].stream_weights)
      // Every character, then the end token (no text, still a generated token with its weights).
      assert.equal(tokens.length, PAYLOAD.length + 1)
      assert.deepEqual(tokens.map((c) => c.choices[0].stream_weights), tokens.map(() => [[0.5, 0.5]]))
      assert.equal(tokens.map((c) => c.choices[0].delta.content).join(''), PAYLOAD)
      assert.equal(chunks.at(-1)?.choices[0].finish_reason, 'stop')
    }))
})

describe('serve --bench-json: reading the report', () => {
  test('a missing file, a file that is not JSON, a report without results or with a bad field: one message naming the file', () => {
    const dir = makeTempDir('parscale-bench-json-')
    try {
      const file = path.join(dir, 'bench.json')
      assert.throws(() => readBenchFigures(file), {message: `--bench-json ${file}: cannot read it (ENOENT)`})
      fs.writeFileSync(file, '{"results": [')
      assert.throws(() => readBenchFigures(file), {message: `--bench-json ${file}: not JSON (write one with \`parscale bench --json FILE\`)`})
      fs.writeFileSync(file, '{"results": []}')
      assert.throws(() => readBenchFigures(file), {message: `--bench-json ${file}: not a \`parscale bench --json\` report ("results" is empty)`})
      fs.writeFileSync(file, JSON.stringify({results: [{parallel: 1, batch: 1, prompt_length: 8, ttft_ms: 'fast', decode_ms_per_token: 1, peak_rss_bytes: 1, weight_bytes: 1}]}))
      assert.throws(() => readBenchFigures(file), {message: `--bench-json ${file}: not a \`parscale bench --json\` report (results[0].ttft_ms is not a number)`})
    } finally {
      fs.rmSync(dir, {recursive: true, force: true})
    }
  })
})

describe('parscale serve: --no-ui and --bench-json (the CLI)', () => {
  const cache = makeTempDir('parscale-serve-page-')
  const env = {PARSCALE_CACHE: cache, HF_HUB_OFFLINE: '1'}

  test('a bench --json report is charted beside the live figures; --no-ui serves no page; bad reports are one line', async (t) => {
    t.after(() => fs.rmSync(cache, {recursive: true, force: true}))
    const report = path.join(cache, 'bench.json')
    const row = (parallel: number, batch: number) => ({parallel, batch, prompt_length: 16, ttft_ms: 5 * parallel, decode_ms_per_token: 2 * parallel, peak_rss_bytes: 2e8 + parallel * 1e6, weight_bytes: 2e7})
    fs.writeFileSync(report, JSON.stringify({machine: {cpu_model: 'Test CPU', device: 'cpu'}, model: 'parscale-default', results: [row(1, 1), row(8, 1), row(8, 4)]}))
    const serve = await spawnServe(['--bench-json', report], env)
    try {
      assert.match(serve.stderr(), new RegExp(`chat page: ${serve.url.replaceAll('.', '\\.')}/\\n`))
      const figures = (await (await fetch(`${serve.url}/ui/figures.json`)).json()) as {bench: {setting: string; results: {parallel: number; decode_ms_per_token: number}[]}}
      assert.deepEqual(figures.bench.results.map((r) => [r.parallel, r.decode_ms_per_token]), [[1, 2], [8, 16]], 'the batch-1 rows')
      assert.match(figures.bench.setting, /batch 1, prompt 16 tokens on Test CPU/)
      const svg = await (await fetch(`${serve.url}/ui/figures.svg`)).text()
      assert.match(svg, /bench --json, P=8: decode 16\.0 ms\/token/)
      assert.equal((await fetch(`${serve.url}/`)).status, 200)
    } finally {
      serve.kill()
    }
    const apiOnly = await spawnServe(['--no-ui'], env)
    try {
      assert.equal((await fetch(`${apiOnly.url}/`)).status, 404)
      assert.doesNotMatch(apiOnly.stderr(), /chat page/)
    } finally {
      apiOnly.kill()
    }
    fs.writeFileSync(report, JSON.stringify({results: [{parallel: 1}]}))
    const bad = await runCli(['serve', '--bench-json', report, '--port', '0'], {env})
    assert.equal(bad.code, 1)
    assert.equal(bad.stderr, `parscale: --bench-json ${report}: not a \`parscale bench --json\` report (results[0].batch is not a number)\n`)
    const both = await runCli(['serve', '--bench-json', report, '--no-ui', '--port', '0'], {env})
    assert.equal(both.code, 2)
    assert.match(both.stderr, /^parscale: --bench-json charts on the page, which --no-ui leaves out/)
  })
})
