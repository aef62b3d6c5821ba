/**
 * The model `parscale run` talks to: resolved (converted on first use), with its tokenizer,
 * generation defaults and one ONNX Runtime session that runs every P the package has.
 */
import {UserError} from '../errors.js'
import {readManifest} from '../package/manifest.js'
import {resolveModel, type ResolvedModel, type ResolveOptions} from '../package/resolve.js'
import type {RunPlan} from './plan.js'
import type {RequestContext} from './requests.js'
import {ParScaleModel} from '../engine/model.js'
import {readGenerationDefaults, TextTokenizer} from '../generation/tokenizer.js'
import {loadOrMeasureProfile, type LoadedProfile} from '../parallel/cost-profile.js'
import {AutoParallelPolicy, type ParallelChoice} from '../parallel/policy.js'

/** What requests are built from, without the ONNX Runtime session: enough to check and encode prompts. */
export interface RequestModel extends RequestContext {
  tokenizer: TextTokenizer
  options: RunPlan['options']
  /** The model as the user named it, for messages. */
  label: string
  /** The converted package. */
  packageDir: string
}

/** Everything a mode needs: the model session, tokenizer, defaults and the checked options. */
export interface RunContext extends RequestContext {
  /** Every P of the package, one backbone; whoever opened the context releases it. */
  model: ParScaleModel
  tokenizer: TextTokenizer
  options: RunPlan['options']
  /** The model as the user named it, for messages. */
  label: string
  /** `--parallel auto`: the policy, its profile, and the P a lone request gets (already in `parallel`). */
  auto?: {policy: AutoParallelPolicy; profile: LoadedProfile; alone: ParallelChoice}
}

export interface LoadHooks {
  /** Conversion or copy progress while the model is resolved. */
  onProgress?: ResolveOptions['onProgress']
  /** A line about what resolving did on its own (a damaged package converted again). */
  onNotice?: ResolveOptions['onNotice']
  /** The package is ready; tokenizer and session are loading. */
  onLoading?: () => void
  /** `--parallel auto` is measuring the cost profile (first use on this machine). */
  onMeasuring?: () => void
}

/** The model resolved, its tokenizer and defaults loaded, the options checked against them. */
export async function openRequestModel(modelName: string | undefined, plan: Pick<RunPlan, 'options' | 'numbers'>, hooks: LoadHooks = {}): Promise<RequestModel> {
  const resolved = resolveModel(modelName, {parallel: plan.numbers.parallel, quant: plan.options.quant, onProgress: hooks.onProgress, onNotice: hooks.onNotice})
  hooks.onLoading?.()
  return loadRequestModel(resolved, plan)
}

async function loadRequestModel(resolved: ResolvedModel, {options, numbers}: Pick<RunPlan, 'options' | 'numbers'>): Promise<RequestModel> {
  const [tokenizer, defaults] = await Promise.all([TextTokenizer.load(resolved.packageDir), readGenerationDefaults(resolved.packageDir)])
  const useTemplate = !options.raw && tokenizer.hasChatTemplate
  if (options.system !== undefined && !useTemplate) {
    throw new UserError('the model\'s tokenizer has no chat template, so --system cannot be used')
  }
  const manifest = readManifest(resolved.packageDir)
  return {
    tokenizer, defaults, options, numbers, label: resolved.label, useTemplate,
    context: defaults.contextLength ?? manifest.model.maxPositionEmbeddings,
    parallel: resolved.parallel,
    availableParallel: manifest.parallel,
    packageDir: resolved.packageDir,
  }
}

export async function openRunContext(modelName: string | undefined, plan: Pick<RunPlan, 'options' | 'numbers' | 'mode'>, hooks: LoadHooks = {}): Promise<RunContext> {
  const resolved = resolveModel(modelName, {parallel: plan.numbers.parallel, quant: plan.options.quant, onProgress: hooks.onProgress, onNotice: hooks.onNotice})
  hooks.onLoading?.()
  const auto = plan.numbers.autoParallel === true
  const expected = auto ? readManifest(resolved.packageDir).parallel : [resolved.parallel]
  // a batch file puts up to batch-size sequences in a step; a prompt or a chat one
  const sequences = plan.mode === 'batch' ? plan.numbers.batchSize : 1
  const opening = ParScaleModel.open(resolved.packageDir, {threads: plan.numbers.threads, device: plan.options.device ?? 'cpu', parallel: expected, sequences})
  const [loaded, model] = await Promise.allSettled([loadRequestModel(resolved, plan), opening])
  if (loaded.status === 'rejected') {
    if (model.status === 'fulfilled') await model.value.release()
    throw loaded.reason
  }
  if (model.status === 'rejected') throw model.reason
  const fallback = model.value.webgpuRoute?.fallback
  if (fallback) hooks.onNotice?.(`parscale: WebGPU on onnxruntime-node's GPU form, not the route PARSCALE_WEBGPU_ROUTE asks for: ${fallback}`)
  const {packageDir, ...ctx} = loaded.value
  if (!auto) return {...ctx, model: model.value}
  try {
    const setting = {threads: plan.numbers.threads, device: plan.options.device ?? 'cpu'}
    // Profiles cover the rows of a full batch (at least the batcher's default 8 sequences), so one measurement serves every mode.
    const maxBatch = Math.max(plan.numbers.batchSize, 8)
    const profile = await loadOrMeasureProfile(packageDir, model.value, setting, maxBatch, {onMeasuring: hooks.onMeasuring})
    const policy = new AutoParallelPolicy(profile.profile, model.value.parallelValues, {budget: plan.numbers.autoBudget, maxBatch: plan.numbers.batchSize})
    const alone = policy.choose([])
    return {...ctx, parallel: alone.parallel, model: model.value, auto: {policy, profile, alone}}
  } catch (error) {
    await model.value.release()
    throw error
  }
}
