/**
 * Every error parscale ends with, as one line on stderr and an exit code: a `UserError` (1, or
 * 2 for a `UsageError`), a flag or command oclif's parser refused (2), a system error such as
 * ENOTDIR or EACCES (1), and a bug (1, `internal error`; PARSCALE_DEBUG=1 adds the stack).
 * Used by every command (`BaseCommand.catch`) and by `main` for what fails before a command runs.
 */
import {EXIT_FAILURE, EXIT_USAGE, UserError} from './core/errors.js'

type ThrownError = Error & {code?: unknown; oclif?: {exit?: number}}

/** A command id as users type it: `batch:submit` → `batch submit` (the topic separator is a space). */
export function commandName(id: string): string {
  return id.replaceAll(':', ' ')
}

/** A message on one line: a newline inside (a JSON snippet, a tool's output) is shown as `\n`. */
export function oneLine(message: string): string {
  return message.trim().replace(/\r\n|\r|\n/g, '\\n')
}

function isSystemError(error: ThrownError): boolean {
  return typeof error.code === 'string' && /^E[A-Z0-9]+$/.test(error.code) && error.code !== 'EEXIT'
}

/** What to print (nothing for a plain exit) and the exit code. */
export function describeError(thrown: unknown, commandId?: string): {line?: string; exitCode: number} {
  const error = (thrown instanceof Error ? thrown : new Error(String(thrown))) as ThrownError
  if (error.code === 'EEXIT') return {exitCode: error.oclif?.exit ?? 0}
  if (error instanceof UserError) return {line: `parscale: ${oneLine(error.message)}`, exitCode: error.exitCode}
  if (error.oclif?.exit === EXIT_USAGE) {
    // The parser's own messages span several wrapped lines: fold them into one.
    const message = error.message.replace(/\s*\n\s*/g, ' ').replace(/See more help with --help/, '').trim()
    const help = commandId ? `parscale ${commandName(commandId)} --help` : 'parscale --help'
    return {line: `parscale: ${message} (see \`${help}\`)`, exitCode: EXIT_USAGE}
  }
  if (isSystemError(error)) return {line: `parscale: ${oneLine(error.message)}`, exitCode: EXIT_FAILURE}
  const debug = process.env.PARSCALE_DEBUG
  const detail = debug ? `\n${error.stack ?? ''}` : ' (PARSCALE_DEBUG=1 prints where)'
  return {line: `parscale: internal error: ${oneLine(error.message)}${detail}`, exitCode: EXIT_FAILURE}
}

/** Prints the error's line on stderr and returns the exit code. */
export function reportError(thrown: unknown, commandId?: string): number {
  const {line, exitCode} = describeError(thrown, commandId)
  if (line !== undefined) process.stderr.write(line + '\n')
  return exitCode
}
