/**
 * Continuous batching, as llama-server's slots do it: each P has a cache whose first slots
 * hold the sequences decoding together. A request that arrives while others decode is
 * prefilled (in chunks, one per step, so running streams keep flowing) into the next slot and
 * joins the batch; a sequence that finishes or is aborted leaves at once and the last slot
 * moves into its place. Requests of different P run in separate calls, one per P per step.
 */
import {UserError} from '../errors.js'
import type {Decoder, DecoderOutput, SequenceCache} from '../engine/decoder.js'
import {checkRequest, decodeGreedyBurst, lastPosition, Row, type GenerationOptions, type GenerationRequest, type GenerationResult, type TokenEvent} from './generation.js'

/** Tokens a lone greedy sequence runs on the device before the batcher looks for new requests again. */
const GREEDY_BURST = 32

export interface SubmitHooks {
  onToken?: (event: Omit<TokenEvent, 'index'>) => void
  /** Aborting finishes the request with `abort` at the next step (or at once while queued). */
  signal?: AbortSignal
}

export interface BatcherOptions {
  /** Most sequences of one P decoding at once. */
  maxBatch: number
  generation: Omit<GenerationOptions, 'onToken' | 'signal'>
}

export interface BatcherStats {
  queued: number
  /** P → sequences prefilling or decoding. */
  running: Record<number, number>
}

interface Job {
  request: GenerationRequest
  hooks: SubmitHooks
  submittedAt: number
  resolve: (result: GenerationResult) => void
  reject: (error: unknown) => void
}

interface Running {
  job: Job
  row: Row
}

interface Group<C extends SequenceCache> {
  cache: C
  /** Slot i holds decoding[i]. */
  decoding: Running[]
  /** At slot decoding.length while its prompt goes in. */
  prefilling?: Running & {fed: number}
}

export class ContinuousBatcher<C extends SequenceCache> {
  private readonly waiting: Job[] = []
  private readonly groups = new Map<number, Group<C>>()
  private loop: Promise<void> | undefined
  private closed = false
  private readonly idleWaiters: (() => void)[] = []

  constructor(
    private readonly decoder: Decoder<C>,
    private readonly options: BatcherOptions,
  ) {
    if (!(Number.isInteger(options.maxBatch) && options.maxBatch >= 1)) throw new RangeError('maxBatch must be a whole number >= 1')
  }

  /** Checks a request as `submit` would, so a caller can refuse a bad one before queueing. */
  check(request: GenerationRequest): void {
    checkRequest(request, this.options.generation.contextLength)
    if (!this.decoder.parallelValues.includes(request.parallel)) {
      throw new UserError(`the model has no P = ${request.parallel}; available: ${this.decoder.parallelValues.join(', ')}`)
    }
  }

