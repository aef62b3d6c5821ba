/**
 * `--parallel auto`: the P a new request gets, from the package's measured cost profile and the
 * requests already in flight. P is fixed for a request once chosen.
 *
 * - Alone, a request gets the largest P whose decode step is within `budget` × the P = 1 step
 *   (more streams buy quality while a step is memory-bound and costs little more).
 * - With others in flight, the largest P that keeps the predicted throughput of everything in
 *   flight at ≥ `floor` × what it would be with every request at P = 1 (and the step within the
 *   budget). So under load new requests fall to small P, and when load falls they rise again.
 *
 * The prediction follows the batcher: each P runs as its own call per step over at most
 * `maxBatch` of its sequences, so a step costs Σ over P groups of step(rows of that group), and
 * yields one token per decoding sequence.
 */
import {UsageError} from '../errors.js'
import {stepMs, type CostProfile} from './cost-profile.js'

export const DEFAULT_AUTO_BUDGET = 1.25
export const DEFAULT_THROUGHPUT_FLOOR = 0.9

export interface PolicyOptions {
  /** Alone: largest P whose step ≤ budget × the P = 1 step (--auto-budget). */
  budget?: number
  /** Under load: throughput at least floor × all-P = 1's. */
  floor?: number
  /** Sequences of one P decoding together (--max-batch / --batch-size). */
  maxBatch: number
}

export interface ParallelChoice {
  parallel: number
  /** Why, in one line for --verbose: "auto: P=4 because …". */
  reason: string
}

/** `--auto-budget`: a number > 0 (how many times the P = 1 step a lone request may take). */
export function parseAutoBudget(input: string | undefined): number | undefined {
  if (input === undefined) return undefined
  const value = Number(input)
  if (input.trim() === '' || !Number.isFinite(value) || value <= 0) throw new UsageError(`--auto-budget must be a number > 0 (got "${input}")`)
  return value
}

/** `--parallel`: a whole number >= 1, or `auto`. */
export function parseParallel(input: string | undefined, flag = '--parallel'): number | 'auto' | undefined {
  if (input === undefined) return undefined
  if (input.trim().toLowerCase() === 'auto') return 'auto'
  const value = Number(input)
  if (input.trim() === '' || !Number.isInteger(value) || value < 1) throw new UsageError(`${flag} must be a whole number >= 1 or auto (got "${input}")`)
  return value
}

const round = (ms: number) => (ms >= 100 ? ms.toFixed(0) : ms.toFixed(1))

export class AutoParallelPolicy {
  readonly budget: number
  readonly floor: number
  private readonly ascending: number[]

  constructor(
    readonly profile: Pick<CostProfile, 'decode'>,
    parallelValues: number[],
    private readonly options: PolicyOptions,
  ) {
    this.budget = options.budget ?? DEFAULT_AUTO_BUDGET
    this.floor = options.floor ?? DEFAULT_THROUGHPUT_FLOOR
    if (!(this.budget > 0)) throw new RangeError('budget must be > 0')
    this.ascending = [...parallelValues].sort((a, b) => a - b)
  }

  /** Predicted milliseconds of one step and tokens it yields, for requests at these P values. */
  predict(parallels: number[]): {ms: number; tokens: number} {
    const counts = new Map<number, number>()
    for (const p of parallels) counts.set(p, (counts.get(p) ?? 0) + 1)
    let ms = 0
    let tokens = 0
    for (const [p, count] of counts) {
      const decoding = Math.min(count, this.options.maxBatch)
      ms += stepMs(this.profile, decoding * p)
      tokens += decoding
    }
    return {ms, tokens}
  }

  /** The P for a new request, given the P of each request in flight (running or waiting). */
  choose(inFlight: readonly number[]): ParallelChoice {
    const single = stepMs(this.profile, 1)
    if (inFlight.length === 0) {
      const fits = this.ascending.filter((p) => stepMs(this.profile, p) <= this.budget * single)
      const parallel = fits.length > 0 ? fits[fits.length - 1] : this.ascending[0]
      const next = this.ascending.find((p) => p > parallel)
      const step = stepMs(this.profile, parallel)
      return {
        parallel,
        reason:
          `auto: P=${parallel} because alone its step is ${round(step)} ms, ${(step / single).toFixed(2)}× P=1's ${round(single)} ms (budget ${this.budget}×)` +
          (next === undefined ? '' : `; P=${next} would be ${(stepMs(this.profile, next) / single).toFixed(2)}×`),
      }
    }
    const allOne = this.predict(inFlight.map(() => 1).concat(1))
    const baseline = allOne.tokens / allOne.ms
    let best: {parallel: number; ratio: number; stepRatio: number} | undefined
    let refused: {parallel: number; ratio: number; stepRatio: number} | undefined
    for (const p of [...this.ascending].reverse()) {
      const mixed = this.predict([...inFlight, p])
      const ratio = mixed.tokens / mixed.ms / baseline
      const stepRatio = mixed.ms / allOne.ms
      if ((ratio >= this.floor && stepRatio <= this.budget) || p === this.ascending[0]) {
        best = {parallel: p, ratio, stepRatio}
        break
      }
      refused ??= {parallel: p, ratio, stepRatio}
    }
    const chosen = best!
    const load = `${inFlight.length} other request${inFlight.length === 1 ? '' : 's'} in flight (${inFlight.reduce((a, b) => a + b, 0)} rows)`
    if (chosen.ratio < this.floor || chosen.stepRatio > this.budget) {
      return {
        parallel: chosen.parallel,
        reason: `auto: P=${chosen.parallel} because with ${load} no P keeps throughput at ${this.floor}× all-P=1's (P=${chosen.parallel} gives ${chosen.ratio.toFixed(2)}×, and stays best once they are done)`,
      }
    }
    return {
      parallel: chosen.parallel,
      reason:
        `auto: P=${chosen.parallel} because with ${load} it keeps throughput at ${chosen.ratio.toFixed(2)}× all-P=1's (floor ${this.floor}×)` +
        (refused && refused.parallel !== chosen.parallel ? `; P=${refused.parallel} would give ${refused.ratio.toFixed(2)}×` : ''),
    }
  }
}

