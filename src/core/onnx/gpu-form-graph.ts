import type {BackboneShape} from '../checkpoint/config.js'
import {encodeFloat16} from '../checkpoint/dtype.js'
import {gateUpParts, queryKeyValueParts, rotaryTables} from './blocks.js'
import {GraphBuilder} from './builder.js'
import type {ExternalLocation} from './external-data.js'
import {Ops} from './ops.js'
import {io} from './parscale-graph.js'
import type {LinearPart} from './weights.js'

/**
 * The GPU form of the decoder (issue 23): one graph per P, built for few kernel launches per
 * decode step, with every step's shapes the same.
 *
 * - The P streams of the one sequence lie on the attention head axis: batch 1, P·heads query
 *   heads and P·kv_heads KV heads. Query head p·heads + h maps to KV head (p·heads + h) / group
 *   = p·kv + h / group, so every stream attends to its own keys only. ONNX Runtime's
 *   GroupQueryAttention then does a whole layer's attention (rotary, cache append, causal
 *   softmax) in one operator, for a decode step and for a multi-token continuation alike.
 * - Rows of the residual stream are (position, stream), so [S·P, heads·d] is [1, S, P·heads·d]
 *   without moving data (a Reshape).
 * - The cache is one fixed-capacity buffer per layer and kind, [1, P·kv, capacity, d] (BNSH),
 *   whose first `prefixTokens` slots hold the stream's learned prefix: GroupQueryAttention
 *   reads them as past keys that every position sees. `seqlens_k` (filled slots − 1) says
 *   where new keys go and what each query sees; `present.*` has the capacity's shape, so the
 *   caller feeds it back as the next `past_key_values.*` (on a GPU, in place).
 * - Rotary inside GroupQueryAttention counts positions from the cache's slot 0, i.e. a token's
 *   position + prefixTokens. The reference rotates tokens at their own position and leaves the
 *   prefix keys unrotated; scores depend on position differences only (R(a)q·R(b)k = q·R(b−a)k),
 *   so the tokens' scores are unchanged and the prefix keys are stored rotated by +prefixTokens
 *   (`rotatePrefixKeys`), which gives R(prefix)k·R(t + prefix)q = k·R(t)q as in the reference.
 * - Only the last K positions' logits are computed (the head and the aggregation run on K·P rows;
 *   K = 1 in decode, every position when scoring text).
 * - Half (`half`, fp16 packages): matrices, embedding rows, norms, attention and the cache in
 *   float16; the aggregation head, the mixing of the P streams and the logits in float32 (Casts at
 *   the final norm's output and around the LM head), as the stream weights are a softmax of small
 *   differences and the logits feed sampling and NLL.
 */
export const gpuFormIo = {
  inputIds: io.inputIds,
  /** int32 [1]: filled cache slots after this call − 1 (prefix + tokens so far + new − 1). */
  seqlensK: 'seqlens_k',
  /** int32 scalar: filled cache slots after this call (seqlens_k + 1). */
  totalSequenceLength: 'total_sequence_length',
  /** float32 (float16 in the half form) [1, P·kv, capacity, d] */
  pastKey: (layer: number) => `past_key_values.${layer}.key`,
  pastValue: (layer: number) => `past_key_values.${layer}.value`,
  presentKey: (layer: number) => `present.${layer}.key`,
  presentValue: (layer: number) => `present.${layer}.value`,
  /** int64 scalar K ≥ 1: logits of the last K positions (1 in decode: every step the same shapes). */
  numLogitsToKeep: io.numLogitsToKeep,
  /** float32 [K, vocab]: the last K positions' logits. */
  logits: io.logits,
  /** float32 [K, P] (P > 1; [1, 1] at P = 1): the last K positions' stream weights. */
  streamWeights: io.streamWeights,
} as const

/**
 * Where one P's aggregation head lies, its matrices already laid out as the graph multiplies by
 * them (engine/gpu-form-weights.ts): `weight0` [P·H, H_agg] and `weight2` [H_agg, P] (the
 * checkpoint's transposed), biases as stored.
 */