  submit(request: GenerationRequest, hooks: SubmitHooks = {}): Promise<GenerationResult> {
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(new UserError('the batcher is closed'))
      this.check(request)
      const job: Job = {request, hooks, submittedAt: performance.now(), resolve, reject}
      if (hooks.signal?.aborted) return resolve(this.abortedWhileQueued(job))
      hooks.signal?.addEventListener('abort', () => this.dropIfWaiting(job), {once: true})
      this.waiting.push(job)
      this.start()
    })
  }

  get stats(): BatcherStats {
    const running: Record<number, number> = {}
    for (const [parallel, group] of this.groups) running[parallel] = group.decoding.length + (group.prefilling ? 1 : 0)
    return {queued: this.waiting.length, running}
  }

  /** Resolves once nothing runs or waits. */
  idle(): Promise<void> {
    if (!this.loop && this.waiting.length === 0) return Promise.resolve()
    return new Promise((resolve) => this.idleWaiters.push(resolve))
  }

  /** Stops taking requests; what was submitted still finishes. */
  async close(): Promise<void> {
    this.closed = true
    await this.idle()
  }

  private start(): void {
    if (this.loop) return
    this.loop = this.run().finally(() => {
      this.loop = undefined
      if (this.waiting.length > 0) this.start()
      else for (const wake of this.idleWaiters.splice(0)) wake()
    })
  }

  private async run(): Promise<void> {
    while (this.waiting.length > 0 || this.groups.size > 0) {
      this.admit()
      for (const [parallel, group] of this.groups) {
        try {
          await this.prefillStep(group)
          await this.decodeStep(group)
        } catch (error) {
          this.fail(group, error)
        }
        if (group.decoding.length === 0 && !group.prefilling) {
          group.cache.dispose?.()
          this.groups.delete(parallel)
        }
      }
    }
  }

  /** Moves waiting requests, in order, into a slot of their P while there is room. */
  private admit(): void {
    for (let i = 0; i < this.waiting.length; i++) {
      const job = this.waiting[i]
      const parallel = job.request.parallel
      let group = this.groups.get(parallel)
      if (group && (group.prefilling || group.decoding.length >= this.options.maxBatch)) continue
      if (!group) {
        group = {cache: this.decoder.newCache(parallel), decoding: []}
        this.groups.set(parallel, group)
      }
      this.waiting.splice(i--, 1)
      const {request} = job
      const onToken = job.hooks.onToken
      const row = new Row(0, request, request.promptIds.length, request.promptIds, {
        ...this.options.generation,
        ...(onToken ? {onToken: ({index: _, ...event}: TokenEvent) => onToken(event)} : {}),
      })
      const slot = group.decoding.length
      const context = this.options.generation.contextLength ?? Infinity
      group.cache.reserve(slot + 1, Math.min(request.promptIds.length + request.maxNewTokens, context))
      group.cache.reset(slot)
      group.prefilling = {job, row, fed: 0}
    }
  }

  /** One chunk of the prompt going in; when it is all in, the first token and a place in the batch. */
  private async prefillStep(group: Group<C>): Promise<void> {
    const entry = group.prefilling
    if (!entry) return
    const {row, job} = entry
    const slot = group.decoding.length
    if (job.hooks.signal?.aborted) {
      group.prefilling = undefined
      return this.finish(entry, 'abort')
    }
    const prompt = job.request.promptIds
    const chunk = this.decoder.prefillChunk(group.cache.parallel, group.cache.capacity)
    const ids = prompt.slice(entry.fed, entry.fed + chunk)
    const out = await this.decoder.forward(group.cache, slot, [ids], 1)
    entry.fed += ids.length
    if (entry.fed < prompt.length) return
    group.prefilling = undefined
    this.advance(row, out, 0)
    if (row.done) this.finish(entry)
    else group.decoding.push(entry)
  }

  /**
   * One token for every decoding sequence of the group; finished ones leave. A sequence alone
   * (nothing prefilling or waiting) that takes the argmax, on a decoder that chains greedy steps on
   * its device, runs up to GREEDY_BURST tokens at once instead.
   */
  private async decodeStep(group: Group<C>): Promise<void> {
    if (group.decoding.length === 0) return
    const prefillSlot = group.decoding.length
    const alone = group.decoding.length === 1 && !group.prefilling && this.waiting.length === 0 ? group.decoding[0] : undefined
    if (!(alone && (await decodeGreedyBurst(this.decoder, group.cache, 0, alone.row, GREEDY_BURST, alone.job.hooks.signal)))) {
      const out = await this.decoder.forward(group.cache, 0, group.decoding.map(({row}) => [row.lastToken]), 1)
      group.decoding.forEach(({row, job}, b) => {
        if (job.hooks.signal?.aborted) row.finish('abort', performance.now())
        else this.advance(row, out, b)
      })
    }
    for (let b = group.decoding.length - 1; b >= 0; b--) {
      if (!group.decoding[b].row.done) continue
      this.finish(group.decoding[b])
      const last = group.decoding.length - 1
      if (b !== last) {
        group.cache.move(last, b)
        group.decoding[b] = group.decoding[last]
      }
      group.decoding.pop()
    }
    // A prompt still going in sits right after the decoding slots: it follows them down.
    if (group.prefilling && group.decoding.length !== prefillSlot) group.cache.move(prefillSlot, group.decoding.length)
  }

  private advance(row: Row, out: DecoderOutput, index: number): void {
    const {logits, streamWeights} = lastPosition(out, index)
    row.step(logits, performance.now(), streamWeights)
  }

  private finish(entry: Running, reason?: 'abort'): void {
    if (reason) entry.row.finish(reason, performance.now())
    entry.job.resolve(entry.row.result(entry.job.submittedAt))
  }

  /** A failed call ends the group's sequences with its error; the others go on. */
  private fail(group: Group<C>, error: unknown): void {
    for (const entry of [...group.decoding, ...(group.prefilling ? [group.prefilling] : [])]) entry.job.reject(error)
    group.decoding = []
    group.prefilling = undefined
  }

  private dropIfWaiting(job: Job): void {
    const i = this.waiting.indexOf(job)
    if (i < 0) return
    this.waiting.splice(i, 1)
    job.resolve(this.abortedWhileQueued(job))
  }

  private abortedWhileQueued(job: Job): GenerationResult {
    const row = new Row(0, job.request, job.request.promptIds.length, job.request.promptIds, this.options.generation)
    row.finish('abort', performance.now())
    return row.result(job.submittedAt)
  }
}

/**
 * Generates every request (any mix of P), `batchSize` sequences per P decoding at once;
 * results in input order, each also handed to `onResult` as soon as it and all before it are done
 * (and to `onFinish` as soon as it is done, in any order: for progress).
 */
export async function generateAll<C extends SequenceCache>(
  decoder: Decoder<C>,
  requests: GenerationRequest[],
  batchSize: number,
  options: GenerationOptions,
  onResult?: (result: GenerationResult, index: number) => void,
  onFinish?: (result: GenerationResult, index: number) => void,
): Promise<GenerationResult[]> {
  const {onToken, signal, ...generation} = options
  const batcher = new ContinuousBatcher(decoder, {maxBatch: batchSize, generation})
  for (const request of requests) batcher.check(request) // every request is checked before any runs
  const results: (GenerationResult | undefined)[] = requests.map(() => undefined)
  let printed = 0
  await Promise.all(
    requests.map(async (request, index) => {
      results[index] = await batcher.submit(request, {
        ...(onToken ? {onToken: (event) => onToken({...event, index})} : {}),
        ...(signal ? {signal} : {}),
      })
      onFinish?.(results[index]!, index)
      for (; printed < results.length && results[printed]; printed++) onResult?.(results[printed]!, printed)
    }),
  )
  return results as GenerationResult[]
}
