// One sequence's decode steps timed one by one, for scripts that compare graphs or settings
// over the same package in one process (bench/graph-ab.ts, bench/stream-weights-cost.ts).
import type {ParScaleModel} from '../engine/model.js'
import {argmax} from '../generation/sampling.js'

/** Prefills `prompt` at P = `parallel`, then runs `steps` greedy decode steps: each step's milliseconds. */
export async function greedyDecodeStepMs(model: ParScaleModel, parallel: number, prompt: number[], steps: number): Promise<number[]> {
  const cache = model.newCache(parallel)
  try {
    cache.reserve(1, prompt.length + steps + 1)
    cache.reset(0)
    let out = await model.forward(cache, 0, [prompt], 1)
    const times: number[] = []
    for (let s = 0; s < steps; s++) {
      const next = argmax(out.logits)
      const t0 = performance.now()
      out = await model.forward(cache, 0, [[next]], 1)
      times.push(performance.now() - t0)
    }
    return times
  } finally {
    cache.dispose()
  }
}
