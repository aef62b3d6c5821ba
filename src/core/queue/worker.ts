/**
 * `parscale worker`: serves the queues of the models it can run. Every few seconds it reads
 * which models have batches (`parscale:models`); for each new one it resolves the model on
 * this machine (the submitter's folder, hub repo id or the embedded model, or one of the
 * worker's own `--model` packages) and compares package fingerprints. A match: it opens the
 * model and starts a BullMQ worker on that model's queue. No match: one line saying why, and
 * it never takes a job of that queue, so the jobs stay for workers that can serve them.
 *
 * Batching: BullMQ hands over one job per processor call, `concurrency` calls at once; each
 * call submits its line to the model's continuous batcher (served-model.ts), where lines of one
 * P decode together, `batchSize` at a time, a new line joining at the next step as another
 * finishes. When a line is done its job completes and BullMQ fetches the next one in the same
 * call; the rest stay in Redis for other workers. With `concurrency` = `batchSize` a finished
 * line's place stayed empty for a step while the next job came from Redis (measured: 265 decode
 * steps of 7.5 lines on average for 64 lines, against run --batch's 255 of 7.8); a few lines
 * more in hand than the batch holds wait in the batcher and fill it at once (255 of 7.8).
 * (Considered instead: grouping the jobs in hand into fixed batches, which idles slots until the
 * slowest line of a batch ends; or fetching jobs by hand with `getNextJob`, which gives up
 * BullMQ's lock renewal, stalled-job checks and graceful close.) Measured against
 * `run --batch`: docs/deploy.md.
 *
 * A worker that dies loses nothing: its jobs' locks expire and another worker's stalled-job
 * check puts them back (BullMQ); `close` finishes the lines in hand first.
 */
import {hostname} from 'node:os'

import {Worker, type Job} from 'bullmq'
import type {Redis} from 'ioredis'

import {UserError} from '../errors.js'
import {packageFingerprint} from '../package/manifest.js'
import {resolveModel} from '../package/resolve.js'
import {connectRedis, displayUrl, isConnectionError} from './connection.js'
import {batchKey, BULL_PREFIX, type LineJob, type ModelRef, MODELS_KEY, modelQueueName, readLineJob} from './jobs.js'
import {type JobResult, reasonOf, ServedModel} from './served-model.js'

/** Lines held per model by default: the batch and a few ready to take a finished line's place. */
export function defaultConcurrency(batchSize: number): number {
  return batchSize + Math.max(2, Math.ceil(batchSize / 4))
}

export interface WorkerSettings {
  url: string
  /** Sequences of one model and P decoding together. */
  batchSize: number
  /** Lines held at once (BullMQ concurrency), per model served. */
  concurrency: number
  threads?: number
  /** --parallel auto: lines that named no P get one chosen by this worker (lines submitted with --parallel auto always do). */
  autoParallel?: boolean
  /** --auto-budget. */
  autoBudget?: number
  /** Models this worker has under other paths than the submitters' (matched by fingerprint). */
  models: string[]
  /** How long the jobs of a worker that stopped answering stay locked before others take them. */
  stallSeconds: number
  /** How often to look for new models (ms). */
  pollMs?: number
}

export interface LineDone {
  model: ModelRef
  /** The batch the line belongs to. */
  batch: string
  ok: boolean
  tokens: number
}

export interface WorkerEvents {
  serving?(model: ModelRef): void
  refused?(model: ModelRef, reason: string): void
  /** A line of `batch` went into generation on `model`. */
  lineStarted?(batch: string, model: ModelRef): void
  lineDone?(line: LineDone): void
  connection?(state: 'lost' | 'back', detail: string): void
  /** One line about what resolving a model did on its own (a damaged package converted again). */
  notice?(line: string): void
  /** Unexpected errors (not the connection): one line each. */
  error?(message: string): void
}

/** Tokens and the span of a batch's generation, added into `parscale:batch:NAME` (for `batch status`). */
const ADD_COUNTERS = `
redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[1])
local first = tonumber(redis.call('HGET', KEYS[1], 'firstAt'))
if not first or tonumber(ARGV[2]) < first then redis.call('HSET', KEYS[1], 'firstAt', ARGV[2]) end
local last = tonumber(redis.call('HGET', KEYS[1], 'lastAt'))
if not last or tonumber(ARGV[3]) > last then redis.call('HSET', KEYS[1], 'lastAt', ARGV[3]) end
`

interface Counters {
  tokens: number
  firstAt: number
  lastAt: number
}

export class QueueWorker {
  private readonly served = new Map<string, {model: ServedModel; worker: Worker}>()
  /** Fingerprints decided (served, refused, or being opened). */
  private readonly decided = new Set<string>()
  private readonly counters = new Map<string, Counters>()
  private timers: NodeJS.Timeout[] = []
  private discovering: Promise<void> = Promise.resolve()
  private closing: Promise<void> | undefined
  private connected = true
  private inHand = 0

  private constructor(
    private readonly redis: Redis,
    private readonly settings: WorkerSettings,
    private readonly local: Map<string, string>,
    private readonly events: WorkerEvents,
  ) {}

  /** Connects (one line naming the URL if Redis cannot be reached), then serves until `close`. */
  static async start(settings: WorkerSettings, events: WorkerEvents = {}): Promise<QueueWorker> {
    const local = new Map<string, string>()
    for (const model of settings.models) {
      const {packageDir} = resolveModel(model, {onNotice: (line) => events.notice?.(line)})
      local.set(packageFingerprint(packageDir), packageDir)
    }
    const redis = await connectRedis(settings.url, {persistent: true})
    const worker = new QueueWorker(redis, settings, local, events)
    worker.watchConnection()
    await worker.discover()
    worker.timers = [setInterval(() => void worker.discover(), settings.pollMs ?? 2000), setInterval(() => void worker.flushCounters(), 1000)]
    return worker
  }

