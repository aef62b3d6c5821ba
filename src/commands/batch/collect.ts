import {once} from 'node:events'
import {type FileHandle, open, rename, rm} from 'node:fs/promises'

import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../../base-command.js'
import {UserError} from '../../core/errors.js'
import {collectBatch} from '../../core/queue/collect.js'
import {checkQueueUrl, withRedis} from '../../core/queue/connection.js'
import {checkBatchName} from '../../core/queue/jobs.js'
import {queueFlag} from '../../flags/queue.js'
import {collectLine, failedLines} from '../../ui/queue-report.js'
import {endOnClosedPipe} from '../../ui/run-output.js'

/** Lines to a file (or stdout), written in blocks; a file that cannot be written is one line. */
class LineSink {
  private buffered: string[] = []

  private constructor(
    private readonly file: FileHandle | undefined,
    private readonly name: string,
  ) {}

  static async open(path: string | undefined): Promise<LineSink> {
    if (path === undefined) return new LineSink(undefined, 'stdout')
    try {
      return new LineSink(await open(path, 'w'), path)
    } catch (error) {
      throw new UserError(`${path}: cannot write (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})`)
    }
  }

  async write(line: string): Promise<void> {
    this.buffered.push(line)
    if (this.buffered.length >= 1000) await this.flush()
  }

  async close(): Promise<void> {
    await this.flush()
    await this.file?.close()
  }

  private async flush(): Promise<void> {
    if (this.buffered.length === 0) return
    const text = this.buffered.join('\n') + '\n'
    this.buffered = []
    if (this.file === undefined) {
      if (!process.stdout.write(text)) await once(process.stdout, 'drain')
      return
    }
    try {
      await this.file.write(text)
    } catch (error) {
      throw new UserError(`${this.name}: cannot write (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})`)
    }
  }
}

export default class BatchCollect extends BaseCommand {
  static override summary = 'Write a queued batch\'s results, one JSON object per input line, in input order'

  static override description = `Each line of the output is the object \`run --batch --json\` prints for the same input line. A line that failed every attempt is {"error": "<reason>"} in its place, and is listed on stderr with its reason (the exit code is then 1).
While lines are unfinished it refuses, unless --partial: then unfinished lines are {"error": "not finished"}.
The file is written under a temporary name and renamed when complete; without --out the lines go to stdout.`

  static override examples = [
    '<%= config.bin %> batch collect prompts --queue redis://localhost:6379 --out results.jsonl',
    '<%= config.bin %> batch collect prompts --queue redis://localhost:6379 --partial | head',
  ]

  static override args = {
    name: Args.string({description: 'batch name', required: true}),
  }

  static override flags = {
    queue: queueFlag,
    out: Flags.string({char: 'o', description: 'results file (JSONL); default: stdout', helpValue: 'FILE'}),
    partial: Flags.boolean({description: 'write what is done now; unfinished lines become {"error": "not finished"}'}),
  }

  async run(): Promise<void> {
    const {args, flags} = await this.parse(BatchCollect)
    const url = checkQueueUrl(flags.queue)
    const name = checkBatchName(args.name)
    const out = flags.out
    const temp = out === undefined ? undefined : `${out}.partial-${process.pid}`
    endOnClosedPipe()
    const sink = await LineSink.open(temp)
    let summary
    try {
      summary = await withRedis(url, (redis) => collectBatch(redis, name, flags.partial, (line) => sink.write(line)))
      await sink.close()
      if (temp !== undefined && out !== undefined) await rename(temp, out)
    } catch (error) {
      await sink.close().catch(() => {})
      if (temp !== undefined) await rm(temp, {force: true})
      throw error
    }
    process.stderr.write(collectLine(summary, out ?? 'stdout') + '\n')
    if (summary.failed.length > 0) {
      for (const line of failedLines(summary)) process.stderr.write(line + '\n')
      throw new UserError(`${summary.failed.length} of ${summary.lines} lines failed (listed above)`)
    }
  }
}
