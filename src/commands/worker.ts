import {Flags} from '@oclif/core'

import {BaseCommand} from '../base-command.js'
import {onStopRequest} from '../core/processes.js'
import {checkQueueUrl} from '../core/queue/connection.js'
import {defaultConcurrency, QueueWorker} from '../core/queue/worker.js'
import {queueFlag} from '../flags/queue.js'
import {UsageError} from '../core/errors.js'
import {parseAutoBudget} from '../core/parallel/policy.js'
import {Progress} from '../ui/progress.js'
import {BatchLog, workerProgress} from '../ui/queue-report.js'

export default class WorkerCommand extends BaseCommand {
  static override summary = 'Generate queued batch lines (from `batch submit`) until stopped'

  static override description = `Serves every model with queued batches that this machine can run: the submitter's folder, hub repo id or the embedded model resolved here (or one of --model), with the same package fingerprint as the jobs. A model it cannot serve gets one line on stderr, and its jobs stay for other workers.
Lines of one model and P decode --batch-size at a time, a new line joining as another finishes (continuous batching, as \`run --batch\`); each result is stored on its job. Run as many workers as you like, on any machine that reaches Redis: a worker that dies (kill -9, a lost machine) loses nothing, as its jobs go back to the queue once their lock expires (--stall-timeout). SIGTERM or Ctrl-C finishes the lines in hand, then exits; a second one exits at once. Started through npx or npm run, it finishes the same way when npm exits (npm signals only the shell it started, so SIGTERM sent to npx never reaches the worker).
Progress is shown when stderr is a terminal; otherwise (a service's journal, a container's log) the worker writes one line per batch on stderr when its share of the batch is done, or when it stops: lines done, tokens, tokens/s.`

  static override examples = [
    '<%= config.bin %> worker --queue redis://localhost:6379',
    {description: 'Serve a package kept under another path than the submitter\'s', command: '<%= config.bin %> worker --queue redis://queue.internal:6379 --model /models/parscale-1.8b --threads 8'},
  ]

  static override flags = {
    queue: queueFlag,
    'batch-size': Flags.integer({description: 'sequences of one model and P decoding together (new lines join as others finish)', min: 1, default: 8}),
    concurrency: Flags.integer({description: 'lines held at once per model (default: --batch-size + max(2, --batch-size / 4), so a finished line\'s place is refilled at the next step)', min: 1}),
    model: Flags.string({description: 'a model this machine has (package, checkpoint folder or hub repo id), served to jobs whose fingerprint it matches (repeatable)', multiple: true, helpValue: 'MODEL'}),
    threads: Flags.integer({description: 'ONNX Runtime intra-op threads', min: 1}),
    parallel: Flags.string({description: 'auto: lines that named no "parallel" get a P chosen here, from this machine\'s measured cost profile and the lines in hand (lines submitted with --parallel auto always do; docs/auto-parallel.md)', options: ['auto'], helpValue: 'auto'}),
    'auto-budget': Flags.string({description: 'with --parallel auto: a lone line gets the largest P whose decode step is at most this many times P = 1\'s (default 1.25)', helpValue: 'X'}),
    'stall-timeout': Flags.integer({description: 'seconds before the lines of a worker that stopped answering go to another worker', min: 1, default: 30, helpValue: 'SECONDS'}),
  }

  async run(): Promise<void> {
    const {flags} = await this.parse(WorkerCommand)
    const url = checkQueueUrl(flags.queue)
    const autoBudget = parseAutoBudget(flags['auto-budget'])
    if (autoBudget !== undefined && flags.parallel !== 'auto') throw new UsageError('--auto-budget needs --parallel auto')
    const progress = new Progress('connecting', Boolean(process.stderr.isTTY))
    // Off a terminal (a journal, a container log) nothing repaints: one line per batch instead.
    const batchLog = process.stderr.isTTY ? undefined : new BatchLog((line) => process.stderr.write(line + '\n'))
    const state = {serving: [] as string[], done: 0, failed: 0, tokens: 0, startedAt: 0}
    let worker: QueueWorker | undefined
    const repaint = () => {
      const seconds = state.startedAt > 0 ? (Date.now() - state.startedAt) / 1000 : 0
      progress.update(workerProgress({...state, seconds, held: worker?.held ?? 0}))
    }
    const settings = {
      url,
      batchSize: flags['batch-size'],
      concurrency: flags.concurrency ?? defaultConcurrency(flags['batch-size']),
      threads: flags.threads,
      autoParallel: flags.parallel === 'auto',
      ...(autoBudget !== undefined ? {autoBudget} : {}),
      models: flags.model ?? [],
      stallSeconds: flags['stall-timeout'],
    }
    try {
      worker = await QueueWorker.start(settings, {
        serving: (model) => {
          state.serving.push(model.label)
          progress.log(`serving ${model.label} (fingerprint ${model.fingerprint})`)
        },
        refused: (model, reason) => progress.log(`parscale: not serving ${model.label} (fingerprint ${model.fingerprint}): ${reason}; its lines stay queued for other workers`),
        lineStarted: (batch, model) => {
          state.startedAt ||= Date.now()
          batchLog?.started(batch, model.label)
          repaint()
        },
        lineDone: (line) => {
          if (line.ok) state.done++
          else state.failed++
          state.tokens += line.tokens
          batchLog?.finished(line.batch, line.ok, line.tokens)
          repaint()
        },
        connection: (_state, detail) => progress.log(detail),
        notice: (line) => progress.log(line),
        error: (message) => progress.log(`parscale: ${message}`),
      })
    } catch (error) {
      progress.stop()
      throw error
    }
    repaint()
    const started = worker
    await new Promise<void>((resolve) => {
      const stopWatching = onStopRequest((cause, again) => {
        if (again) process.exit(130)
        if (cause === 'launcher exited') progress.log('npm exited: finishing the lines in hand')
        progress.update('finishing the lines in hand (again to quit now)')
        void started.close().then(() => {
          stopWatching()
          resolve()
        })
      })
    })
    batchLog?.flush()
    progress.stop()
  }
}
