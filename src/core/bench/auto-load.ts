/**
 * `bench --concurrency` and `npm run bench:auto`: `parscale serve` started as a child process
 * (as deployed) in one mode (fixed P = 1, fixed P = 8, `--parallel auto`), then loaded by N
 * clients at once, each sending its requests one after another (a closed loop): throughput,
 * latency and the P each answer reports, per concurrency.
 */
import {spawn} from 'node:child_process'
import path from 'node:path'
import {fileURLToPath} from 'node:url'

/** The CLI's entry point: dist/src/core/bench → the package root's bin/run.js. */
const BIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', '..', 'bin', 'run.js')

export interface ServeChildProcess {
  url: string
  /** What the server wrote on stderr so far (its startup lines, --verbose reasons). */
  stderr(): string
  /** SIGTERM; resolves with the exit code. */
  stop(): Promise<number | null>
}

/** `parscale serve MODEL --port 0 …args` as a child; resolves once it listens. */
export function startServeChild(model: string | undefined, args: string[], env: Record<string, string> = {}): Promise<ServeChildProcess> {
  const child = spawn(process.execPath, [BIN, 'serve', ...(model === undefined ? [] : [model]), '--port', '0', '--no-ui', ...args], {
    env: {...process.env, NODE_NO_WARNINGS: '1', ...env},
    stdio: ['ignore', 'ignore', 'pipe'],
  })
  let stderr = ''
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)))
  return new Promise((resolve, reject) => {
    child.stderr.on('data', (data: Buffer) => {
      stderr += data.toString()
      const match = /serving .* at (http:\/\/\S+)\/v1/.exec(stderr)
      if (match) {
        resolve({
          url: match[1],
          stderr: () => stderr,
          stop: () => {
            child.kill('SIGTERM')
            return exited
          },
        })
      }
    })
    exited.then((code) => reject(new Error(`serve exited (${code}) before listening: ${stderr.trim().split('\n').at(-1) ?? ''}`)))
  })
}

export interface LoadSettings {
  /** Clients sending at once. */
  concurrency: number
  /** Requests each client sends, one after another. */
  requestsPerClient: number
  maxTokens: number
  prompts: string[]
}

export interface LoadPoint {
  concurrency: number
  requests: number
  tokens: number
  seconds: number
  tokensPerS: number
  /** From sending a request to its whole answer. */
  meanLatencyMs: number
  medianLatencyMs: number
  /** Mean of the P the answers report. */
  meanParallel: number
  /** P → answers that ran at it. */
  parallelCounts: Record<number, number>
}

interface Answer {
  tokens: number
  latencyMs: number
  parallel: number
}

async function complete(url: string, prompt: string, maxTokens: number): Promise<Answer> {
  const started = performance.now()
  const response = await fetch(`${url}/v1/completions`, {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({prompt, max_tokens: maxTokens, temperature: 0}),
  })
  const body = (await response.json()) as {parallel?: number; usage?: {completion_tokens: number}; error?: {message: string}}
  if (!response.ok || body.usage === undefined || body.parallel === undefined) throw new Error(`serve answered ${response.status}: ${body.error?.message ?? 'no usage'}`)
  return {tokens: body.usage.completion_tokens, latencyMs: performance.now() - started, parallel: body.parallel}
}

/** N clients at once, each sending `requestsPerClient` requests back to back. */
export async function measureLoad(url: string, settings: LoadSettings): Promise<LoadPoint> {
  const answers: Answer[] = []
  const started = performance.now()
  await Promise.all(
    Array.from({length: settings.concurrency}, async (_, client) => {
      for (let i = 0; i < settings.requestsPerClient; i++) {
        const prompt = settings.prompts[(client + i * settings.concurrency) % settings.prompts.length]
        answers.push(await complete(url, prompt, settings.maxTokens))
      }
    }),
  )
  const seconds = (performance.now() - started) / 1000
  const tokens = answers.reduce((sum, a) => sum + a.tokens, 0)
  const latencies = answers.map((a) => a.latencyMs).sort((a, b) => a - b)
  const parallelCounts: Record<number, number> = {}
  for (const a of answers) parallelCounts[a.parallel] = (parallelCounts[a.parallel] ?? 0) + 1
  return {
    concurrency: settings.concurrency,
    requests: answers.length,
    tokens,
    seconds,
    tokensPerS: tokens / seconds,
    meanLatencyMs: latencies.reduce((a, b) => a + b, 0) / latencies.length,
    medianLatencyMs: latencies[Math.floor(latencies.length / 2)],
    meanParallel: answers.reduce((sum, a) => sum + a.parallel, 0) / answers.length,
    parallelCounts,
  }
}

export interface LoadMode {
  /** "P=1", "P=8", "auto". */
  name: string
  /** serve's flags for it (`--parallel 1`, `--parallel auto --auto-budget 2`). */
  args: string[]
}

export interface LoadCurve {
  mode: string
  points: LoadPoint[]
}

/** The modes bench compares: fixed P = 1, fixed largest P, and auto. */
export function loadModes(parallelValues: number[], autoArgs: string[] = []): LoadMode[] {
  const largest = Math.max(...parallelValues)
  const smallest = Math.min(...parallelValues)
  return [
    {name: `P=${smallest}`, args: ['--parallel', String(smallest)]},
    ...(largest === smallest ? [] : [{name: `P=${largest}`, args: ['--parallel', String(largest)]}]),
    {name: 'auto', args: ['--parallel', 'auto', ...autoArgs]},
  ]
}

/**
 * Each mode's server started once; at each concurrency in turn, every mode is loaded (paired
 * rounds: the machine's load drifts alike for all). A warm-up request first, out of the figures.
 */
export async function loadCurves(
  model: string | undefined,
  modes: LoadMode[],
  concurrencies: number[],
  settings: Omit<LoadSettings, 'concurrency'>,
  serveArgs: string[],
  onStatus: (line: string) => void = () => {},
): Promise<LoadCurve[]> {
  const servers: ServeChildProcess[] = []
  try {
    for (const mode of modes) {
      onStatus(`starting serve ${mode.args.join(' ')}`)
      servers.push(await startServeChild(model, [...serveArgs, ...mode.args]))
    }
    for (const server of servers) await complete(server.url, settings.prompts[0], 2)
    const curves: LoadCurve[] = modes.map((mode) => ({mode: mode.name, points: []}))
    for (const concurrency of concurrencies) {
      for (const [i, server] of servers.entries()) {
        onStatus(`${modes[i].name}: ${concurrency} concurrent`)
        // A moment between rounds: auto's recent-load window must not carry one round's load into the next.
        await new Promise((resolve) => setTimeout(resolve, 400))
        curves[i].points.push(await measureLoad(server.url, {...settings, concurrency}))
      }
    }
    return curves
  } finally {
    await Promise.all(servers.map((s) => s.stop()))
  }
}
