/**
 * The model `parscale run` talks to: resolved (converted on first use), with its tokenizer,
 * generation defaults and one ONNX Runtime session that runs every P the package has.
 */
import {UserError} from '../errors.js'
import {resolveModel, type ResolveOptions} from '../package/resolve.js'
import type {RunPlan} from './plan.js'
import type {RequestContext} from './requests.js'
import {ParScaleModel} from './model.js'
import {readGenerationDefaults, TextTokenizer} from './tokenizer.js'

/** Everything a mode needs: the model session, tokenizer, defaults and the checked options. */
export interface RunContext extends RequestContext {
  /** Every P of the package, one backbone; whoever opened the context releases it. */
  model: ParScaleModel
  tokenizer: TextTokenizer
  options: RunPlan['options']
  /** The model as the user named it, for messages. */
  label: string
}

export interface LoadHooks {
  /** Conversion or copy progress while the model is resolved. */
  onProgress?: ResolveOptions['onProgress']
  /** The package is ready; tokenizer and session are loading. */
  onLoading?: () => void
}

export async function openRunContext(modelName: string | undefined, plan: Pick<RunPlan, 'options' | 'numbers'>, hooks: LoadHooks = {}): Promise<RunContext> {
  const {options, numbers} = plan
  const resolved = resolveModel(modelName, {parallel: numbers.parallel, quant: options.quant, onProgress: hooks.onProgress})
  hooks.onLoading?.()
  const [tokenizer, defaults, model] = await Promise.all([
    TextTokenizer.load(resolved.packageDir),
    readGenerationDefaults(resolved.packageDir),
    ParScaleModel.open(resolved.packageDir, {threads: numbers.threads, device: options.device ?? 'cpu', parallel: [resolved.parallel]}),
  ])
  const useTemplate = !options.raw && tokenizer.hasChatTemplate
  if (options.system !== undefined && !useTemplate) {
    await model.release()
    throw new UserError(options.raw ? '--system needs the chat template; drop --raw' : 'the model\'s tokenizer has no chat template, so --system cannot be used')
  }
  return {
    model, tokenizer, defaults, options, numbers, label: resolved.label, useTemplate,
    context: defaults.contextLength ?? model.maxPositions,
    parallel: resolved.parallel,
    availableParallel: model.parallelValues,
  }
}
