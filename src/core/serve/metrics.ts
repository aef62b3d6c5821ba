/**
 * The server's Prometheus metrics (prom-client, its own registry, names prefixed `parscale_`):
 * requests by endpoint and status, tokens, queue depth and running rows per P (read from the
 * batcher when scraped), time to first token and time per output token. Queue depth and
 * requests in progress are what an autoscaler should watch (docs/deploy.md).
 */
import {collectDefaultMetrics, Counter, Gauge, Histogram, Registry} from 'prom-client'

import type {GenerationResult} from '../generation/generation.js'

/** Live numbers read at scrape time. */
export interface MetricsSource {
  parallelValues: number[]
  /** Requests waiting for a slot in the batch. */
  queued(): number
  /** P → sequences prefilling or decoding. */
  running(): Record<number, number>
  /** Generations accepted and not finished (queued + running): what --max-queue limits. */
  inProgress(): number
}

/** Times one generation from the moment it was submitted. */
export interface GenerationTimer {
  token(now?: number): void
  finish(result: GenerationResult): void
}

const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
const TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]

export class ServerMetrics {
  readonly registry = new Registry()
  private readonly requests: Counter<'endpoint' | 'status'>
  private readonly generatedTokens: Counter<'parallel'>
  private readonly promptTokens: Counter<'parallel'>
  private readonly generations: Counter<'parallel' | 'finish_reason'>
  private readonly ttft: Histogram<'parallel'>
  private readonly tokenLatency: Histogram<'parallel'>
  private readonly chosen: Counter<'parallel' | 'by'>

  constructor(source: MetricsSource) {
    const registers = [this.registry]
    collectDefaultMetrics({register: this.registry, prefix: 'parscale_'})
    this.requests = new Counter({name: 'parscale_requests_total', help: 'HTTP requests answered, by endpoint and status code', labelNames: ['endpoint', 'status'], registers})
    this.generatedTokens = new Counter({name: 'parscale_generated_tokens_total', help: 'Tokens generated, by P', labelNames: ['parallel'], registers})
    this.promptTokens = new Counter({name: 'parscale_prompt_tokens_total', help: 'Prompt tokens processed, by P', labelNames: ['parallel'], registers})
    this.generations = new Counter({name: 'parscale_generations_total', help: 'Generations finished, by P and finish reason', labelNames: ['parallel', 'finish_reason'], registers})
    this.ttft = new Histogram({name: 'parscale_time_to_first_token_seconds', help: 'From a generation entering the queue to its first token', labelNames: ['parallel'], buckets: LATENCY_BUCKETS, registers})
    this.tokenLatency = new Histogram({name: 'parscale_time_per_output_token_seconds', help: 'Between consecutive tokens of one generation', labelNames: ['parallel'], buckets: TOKEN_BUCKETS, registers})
    this.chosen = new Counter({
      name: 'parscale_parallel_chosen_total',
      help: 'Generations admitted, by the P they run at and who chose it: auto (--parallel auto), request (its "parallel"), default (--parallel N)',
      labelNames: ['parallel', 'by'],
      registers,
    })
    new Gauge({
      name: 'parscale_queue_depth',
      help: 'Generations waiting for a slot in the batch',
      registers,
      collect() {
        this.set(source.queued())
      },
    })
    new Gauge({
      name: 'parscale_requests_in_progress',
      help: 'Generations accepted and not finished, queued or running (limited by --max-queue)',
      registers,
      collect() {
        this.set(source.inProgress())
      },
    })
    new Gauge({
      name: 'parscale_running_rows',
      help: 'Sequences prefilling or decoding, by P',
      labelNames: ['parallel'],
      registers,
      collect() {
        const running = source.running()
        for (const parallel of source.parallelValues) this.set({parallel: String(parallel)}, running[parallel] ?? 0)
      },
    })
  }

  /** A generation admitted at `parallel`, chosen `by` the policy, the request or the server's default. */
  parallelChosen(parallel: number, by: 'auto' | 'request' | 'default', count = 1): void {
    this.chosen.inc({parallel: String(parallel), by}, count)
  }

  request(endpoint: string, status: number): void {
    this.requests.inc({endpoint, status: String(status)})
  }

  generation(parallel: number, startedAt = performance.now()): GenerationTimer {
    const labels = {parallel: String(parallel)}
    let last: number | undefined
    return {
      token: (now = performance.now()) => {
        if (last === undefined) this.ttft.observe(labels, (now - startedAt) / 1000)
        else this.tokenLatency.observe(labels, (now - last) / 1000)
        last = now
        this.generatedTokens.inc(labels)
      },
      finish: (result) => {
        this.promptTokens.inc(labels, result.promptTokens)
        this.generations.inc({...labels, finish_reason: result.finishReason})
      },
    }
  }

  text(): Promise<string> {
    return this.registry.metrics()
  }

  get contentType(): string {
    return this.registry.contentType
  }
}
