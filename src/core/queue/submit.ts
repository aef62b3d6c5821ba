/**
 * `batch submit`: the file checked whole with `run --batch`'s rules and messages (`readBatchFile`,
 * then `batchRequests` as each line is encoded), then one job per line on the model's queue. Ids are
 * deterministic (`NAME#LINE`), so a second submit of the same batch adds only what is missing
 * (nothing, unless the first was interrupted).
 */
import {createHash} from 'node:crypto'
import {existsSync} from 'node:fs'
import {resolve} from 'node:path'

import {Queue} from 'bullmq'
import type {Redis} from 'ioredis'

import {UserError} from '../errors.js'
import {packageFingerprint} from '../package/manifest.js'
import type {BatchItem} from '../run/batch-file.js'
import {openRequestModel, type LoadHooks} from '../run/context.js'
import type {RunPlan} from '../run/plan.js'
import {batchRequests} from '../run/requests.js'
import {batchKey, BULL_PREFIX, JOB_FORMAT, lineJobId, type BatchSpec, type LineJob, type ModelRef, MODELS_KEY, modelQueueName} from './jobs.js'

export interface PreparedBatch {
  spec: BatchSpec
  jobs: LineJob[]
}

export interface PrepareOptions {
  name: string
  /** Tries per line before it is marked failed. */
  attempts: number
}

/** Encodes every line of a checked file (`readBatchFile`); nothing touches the queue yet. */
export async function prepareBatch(model: string | undefined, plan: Extract<RunPlan, {mode: 'batch'}>, items: BatchItem[], options: PrepareOptions, hooks: LoadHooks = {}): Promise<PreparedBatch> {
  const {file} = plan
  const ctx = await openRequestModel(model, plan, hooks)
  const requests = batchRequests(ctx, file, items)
  const ref: ModelRef = {
    reference: model === undefined ? null : existsSync(model) ? resolve(model) : ctx.label,
    label: ctx.label,
    fingerprint: packageFingerprint(ctx.packageDir),
    ...(plan.options.quant ? {quant: plan.options.quant} : {}),
  }
  const jobs = items.map((item, i): LineJob => ({
    format: JOB_FORMAT,
    batch: options.name,
    line: item.line,
    model: ref,
    request: requests[i],
    ...(plan.numbers.autoParallel && item.parallel === undefined ? {autoParallel: true} : {}),
    fields: {
      input: item.input,
      ...(item.maxNewTokens === undefined ? {} : {max_new_tokens: item.maxNewTokens}),
      ...(item.temperature === undefined ? {} : {temperature: item.temperature}),
      ...(item.parallel === undefined ? {} : {parallel: item.parallel}),
      ...(item.id === undefined ? {} : {id: item.id}),
    },
  }))
  // Without --seed each submit draws a new base seed: the digest takes --seed, not the seeds drawn.
  const content = jobs.map(({line, request, fields, autoParallel}) => ({line, fields, autoParallel, request: {...request, sampling: {...request.sampling, seed: undefined}}}))
  const settings = {model: ref.fingerprint, attempts: options.attempts, seed: plan.numbers.seed ?? null}
  const digest = createHash('sha256').update(JSON.stringify({settings, content})).digest('hex').slice(0, 16)
  const spec: BatchSpec = {
    format: JOB_FORMAT,
    name: options.name,
    file,
    lines: items.map((item) => item.line),
    model: ref,
    parallel: plan.numbers.autoParallel ? 'auto' : ctx.parallel,
    digest,
    attempts: options.attempts,
    submittedAt: new Date().toISOString(),
  }
  return {spec, jobs}
}

export interface SubmitOutcome {
  added: number
  /** Lines a previous submit of this batch already queued. */
  existing: number
  queue: string
}

const CHUNK = 500

/** Records the batch and queues the lines it does not have yet. */
export async function submitBatch(redis: Redis, {spec, jobs}: PreparedBatch): Promise<SubmitOutcome> {
  const key = batchKey(spec.name)
  if ((await redis.hsetnx(key, 'spec', JSON.stringify(spec))) === 0) {
    const before = JSON.parse((await redis.hget(key, 'spec')) ?? '{}') as Partial<BatchSpec>
    if (before.digest !== spec.digest) {
      throw new UserError(`a batch named "${spec.name}" already exists with other lines or settings (${before.file ?? '?'}, ${before.submittedAt ?? '?'}); choose another --name`)
    }
  }
  await redis.hset(MODELS_KEY, spec.model.fingerprint, JSON.stringify(spec.model))
  const queueName = modelQueueName(spec.model.fingerprint)
  const queue = new Queue(queueName, {connection: redis, prefix: BULL_PREFIX})
  try {
    let added = 0
    for (let offset = 0; offset < jobs.length; offset += CHUNK) {
      const chunk = jobs.slice(offset, offset + CHUNK)
      const ids = chunk.map((job) => lineJobId(spec.name, job.line))
      const exists = await Promise.all(ids.map((id) => redis.exists(queue.toKey(id))))
      const missing = chunk.filter((_, i) => exists[i] === 0)
      await queue.addBulk(missing.map((job) => ({
        name: spec.name,
        data: job,
        opts: {jobId: lineJobId(spec.name, job.line), attempts: spec.attempts, backoff: {type: 'exponential', delay: 1000}},
      })))
      added += missing.length
    }
    return {added, existing: jobs.length - added, queue: queueName}
  } finally {
    await queue.close()
  }
}
