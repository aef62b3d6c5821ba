import {closeSync, openSync} from 'node:fs'
import {join} from 'node:path'

import type {ModelConfig} from '../checkpoint/config.js'
import {decodeToFloat32} from '../checkpoint/dtype.js'
import {rowBlockNames, storedInitializers, type StoredInitializer} from '../engine/gpu-form.js'
import {FileFormatError, UserError} from '../errors.js'
import {readManifest, selectVariant} from '../package/manifest.js'
import {readAt} from '../read-at.js'
import type {QuantizedMatrix, TensorSource} from './decoder.js'

/**
 * A package at one P as the hand-written kernels read it: the backbone from the initializers its
 * graph names (q·k·v and gate·up stored stacked, split back into the checkpoint's names; an untied
 * head in row blocks), the prefixes and aggregation head from that P's weights file. A float
 * package (fp32, fp16: its WebGPU graph) is read widened to float32; a quantized one (its CPU
 * graph's MatMulNBits codes and scales, the embedding table where the manifest says) as stored,
 * through `readQuantized`.
 */
export function packageSource(packageDir: string, parallel: number): TensorSource {
  const manifest = readManifest(packageDir)
  const graph = manifest.quant ? manifest.graph : manifest.webgpuGraph
  if (!graph) throw new UserError(`${packageDir}: the package has no WebGPU graph; convert again`)
  const variant = selectVariant(manifest, parallel, packageDir)
  const stored = storedInitializers(join(packageDir, graph))
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
    if (!entry) throw new FileFormatError(join(packageDir, graph), `has no weight "${name}"; convert again`)
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
  const bits = manifest.quant ? (manifest.quant.bits === 4 ? 4 : 8) : undefined
  /** Rows [first, first + count) of the quantized matrix stored as `storedAs` (`.codes` [N, blocks, blob], `.scales` [N · blocks]). */
  const quantizedRows = (storedAs: string, first?: number, count?: number): QuantizedMatrix => {
    const codes = stored.get(`${storedAs}.codes`)
    if (!codes || !bits) throw new FileFormatError(join(packageDir, graph), `has no quantized weight "${storedAs}"; convert again`)
    const [rows, blocks, blob] = codes.shape as [number, number, number]
    const [from, n] = [first ?? 0, count ?? rows]
    const rowBytes = blocks * blob
    const scales = stored.get(`${storedAs}.scales`)!
    const scaleBytes = readBytes(join(packageDir, scales.location.file), scales.location.offset + from * blocks * 4, n * blocks * 4, `"${storedAs}.scales"`)
    return {
      codes: readBytes(join(packageDir, codes.location.file), codes.location.offset + from * rowBytes, n * rowBytes, `"${storedAs}.codes"`),
      scales: new Float32Array(scaleBytes.buffer, 0, n * blocks),
      blockSize: (blob * 8) / bits,
    }
  }
  const readQuantized = (name: string): QuantizedMatrix => {
    const part = /^(model\.layers\.\d+)\.(self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)\.weight$/.exec(name)
    if (part) {
      const [, layer, which] = part
      if (which!.startsWith('mlp')) return quantizedRows(`${layer}.mlp.gate_up_proj`, which === 'mlp.gate_proj' ? 0 : I, I)
      const [first, count] = which === 'self_attn.q_proj' ? [0, q] : which === 'self_attn.k_proj' ? [q, kv] : [q + kv, kv]
      return quantizedRows(`${layer}.self_attn.qkv_proj`, first, count)
    }
    if (name === 'model.embed_tokens.weight') {
      const table = manifest.embedding
      if (!table.scalesOffset || !table.blockSize || (table.dtype !== 'int4' && table.dtype !== 'int8')) throw new FileFormatError(join(packageDir, 'parscale.json'), 'its quantized package names no quantized embedding table; convert again')
      const rowBytes = (table.hidden * (table.dtype === 'int4' ? 4 : 8)) / 8
      const scales = readBytes(join(packageDir, table.file), table.scalesOffset, (table.rows * table.hidden * 4) / table.blockSize, 'the embedding scales')
      return {codes: readBytes(join(packageDir, table.file), table.offset, table.rows * rowBytes, 'the embedding codes'), scales: new Float32Array(scales.buffer), blockSize: table.blockSize}
    }
    if (name === 'lm_head.weight') {
      const blocks = rowBlockNames([...stored.keys()].filter((n) => n.endsWith('.codes')).map((n) => n.slice(0, -'.codes'.length)), 'lm_head.weight')
      if (blocks.length === 0) throw new FileFormatError(join(packageDir, graph), 'has no lm_head.weight; convert again')
      const parts = blocks.map((b) => quantizedRows(b))
      const codes = new Uint8Array(parts.reduce((n, p) => n + p.codes.length, 0))
      const scales = new Float32Array(parts.reduce((n, p) => n + p.scales.length, 0))
      let [c, sc] = [0, 0]
      for (const p of parts) {
        codes.set(p.codes, c)
        scales.set(p.scales, sc)
        c += p.codes.length
        sc += p.scales.length
      }
      return {codes, scales, blockSize: parts[0]!.blockSize}
    }
    return quantizedRows(name)
  }
  return {
    config,
    queryScaled: true, // the converter folds 1/√d into q_proj (graph v1 on)
    halfWeights: manifest.dtype === 'fp16',
    ...(manifest.quant && bits ? {quant: {bits, blockSize: manifest.quant.blockSize}, readQuantized} : {}),
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
        if (blocks.length === 0) throw new FileFormatError(join(packageDir, graph), 'has no lm_head.weight; convert again')
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
