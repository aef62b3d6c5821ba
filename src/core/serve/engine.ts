/**
 * What the HTTP layer serves: one model (every P it has, one session), its tokenizer and
 * generation defaults, and the continuous batcher every request joins. The engine admits
 * generations up to --max-queue (running + queued), ties each to an abort signal (the client
 * going away, or shutdown running out of time) and feeds the metrics.
 */
import {basename, resolve} from 'node:path'

import {ContinuousBatcher} from '../generation/batcher.js'
import type {Decoder, SequenceCache} from '../engine/decoder.js'
import type {GenerationOptions, GenerationRequest, GenerationResult} from '../generation/generation.js'
import type {Device} from '../engine/device.js'
import {ParScaleModel} from '../engine/model.js'
import {generationOptions} from '../run/requests.js'
import {readGenerationDefaults, TextTokenizer} from '../generation/tokenizer.js'
import {isRepoId} from '../hub/families.js'
import {resolveModel, type ResolveOptions} from '../package/resolve.js'
import {readManifest} from '../package/manifest.js'
import type {QuantScheme} from '../quant/scheme.js'
import {queueFull, shuttingDown} from './api-error.js'
import {ServedFigures} from './figures.js'
import {ServerMetrics} from './metrics.js'
import type {PreparedRequest, ServedModel} from './openai-requests.js'
import {loadOrMeasureProfile, stepMs, type LoadedProfile} from '../parallel/cost-profile.js'
import {AUTO_LOAD_WINDOW_MS, AutoParallel, AutoParallelPolicy, type ParallelChoice} from '../parallel/policy.js'

export interface EngineOptions {
  /** Most sequences of one P decoding together (--max-batch). */
  maxBatch: number
  /** Most generations running or waiting (--max-queue); more get 429. */
  maxQueue: number
  /** --parallel auto: chooses the P of requests that name none. */
  auto?: AutoParallel
  /** Each choice the policy makes, with its reason (serve --verbose prints them). */
  onChoice?: (choice: ParallelChoice) => void
}

export interface OpenEngineOptions extends EngineOptions {
  /** --parallel: the P of requests that name none (default: the model's largest); `auto` chooses per request. */
  parallel?: number | 'auto'
  /** --auto-budget: how many times the P = 1 step a lone request's step may take. */
  autoBudget?: number
  /** Measure the cost profile again even when one is cached. */
  refreshProfile?: boolean
  /** The cost profile is being measured (first use): a line for the user. */
  onMeasuring?: () => void
  threads?: number
  device?: Device
  /** --quant: a checkpoint is converted (once, cached) with this scheme. */
  quant?: QuantScheme
  onProgress?: ResolveOptions['onProgress']
  onNotice?: ResolveOptions['onNotice']
}

/** Room for some generations, held from admission until they finish. */
export interface Admission {
  readonly count: number
  release(): void
}

/** One generated token of a choice: its text (may be empty) and the stream weights behind it. */
export interface GeneratedToken {
  text: string
  streamWeights?: Float32Array
}

export interface GenerateHooks {
  /** New text of choice `choice` (never empty). */
  onText?: (choice: number, text: string) => void
  /** Every generated token of choice `choice`, text or not (`stream_weights` sends one chunk per token). */
  onToken?: (choice: number, token: GeneratedToken) => void
  /** The client went away. */
  signal?: AbortSignal
}

/** What the engine runs on: a decoder it releases at the end (ParScaleModel; a fake one in tests). */
export type EngineModel<C extends SequenceCache> = Decoder<C> & {release(): Promise<void>}

/** The batcher's part the engine uses; none of it depends on the cache type. */
type Batcher = Pick<ContinuousBatcher<SequenceCache>, 'submit' | 'stats' | 'close'>

/** Seconds a refused client is told to wait: about one request's time on a small model. */
const RETRY_AFTER_SECONDS = 1

/** The name clients use for the model: the embedded one, a hub repo id, or a folder's name. */
export function servedModelId(modelName: string | undefined): string {
  if (modelName === undefined) return 'parscale-default'
  if (isRepoId(modelName)) return modelName
  return basename(resolve(modelName))
}

export class ServeEngine {
  readonly metrics: ServerMetrics
  /** Latency and memory per P as this server measured them (the page charts them). */
  readonly figures = new ServedFigures()
  /** With --parallel auto: the cost profile the policy predicts from, and whether it came from the cache. */
  profile: LoadedProfile | undefined
  private admitted = 0
  private closing = false
  /** Aborted when shutdown runs out of time: every generation stops at its next step. */
  private readonly shutdown = new AbortController()
  private readonly idleWaiters: (() => void)[] = []

  private constructor(
    readonly served: ServedModel,
    private readonly batcher: Batcher,
    private readonly releaseModel: () => Promise<void>,
    private readonly options: EngineOptions,
  ) {
    this.metrics = new ServerMetrics({
      parallelValues: served.parallelValues,
      queued: () => this.batcher.stats.queued,
      running: () => this.batcher.stats.running,
      inProgress: () => this.admitted,
    })
  }

  /** An engine over a loaded model; `generation` as the batcher takes it (EOS ids, detokenizer, context). */
  static over<C extends SequenceCache>(
    served: ServedModel,
    model: EngineModel<C>,
    generation: Omit<GenerationOptions, 'onToken' | 'signal'>,
    options: EngineOptions,
  ): ServeEngine {
    const batcher = new ContinuousBatcher(model, {maxBatch: options.maxBatch, generation})
    return new ServeEngine(served, batcher, () => model.release(), options)
  }

