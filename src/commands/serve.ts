import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../base-command.js'
import {UserError} from '../core/errors.js'
import {formatBytes, percent} from '../core/format.js'
import {onStopRequest} from '../core/processes.js'
import type {QuantScheme} from '../core/quant/scheme.js'
import {checkWebGpu, DEVICES, type Device} from '../core/engine/device.js'
import {ServeEngine} from '../core/serve/engine.js'
import {parseServeOptions, SERVE_DEFAULTS, type ServeOptions} from '../core/serve/options.js'
import {RunningServer} from '../core/serve/server.js'
import {readBenchFigures} from '../core/serve/ui/bench-figures.js'
import {quantFlags, quantFromFlags} from '../flags/quant.js'
import {Progress} from '../ui/progress.js'
import {DEFAULT_AUTO_BUDGET, type ParallelChoice} from '../core/parallel/policy.js'

/** A number flag; checked in `parseServeOptions` so a bad value is one line, like every user error. */
function numberFlag(description: string, helpValue = 'N', char?: 'p') {
  return Flags.string({description, helpValue, ...(char ? {char} : {})})
}

export default class Serve extends BaseCommand {
  static override summary = 'Serve a ParScale model over an OpenAI-compatible HTTP API, with continuous batching'
  static override description = `Endpoints: POST /v1/chat/completions, POST /v1/completions (both with "stream": true for server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus).
A request may pick its number of parallel streams with the extension field "parallel" (one of the P values /v1/models lists, or "auto"); without it, --parallel. With --parallel auto the server chooses the P of each request that names none: alone, the largest P whose decode step is within --auto-budget × P = 1's; under load, smaller P so throughput stays near all-P = 1's (measured once per machine into a cost profile cached beside the package; docs/auto-parallel.md). Answers report the P they got in "parallel"; /metrics counts them (parscale_parallel_chosen_total). Requests that arrive while others decode join the running batch at the next step (up to --max-batch sequences per P); past --max-queue running + waiting generations, requests get 429 with Retry-After.
Sampling fields left out of a request come from the model's generation_config.json, as with \`parscale run\`. A model without a chat template (like the embedded default model, a base model) answers chat requests by continuing the conversation's texts joined together, system messages left out.
With "stream_weights": true a request gets each generated token's P stream weights (streamed: one chunk per token, its weights in choices[].stream_weights).
A chat page is served at / (plain HTML talking to this API, offline): choose P, stream answers with each token's stream weights, see this server's latency and memory per P (--bench-json FILE adds a \`parscale bench --json\` report to that chart); --no-ui leaves it out.
SIGTERM or Ctrl-C stops accepting requests and lets running ones finish for up to --shutdown-timeout seconds (Ctrl-C again cuts them off), then exits 0. Started through npx or npm run, it stops the same way when npm exits (npm signals only the shell it started, so SIGTERM sent to npx never reaches the server).

MODEL is a converted package, a checkpoint folder (converted on first use and cached), or a pulled hub repo id; without it, the embedded default model.`

  static override examples = [
    {description: 'Serve the default model on 127.0.0.1:8080; open http://127.0.0.1:8080/ for the chat page', command: '<%= config.bin %> serve'},
    {description: 'Ask it with curl', command: `curl -s localhost:8080/v1/chat/completions -H 'Content-Type: application/json' -d '{"messages": [{"role": "user", "content": "def fibonacci(n):"}], "max_tokens": 32, "parallel": 4}'`},
    {description: 'Keep an access log (JSON lines: {"level":"info","time":…,"reqId":"req-1","method":"POST","path":"/v1/chat/completions","status":200,"ms":812.4,"parallel":4,"prompt_tokens":9,"completion_tokens":32,"msg":"request"})', command: '<%= config.bin %> serve --log-requests >> access.jsonl'},
    {description: 'Serve a pulled model on every interface, with a key', command: '<%= config.bin %> serve ParScale/ParScale-1.8B-P8-Inst --host 0.0.0.0 --api-key "$KEY"'},
  ]

  static override args = {
    model: Args.string({description: 'model package, checkpoint folder or hub repo id (default: the embedded model)'}),
  }

  static override flags = {
    host: Flags.string({description: `address to listen on (default ${SERVE_DEFAULTS.host}; 0.0.0.0 for every interface)`, helpValue: 'ADDRESS'}),
    port: numberFlag(`port to listen on (default ${SERVE_DEFAULTS.port}; 0 picks a free one)`, 'PORT'),
    parallel: numberFlag('parallel streams P of requests that name none (default: the model\'s largest); auto: chosen per request from the load and a measured cost profile (docs/auto-parallel.md)', 'N|auto', 'p'),
    'auto-budget': Flags.string({description: 'with --parallel auto: a lone request gets the largest P whose decode step is at most this many times P = 1\'s (default 1.25)', helpValue: 'X'}),
    verbose: Flags.boolean({description: 'with --parallel auto: one line on stderr per request saying which P it got and why'}),
    'max-batch': numberFlag(`most sequences of one P decoding together (default ${SERVE_DEFAULTS.maxBatch})`),
    'max-queue': numberFlag(`most generations running or waiting; more get 429 (default ${SERVE_DEFAULTS.maxQueue})`),
    'api-key': Flags.string({description: 'require "Authorization: Bearer KEY" on /v1 requests', helpValue: 'KEY', env: 'PARSCALE_API_KEY'}),
    threads: numberFlag('ONNX Runtime intra-op threads'),
    device: Flags.string({description: 'where the model runs: cpu, or a GPU through ONNX Runtime\'s WebGPU provider', options: [...DEVICES], default: 'cpu'}),
    ...quantFlags,
    'log-requests': Flags.boolean({description: 'an access log: one JSON line per request on stdout (method, path, status, ms; for generations P and tokens), from fastify\'s logger'}),
    ui: Flags.boolean({description: 'serve the chat page at / (--no-ui: the API only)', default: true, allowNo: true}),
    'bench-json': Flags.string({description: 'a `parscale bench --json` report the page charts beside the server\'s own latency and memory per P', helpValue: 'FILE'}),
    'shutdown-timeout': numberFlag(`seconds running requests get to finish after SIGTERM / Ctrl-C (default ${SERVE_DEFAULTS.shutdownTimeout})`, 'SECONDS'),
  }

