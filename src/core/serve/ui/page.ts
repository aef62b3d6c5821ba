/**
 * serve's chat page: `/` and its static files under `/ui/` (the package's web/ folder: plain
 * HTML, CSS and ES modules, no build step), and the figures it charts: `/ui/figures.json` and
 * `/ui/figures.svg` (this server's latency and memory per P, drawn by vega on the server, in a
 * worker thread, so no charting code goes to the browser). The page talks to the server's own /v1 API.
 *
 * The files are a fixed list read once at start and served from memory: no path from a URL
 * reaches the file system. Every answer here carries a Content-Security-Policy that allows only
 * this origin's script, style and connections (no inline script), so model output could not run
 * even if it were ever taken for markup; the page renders every text as text.
 */
import {readFileSync} from 'node:fs'
import path from 'node:path'
import {fileURLToPath} from 'node:url'
import {Worker} from 'node:worker_threads'

import type {FastifyInstance, FastifyReply} from 'fastify'

import type {ServedChartInput} from '../../../ui/charts/serve-charts.js'
import type {ServedFigures} from '../figures.js'
import type {BenchFigures} from './bench-figures.js'
import type {ChartReply, ChartRequest} from './chart-worker.js'

export interface PageOptions {
  /** `serve --bench-json`: a bench report the chart shows beside the server's own figures. */
  bench?: BenchFigures
}

/** Where the page's files are: web/ at the package's root (shipped: package.json "files"). */
export const WEB_DIR = fileURLToPath(new URL('../../../../../web', import.meta.url))

/** URL → file in web/, and its type. */
const ASSETS: Record<string, {file: string; type: string}> = {
  '/': {file: 'index.html', type: 'text/html; charset=utf-8'},
  '/ui/app.js': {file: 'app.js', type: 'text/javascript; charset=utf-8'},
  '/ui/api.js': {file: 'api.js', type: 'text/javascript; charset=utf-8'},
  '/ui/transcript.js': {file: 'transcript.js', type: 'text/javascript; charset=utf-8'},
  '/ui/figures.js': {file: 'figures.js', type: 'text/javascript; charset=utf-8'},
  '/ui/style.css': {file: 'style.css', type: 'text/css; charset=utf-8'},
  '/ui/icon.svg': {file: 'icon.svg', type: 'image/svg+xml'},
}

/** The page and its files need no API key (they hold no data); the figures do, as the API does. */
export const PAGE_OPEN_PATHS: readonly string[] = Object.keys(ASSETS)

/**
 * Only this origin's script, style, images (blob: for the chart, fetched with the key) and
 * connections; nothing inline, no frames, no forms posting anywhere, no plugins.
 */
export const PAGE_CSP = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' blob:",
  "connect-src 'self'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ')

/** The chart opened on its own: no script at all, vega's inline styling allowed. */
const SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"

function secure(reply: FastifyReply, csp: string): FastifyReply {
  return reply.headers({
    'content-security-policy': csp,
    'x-content-type-options': 'nosniff',
    'referrer-policy': 'no-referrer',
    // A new server version may ship new files: the browser asks again each time (they are small).
    'cache-control': 'no-cache',
  })
}

/** Every file the page loads, read now: a missing one is a broken package, found at start. */
export function readPageAssets(dir = WEB_DIR): Map<string, {body: Buffer; type: string}> {
  return new Map(Object.entries(ASSETS).map(([url, {file, type}]) => [url, {body: readFileSync(path.join(dir, file)), type}]))
}

export function registerPage(app: FastifyInstance, figures: ServedFigures, model: {parallelValues: number[]}, options: PageOptions): void {
  for (const [url, {body, type}] of readPageAssets()) {
    app.get(url, async (_request, reply) => secure(reply, PAGE_CSP).type(type).send(body))
  }

  const snapshot = () => ({parallel: model.parallelValues, live: figures.snapshot(), bench: options.bench ?? null})

  app.get('/ui/figures.json', async (_request, reply) => secure(reply, PAGE_CSP).send(snapshot()))

  // The same figures give the same chart: drawn once, however many ask.
  const charts = new ChartWorker()
  app.addHook('onClose', () => charts.close())
  let rendered: {key: string; svg: Promise<string>} | undefined
  app.get('/ui/figures.svg', async (_request, reply) => {
    const {parallel, live, bench} = snapshot()
    const key = JSON.stringify(live)
    if (rendered?.key !== key) {
      rendered = {key, svg: charts.render({parallelValues: parallel, live, ...(bench ? {bench} : {})})}
      // A failed drawing is not kept: the next request tries again.
      const failed = rendered
      failed.svg.catch(() => {
        if (rendered === failed) rendered = undefined
      })
    }
    return secure(reply, SVG_CSP).type('image/svg+xml; charset=utf-8').send(await rendered.svg)
  })
}

/** The chart-drawing worker thread (chart-worker.ts), started at the first chart; vega loads only there. */
class ChartWorker {
  private worker: Worker | undefined
  private next = 0
  private readonly pending = new Map<number, {resolve: (svg: string) => void; reject: (error: Error) => void}>()

  render(input: ServedChartInput): Promise<string> {
    const worker = (this.worker ??= this.start())
    const id = this.next++
    return new Promise((resolve, reject) => {
      this.pending.set(id, {resolve, reject})
      worker.postMessage({id, input} satisfies ChartRequest)
    })
  }

  private start(): Worker {
    const worker = new Worker(new URL('./chart-worker.js', import.meta.url))
    // An idle chart worker does not keep the process alive; the server's close ends it.
    worker.unref()
    worker.on('message', (reply: ChartReply) => {
      const waiting = this.pending.get(reply.id)
      this.pending.delete(reply.id)
      if ('svg' in reply) waiting?.resolve(reply.svg)
      else waiting?.reject(new Error(`drawing the chart failed: ${reply.error}`))
    })
    const fail = (error: Error) => {
      this.worker = undefined
      for (const {reject} of this.pending.values()) reject(error)
      this.pending.clear()
    }
    worker.on('error', fail)
    worker.on('exit', (code) => fail(new Error(`the chart worker exited (${code})`)))
    return worker
  }

  async close(): Promise<void> {
    const worker = this.worker
    this.worker = undefined
    await worker?.terminate()
  }
}
