// Servers for tests: an in-process one over the fake decoder (deterministic: its steps can be
// held), and the real CLI as a child process. Callers close them in `after`/`finally`.
import assert from 'node:assert/strict'
import {spawn, type ChildProcessWithoutNullStreams} from 'node:child_process'
import path from 'node:path'

import OpenAI from 'openai'

import type {DecoderOutput} from '../../src/core/engine/decoder.js'
import {ServeEngine} from '../../src/core/serve/engine.js'
import type {ServedModel} from '../../src/core/serve/openai-requests.js'
import {RunningServer, type ServerOptions} from '../../src/core/serve/server.js'
import {REPO_ROOT} from './cli.js'
import {ALPHABET, charTokenizerOf, END, FakeCache, FakeDecoder} from './fake-decoder.js'

/**
 * The fake decoder, with a step that yields to the event loop (as onnxruntime-node does before
 * each run, so HTTP keeps flowing) and can be held: `hold()` stops every step until `resume()`.
 */
export class HeldDecoder extends FakeDecoder {
  private gate: Promise<void> | undefined
  private open: (() => void) | undefined
  released = false

  hold(): void {
    this.gate ??= new Promise((resolve) => (this.open = resolve))
  }

  resume(): void {
    this.open?.()
    this.gate = undefined
  }

  override async forward(cache: FakeCache, first: number, inputIds: number[][], numLogitsToKeep: number): Promise<DecoderOutput> {
    await new Promise((resolve) => setImmediate(resolve))
    await this.gate
    return super.forward(cache, first, inputIds, numLogitsToKeep)
  }

  async release(): Promise<void> {
    this.released = true
  }
}

export const A = ALPHABET.indexOf('a')

export interface FakeServer {
  url: string
  client: OpenAI
  server: RunningServer
  engine: ServeEngine
  decoder: HeldDecoder
  close(): Promise<void>
}

/**
 * Character tokenizer, P = 1 and 2, no chat template; the model writes "a" forever unless told.
 * `alphabet` extends ALPHABET with more characters (token ids of ALPHABET's stay as they are).
 */
export async function startFakeServer(
  options: {maxBatch?: number; maxQueue?: number; context?: number; script?: (history: number[]) => number | undefined; alphabet?: string} & ServerOptions = {},
): Promise<FakeServer> {
  const alphabet = options.alphabet ?? ALPHABET
  assert.ok(alphabet.startsWith(ALPHABET), 'the alphabet extends ALPHABET')
  const charTokenizer = charTokenizerOf(alphabet)
  const decoder = new HeldDecoder(alphabet.length, options.script ?? (() => A), [1, 2])
  const context = options.context ?? 100_000
  const served: ServedModel = {
    id: 'fake-model',
    tokenizer: {
      hasChatTemplate: false,
      encode: charTokenizer.encode,
      encodeChat: () => assert.fail('no chat template'),
      decodeWithSpecial: charTokenizer.decodeWithSpecial,
    },
    defaults: {eosTokenIds: [END]},
    context,
    parallelValues: [1, 2],
    defaultParallel: 1,
  }
  const engine = ServeEngine.over(served, decoder, {eosTokenIds: [END], decode: charTokenizer.decode, contextLength: context}, {
    maxBatch: options.maxBatch ?? 8,
    maxQueue: options.maxQueue ?? 64,
  })
  const server = await RunningServer.listen(engine, {host: '127.0.0.1', port: 0, ...options})
  return {
    url: server.url,
    client: openaiClient(server.url, options.apiKey),
    server,
    engine,
    decoder,
    close: async () => {
      decoder.resume()
      await server.shutdown(0)
    },
  }
}

export function openaiClient(url: string, apiKey = 'unused'): OpenAI {
  // No retries: a 429 or 5xx must reach the test as it was sent.
  return new OpenAI({baseURL: `${url}/v1`, apiKey, maxRetries: 0, timeout: 120_000})
}

export interface ServeChild {
  url: string
  child: ChildProcessWithoutNullStreams
  stdout(): string
  stderr(): string
  /** Resolves with the exit code. */
  exited: Promise<number | null>
  /** SIGKILL if still running (cleanup). */
  kill(): void
  /** SIGTERM (a graceful shutdown); resolves with the exit code. */
  stop(): Promise<number | null>
}

/** Runs `body` against a fresh fake server, closing it whatever happens. */
export async function withFakeServer(options: Parameters<typeof startFakeServer>[0], body: (s: FakeServer) => Promise<void>): Promise<void> {
  const s = await startFakeServer(options)
  try {
    await body(s)
  } finally {
    await s.close()
  }
}

/** `parscale serve ...args` on a free port; resolves once it listens. Tests and bench scripts use it. */
export function spawnServe(args: string[], env: Record<string, string> = {}): Promise<ServeChild> {
  const child = spawn(process.execPath, [path.join(REPO_ROOT, 'bin', 'run.js'), 'serve', '--port', '0', ...args], {
    cwd: REPO_ROOT,
    env: {...process.env, NODE_NO_WARNINGS: '1', ...env},
    stdio: ['pipe', 'pipe', 'pipe'],
  })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (data: Buffer) => (stdout += data.toString()))
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)))
  const kill = () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
  }
  const stop = () => {
    child.kill('SIGTERM')
    return exited
  }
  return new Promise((resolve, reject) => {
    child.stderr.on('data', (data: Buffer) => {
      stderr += data.toString()
      const match = /serving .* at (http:\/\/\S+)\/v1/.exec(stderr)
      if (match) resolve({url: match[1], child, stdout: () => stdout, stderr: () => stderr, exited, kill, stop})
    })
    exited.then((code) => reject(new Error(`serve exited (${code}) before listening: ${stderr}`)))
  })
}

/** Reads a server-sent event stream whole: the `data:` payloads in order. */
export async function sseEvents(response: Response): Promise<string[]> {
  const text = await response.text()
  return text
    .split('\n\n')
    .filter((event) => event.startsWith('data: '))
    .map((event) => event.slice('data: '.length))
}

/** A metric's value from Prometheus text (`name{labels} value`), 0 when absent. */
export function metricValue(text: string, name: string, labels: Record<string, string> = {}): number {
  const wanted = Object.entries(labels).map(([k, v]) => `${k}="${v}"`)
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue
    const match = /^([^{\s]+)(?:\{([^}]*)\})?\s+(\S+)$/.exec(line)
    if (!match || match[1] !== name) continue
    const have = (match[2] ?? '').split(',')
    if (wanted.every((w) => have.includes(w))) return Number(match[3])
  }
  return 0
}

/** Polls `condition` until it holds (bounded: the test fails with `what` after `ms`). */
export async function eventually(what: string, condition: () => Promise<boolean> | boolean, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms
  while (!(await condition())) {
    if (Date.now() > deadline) assert.fail(`timed out waiting until ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}
