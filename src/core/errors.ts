/**
 * An error caused by the user's input (a file, a flag, a model id) rather than by a bug.
 * Commands print its message as one line on stderr and exit with `exitCode`.
 */
export class UserError extends Error {
  constructor(message: string, readonly exitCode = 1) {
    super(message)
    this.name = 'UserError'
  }
}

/** A problem with a specific file: the message always names the file first. */
export class FileFormatError extends UserError {
  constructor(readonly file: string, problem: string) {
    super(`${file}: ${problem}`)
    this.name = 'FileFormatError'
  }
}