  static async open(modelName: string | undefined, options: OpenEngineOptions): Promise<ServeEngine> {
    const auto = options.parallel === 'auto'
    const fixed = options.parallel === 'auto' ? undefined : options.parallel
    const resolved = resolveModel(modelName, {parallel: fixed, quant: options.quant, onProgress: options.onProgress, onNotice: options.onNotice})
    const [tokenizer, defaults, model] = await Promise.all([
      TextTokenizer.load(resolved.packageDir),
      readGenerationDefaults(resolved.packageDir),
      // Any P the package has may be asked for, by up to maxBatch sequences a step: a quantized model
      // makes its P ≥ 4 decode graph now, not in the middle of the first such step.
      ParScaleModel.open(resolved.packageDir, {threads: options.threads, device: options.device ?? 'cpu', parallel: readManifest(resolved.packageDir).parallel, sequences: options.maxBatch}),
    ])
    const served: ServedModel = {
      id: servedModelId(modelName),
      tokenizer,
      defaults,
      context: defaults.contextLength ?? model.maxPositions,
      parallelValues: model.parallelValues,
      defaultParallel: resolved.parallel,
      ...(auto ? {autoParallel: true} : {}),
    }
    let autoParallel: AutoParallel | undefined
    let profile: LoadedProfile | undefined
    if (auto) {
      let loaded: LoadedProfile
      try {
        loaded = await loadOrMeasureProfile(resolved.packageDir, model, {threads: options.threads, device: options.device ?? 'cpu'}, options.maxBatch, {
          refresh: options.refreshProfile,
          onMeasuring: options.onMeasuring,
        })
      } catch (error) {
        await model.release()
        throw error
      }
      const policy = new AutoParallelPolicy(loaded.profile, model.parallelValues, {budget: options.autoBudget, maxBatch: options.maxBatch})
      autoParallel = new AutoParallel(policy, AUTO_LOAD_WINDOW_MS)
      profile = loaded
    }
    const context = served.context
    const engine = ServeEngine.over(served, model, generationOptions({tokenizer, defaults, context}), {...options, ...(autoParallel ? {auto: autoParallel} : {})})
    engine.profile = profile
    return engine
  }

  get inProgress(): number {
    return this.admitted
  }

  get isClosing(): boolean {
    return this.closing
  }

  /** Takes room for `count` generations, or refuses at once (429 over --max-queue, 503 while closing). */
  admit(count: number, onRelease?: () => void): Admission {
    if (this.closing) throw shuttingDown()
    if (this.admitted + count > this.options.maxQueue) throw queueFull(this.options.maxQueue, RETRY_AFTER_SECONDS)
    this.admitted += count
    let released = false
    return {
      count,
      release: () => {
        if (released) return
        released = true
        onRelease?.()
        this.admitted -= count
        if (this.admitted === 0) for (const wake of this.idleWaiters.splice(0)) wake()
      },
    }
  }

  /**
   * Admits an HTTP request's generations (as `admit`) and settles their P: chosen by the
   * --parallel auto policy against the requests in flight when the request left it to the server;
   * counted in the metrics by P and by who chose it.
   */
  async admitRequest(prepared: PreparedRequest): Promise<Admission> {
    const auto = this.options.auto
    const ends: (() => void)[] = []
    const admission = this.admit(prepared.requests.length, () => ends.forEach((end) => end()))
    try {
      if (prepared.auto && auto) {
        // A request finding the server idle waits about one P = 1 step, so a burst is seen as one.
        const choice = await auto.chooseGathered(Math.min(100, stepMs(auto.policy.profile, 1)))
        prepared.parallel = choice.parallel
        for (const request of prepared.requests) request.parallel = choice.parallel
        this.options.onChoice?.(choice)
      }
    } catch (error) {
      admission.release()
      throw error
    }
    if (auto) for (const _ of prepared.requests) ends.push(auto.begin(prepared.parallel))
    this.metrics.parallelChosen(prepared.parallel, prepared.chosenBy, prepared.requests.length)
    return admission
  }

  /** Generates the admitted requests (one per choice) in the shared batch; releases the admission when all are done. */
  async generate(admission: Admission, requests: GenerationRequest[], hooks: GenerateHooks = {}): Promise<GenerationResult[]> {
    if (requests.length !== admission.count) throw new Error('generate: admitted for a different number of requests')
    const signal = hooks.signal ? AbortSignal.any([hooks.signal, this.shutdown.signal]) : this.shutdown.signal
    try {
      // Settled, not Promise.all: the admission is released only when every choice is done.
      const settled = await Promise.allSettled(
        requests.map(async (request, choice) => {
          const timer = this.metrics.generation(request.parallel)
          const result = await this.batcher.submit(request, {
            signal,
            onToken: ({text, streamWeights}) => {
              timer.token()
              hooks.onToken?.(choice, {text, ...(streamWeights ? {streamWeights} : {})})
              if (text !== '') hooks.onText?.(choice, text)
            },
          })
          timer.finish(result)
          this.figures.record(result)
          return result
        }),
      )
      const failed = settled.find((s) => s.status === 'rejected')
      if (failed) throw failed.reason
      return settled.map((s) => (s as PromiseFulfilledResult<GenerationResult>).value)
    } finally {
      admission.release()
    }
  }

  /** Refuses new generations from now on (503); those admitted go on. */
  stopAccepting(): void {
    this.closing = true
  }

  /** Ends every running generation at its next step (finish reason `abort`). */
  abortAll(): void {
    this.shutdown.abort()
  }

  /** Resolves once no admitted generation is left. */
  idle(): Promise<void> {
    if (this.admitted === 0) return Promise.resolve()
    return new Promise((resolve) => this.idleWaiters.push(resolve))
  }

  async close(): Promise<void> {
    this.stopAccepting()
    await this.batcher.close()
    await this.releaseModel()
  }
}
