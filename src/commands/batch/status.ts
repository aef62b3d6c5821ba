import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../../base-command.js'
import {checkQueueUrl, withRedis} from '../../core/queue/connection.js'
import {checkBatchName} from '../../core/queue/jobs.js'
import {batchStatus} from '../../core/queue/status.js'
import {queueFlag} from '../../flags/queue.js'
import {statusJson, statusLines} from '../../ui/queue-report.js'

export default class BatchStatusCommand extends BaseCommand {
  static override summary = 'How far a queued batch is: waiting, active, done and failed lines, tokens/s'

  static override description = 'Counts the lines of batch NAME by state on its model\'s queue (reading the ids of every job on that queue), with the tokens the workers generated for it and the rate from the first generated batch to the last.'

  static override examples = [
    '<%= config.bin %> batch status prompts --queue redis://localhost:6379',
    '<%= config.bin %> batch status prompts --queue redis://localhost:6379 --json',
  ]

  static override args = {
    name: Args.string({description: 'batch name (given to or derived by `batch submit`)', required: true}),
  }

  static override flags = {
    queue: queueFlag,
    json: Flags.boolean({description: 'one JSON object on stdout'}),
  }

  async run(): Promise<void> {
    const {args, flags} = await this.parse(BatchStatusCommand)
    const url = checkQueueUrl(flags.queue)
    const status = await withRedis(url, (redis) => batchStatus(redis, checkBatchName(args.name)))
    if (flags.json) this.log(JSON.stringify(statusJson(status)))
    else for (const line of statusLines(status)) this.log(line)
  }
}
