import {UsageError} from '../core/errors.js'

/** A comma-separated list of positive integers (`--parallel 1,2,4,8`), or one usage error naming the flag. */
export function intList(text: string, flag: string): number[] {
  const values = text.split(',').map((s) => Number(s.trim()))
  if (values.length === 0 || values.some((v) => !Number.isSafeInteger(v) || v < 1)) throw new UsageError(`--${flag} must be a comma-separated list of positive integers (found "${text}")`)
  return values
}