export interface AggregationHeadFiles {
  weight0: {location: ExternalLocation; shape: number[]}
  bias0: {location: ExternalLocation; shape: number[]}
  weight2: {location: ExternalLocation; shape: number[]}
  bias2: {location: ExternalLocation; shape: number[]}
  smooth: number
}

/**
 * The matrices as the GPU form multiplies by them. Float weights: MatMul on matrices laid out
 * [in, out] in a file of their own (the provider's Gemm(transB) streams weights slowly at one
 * row, docs/benchmarks.md; a Transpose on an initializer would be folded on the host at every
 * load). Quantized weights: the package's MatMulNBits codes and scales as its CPU graph reads
 * them (the WebGPU provider has a MatMulNBits kernel), and GatherBlockQuantized for the
 * embedding table.
 */
export interface GpuWeights {
  /** Norm weights, biases: float32 vectors. */
  get(name: string): string
  /** x · Wᵀ (+ b) for a matrix stored [out, in] as `storedAs` (several parts stacked: q·k·v, gate·up). */
  project(x: string, parts: LinearPart[], storedAs: string): string
  /**
   * x · W[first … first + count)ᵀ: some output rows of a stacked matrix, as a product of its own
   * over the same stored bytes (quantized weights only). The MLP's gate and up as two MatMulNBits
   * over one SkipSimplifiedLayerNormalization are the pattern the WebGPU provider fuses, with the
   * SiLU and the product, into one MatMulNBitsMlp kernel (4-bit, blocks of 32).
   */
  projectRows?(x: string, storedAs: string, first: number, count: number): string
  /** Rows of the embedding table for the ids [1, S]: [1, S, H]. */
  embed(ids: string): string
  /** Logits [rows, vocab] of hidden rows [rows, H] (the LM head, or the tied embeddings). */
  lmHead(x: string): string
}

/** A package's float tensors for the GPU form: vectors as stored, matrices laid out [in, out]. */
export interface LaidOutFloatWeights {
  /** A vector (norm weight, bias) by its stored name, in the form's float type. */
  get(name: string): string
  /**
   * The matrix whose rows are these stored [out, in] tensors stacked (one tensor, or the head's
   * vocabulary blocks), as an initializer [in, out] in the form's float type.
   */
  transposed(sources: string[]): string
  /** The stored tensors of a matrix kept in row blocks (the LM head), first rows first. */
  rowBlocks(storedAs: string): string[]
  /** The embedding table [vocab, H] as stored, and whether it is float16 (untied models). */
  table(name: string): {tensor: string; half: boolean}
}

/**
 * GpuWeights over float matrices (see GpuWeights). A tied model keeps one table on the device:
 * the LM head's [H, vocab], which the embedding gathers columns of (Gather on axis 1, then a
 * Transpose of the few gathered rows) instead of holding the embedding table as well.
 */
export function floatGpuWeights(g: GraphBuilder, weights: LaidOutFloatWeights, config: BackboneShape, half = false): GpuWeights {
  const ops = new Ops(g)
  const headBlocks = () => config.tieWordEmbeddings ? weights.rowBlocks('lm_head.weight (tied to model.embed_tokens.weight)') : weights.rowBlocks('lm_head.weight')
  let head: string | undefined
  const headMatrix = () => (head ??= weights.transposed(headBlocks())) // [H, vocab]
  return {
    get: (name) => weights.get(name),
    project: (x, parts, storedAs) => {
      // one stored part as it is; several (q·k·v, gate·up) are stored stacked as `storedAs`
      const single = parts.length === 1 && !parts[0]!.scale
      const y = ops.matmul(x, weights.transposed([single ? parts[0]!.weight : `${storedAs}.weight`]))
      const bias = single ? parts[0]!.bias : parts.some((p) => p.bias) ? `${storedAs}.bias` : undefined
      return bias ? ops.add(y, weights.get(bias)) : y
    },
    embed: (ids) => {
      if (config.tieWordEmbeddings) {
        const columns = g.node('Gather', [headMatrix(), ids], {axis: 1}) // [H, 1, S]
        return ops.transpose(columns, [1, 2, 0]) // [1, S, H]
      }
      const {tensor, half: stored} = weights.table('model.embed_tokens.weight')
      const rows = g.node('Gather', [tensor, ids], {axis: 0})
      // the rows read change type, not the table: widened, or (an fp32 table in the half form) rounded
      return stored === half ? rows : g.node('Cast', [rows], {to: half ? 10 : 1})
    },
    lmHead: (x) => ops.matmul(x, headMatrix()),
  }
}

