/**
 * What makes one P of a package: each stream's learned prefix keys/values per layer, and the
 * aggregation head that mixes the streams. They live in the package's `p{P}.weights` (float32,
 * indexed by the manifest) and are read once per P when a model first runs it.
 */
import {closeSync, openSync} from 'node:fs'
import {join} from 'node:path'

import type {BackboneShape} from '../checkpoint/config.js'
import {FileFormatError} from '../errors.js'
import type {PackageVariant, StoredTensor} from '../package/manifest.js'
import {readAt} from '../read-at.js'

export interface HostTensor {
  data: Float32Array
  dims: number[]
}

export interface StreamWeights {
  parallel: number
  prefixTokens: number
  /** Per layer, [P, kv, head_dim, prefix] (transposed; the WebGPU graph keeps its cache so, the CPU cache transposes back). */
  prefixKeys: Float32Array[]
  /** Per layer, [P, kv, prefix, head_dim]. */
  prefixValues: Float32Array[]
  aggregate: {weight0: HostTensor; bias0: HostTensor; weight2: HostTensor; bias2: HostTensor; smooth: number}
}

/**
 * P = 1: no prefix, and a one-unit zero aggregation head. The graph always mixes streams;
 * a softmax over one stream is exactly 1, so the single stream passes through unchanged.
 */
export function singleStream(shape: BackboneShape): StreamWeights {
  const zeros = (dims: number[]): HostTensor => ({data: new Float32Array(dims.reduce((a, b) => a * b, 1)), dims})
  return {
    parallel: 1,
    prefixTokens: 0,
    prefixKeys: [],
    prefixValues: [],
    aggregate: {weight0: zeros([1, shape.hiddenSize]), bias0: zeros([1]), weight2: zeros([1, 1]), bias2: zeros([1]), smooth: 0},
  }
}

/** Reads the prefixes and aggregation head of one P > 1 variant. */
export function loadStreamWeights(packageDir: string, variant: PackageVariant, shape: BackboneShape): StreamWeights {
  if (variant.parallel === 1 || !variant.weights) return singleStream(shape)
  const file = join(packageDir, variant.weights)
  const fd = openSync(file, 'r')
  try {
    const read = (name: string): HostTensor => {
      const stored: StoredTensor | undefined = variant.tensors?.[name]
      if (!stored) throw new FileFormatError(file, `has no tensor "${name}" in the manifest; convert again`)
      const data = new Float32Array(stored.length / 4)
      const bytes = new Uint8Array(data.buffer)
      if (readAt(fd, bytes, stored.offset) < bytes.byteLength) throw new FileFormatError(file, `ends inside tensor "${name}"; convert again`)
      return {data, dims: stored.shape}
    }
    const {numLayers, numKvHeads: kv, headDim: d} = shape
    const P = variant.parallel
    const n = variant.prefixTokens
    const prefixKeys: Float32Array[] = []
    const prefixValues: Float32Array[] = []
    for (let layer = 0; layer < numLayers; layer++) {
      const keys = read(`model.layers.${layer}.self_attn.prefix_k`).data // [P, kv, n, d]
      prefixKeys.push(transposeLastTwo(keys, P * kv, n, d))
      prefixValues.push(read(`model.layers.${layer}.self_attn.prefix_v`).data)
    }
    return {
      parallel: P,
      prefixTokens: n,
      prefixKeys,
      prefixValues,
      aggregate: {
        weight0: read('model.aggregate_layer.0.weight'),
        bias0: read('model.aggregate_layer.0.bias'),
        weight2: read('model.aggregate_layer.2.weight'),
        bias2: read('model.aggregate_layer.2.bias'),
        smooth: variant.attnSmooth,
      },
    }
  } finally {
    closeSync(fd)
  }
}

/** [batch, rows, cols] → [batch, cols, rows] */
export function transposeLastTwo(x: Float32Array, batch: number, rows: number, cols: number): Float32Array {
  const out = new Float32Array(x.length)
  for (let b = 0; b < batch; b++) {
    const base = b * rows * cols
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[base + c * rows + r] = x[base + r * cols + c]
  }
  return out
}
