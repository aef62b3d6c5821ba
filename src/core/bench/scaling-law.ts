// The paper's parallel scaling law, L = E + (A·1e9 / (N·(k·ln P + 1)))^α: P streams act
// like multiplying the parameters N by (k·ln P + 1). The P = 1 size with the same predicted
// loss is therefore N′ = N·(k·ln P + 1), which depends on k alone (E, A and α cancel).
import type {SyntheticShape} from '../checkpoint/synthetic.js'

export interface ScalingFit {
  dataset: string
  k: number
}

/**
 * k per dataset. Approximate values recalled from the paper's fit (arXiv 2505.10475,
 * Stack-V2-Python ≈ 0.39, Pile ≈ 0.33); not re-fitted here, as the paper's table of
 * losses is not bundled. Only k enters the equivalent size.
 */
export const SCALING_FITS: readonly ScalingFit[] = [
  {dataset: 'Stack-V2-Python', k: 0.39},
  {dataset: 'Pile', k: 0.33},
]

export function equivalentParameters(n: number, parallel: number, fit: ScalingFit): number {
  return n * (fit.k * Math.log(parallel) + 1)
}

/** Parameters of a P = 1 Qwen2 model of this shape. */
export function shapeParameters(s: SyntheticShape): number {
  const headDim = s.hiddenSize / s.numHeads
  const q = s.numHeads * headDim
  const kv = s.numKvHeads * headDim
  const perLayer = s.hiddenSize * (q + 2 * kv) + q + 2 * kv + q * s.hiddenSize + 3 * s.hiddenSize * s.intermediateSize + 2 * s.hiddenSize
  return s.numLayers * perLayer + s.vocabSize * s.hiddenSize * (s.tieWordEmbeddings ? 1 : 2) + s.hiddenSize
}

/**
 * A P = 1 shape of about `target` parameters, grown as the Qwen2.5 family grows from
 * 0.5B (hidden 896, 24 layers) to 3B (hidden 2048, 36 layers): width in steps of one
 * 64-wide head, depth interpolated along, MLP ≈ 5.4 × hidden, vocabulary and tying kept.
 */
export function scaledShape(base: SyntheticShape, target: number): SyntheticShape {
  const headDim = base.hiddenSize / base.numHeads
  let best = base
  for (let heads = base.numHeads; heads <= base.numHeads * 8; heads++) {
    const hidden = heads * headDim
    const layers = Math.max(base.numLayers, Math.round(base.numLayers + ((hidden - base.hiddenSize) / base.hiddenSize) * base.numLayers * 0.39))
    const intermediate = Math.round((hidden * base.intermediateSize) / base.hiddenSize / 64) * 64
    const kvHeads = heads % base.numKvHeads === 0 ? base.numKvHeads : 1
    const shape = {...base, hiddenSize: hidden, numHeads: heads, numKvHeads: kvHeads, numLayers: layers, intermediateSize: intermediate}
    if (Math.abs(shapeParameters(shape) - target) < Math.abs(shapeParameters(best) - target)) best = shape
    if (shapeParameters(shape) > target) break
  }
  return best
}