export interface GpuFormOptions {
  parallel: number
  prefixTokens: number
  /** P > 1: the aggregation head's tensors in the package. */
  head?: AggregationHeadFiles
  /**
   * One token per call and the last position's logits only, every shape static: no Shape,
   * no shape arithmetic, no `num_logits_to_keep` input. Graph capture needs every node on the
   * GPU provider, and ONNX Runtime places shape arithmetic on the CPU.
   */
  decodeOnly?: boolean
  /** The half form (see the module comment): the weights given are float16 (LaidOutFloatWeights). */
  half?: boolean
}

/** The rotary tables GroupQueryAttention reads: positions 0 … maxPositions + prefixTokens − 1. */
export function gpuRotaryTables(config: BackboneShape, prefixTokens: number): {cos: Float32Array; sin: Float32Array; rows: number} {
  const rows = config.maxPositionEmbeddings + prefixTokens
  return {...rotaryTables({...config, maxPositionEmbeddings: rows}), rows}
}

/**
 * Prefix keys [P·kv, n, d] (as stored, per stream) rotated by +n positions (rotate-half form), so
 * that GroupQueryAttention's positions, counted from the cache's slot 0, give the reference's
 * scores (see the module comment). Computed in float64 from the float32 tables.
 */
export function rotatePrefixKeys(keys: Float32Array, heads: number, n: number, d: number, cos: Float32Array, sin: Float32Array): Float32Array {
  const half = d / 2
  const out = new Float32Array(keys.length)
  const c = cos.subarray(n * half, (n + 1) * half)
  const s = sin.subarray(n * half, (n + 1) * half)
  for (let row = 0; row < heads * n; row++) {
    const base = row * d
    for (let i = 0; i < half; i++) {
      const x1 = keys[base + i]!
      const x2 = keys[base + half + i]!
      out[base + i] = x1 * c[i]! - x2 * s[i]!
      out[base + half + i] = x2 * c[i]! + x1 * s[i]!
    }
  }
  return out
}

