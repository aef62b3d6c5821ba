/**
 * Where a batch stands. A batch's lines live on its model's queue, among other batches' lines,
 * so the states come from BullMQ's lists of job ids (one read per state, ids only), kept to the
 * ids `NAME#…`. Tokens and times are counters the workers add to after each generated group.
 */
import {Queue} from 'bullmq'
import type {Redis} from 'ioredis'

import {UserError} from '../errors.js'
import {batchKey, BULL_PREFIX, lineJobId, type BatchSpec, modelQueueName} from './jobs.js'

export type LineState = 'waiting' | 'active' | 'done' | 'failed'

/** In the order jobs move, so a job that moves while they are read is still seen once. */
const STATES: [LineState, Parameters<Queue['getRanges']>[0]][] = [
  ['waiting', ['wait', 'prioritized', 'delayed', 'waiting-children']],
  ['active', ['active']],
  ['done', ['completed']],
  ['failed', ['failed']],
]

function stateOf(state: string): LineState | undefined {
  if (state === 'completed') return 'done'
  if (state === 'failed' || state === 'active') return state
  if (state === 'unknown') return undefined
  return 'waiting'
}

export interface BatchStatus {
  spec: BatchSpec
  counts: Record<LineState, number>
  /** Lines with no job (removed from Redis by hand, or a submit cut short). */
  missing: number
  tokens: number
  /** Generated tokens per second from the first group's start to the last group's end. */
  tokensPerS?: number
}

export async function readSpec(redis: Redis, name: string): Promise<BatchSpec> {
  const text = await redis.hget(batchKey(name), 'spec')
  if (text === null) throw new UserError(`no batch named "${name}" on this queue (\`parscale batch submit\` creates one)`)
  return JSON.parse(text) as BatchSpec
}

export function batchQueue(redis: Redis, spec: BatchSpec): Queue {
  return new Queue(modelQueueName(spec.model.fingerprint), {connection: redis, prefix: BULL_PREFIX})
}

/** The state of each of the batch's lines, by job id. */
export async function lineStates(queue: Queue, spec: BatchSpec): Promise<Map<string, LineState>> {
  const prefix = lineJobId(spec.name, 0).slice(0, -1)
  const states = new Map<string, LineState>()
  for (const [state, types] of STATES) {
    for (const id of await queue.getRanges(types, 0, -1)) {
      if (id.startsWith(prefix) && !states.has(id)) states.set(id, state)
    }
  }
  // A job sent back while the lists were read (a retry, a stalled job) is asked for alone.
  for (const line of spec.lines) {
    const id = lineJobId(spec.name, line)
    if (states.has(id)) continue
    const state = stateOf(await queue.getJobState(id))
    if (state) states.set(id, state)
  }
  return states
}

export async function batchStatus(redis: Redis, name: string): Promise<BatchStatus> {
  const spec = await readSpec(redis, name)
  const queue = batchQueue(redis, spec)
  try {
    const states = await lineStates(queue, spec)
    const counts: Record<LineState, number> = {waiting: 0, active: 0, done: 0, failed: 0}
    let missing = 0
    for (const line of spec.lines) {
      const state = states.get(lineJobId(spec.name, line))
      if (state) counts[state]++
      else missing++
    }
    const [tokens, firstAt, lastAt] = (await redis.hmget(batchKey(name), 'tokens', 'firstAt', 'lastAt')).map(Number)
    const seconds = (lastAt - firstAt) / 1000
    return {spec, counts, missing, tokens: tokens || 0, tokensPerS: seconds > 0 ? tokens / seconds : undefined}
  } finally {
    await queue.close()
  }
}
