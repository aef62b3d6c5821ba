import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../../base-command.js'
import {formatBytes, percent} from '../../core/format.js'
import {checkQueueUrl, displayUrl, withRedis} from '../../core/queue/connection.js'
import {checkBatchName, defaultBatchName} from '../../core/queue/jobs.js'
import {prepareBatch, submitBatch} from '../../core/queue/submit.js'
import {readBatchFile} from '../../core/run/batch-file.js'
import {planRun} from '../../core/run/plan.js'
import {generationFlagOptions, generationFlags} from '../../flags/generation.js'
import {quantFlags, quantFromFlags} from '../../flags/quant.js'
import {queueFlag} from '../../flags/queue.js'
import {Progress} from '../../ui/progress.js'
import {submitLine} from '../../ui/queue-report.js'

export default class BatchSubmit extends BaseCommand {
  static override summary = 'Queue a JSONL batch on Redis for `parscale worker`s on any machine'

  static override description = `FILE.jsonl has the lines \`run --batch\` takes, checked whole first with the same rules and messages: one {"prompt": …} or {"messages": […]} per line, optionally with "max_new_tokens" (or "max_tokens"), "temperature", "parallel" and "id" (given back on the line's result by \`batch collect\`), e.g.
  {"id": "fib", "prompt": "def fibonacci(n):", "max_new_tokens": 48}
With --parallel auto, lines that name no "parallel" are left to the worker that takes them: it chooses P from its own machine's measured cost profile and the lines it has in hand (docs/auto-parallel.md).
Each line becomes one job (id NAME#LINE) that records the model and its package fingerprint, the sampling settings and the line's own fields; submitting the same batch again adds only what is missing.
Workers (\`parscale worker --queue URL\`) on any machine that reaches Redis generate the lines; \`batch status\` shows the progress and \`batch collect\` writes the results in input order, the objects \`run --batch --json\` prints.

MODEL is a converted package, a checkpoint folder or a pulled hub repo id; without it, the embedded default model. A worker serves a job only when its own copy of the model has the same fingerprint.`

  static override examples = [
    {description: 'Queue prompts.jsonl as batch "prompts" for the default model', command: '<%= config.bin %> batch submit prompts.jsonl --queue redis://localhost:6379'},
    {description: 'A pulled hub model at P = 4, greedy, at most 64 new tokens, under a chosen name', command: '<%= config.bin %> batch submit prompts.jsonl ParScale/ParScale-1.8B --parallel 4 --temperature 0 -n 64 --name sweep-p4 --queue redis://queue.internal:6379'},
  ]

  static override args = {
    file: Args.string({description: 'JSONL file: one {"prompt": …} or {"messages": […]} per line', required: true}),
    model: Args.string({description: 'model package, checkpoint folder or hub repo id (default: the embedded model)'}),
  }

  static override flags = {
    queue: queueFlag,
    name: Flags.string({description: 'batch name (default: the file name without its extension)', helpValue: 'NAME'}),
    attempts: Flags.integer({description: 'tries per line before it is marked failed', min: 1, default: 3}),
    ...generationFlags,
    ...quantFlags,
    quiet: Flags.boolean({char: 'q', description: 'no progress on stderr'}),
  }

  async run(): Promise<void> {
    const {args, flags} = await this.parse(BatchSubmit)
    const url = checkQueueUrl(flags.queue)
    const name = flags.name === undefined ? defaultBatchName(args.file) : checkBatchName(flags.name)
    const generation = generationFlagOptions(flags)
    const plan = planRun({...generation, quant: quantFromFlags(flags), batch: args.file, chat: false, json: true, quiet: flags.quiet}, () => false)
    if (plan.mode !== 'batch') throw new Error('unreachable: a batch plan')
    const items = await readBatchFile(args.file)
    // Connected before the model loads (a conversion can take minutes): a wrong URL fails at once.
    const [spec, outcome] = await withRedis(url, async (redis) => {
      const progress = new Progress('preparing model', !flags.quiet && Boolean(process.stderr.isTTY))
      let prepared
      try {
        prepared = await prepareBatch(args.model, plan, items, {name, attempts: flags.attempts}, {
          onProgress: ({phase, doneBytes, totalBytes}) => progress.update(`${phase}: ${percent(doneBytes, totalBytes)} of ${formatBytes(totalBytes)}`),
          onLoading: () => progress.update('encoding prompts'),
          onNotice: (line) => progress.log(line),
        })
      } finally {
        progress.stop()
      }
      return [prepared.spec, await submitBatch(redis, prepared)] as const
    })
    this.log(submitLine(spec, outcome, displayUrl(url)))
  }
}
