/**
 * `batch collect`: one JSON object per input line, in input order: the object `run --batch
 * --json` prints for a line that is done, `{"error": …}` in the place of a line that failed
 * every attempt (or, with `partial`, of one not finished yet), so line N of the output is
 * always line N of the input. It refuses while lines are unfinished unless `partial`.
 */
import type {Redis} from 'ioredis'

import {UserError} from '../errors.js'
import {lineJobId, type LineJob} from './jobs.js'
import {batchQueue, lineStates, readSpec} from './status.js'

export interface FailedLine {
  line: number
  reason: string
  attempts: number
}

export interface CollectSummary {
  file: string
  lines: number
  done: number
  failed: FailedLine[]
  unfinished: number
}

const CHUNK = 200

export async function collectBatch(redis: Redis, name: string, partial: boolean, write: (jsonLine: string) => Promise<void>): Promise<CollectSummary> {
  const spec = await readSpec(redis, name)
  const queue = batchQueue(redis, spec)
  try {
    const states = await lineStates(queue, spec)
    const unfinished = spec.lines.filter((line) => {
      const state = states.get(lineJobId(name, line))
      return state !== 'done' && state !== 'failed'
    })
    if (unfinished.length > 0 && !partial) {
      const active = unfinished.filter((line) => states.get(lineJobId(name, line)) === 'active').length
      throw new UserError(`batch "${name}": ${unfinished.length} of ${spec.lines.length} lines are not finished (${unfinished.length - active} waiting, ${active} active); wait for the workers, or take what is done with --partial`)
    }
    const summary: CollectSummary = {file: spec.file, lines: spec.lines.length, done: 0, failed: [], unfinished: 0}
    for (let offset = 0; offset < spec.lines.length; offset += CHUNK) {
      const lines = spec.lines.slice(offset, offset + CHUNK)
      const jobs = await Promise.all(lines.map((line) => queue.getJob(lineJobId(name, line))))
      for (const [i, job] of jobs.entries()) {
        const result = job?.finishedOn ? (job.returnvalue as Record<string, unknown> | null) : null
        // The line's id, on every object of it (a result of an older worker may lack it).
        const id = (job?.data as Partial<LineJob> | undefined)?.fields?.id
        const withId = (object: Record<string, unknown>) => (id === undefined ? object : {id, ...object})
        if (result) {
          summary.done++
          await write(JSON.stringify(withId(result)))
        } else if (job?.finishedOn) {
          const failed = {line: lines[i], reason: job.failedReason || 'failed', attempts: job.attemptsMade}
          summary.failed.push(failed)
          await write(JSON.stringify(withId({error: failed.reason})))
        } else {
          summary.unfinished++
          await write(JSON.stringify(withId({error: 'not finished'})))
        }
      }
    }
    return summary
  } finally {
    await queue.close()
  }
}
