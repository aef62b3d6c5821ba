import {closeSync, openSync} from 'node:fs'
import {join} from 'node:path'

import type {ModelConfig} from '../checkpoint/config.js'
import {decodeToFloat32} from '../checkpoint/dtype.js'
import {rowBlockNames, storedInitializers, type StoredInitializer} from '../engine/gpu-form.js'
import {FileFormatError, UserError} from '../errors.js'
import {readManifest, selectVariant} from '../package/manifest.js'
import {readAt} from '../read-at.js'
import type {TensorSource} from './decoder.js'

/**
 * A float package (fp32 or fp16) at one P as the hand-written kernels read it: the backbone from
 * the initializers its WebGPU graph names (q·k·v and gate·up stored stacked, split back into the
 * checkpoint's names; an untied head in row blocks), the prefixes and aggregation head from that
 * P's weights file, all widened to float32 as read. Quantized packages are refused (their
 * matrices are MatMulNBits codes).
 */
export function packageSource(packageDir: string, parallel: number): TensorSource {
  const manifest = readManifest(packageDir)
  if (manifest.quant || !manifest.webgpuGraph) throw new UserError(`${packageDir}: the hand-written WebGPU kernels take float packages (fp32, fp16), not --quant ${manifest.quant?.scheme ?? ''} ones`)
  const variant = selectVariant(manifest, parallel, packageDir)
  const stored = storedInitializers(join(packageDir, manifest.webgpuGraph))
  const shape = manifest.model
  const config: ModelConfig = {
    ...shape,
    modelType: parallel > 1 ? 'qwen2_parscale' : 'qwen2',
    parallel,
    prefixTokens: variant.prefixTokens,
    attnSmooth: variant.attnSmooth,
    raw: {},
  }
  const readBytes = (file: string, offset: number, length: number, what: string): Uint8Array => {
    const bytes = new Uint8Array(length)
    const fd = openSync(file, 'r')
    try {
      if (readAt(fd, bytes, offset) < length) throw new FileFormatError(file, `ends inside ${what}; convert again`)
    } finally {
      closeSync(fd)
    }
    return bytes
  }
  const initializer = (name: string, entry: StoredInitializer | undefined = stored.get(name)): Float32Array => {
    if (!entry) throw new FileFormatError(join(packageDir, manifest.webgpuGraph!), `has no weight "${name}"; convert again`)
    const bytes = readBytes(join(packageDir, entry.location.file), entry.location.offset, entry.location.length, `"${name}"`)
    return entry.half ? decodeToFloat32('F16', bytes) : new Float32Array(bytes.buffer, 0, bytes.byteLength / 4)
  }
  // q, k and v (gate and up) are asked for one after another: the stacked matrix is read once for them
  let lastStacked: {name: string; values: Float32Array} | undefined
  const rows = (name: string, first: number, count: number): Float32Array => {
    if (lastStacked?.name !== name) lastStacked = {name, values: initializer(name)}
    const all = lastStacked.values
    const width = all.length / (stored.get(name)!.shape[0] ?? 1)
    return all.slice(first * width, (first + count) * width)
  }
  const q = shape.numHeads * shape.headDim
  const kv = shape.numKvHeads * shape.headDim
  const I = shape.intermediateSize
  return {
    config,
    queryScaled: true, // the converter folds 1/√d into q_proj (graph v1 on)
    halfWeights: manifest.dtype === 'fp16',
    read(name: string): Float32Array {
      const tensor = variant.tensors[name]
      if (tensor && variant.weights) {
        const bytes = readBytes(join(packageDir, variant.weights), tensor.offset, tensor.length, `tensor "${name}"`)
        return new Float32Array(bytes.buffer, 0, bytes.byteLength / 4)
      }
      const part = /^(model\.layers\.\d+)\.(self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)\.(weight|bias)$/.exec(name)
      if (part) {
        const [, layer, which, kind] = part
        if (which!.startsWith('mlp')) return rows(`${layer}.mlp.gate_up_proj.weight`, which === 'mlp.gate_proj' ? 0 : I, I)
        const [first, count] = which === 'self_attn.q_proj' ? [0, q] : which === 'self_attn.k_proj' ? [q, kv] : [q + kv, kv]
        return rows(`${layer}.self_attn.qkv_proj.${kind}`, first, count)
      }
      if (name === 'lm_head.weight' && !stored.has(name)) {
        const blocks = rowBlockNames(stored.keys(), 'lm_head.weight')
        if (blocks.length === 0) throw new FileFormatError(join(packageDir, manifest.webgpuGraph!), 'has no lm_head.weight; convert again')
        const out = new Float32Array(shape.vocabSize * shape.hiddenSize)
        let at = 0
        for (const block of blocks) {
          const values = initializer(block)
          out.set(values, at)
          at += values.length
        }
        return out
      }
      return initializer(name)
    },
  }
}
