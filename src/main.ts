/**
 * The program `bin/run.js` starts: oclif finds and runs the command; whatever fails before a
 * command's own handler can catch it (an unknown command, a broken config) ends the same way
 * as a command's error, one line on stderr (error-report.ts).
 */
import {flush, run} from '@oclif/core'

import {reportError} from './error-report.js'

export async function main(root: string, argv = process.argv.slice(2)): Promise<void> {
  try {
    await run(argv, root)
    await flush()
  } catch (error) {
    process.exit(reportError(error))
  }
}