  async run(): Promise<void> {
    const {args, flags} = await this.parse(Serve)
    const options = parseServeOptions({
      host: flags.host,
      apiKey: flags['api-key'],
      autoBudget: flags['auto-budget'],
      numbers: {
        port: flags.port,
        parallel: flags.parallel,
        'max-batch': flags['max-batch'],
        'max-queue': flags['max-queue'],
        threads: flags.threads,
        'shutdown-timeout': flags['shutdown-timeout'],
      },
    })
    const device = flags.device as Device
    const quant = quantFromFlags(flags)
    if (!flags.ui && flags['bench-json'] !== undefined) throw new UserError('--bench-json charts on the page, which --no-ui leaves out: drop one of them', 2)
    const bench = flags['bench-json'] === undefined ? undefined : readBenchFigures(flags['bench-json'])
    if (device === 'webgpu') await checkWebGpu() // before converting or loading anything
    const engine = await this.load(args.model, options, device, quant, flags.verbose)
    let server: RunningServer
    try {
      server = await RunningServer.listen(engine, {
        host: options.host,
        port: options.port,
        apiKey: options.apiKey,
        onInternalError: reportInternalError,
        ...(flags['log-requests'] ? {requestLog: process.stdout} : {}),
        ...(flags.ui ? {page: bench ? {bench} : {}} : {}),
      })
    } catch (error) {
      await engine.close()
      throw error
    }
    const {served} = engine
    const profile = engine.profile
    process.stderr.write(
      (profile
        ? `auto P: cost profile ${profile.cached ? 'cached' : `measured in ${(profile.profile.measureMs / 1000).toFixed(1)} s`} (${profile.file}); budget ${options.autoBudget ?? DEFAULT_AUTO_BUDGET}× P = 1's step alone\n`
        : '') +
      `serving ${served.id} (P ${served.parallelValues.join(', ')}; default ${served.autoParallel ? 'auto' : served.defaultParallel}) at ${server.url}/v1 · ` +
        `max batch ${options.maxBatch} per P, max queue ${options.maxQueue}${options.apiKey ? ' · API key required' : ''}\n` +
        (flags.ui ? `chat page: ${server.url}/\n` : ''),
    )
    await untilStopped(server, options.shutdownTimeout)
  }

  private async load(model: string | undefined, options: ServeOptions, device: Device, quant: QuantScheme | undefined, verbose: boolean): Promise<ServeEngine> {
    const progress = new Progress('preparing model')
    try {
      return await ServeEngine.open(model, {
        parallel: options.parallel,
        autoBudget: options.autoBudget,
        onMeasuring: () => progress.update('measuring the cost profile for --parallel auto (once per machine, cached beside the package)'),
        ...(verbose ? {onChoice: ({reason}: ParallelChoice) => process.stderr.write(`${reason}\n`)} : {}),
        threads: options.threads,
        device,
        quant,
        maxBatch: options.maxBatch,
        maxQueue: options.maxQueue,
        onProgress: ({phase, doneBytes, totalBytes}) => progress.update(`${phase}: ${percent(doneBytes, totalBytes)} of ${formatBytes(totalBytes)}`),
        onNotice: (line) => progress.log(line),
      })
    } finally {
      progress.stop()
    }
  }
}

/**
 * Serves until SIGTERM, SIGINT or (under npx / npm) npm exiting, then drains: the first request
 * waits for running generations, a second cuts them off.
 */
function untilStopped(server: RunningServer, timeoutSeconds: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const stopWatching = onStopRequest((cause, again) => {
      const by = cause === 'launcher exited' ? 'npm exited' : cause
      if (again) {
        process.stderr.write(`${by}: cutting off the running requests\n`)
        server.hurry()
        return
      }
      const running = server.inProgress
      process.stderr.write(`${by}: stopping${running > 0 ? `; ${running} generation${running === 1 ? '' : 's'} finishing (up to ${timeoutSeconds} s, Ctrl-C again to cut off)` : ''}\n`)
      server.shutdown(timeoutSeconds * 1000).then(() => {
        stopWatching()
        process.stderr.write('stopped\n')
        resolve()
      }, reject)
    })
  })
}

function reportInternalError(error: unknown): void {
  process.stderr.write(`parscale serve: internal error: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`)
}
