/** Exit codes: 0 done, 1 a runtime failure, 2 a usage error, 130 interrupted (Ctrl-C). */
export const EXIT_FAILURE = 1
export const EXIT_USAGE = 2
export const EXIT_INTERRUPTED = 130

/**
 * An error caused by the user's input (a file, a flag, a model id) rather than by a bug.
 * Commands print its message as one line on stderr and exit with `exitCode` (1: the command
 * could not do its work; see `UsageError` for 2).
 */
export class UserError extends Error {
  constructor(message: string, readonly exitCode = 1) {
    super(message)
    this.name = 'UserError'
  }
}

/**
 * A command line that is wrong on any machine: an unknown or malformed flag value, a value out
 * of range, flags that contradict each other, an argument in the wrong place. Exit code 2, as
 * for the flags oclif's parser refuses. What depends on the machine's state (a missing file, a
 * model without that P, an unreachable server) is a plain `UserError` (exit 1).
 */
export class UsageError extends UserError {
  constructor(message: string) {
    super(message, EXIT_USAGE)
    this.name = 'UsageError'
  }
}

/** A problem with a specific file: the message always names the file first. */
export class FileFormatError extends UserError {
  constructor(readonly file: string, problem: string) {
    super(`${file}: ${problem}`)
    this.name = 'FileFormatError'
  }
}
