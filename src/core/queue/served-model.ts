/**
 * A model a worker serves: its package opened once (tokenizer, generation defaults, one ONNX
 * Runtime session for every P) and the engine's continuous batcher over it. Each job in hand
 * submits its line; the line joins the sequences of its P already decoding at the next step and
 * leaves when it is done, so the worker's batch refills as lines finish, as `run --batch` does.
 * The result stored on each job is the JSON object `run --json` prints.
 */
import {ContinuousBatcher, generateAll} from '../generation/batcher.js'
import {openRequestModel} from '../run/context.js'
import type {GenerationOptions} from '../generation/generation.js'
import {batchJsonResult} from '../run/json-result.js'
import {type ModelCache, ParScaleModel} from '../engine/model.js'
import {generationOptions} from '../run/requests.js'
import type {LineJob, ModelRef} from './jobs.js'
import {loadOrMeasureProfile} from '../parallel/cost-profile.js'
import {AUTO_LOAD_WINDOW_MS, AutoParallel, AutoParallelLoad, AutoParallelPolicy} from '../parallel/policy.js'

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
  /** --parallel auto: lines that named no P get one chosen here (as do lines submitted with --parallel auto). */
  autoParallel?: boolean
  autoBudget?: number
  /** The cost profile is being measured (first auto line on this machine). */
  onMeasuring?: (label: string) => void
}

export class ServedModel {
  /** Lines in hand at their P (the load the auto policy weighs), and the policy once a line needed it. */
  private auto: Promise<AutoParallel> | undefined
  private readonly inFlight = new AutoParallelLoad()

  private constructor(
    readonly ref: ModelRef,
    private readonly model: ParScaleModel,
    private readonly batcher: ContinuousBatcher<ModelCache>,
    private readonly generation: GenerationOptions,
    private readonly packageDir: string,
    private readonly options: ServeOptions,
  ) {}

  static async open(ref: ModelRef, packageDir: string, options: ServeOptions): Promise<ServedModel> {
    const {batchSize, threads} = options
    const plan = {options: {raw: false, chat: false, json: true, quiet: true, truncate: false, numbers: {}}, numbers: {batchSize, threads}}
    const [ctx, model] = await Promise.all([openRequestModel(packageDir, plan), ParScaleModel.open(packageDir, {threads})])
    const generation = generationOptions(ctx)
    return new ServedModel(ref, model, new ContinuousBatcher(model, {maxBatch: batchSize, generation}), generation, packageDir, options)
  }

  /** The policy over this machine's cost profile of the package (measured on the first line that needs it, then cached). */
  private policy(): Promise<AutoParallel> {
    this.auto ??= (async () => {
      const {batchSize, threads, autoBudget} = this.options
      const loaded = await loadOrMeasureProfile(this.packageDir, this.model, {threads, device: 'cpu'}, Math.max(batchSize, 8), {
        onMeasuring: () => this.options.onMeasuring?.(this.ref.label),
      })
      return new AutoParallel(new AutoParallelPolicy(loaded.profile, this.model.parallelValues, {budget: autoBudget, maxBatch: batchSize}), AUTO_LOAD_WINDOW_MS, () => performance.now(), this.inFlight)
    })()
    return this.auto
  }

  /** The P a job runs at: its own, or chosen now against the lines in hand. */
  private async settleParallel(job: LineJob): Promise<void> {
    if (job.autoParallel || (this.options.autoParallel && job.fields?.parallel === undefined)) {
      job.request.parallel = (await this.policy()).choose().parallel
    }
  }

  /**
   * Generates one line with the others in hand. A failed model call fails every sequence of that
   * P that was in it, so a line that fails is tried once more on its own: only a line at fault
   * fails its attempt.
   */
  async generate(job: LineJob): Promise<JobResult> {
    await this.settleParallel(job)
    const end = this.inFlight.begin(job.request.parallel)
    try {
      return batchJsonResult(await this.batcher.submit(job.request), job.fields?.id)
    } catch {
      const [result] = await generateAll(this.model, [job.request], 1, this.generation)
      return batchJsonResult(result, job.fields?.id)
    } finally {
      end()
    }
  }

  /** Waits for the lines in hand, then frees the session. */
  async close(): Promise<void> {
    await this.batcher.close()
    await this.model.release()
  }
}