  /** Stops taking jobs, finishes the lines in hand, and disconnects. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      for (const timer of this.timers) clearInterval(timer)
      await this.discovering
      await Promise.all([...this.served.values()].map(({worker}) => worker.close()))
      for (const {model} of this.served.values()) await model.close()
      await this.flushCounters()
      this.redis.disconnect()
    })()
    return this.closing
  }

  /** Lines being generated. */
  get held(): number {
    return this.inHand
  }

  private watchConnection(): void {
    const where = displayUrl(this.settings.url)
    this.redis.on('error', () => {})
    this.redis.on('close', () => {
      if (!this.connected || this.closing) return
      this.connected = false
      this.events.connection?.('lost', `lost Redis at ${where}; reconnecting`)
    })
    this.redis.on('ready', () => {
      if (this.connected) return
      this.connected = true
      this.events.connection?.('back', `reconnected to Redis at ${where}`)
    })
  }

  private discover(): Promise<void> {
    this.discovering = this.discovering.then(async () => {
      if (this.closing || !this.connected) return
      let models: Record<string, string>
      try {
        models = await this.redis.hgetall(MODELS_KEY)
      } catch {
        return // the connection is down; the next round tries again
      }
      for (const [fingerprint, text] of Object.entries(models)) {
        if (this.decided.has(fingerprint) || this.closing) continue
        this.decided.add(fingerprint)
        let ref: ModelRef
        try {
          ref = {...(JSON.parse(text) as ModelRef), fingerprint}
        } catch {
          continue
        }
        try {
          await this.decide(ref)
        } catch (error) {
          this.events.refused?.(ref, reasonOf(error))
        }
      }
    })
    return this.discovering
  }

  private async decide(ref: ModelRef): Promise<void> {
    let packageDir = this.local.get(ref.fingerprint)
    if (!packageDir) {
      try {
        packageDir = resolveModel(ref.reference ?? undefined, {quant: ref.quant, onNotice: (line) => this.events.notice?.(line)}).packageDir
      } catch (error) {
        return this.events.refused?.(ref, error instanceof UserError ? error.message : reasonOf(error))
      }
      const here = packageFingerprint(packageDir)
      if (here !== ref.fingerprint) {
        return this.events.refused?.(ref, `here it is a different package (fingerprint ${here}, the jobs need ${ref.fingerprint})`)
      }
    }
    const {settings} = this
    const model = await ServedModel.open(ref, packageDir, {
      batchSize: settings.batchSize,
      threads: settings.threads,
      autoParallel: settings.autoParallel,
      autoBudget: settings.autoBudget,
      onMeasuring: (label) => this.events.notice?.(`measuring the cost profile of ${label} for --parallel auto (once per machine, cached beside the package)`),
    })
    const worker = new Worker<LineJob, JobResult>(modelQueueName(ref.fingerprint), (job) => this.process(job, model), {
      connection: this.redis,
      prefix: BULL_PREFIX,
      concurrency: settings.concurrency,
      lockDuration: settings.stallSeconds * 1000,
      stalledInterval: settings.stallSeconds * 1000,
      // A line whose worker dies every time (out of memory, say) fails at its third stall.
      maxStalledCount: 2,
      name: `${hostname()}:${process.pid}`,
    })
    worker.on('error', (error) => {
      if (!isConnectionError(error) && this.connected) this.events.error?.(reasonOf(error))
    })
    this.served.set(ref.fingerprint, {model, worker})
    this.events.serving?.(ref)
  }

  private async process(job: Job<LineJob, JobResult>, served: ServedModel): Promise<JobResult> {
    const line = readLineJob(job.data)
    if (line.model.fingerprint !== served.ref.fingerprint) {
      throw new Error(`the job is for model ${line.model.fingerprint}, on the queue of ${served.ref.fingerprint}`)
    }
    const started = Date.now()
    this.inHand++
    this.events.lineStarted?.(line.batch, served.ref)
    let result: JobResult | undefined
    try {
      result = await served.generate(line)
      return result
    } finally {
      this.inHand--
      const tokens = Number(result?.generated_tokens) || 0
      this.count(line.batch, tokens, started, Date.now())
      this.events.lineDone?.({model: served.ref, batch: line.batch, ok: result !== undefined, tokens})
    }
  }

  private count(batch: string, tokens: number, firstAt: number, lastAt: number): void {
    const c = this.counters.get(batch)
    if (!c) return void this.counters.set(batch, {tokens, firstAt, lastAt})
    c.tokens += tokens
    c.firstAt = Math.min(c.firstAt, firstAt)
    c.lastAt = Math.max(c.lastAt, lastAt)
  }

  /** The counters `batch status` shows; the results themselves are on the jobs. */
  private async flushCounters(): Promise<void> {
    if (this.counters.size === 0 || !this.connected) return
    const counters = [...this.counters]
    this.counters.clear()
    const pipeline = this.redis.pipeline()
    for (const [batch, c] of counters) pipeline.eval(ADD_COUNTERS, 1, batchKey(batch), c.tokens, c.firstAt, c.lastAt)
    await pipeline.exec().catch(() => {})
  }
}
