import {Command} from '@oclif/core'

import {UserError} from './core/errors.js'

type CommandError = Error & {code?: string; oclif?: {exit?: number}}

/**
 * Shared behaviour of every parscale command: a user error, or a flag/argument the parser
 * refused, becomes one line on stderr ("parscale: <message>") and a non-zero exit code,
 * never a stack trace or a usage dump.
 */
export abstract class BaseCommand extends Command {
  protected override async catch(err: CommandError): Promise<unknown> {
    if (err instanceof UserError) {
      process.stderr.write(`parscale: ${err.message}\n`)
      return this.exit(err.exitCode)
    }
    if (err.oclif?.exit === 2 && err.code !== 'EEXIT') {
      // The parser's own messages span several wrapped lines: fold them into one.
      const message = err.message.replace(/\s*\n\s*/g, ' ').replace(/See more help with --help/, '').trim()
      process.stderr.write(`parscale: ${message} (see \`parscale ${this.id} --help\`)\n`)
      return this.exit(2)
    }
    return super.catch(err)
  }
}
