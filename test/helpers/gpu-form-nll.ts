import type {GpuFormModel} from '../../src/core/engine/gpu-form.js'
import {negativeLogLikelihood} from '../../src/core/run/evaluate.js'

/**
 * Mean NLL of `ids` through an opened GPU form, the way decoding sees it: the first `prompt` tokens
 * in one call, then one token a step, each step's logits predicting the next token.
 */
export async function stepwiseMeanNll(model: GpuFormModel, ids: number[], prompt = 8): Promise<number> {
  let total = 0
  let {logits} = await model.step(ids.slice(0, prompt))
  for (let t = prompt; t < ids.length; t++) {
    total += negativeLogLikelihood(logits, 0, logits.length, ids[t]!)
    if (t + 1 < ids.length) ({logits} = await model.step([ids[t]!]))
  }
  return total / (ids.length - prompt)
}
