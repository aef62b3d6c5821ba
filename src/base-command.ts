import {Command} from '@oclif/core'

import {oneLine, reportError} from './error-report.js'

/**
 * Shared behaviour of every parscale command: a user error, or a flag/argument the parser
 * refused, becomes one line on stderr ("parscale: <message>") and its exit code (2 for usage,
 * 1 otherwise: error-report.ts), never a stack trace or a usage dump.
 */
export abstract class BaseCommand extends Command {
  protected override async catch(err: Error): Promise<unknown> {
    return this.exit(reportError(err, this.id))
  }

  /** oclif's warnings (a deprecated flag spelling) as one line, like errors. */
  override warn(input: string | Error): string | Error {
    process.stderr.write(`parscale: warning: ${oneLine(typeof input === 'string' ? input : input.message)}\n`)
    return input
  }
}
