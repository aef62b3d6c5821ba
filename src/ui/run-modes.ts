/**
 * The non-interactive `parscale run` modes: one prompt streamed to stdout, and a JSONL
 * batch printed in input order. Timing goes to stderr unless --quiet or --json.
 */
import {readBatchFile} from '../core/run/batch-file.js'
import {generateAll} from '../core/generation/batcher.js'
import type {RunContext} from '../core/run/context.js'
import {batchRequests, generationOptions, promptRequest} from '../core/run/requests.js'
import {Progress} from './progress.js'
import {batchItemText, batchJsonResult, batchProgressLine, batchSummaryLine, jsonResult, type LineWriter, timingLine, writeTokenText} from './run-output.js'
import {answerStreamView} from './stream-view.js'
import {assignAutoParallel} from '../core/parallel/policy.js'
import type {LoadedProfile} from '../core/parallel/cost-profile.js'

/** Where the cost profile came from, for --verbose. */
export function profileLine(loaded: LoadedProfile): string {
  const p = loaded.profile
  const how = loaded.cached ? 'cached' : `measured now in ${(p.measureMs / 1000).toFixed(1)} s`
  return `auto: cost profile ${how} (${p.key}; ${loaded.file})`
}

/** The profile and the lone request's choice, for --verbose. */
export function autoLine(ctx: Pick<RunContext, 'auto'>): string {
  return ctx.auto ? `${profileLine(ctx.auto.profile)}\n${ctx.auto.alone.reason}` : ''
}

/** One prompt: stream the answer (or print one JSON line), timing on stderr. */
export async function runOneShot(ctx: RunContext, prompt: string, log: LineWriter): Promise<void> {
  const {options} = ctx
  if (ctx.auto && options.verbose) process.stderr.write(autoLine(ctx) + '\n')
  const request = promptRequest(ctx, prompt)
  const generation = generationOptions(ctx)
  if (!options.json) generation.onToken = writeTokenText
  const [result] = await generateAll(ctx.model, [request], 1, generation)
  if (options.json) log(JSON.stringify(jsonResult(result)))
  else process.stdout.write('\n')
  const streams = options.json ? undefined : answerStreamView(result, (ids) => ctx.tokenizer.decode(ids))
  if (streams) log(streams)
  if (!options.quiet && !options.json) process.stderr.write(timingLine(result) + '\n')
}

/**
 * A JSONL file, checked whole first, run `--batch-size` sequences at a time per P (a line may
 * name its own P), printed in input order.
 */
export async function runBatch(ctx: RunContext, file: string, log: LineWriter): Promise<void> {
  const {options} = ctx
  const items = await readBatchFile(file)
  const requests = batchRequests(ctx, file, items)
  if (ctx.auto) {
    const choices = assignAutoParallel(ctx.auto.policy, requests, items.map((item) => item.parallel === undefined))
    if (options.verbose) {
      process.stderr.write(profileLine(ctx.auto.profile) + '\n')
      choices.forEach((choice, i) => choice && process.stderr.write(`${file}:${items[i].line}: ${choice.reason}\n`))
    }
  }
  const started = performance.now()
  // A terminal watching stderr sees lines done and the rate while stdout goes to a file; the
  // summary closes the run in text mode, and after --json only on a terminal (scripts read stderr).
  const terminal = !options.quiet && Boolean(process.stderr.isTTY)
  const progress = new Progress(batchProgressLine(0, items.length, 0, 0), terminal)
  let done = 0
  let tokens = 0
  const repaint = () => progress.update(batchProgressLine(done, items.length, tokens, (performance.now() - started) / 1000))
  const generation = {...generationOptions(ctx), ...(terminal ? {onToken: () => (tokens++, repaint())} : {})}
  let results
  try {
    results = await generateAll(ctx.model, requests, ctx.numbers.batchSize, generation, (result, index) => {
      if (options.json) log(JSON.stringify(batchJsonResult(result, items[index].id)))
      else {
        const streams = answerStreamView(result, (ids) => ctx.tokenizer.decode(ids))
        log(batchItemText(file, items[index], result) + (streams ? `${streams}\n` : ''))
      }
    }, () => (done++, repaint()))
  } finally {
    progress.stop()
  }
  if (!options.quiet && (!options.json || terminal)) {
    const seconds = (performance.now() - started) / 1000
    process.stderr.write(batchSummaryLine(results, seconds) + '\n')
  }
}
