/**
 * A model a worker serves: its package opened once (tokenizer, generation defaults, one ONNX
 * Runtime session for every P) and the engine's continuous batcher over it. Each job in hand
 * submits its line; the line joins the sequences of its P already decoding at the next step and
 * leaves when it is done, so the worker's batch refills as lines finish, as `run --batch` does.
 * The result stored on each job is the JSON object `run --json` prints.
 */
import {ContinuousBatcher, generateAll} from '../run/batcher.js'
import {openRequestModel} from '../run/context.js'
import type {GenerationOptions} from '../run/generation.js'
import {batchJsonResult} from '../run/json-result.js'
import {type ModelCache, ParScaleModel} from '../engine/model.js'
import {generationOptions} from '../run/requests.js'
import type {LineJob, ModelRef} from './jobs.js'

export type JobResult = Record<string, unknown>

/** The first line of an error, for a job's failed reason. */
export function reasonOf(error: unknown): string {
  const message = error instanceof Error ? error.message : String(error)
  return message.split('\n')[0].trim() || 'unknown error'
}

export interface ServeOptions {
  /** Sequences of one P decoding at once. */
  batchSize: number
  threads?: number
}

export class ServedModel {
  private constructor(
    readonly ref: ModelRef,
    private readonly model: ParScaleModel,
    private readonly batcher: ContinuousBatcher<ModelCache>,
    private readonly generation: GenerationOptions,
  ) {}

  static async open(ref: ModelRef, packageDir: string, {batchSize, threads}: ServeOptions): Promise<ServedModel> {
    const plan = {options: {raw: false, chat: false, json: true, quiet: true, truncate: false, numbers: {}}, numbers: {batchSize, threads}}
    const [ctx, model] = await Promise.all([openRequestModel(packageDir, plan), ParScaleModel.open(packageDir, {threads})])
    const generation = generationOptions(ctx)
    return new ServedModel(ref, model, new ContinuousBatcher(model, {maxBatch: batchSize, generation}), generation)
  }

  /**
   * Generates one line with the others in hand. A failed model call fails every sequence of that
   * P that was in it, so a line that fails is tried once more on its own: only a line at fault
   * fails its attempt.
   */
  async generate(job: LineJob): Promise<JobResult> {
    try {
      return batchJsonResult(await this.batcher.submit(job.request), job.fields?.id)
    } catch {
      const [result] = await generateAll(this.model, [job.request], 1, this.generation)
      return batchJsonResult(result, job.fields?.id)
    }
  }

  /** Waits for the lines in hand, then frees the session. */
  async close(): Promise<void> {
    await this.batcher.close()
    await this.model.release()
  }
}
