/** How the queue commands report: submit's line, `batch status`, the worker's progress. */
import type {CollectSummary} from '../core/queue/collect.js'
import type {BatchSpec} from '../core/queue/jobs.js'
import type {BatchStatus} from '../core/queue/status.js'
import type {SubmitOutcome} from '../core/queue/submit.js'

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`
}

function modelText(spec: BatchSpec): string {
  return `${spec.model.label} (P=${spec.parallel}, fingerprint ${spec.model.fingerprint})`
}

export function submitLine(spec: BatchSpec, outcome: SubmitOutcome, where: string): string {
  const lines = spec.lines.length
  if (outcome.added === 0) return `batch ${spec.name}: all ${plural(lines, 'line')} already queued on ${where}; nothing added`
  const again = outcome.existing > 0 ? ` (${outcome.existing} were already queued)` : ''
  return `batch ${spec.name}: queued ${plural(outcome.added, 'line')} of ${spec.file}${again} for ${modelText(spec)} on ${where}`
}

export function statusLines(status: BatchStatus): string[] {
  const {spec, counts} = status
  const rate = status.tokensPerS === undefined ? '' : ` · ${status.tokensPerS.toFixed(1)} tokens/s`
  const missing = status.missing > 0 ? ` · missing ${status.missing}` : ''
  return [
    `batch ${spec.name} · ${plural(spec.lines.length, 'line')} of ${spec.file} · ${modelText(spec)} · submitted ${spec.submittedAt}`,
    `waiting ${counts.waiting} · active ${counts.active} · done ${counts.done} · failed ${counts.failed}${missing} · ${status.tokens} tokens${rate}`,
  ]
}

export function statusJson(status: BatchStatus): Record<string, unknown> {
  const {spec, counts} = status
  return {
    name: spec.name,
    file: spec.file,
    lines: spec.lines.length,
    model: spec.model.label,
    fingerprint: spec.model.fingerprint,
    parallel: spec.parallel,
    ...counts,
    missing: status.missing,
    tokens: status.tokens,
    tokens_per_s: status.tokensPerS === undefined ? null : Math.round(status.tokensPerS * 100) / 100,
  }
}

/** `FILE:LINE: failed after N attempts: reason`, one per failed line. */
export function failedLines(summary: CollectSummary): string[] {
  return summary.failed.map((f) => `${summary.file}:${f.line}: failed after ${plural(f.attempts, 'attempt')}: ${f.reason}`)
}

export function collectLine(summary: CollectSummary, out: string): string {
  const parts = [`${summary.done} done`]
  if (summary.failed.length > 0) parts.push(`${summary.failed.length} failed`)
  if (summary.unfinished > 0) parts.push(`${summary.unfinished} not finished`)
  return `${plural(summary.lines, 'line')} → ${out} (${parts.join(', ')})`
}

/** The worker's spinner text. */
export function workerProgress(state: {serving: string[]; done: number; failed: number; tokens: number; seconds: number; held: number}): string {
  if (state.serving.length === 0) return 'waiting for batches of a model this worker can serve'
  const rate = state.seconds > 0 ? ` · ${(state.tokens / state.seconds).toFixed(1)} tokens/s` : ''
  const failed = state.failed > 0 ? ` · ${state.failed} failed` : ''
  const doing = state.held > 0 ? `generating ${plural(state.held, 'line')}` : 'waiting for jobs'
  return `${doing} · ${plural(state.done, 'line')} done${failed}${rate} · serving ${state.serving.join(', ')}`
}

interface BatchShare {
  model: string
  inHand: number
  done: number
  failed: number
  tokens: number
  startedAt: number
  quiet?: NodeJS.Timeout
}

/**
 * The worker's log when stderr is not a terminal (a service's journal, a container's log): one
 * line per batch, when this worker has no line of it in hand for `settleMs` (its share of the
 * batch is done, or the queue ran dry), and for every batch still open when it stops.
 */
export class BatchLog {
  private readonly batches = new Map<string, BatchShare>()

  constructor(
    private readonly write: (line: string) => void,
    private readonly settleMs = 2000,
    private readonly now: () => number = Date.now,
  ) {}

  started(batch: string, model: string): void {
    const share = this.batches.get(batch) ?? {model, inHand: 0, done: 0, failed: 0, tokens: 0, startedAt: this.now()}
    clearTimeout(share.quiet)
    share.inHand++
    this.batches.set(batch, share)
  }

  finished(batch: string, ok: boolean, tokens: number): void {
    const share = this.batches.get(batch)
    if (!share) return
    share.inHand--
    if (ok) share.done++
    else share.failed++
    share.tokens += tokens
    if (share.inHand === 0) share.quiet = setTimeout(() => this.report(batch), this.settleMs).unref()
  }

  /** Reports every batch now (the worker is stopping). */
  flush(): void {
    for (const batch of [...this.batches.keys()]) this.report(batch)
  }

  private report(batch: string): void {
    const share = this.batches.get(batch)
    if (!share) return
    clearTimeout(share.quiet)
    this.batches.delete(batch)
    this.write(batchLogLine(batch, share, (this.now() - share.startedAt) / 1000))
  }
}

export function batchLogLine(batch: string, share: Pick<BatchShare, 'model' | 'done' | 'failed' | 'tokens'>, seconds: number): string {
  const failed = share.failed > 0 ? `, ${share.failed} failed` : ''
  const rate = seconds > 0 ? ` (${(share.tokens / seconds).toFixed(1)} tokens/s)` : ''
  return `batch ${batch}: ${plural(share.done, 'line')} done${failed} · ${share.tokens} tokens in ${seconds.toFixed(1)} s${rate} · ${share.model}`
}