/** How long a burst of requests still counts as load after it passed (serve, worker). */
export const AUTO_LOAD_WINDOW_MS = 250

/** The requests in flight at their P, and how many there were lately. */
export class AutoParallelLoad {
  private readonly inFlight = new Map<number, number>()
  private nextId = 0
  private recent: {at: number; count: number}[] = []

  constructor(private readonly now: () => number = () => performance.now()) {}

  /** The P values in flight now. */
  get parallels(): number[] {
    return [...this.inFlight.values()]
  }

  /** The most requests in flight at once within the last `windowMs`. */
  recentPeak(windowMs: number): number {
    const now = this.now()
    this.recent = this.recent.filter((r) => now - r.at <= windowMs)
    return Math.max(this.inFlight.size, ...this.recent.map((r) => r.count))
  }

  /** Counts a request at `parallel` in flight until the returned function is called. */
  begin(parallel: number): () => void {
    const id = this.nextId++
    this.inFlight.set(id, parallel)
    let ended = false
    return () => {
      if (ended) return
      ended = true
      // The others still in flight as it left: a sequential client stays alone, while in a burst that
      // is ending the requests that follow a moment later still see the ones before them.
      this.inFlight.delete(id)
      this.recent.push({at: this.now(), count: this.inFlight.size})
    }
  }
}

/**
 * The policy over a live load (a server's requests, a worker's lines). A burst that has just
 * passed still counts for `windowMs` (its peak, as P = 1 requests), so requests arriving a moment
 * apart under steady load are not each taken for a lone one.
 */
export class AutoParallel {
  /** Requests waiting for their P (counted as P = 1 load by the others). */
  private pending = 0

  constructor(
    readonly policy: AutoParallelPolicy,
    private readonly windowMs = 0,
    now: () => number = () => performance.now(),
    readonly load: AutoParallelLoad = new AutoParallelLoad(now),
  ) {}

  /** Chooses a P for a new request against the load (in flight now, or the recent peak). */
  choose(): ParallelChoice {
    const current = this.load.parallels.concat(Array.from({length: this.pending}, () => 1))
    const padding = Math.max(0, this.load.recentPeak(this.windowMs) - current.length)
    return this.policy.choose(current.concat(Array.from({length: padding}, () => 1)))
  }

  /**
   * As `choose`, but a request that finds nothing in flight first waits `gatherMs` (about one P = 1
   * step): requests of a burst arrive a few milliseconds apart, and the first of them would
   * otherwise be taken for a lone one and run at a large P beside all the others.
   */
  async chooseGathered(gatherMs: number): Promise<ParallelChoice> {
    const idle = this.pending === 0 && this.load.recentPeak(this.windowMs) === 0
    this.pending++
    try {
      if (idle && gatherMs > 0) await new Promise((resolve) => setTimeout(resolve, gatherMs))
    } finally {
      this.pending--
    }
    return this.choose()
  }

  /** Counts a request at `parallel` in flight until the returned function is called. */
  begin(parallel: number): () => void {
    return this.load.begin(parallel)
  }
}

/**
 * P for the requests of a batch that name none (`run --batch`): all its lines are submitted
 * together, so each is chosen against every other line (those naming a P at it, those chosen
 * before at theirs, those still to choose as P = 1). A one-line batch is a lone request.
 * Returns each chosen line's choice (undefined for the lines that name their P).
 */
export function assignAutoParallel(policy: AutoParallelPolicy, requests: {parallel: number}[], chosen: readonly boolean[]): (ParallelChoice | undefined)[] {
  const planned = requests.map((request, i) => (chosen[i] ? 1 : request.parallel))
  return requests.map((request, i) => {
    if (!chosen[i]) return undefined
    const choice = policy.choose(planned.filter((_, j) => j !== i))
    request.parallel = choice.parallel
    planned[i] = choice.parallel
    return choice
  })
}
