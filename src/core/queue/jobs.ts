/**
 * What a batch looks like on the queue. One BullMQ queue per model: its name carries the
 * package fingerprint, so a worker listens only to queues of models it can serve and never
 * takes a job it would have to give back. A batch is a name, a record of what was submitted
 * (`BatchSpec`) and one job per line with the deterministic id `NAME#LINE`: submitting the same
 * file again adds nothing.
 *
 * Redis keys: `parscale:models` (fingerprint → `ModelRef`, what workers look for),
 * `parscale:batch:NAME` (the spec, and the counters the workers keep for `batch status`), and
 * BullMQ's own keys under `parscale:q:model-FINGERPRINT:…`.
 */
import {basename, extname} from 'node:path'

import {UsageError} from '../errors.js'
import type {BatchInput, BatchLineId} from '../run/batch-file.js'
import type {QuantScheme} from '../quant/scheme.js'
import type {GenerationRequest} from '../generation/generation.js'

/** The version of `LineJob` and `BatchSpec`; a worker refuses jobs of a newer one. */
export const JOB_FORMAT = 1

/** BullMQ's key prefix. */
export const BULL_PREFIX = 'parscale:q'
export const MODELS_KEY = 'parscale:models'

export function batchKey(name: string): string {
  return `parscale:batch:${name}`
}

/** The queue of one model (by package fingerprint). */
export function modelQueueName(fingerprint: string): string {
  return `model-${fingerprint}`
}

export function lineJobId(batch: string, line: number): string {
  return `${batch}#${line}`
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/

export function checkBatchName(name: string): string {
  if (!NAME.test(name)) throw new UsageError(`batch name "${name}": use letters, digits, ".", "_" and "-" (at most 100, starting with a letter or digit)`)
  return name
}

/** Without --name: the file's name without its extension (`prompts.jsonl` → `prompts`). */
export function defaultBatchName(file: string): string {
  const name = basename(file, extname(file)).replace(/[^A-Za-z0-9._-]/g, '_').replace(/^[._-]+/, '')
  return checkBatchName(name === '' ? 'batch' : name.slice(0, 100))
}

/** A model as the submitter resolved it; workers resolve `reference` on their own machine. */
export interface ModelRef {
  /** Absolute folder or hub repo id; null = the embedded default model. */
  reference: string | null
  /** For messages. */
  label: string
  /** `packageFingerprint` of the package the submitter encoded the prompts with. */
  fingerprint: string
  /** --quant of the submit: a worker converts a checkpoint with it (a package already holds its own). */
  quant?: QuantScheme
}

/** One line's job: everything a worker needs, nothing it must look up. */
export interface LineJob {
  format: typeof JOB_FORMAT
  batch: string
  /** 1-based line in the submitted file. */
  line: number
  model: ModelRef
  /** Prompt ids (chat template applied, fitted to the context), length, sampling and P. */
  request: GenerationRequest
  /** Submitted with --parallel auto and the line named no P: the worker chooses it (its own machine's cost profile, its load). */
  autoParallel?: boolean
  /** The line's own fields, as given. */
  fields: {input: BatchInput; max_new_tokens?: number; temperature?: number; parallel?: number; id?: BatchLineId}
}

/** What `batch submit` recorded, kept in `parscale:batch:NAME`. */
export interface BatchSpec {
  format: typeof JOB_FORMAT
  name: string
  /** The file as given, for messages (`FILE:LINE`). */
  file: string
  /** Line numbers in file order; job ids are `NAME#LINE`. */
  lines: number[]
  model: ModelRef
  /** P of the lines that name none (`auto`: each worker chooses). */
  parallel: number | 'auto'
  /** Digest of every job's content: a second submit under the same name must match it. */
  digest: string
  attempts: number
  submittedAt: string
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

const wholeNumbers = (value: unknown): value is number[] => Array.isArray(value) && value.every((v) => Number.isInteger(v) && v >= 0)

/**
 * Checks a job's data as a worker reads it (a job may come from another parscale version or
 * tool). Values the generation loop itself checks (empty prompt, lengths) are left to it.
 */
export function readLineJob(data: unknown): LineJob {
  if (!isRecord(data)) throw new Error('the job data is not an object')
  if (typeof data.format !== 'number' || data.format > JOB_FORMAT) {
    throw new Error(`the job is in format ${String(data.format)}, newer than this parscale reads (${JOB_FORMAT}); upgrade the worker`)
  }
  const {request, model} = data
  if (!isRecord(request) || !wholeNumbers(request.promptIds) || typeof request.maxNewTokens !== 'number' || !isRecord(request.sampling) || !Number.isInteger(request.parallel)) {
    throw new Error('the job has no valid request (promptIds, maxNewTokens, sampling, parallel)')
  }
  if (!isRecord(model) || typeof model.fingerprint !== 'string') throw new Error('the job names no model fingerprint')
  return data as unknown as LineJob
}