export function buildGpuFormGraph(config: BackboneShape, makeWeights: (g: GraphBuilder) => GpuWeights, options: GpuFormOptions): GraphBuilder {
  const {parallel: P, prefixTokens} = options
  const g = new GraphBuilder(`parscale-gpu-p${P}`)
  const ops = new Ops(g)
  const {numKvHeads: kv, headDim: d, hiddenSize: H, numHeads, intermediateSize: I, numLayers} = config
  const eps = {float: config.rmsNormEps}

  const decodeOnly = options.decodeOnly === true
  const half = options.half === true
  const cacheType = half ? 'float16' : 'float32'
  const inputIds = g.input(gpuFormIo.inputIds, 'int64', [1, decodeOnly ? 1 : 'sequence_length'])
  const seqlensK = g.input(gpuFormIo.seqlensK, 'int32', [1])
  const totalLength = g.input(gpuFormIo.totalSequenceLength, 'int32', [])
  const keep = decodeOnly ? undefined : g.input(gpuFormIo.numLogitsToKeep, 'int64', [])
  const past = Array.from({length: numLayers}, (_, layer) => ({
    key: g.input(gpuFormIo.pastKey(layer), cacheType, [1, P * kv, 'capacity', d]),
    value: g.input(gpuFormIo.pastValue(layer), cacheType, [1, P * kv, 'capacity', d]),
  }))
  const weights = makeWeights(g)
  const w = (name: string) => weights.get(name)
  const tables = gpuRotaryTables(config, prefixTokens)
  // GroupQueryAttention takes the tables in the type of its queries
  const table = (name: string, values: Float32Array) => (half ? g.inlineHalf(name, encodeFloat16(values), [tables.rows, d / 2]) : g.inlineFloat(name, values, [tables.rows, d / 2]))
  const cosCache = table('rotary.gpu_cos_cache', tables.cos)
  const sinCache = table('rotary.gpu_sin_cache', tables.sin)

  // The residual stream, rows (position, stream): [S·P, H].
  let residual = g.within('embed', () => {
    const embedded = weights.embed(inputIds) // [1, S, H]
    if (P === 1) return ops.reshape(embedded, g.int64([-1, H]))
    if (decodeOnly) return ops.reshape(ops.expand(ops.reshape(embedded, g.int64([1, 1, H])), g.int64([1, P, H])), g.int64([P, H]))
    const seq = ops.shape(inputIds, 1, 2)
    return ops.reshape(ops.expand(ops.reshape(embedded, g.int64([-1, 1, H])), ops.shapeOf([seq, P, H])), g.int64([-1, H]))
  })

  let pending: string | undefined // the last block's output, not yet added to the residual
  const norm = (weight: string): string => {
    if (pending === undefined) return g.node('SimplifiedLayerNormalization', [residual, w(weight)], {axis: -1, epsilon: eps})
    const [out, , , sum] = g.nodeSome('SkipSimplifiedLayerNormalization', [pending, residual, w(weight)], [true, false, false, true], {epsilon: eps}, 'com.microsoft')
    residual = sum!
    pending = undefined
    return out!
  }

  /**
   * q, k, v as GroupQueryAttention takes them. Packed ([1, S, (all q heads, all k heads, all v
   * heads)·d], one input) where the projection's rows can give that layout: at P = 1 as they
   * are, and with as many KV heads as query heads by one Transpose of (stream, part); the
   * provider then splits, rotates and appends to the cache in one kernel. Otherwise the
   * projection is split into three inputs.
   */
  const queryKeyValue = (qkv: string, asHeads: (t: string, width: number) => string): string[] => {
    if (P === 1) return [ops.reshape(qkv, g.int64([1, -1, (numHeads + 2 * kv) * d])), '', '']
    if (numHeads === kv) {
      const parts = ops.transpose(ops.reshape(qkv, g.int64([-1, P, 3, kv * d])), [0, 2, 1, 3]) // [S, 3, P, kv·d]
      return [ops.reshape(parts, g.int64([1, -1, 3 * P * kv * d])), '', '']
    }
    const [q, k, v] = g.nodeN('Split', [qkv, g.int64([numHeads * d, kv * d, kv * d])], 3, {axis: -1})
    return [asHeads(q!, numHeads * d), asHeads(k!, kv * d), asHeads(v!, kv * d)]
  }

  for (let layer = 0; layer < numLayers; layer++) {
    g.within(`layers.${layer}`, () => {
      const name = (tensor: string) => `model.layers.${layer}.${tensor}`
      const x = norm(name('input_layernorm.weight'))
      pending = g.within('attn', () => {
        // the stored q·k·v matrix (queries carry the 1/√d of the scores: scale 1 below)
        const qkv = weights.project(x, queryKeyValueParts(layer, d), name('self_attn.qkv_proj'))
        const asHeads = (t: string, width: number) => ops.reshape(t, g.int64([1, -1, P * width])) // rows (s, p) → [1, S, P·width]
        const [context, presentKey, presentValue] = g.nodeN(
          'GroupQueryAttention',
          [...queryKeyValue(qkv, asHeads), past[layer].key, past[layer].value, seqlensK, totalLength, cosCache, sinCache],
          3,
          {num_heads: P * numHeads, kv_num_heads: P * kv, scale: {float: 1}, do_rotary: 1, rotary_interleaved: 0, local_window_size: -1},
          'com.microsoft',
        )
        g.output(presentKey!, gpuFormIo.presentKey(layer), cacheType, [1, P * kv, 'capacity', d])
        g.output(presentValue!, gpuFormIo.presentValue(layer), cacheType, [1, P * kv, 'capacity', d])
        const rows = ops.reshape(context!, g.int64([-1, numHeads * d]))
        return weights.project(rows, [{weight: name('self_attn.o_proj.weight')}], name('self_attn.o_proj.weight'))
      })
      const y = norm(name('post_attention_layernorm.weight'))
      pending = g.within('mlp', () => {
        const stacked = name('mlp.gate_up_proj')
        const [gate, up] = weights.projectRows
          ? [weights.projectRows(y, stacked, 0, I), weights.projectRows(y, stacked, I, I)]
          : g.nodeN('Split', [weights.project(y, gateUpParts(layer), stacked), g.int64([I, I])], 2, {axis: -1})
        const silu = g.node('QuickGelu', [gate!], {alpha: {float: 1}}, 'com.microsoft') // x·sigmoid(x)
        return weights.project(ops.mul(silu, up!), [{weight: name('mlp.down_proj.weight')}], name('mlp.down_proj.weight'))
      })
    })
  }

  g.within('head', () => {
    const normed = norm('model.norm.weight') // [S·P, H]
    // the last K positions' P rows each (the start, −K·P, is shape arithmetic on the CPU)
    const last = keep === undefined ? normed : ops.slice(normed, ops.mul(ops.reshape(keep, g.int64([1])), g.int64([-P])), g.int64([Number.MAX_SAFE_INTEGER]), 0) // [K·P, H]
    let mixed: string // [K, H], in the type of the LM head's matrix
    let mix: string
    if (P === 1 || !options.head) {
      mixed = last
      mix = g.float([1], [1, 1])
    } else {
      const head = options.head
      const tensor = (name: string, t: {location: ExternalLocation; shape: number[]}) => g.externalInitializer(name, 'float32', t.shape, t.location)
      // the aggregation head and the mixing in float32 (the half form's boundary)
      const perPosition = ops.reshape(half ? g.node('Cast', [last], {to: 1}) : last, g.int64([-1, P, H])) // [K, P, H]
      const features = ops.reshape(ops.transpose(perPosition, [0, 2, 1]), g.int64([-1, H * P])) // hidden-major: h·P + p
      const hidden = ops.add(ops.matmul(features, tensor('aggregate.0.weight^T', head.weight0)), tensor('aggregate.0.bias', head.bias0))
      const silu = g.node('QuickGelu', [hidden], {alpha: {float: 1}}, 'com.microsoft')
      const scores = ops.add(ops.matmul(silu, tensor('aggregate.2.weight^T', head.weight2)), tensor('aggregate.2.bias', head.bias2))
      mix = ops.add(ops.mul(ops.softmax(scores, -1), g.float([1 - head.smooth], [])), g.float([head.smooth / P], [])) // [K, P]
      mixed = ops.reshape(ops.matmul(ops.reshape(mix, g.int64([-1, 1, P])), perPosition), g.int64([-1, H])) // [K, H]
      if (half) mixed = g.node('Cast', [mixed], {to: 10})
    }
    const keptRows = decodeOnly ? 1 : 'keep'
    const logits = weights.lmHead(mixed)
    g.output(half ? g.node('Cast', [logits], {to: 1}) : logits, gpuFormIo.logits, 'float32', [keptRows, config.vocabSize])
    g.output(mix, gpuFormIo.streamWeights, 'float32', [P === 1 || !options.head ? 1 : keptRows, P])
  })
  return g
}
