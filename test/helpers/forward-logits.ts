import {ParScaleModel} from '../../src/core/engine/model.js'
import type {Device} from '../../src/core/engine/device.js'

/** Every position's logits of `ids` through ParScaleModel.forward at `parallel`, in one forward call. */
export async function forwardLogits(dir: string, parallel: number, ids: number[], device: Device = 'cpu'): Promise<{values: Float32Array; vocab: number}> {
  const model = await ParScaleModel.open(dir, {device})
  const cache = model.newCache(parallel)
  cache.reserve(1, ids.length)
  cache.reset(0)
  const out = await model.forward(cache, 0, [ids], 0)
  cache.dispose()
  await model.release()
  return {values: out.logits, vocab: out.dims[2]!}
}
