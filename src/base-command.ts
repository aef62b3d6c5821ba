import {Command} from '@oclif/core'

import {UserError} from './core/errors.js'

/**
 * Shared behaviour of every parscale command: a user error becomes one line on stderr
 * ("parscale: <message>") and a non-zero exit code, never a stack trace.
 */
export abstract class BaseCommand extends Command {
  protected override async catch(err: Error & {exitCode?: number; oclif?: {exit?: number}}): Promise<unknown> {
    if (err instanceof UserError) {
      process.stderr.write(`parscale: ${err.message}\n`)
      return this.exit(err.exitCode)
    }
    return super.catch(err)
  }
}
