import type {BackboneShape} from '../checkpoint/config.js'
import {embedTokens, gateUpParts, queryKeyValueParts, rotaryInitializers, type DecoderContext, type Rotary} from './blocks.js'
import {GraphBuilder} from './builder.js'
import {Ops} from './ops.js'
import {io} from './parscale-graph.js'
import type {FloatWeightProvider, LinearPart} from './weights.js'

/**
 * The decoder for a GPU (the WebGPU execution provider), next to the CPU graph in every
 * package (`model.webgpu.onnx`, structure only: it reads the same weight files).
 *
 * On a GPU the cache lives in device memory and stays there: each call takes the whole cache
 * as `past_key_values.*` and returns it with the call's keys and values appended as
 * `present.*` (a Concat on the GPU, a copy at device bandwidth), which the runtime feeds back
 * as the next call's past without it ever crossing to the CPU. On the CPU the opposite holds
 * (onnxruntime-node copies every CPU output), which is why the CPU graph returns only the new
 * keys and values and JavaScript appends them in place.
 *
 * Measured on an H200 (docs/benchmarks.md): the provider's Gemm(transB) streams weights slowly
 * at one row, so projections are MatMuls on weights transposed (and concatenated: q·k·v,
 * gate·up, the LM head's blocks) by constant folding at load; narrow projections are split
 * along K for enough workgroups; and every kernel launch costs CPU time, so the graph is built
 * for few kernels: fused RMSNorm with the residual add (SkipSimplifiedLayerNormalization), the
 * query scale folded into the q weights, rotary on the projections as they come out ([rows,
 * seq, heads·d], positions per row), SiLU as QuickGelu(alpha = 1), one score MatMul over the
 * whole cache with the mask computed by the caller (valid slots and causality as one additive
 * [batch, 1, seq, total] input), one softmax.
 *
 * P is a run-time size as in the CPU graph (streams in the batch axis), so one session serves
 * every P. Rows of the cache are (batch, stream); a batch's rows all gain `seq` positions per
 * call, and slots a row does not use (another row's longer prompt, a masked placeholder) are
 * masked out by the caller.
 */
export const webgpuIo = {
  ...io,
  /** int64 [batch·P, seq]: rotary position of each new token, per row (stream). */
  positions: 'positions',
  /** float32 [batch, 1, seq, past + seq]: 0 where a new token may attend, −1e30 elsewhere. */
  attentionMask: 'attention_mask',
  /** float32 [batch·P, kv_heads, head_dim, past]: keys transposed, as the score MatMul reads them. */
  pastKey: (layer: number) => `past_key_values.${layer}.key`,
  /** float32 [batch·P, kv_heads, past, head_dim] */
  pastValue: (layer: number) => `past_key_values.${layer}.value`,
  presentKey: (layer: number) => `present.${layer}.key`,
  presentValue: (layer: number) => `present.${layer}.value`,
  /** The aggregation head as MatMul takes it: weights transposed ([P·H, H_agg] and [H_agg, P]). */
  aggregate: {
    weight0: 'aggregate.0.weight_t',
    bias0: 'aggregate.0.bias',
    weight2: 'aggregate.2.weight_t',
    bias2: 'aggregate.2.bias',
    smooth: 'aggregate.smooth',
  },
} as const

/** The additive value of a masked position (finite, so a softmax row never sees only −inf). */
export const MASKED = -1e30

/** Forms of the projections, measured against each other on the GPU (docs/benchmarks.md). */
export interface WebGpuGraphOptions {
  /**
   * matmul: MatMul on [in, out] weights, transposed once by ONNX Runtime's constant folding when
   * the session loads. gemm: Gemm(transB) on the stored [out, in] weights (measured slower).
   */
  linear?: 'matmul' | 'gemm'
  /** One projection for q, k, v and one for gate, up (weights concatenated at load), then Split. */
  fuse?: boolean
  /**
   * Split-K, for projections whose few output columns give the GPU few workgroups at one row
   * (a MatMul workgroup computes 32 columns): the input is cut into k slices, k partial products
   * run as one batched MatMul and are summed. k is chosen per projection so that about
   * `splitK` workgroups run (0 turns it off), on the projections `splitOn` names.
   */
  splitK?: number
  splitOn?: 'all' | 'mlp' | 'down'
}

export const DEFAULT_WEBGPU_GRAPH: Required<WebGpuGraphOptions> = {linear: 'matmul', fuse: true, splitK: 1536, splitOn: 'all'}

/** A weight [Σ widths, in] (and bias) whose outputs are `widths` wide, side by side. */
interface Projection {
  weight: string
  bias?: string
  widths: number[]
}

/** Slices of the input for split-K: about `target` workgroups of 32 output columns; slices of at least 32, a multiple of 4. */
export function splitFactor(inner: number, out: number, target: number): number {
  const groups = Math.ceil(out / 32)
  if (target <= 0 || groups * 2 > target) return 1
  let best = 1
  for (let k = 2; k <= inner / 32; k++) {
    if (inner % k !== 0 || (inner / k) % 4 !== 0) continue
    if (Math.abs(k * groups - target) < Math.abs(best * groups - target)) best = k
  }
  return best
}

export function buildWebGpuDecoderGraph(config: BackboneShape, makeWeights: (g: GraphBuilder) => FloatWeightProvider, options: WebGpuGraphOptions = {}): GraphBuilder {
  const form = {...DEFAULT_WEBGPU_GRAPH, ...options}
  const g = new GraphBuilder('parscale-webgpu')
  const ops = new Ops(g)
  const {numKvHeads: kv, headDim: d, hiddenSize: H, numHeads, intermediateSize: I} = config
  const group = numHeads / kv

  const inputIds = g.input(webgpuIo.inputIds, 'int64', ['batch', 'sequence_length'])
  const positions = g.input(webgpuIo.positions, 'int64', ['batch_streams', 'sequence_length'])
  const mask = g.input(webgpuIo.attentionMask, 'float32', ['batch', 1, 'sequence_length', 'total_length'])
  const past = Array.from({length: config.numLayers}, (_, layer) => ({
    key: g.input(webgpuIo.pastKey(layer), 'float32', ['batch_streams', kv, d, 'past_length']),
    value: g.input(webgpuIo.pastValue(layer), 'float32', ['batch_streams', kv, 'past_length', d]),
  }))
  const head = {
    weight0: g.input(webgpuIo.aggregate.weight0, 'float32', ['streams_hidden', 'aggregate_hidden']),
    bias0: g.input(webgpuIo.aggregate.bias0, 'float32', ['aggregate_hidden']),
    weight2: g.input(webgpuIo.aggregate.weight2, 'float32', ['aggregate_hidden', 'streams']),
    bias2: g.input(webgpuIo.aggregate.bias2, 'float32', ['streams']),
    smooth: g.input(webgpuIo.aggregate.smooth, 'float32', []),
  }
  const numLogitsToKeep = g.input(io.numLogitsToKeep, 'int64', [])

  const weights = makeWeights(g)
  const batch = ops.shape(inputIds, 0, 1)
  const seq = ops.shape(inputIds, 1, 2)
  const streams = ops.shape(head.weight2, 1, 2)
  const rows = ops.mul(batch, streams)
  const total = ops.add(ops.shape(past[0].key, 3, 4), seq) // every layer's cache length after this call
  const dims = {batch, seq, streams, batchStreams: rows}
  const ctx: DecoderContext = {g, ops, weights, config, dims}
  const eps = {float: config.rmsNormEps}
  const w = (name: string) => weights.get(name)

  /**
   * x·Wᵀ (+ b) on activations [rows·seq, in], for a weight stored [out, in] (several
   * projections side by side: `widths` splits the output along the last axis).
   */
  const project = (x: string, inner: number, role: 'attn' | 'mlp' | 'down', p: Projection): string[] => {
    const {weight: W, bias, widths} = p
    const out = widths.reduce((sum, width) => sum + width, 0)
    const splits = form.splitOn === 'all' || form.splitOn === role || (form.splitOn === 'mlp' && role === 'down')
    const k = splits ? splitFactor(inner, out, form.splitK) : 1
    let y: string
    if (form.linear === 'gemm') {
      y = g.node('Gemm', bias ? [x, W, bias] : [x, W], {transB: 1})
    } else if (k > 1) {
      // [k, M, in/k] · [k, in/k, out] → Σ over k; the weight slices are made by constant folding at load
      const slices = ops.transpose(ops.reshape(W, g.int64([out, k, inner / k])), [1, 2, 0])
      const partsOfX = ops.transpose(ops.reshape(x, g.int64([-1, k, inner / k])), [1, 0, 2])
      y = ops.reduceSum(ops.matmul(partsOfX, slices), [0], 0)
      if (bias) y = ops.add(y, bias)
    } else {
      y = ops.matmul(x, ops.transpose(W, [1, 0]))
      if (bias) y = ops.add(y, bias)
    }
    if (widths.length === 1) return [y]
    return g.nodeN('Split', [y, g.int64(widths)], widths.length, {axis: -1})
  }
  /** One projection per part of a stacked one (the unfused form): weights split by constant folding at load. */
  const separately = (p: Projection): Projection[] => {
    if (p.widths.length === 1) return [p]
    const weights = g.nodeN('Split', [p.weight, g.int64(p.widths)], p.widths.length, {axis: 0})
    const biases = p.bias ? g.nodeN('Split', [p.bias, g.int64(p.widths)], p.widths.length, {axis: 0}) : undefined
    return p.widths.map((width, i) => ({weight: weights[i]!, ...(biases ? {bias: biases[i]!} : {}), widths: [width]}))
  }
  /** A projection through the matrix the CPU graph stacked and stored (the same bytes). */
  const stacked = (parts: LinearPart[], widths: number[], storedAs: string): Projection => ({...weights.concatenated(parts, storedAs), widths})

  // The residual stream as [rows·seq, H] (rows (batch, stream), then positions).
  let residual = g.within('embed', () => embedTokens(ctx, inputIds))
  // positions come per row (stream) already: [batch·P, seq]
  const tables: Rotary = g.within('rotary', () => ({positions, ...rotaryInitializers(ctx)}))
  const rope = (x: string) => g.node('RotaryEmbedding', [x, tables.positions, tables.cosTable, tables.sinTable], {interleaved: 0}, 'com.microsoft')

  let pending: string | undefined // the last block's output, not yet added to the residual
  const norm = (weight: string): string => {
    if (pending === undefined) return g.node('SimplifiedLayerNormalization', [residual, w(weight)], {axis: -1, epsilon: eps})
    const [out, , , sum] = g.nodeSome('SkipSimplifiedLayerNormalization', [pending, residual, w(weight)], [true, false, false, true], {epsilon: eps}, 'com.microsoft')
    residual = sum
    pending = undefined
    return out
  }

  for (let layer = 0; layer < config.numLayers; layer++) {
    g.within(`layers.${layer}`, () => {
      const name = (tensor: string) => `model.layers.${layer}.${tensor}`
      const x = norm(name('input_layernorm.weight'))
      pending = g.within('attn', () => {
        // q, k, v as the CPU graph stacks them (attention in blocks.ts): the query rows carry the 1/√d of the scores
        const qkv = stacked(queryKeyValueParts(layer, d), [numHeads * d, kv * d, kv * d], name('self_attn.qkv_proj'))
        const [qp, kp, v] = form.fuse ? project(x, H, 'attn', qkv) : separately(qkv).map((p) => project(x, H, 'attn', p)[0])
        const q = rope(ops.reshape(qp, ops.shapeOf([rows, seq, numHeads * d]))) // [R, S, heads·d]
        const k = rope(ops.reshape(kp, ops.shapeOf([rows, seq, kv * d])))
        // queries of one KV head's group become rows: [R, kv, group·S, d]
        const queries = ops.reshape(
          ops.transpose(ops.reshape(q, ops.shapeOf([rows, seq, kv, group, d])), [0, 2, 3, 1, 4]),
          ops.shapeOf([rows, kv, -1, d]),
        )
        const newKey = ops.transpose(ops.reshape(k, ops.shapeOf([rows, seq, kv, d])), [0, 2, 3, 1]) // [R, kv, d, S]
        const newValue = ops.transpose(ops.reshape(v, ops.shapeOf([rows, seq, kv, d])), [0, 2, 1, 3]) // [R, kv, S, d]
        const keys = ops.concat([past[layer].key, newKey], 3)
        const values = ops.concat([past[layer].value, newValue], 2)
        // scores [R, kv, group·S, T] viewed as [B, P·kv·group, S, T] take the mask [B, 1, S, T]
        const scores = ops.add(ops.reshape(ops.matmul(queries, keys), ops.shapeOf([batch, -1, seq, total])), mask)
        const probs = ops.reshape(ops.softmax(scores, -1), ops.shapeOf([rows, kv, -1, total]))
        const context = ops.reshape(ops.matmul(probs, values), ops.shapeOf([rows, kv, group, seq, d]))
        const perToken = ops.reshape(ops.transpose(context, [0, 3, 1, 2, 4]), g.int64([-1, numHeads * d]))
        // declared once all their consumers exist (outputs are renamed in place)
        g.output(keys, webgpuIo.presentKey(layer), 'float32', ['batch_streams', kv, d, 'total_length'])
        g.output(values, webgpuIo.presentValue(layer), 'float32', ['batch_streams', kv, 'total_length', d])
        return project(perToken, numHeads * d, 'attn', {weight: w(name('self_attn.o_proj.weight')), widths: [H]})[0]
      })
      const y = norm(name('post_attention_layernorm.weight'))
      pending = g.within('mlp', () => {
        const gateUp = stacked(gateUpParts(layer), [I, I], name('mlp.gate_up_proj'))
        const [gate, up] = form.fuse ? project(y, H, 'mlp', gateUp) : separately(gateUp).map((p) => project(y, H, 'mlp', p)[0])
        const silu = g.node('QuickGelu', [gate], {alpha: {float: 1}}, 'com.microsoft') // x·sigmoid(x)
        return project(ops.mul(silu!, up!), I, 'down', {weight: w(name('mlp.down_proj.weight')), widths: [H]})[0]
      })
    })
  }

  const {logits, mix} = g.within('head', () => {
    const normed = ops.reshape(norm('model.norm.weight'), ops.shapeOf([rows, seq, H]))
    // Keep only the positions whose logits are wanted before the (costly) head: 0 keeps all.
    const start = ops.neg(ops.reshape(numLogitsToKeep, g.int64([1])))
    const kept = ops.reshape(ops.slice(normed, start, g.int64([Number.MAX_SAFE_INTEGER]), 1), g.int64([-1, H]))
    const aggregated = g.within('aggregate', () => mixStreams(ctx, kept, head))
    // The LM head's row blocks (stored so for the CPU) as one [H, vocab] matrix, built at load.
    const blocks = config.tieWordEmbeddings
      ? weights.rowBlocks('model.embed_tokens.weight', 'lm_head.weight (tied to model.embed_tokens.weight)', HEAD_BLOCK_BYTES)
      : weights.rowBlocks('lm_head.weight', 'lm_head.weight', HEAD_BLOCK_BYTES)
    const matrix = blocks.length === 1 ? ops.transpose(blocks[0], [1, 0]) : ops.concat(blocks.map((b) => ops.transpose(b, [1, 0])), 1)
    return {
      logits: ops.reshape(ops.matmul(aggregated.mixed, matrix), ops.shapeOf([batch, -1, config.vocabSize])),
      mix: ops.reshape(aggregated.weights, ops.shapeOf([batch, -1, streams])),
    }
  })
  g.output(logits, io.logits, 'float32', ['batch', 'logits_sequence_length', config.vocabSize])
  g.output(mix, io.streamWeights, 'float32', ['batch', 'logits_sequence_length', 'streams'])
  return g
}

/** The CPU graph's LM head blocks (blocks.ts): the same stored tensors. */
const HEAD_BLOCK_BYTES = 64 << 20

/**
 * aggregateStreams (blocks.ts) with the head's weights fed transposed, for MatMul: features
 * hidden-major (h·P + p) → Linear → SiLU → Linear → softmax → smoothed → weighted sum.
 */
function mixStreams(ctx: DecoderContext, hidden: string, head: {weight0: string; bias0: string; weight2: string; bias2: string; smooth: string}): {mixed: string; weights: string} {
  const {ops, g, config, dims} = ctx
  const H = config.hiddenSize
  const streams = ops.reshape(hidden, ops.shapeOf([dims.batch, dims.streams, -1, H])) // [B, P, K, H]
  const featureWidth = ops.mul(dims.streams, g.int64([H]))
  // 3-D, so ONNX Runtime does not fuse MatMul + Add into a Gemm (a slower kernel on the GPU)
  const features = ops.reshape(ops.transpose(streams, [0, 2, 3, 1]), ops.shapeOf([dims.batch, -1, featureWidth])) // [B, K, H·P]
  const hiddenUnits = g.node('QuickGelu', [ops.add(ops.matmul(features, head.weight0), head.bias0)], {alpha: {float: 1}}, 'com.microsoft')
  const scored = ops.add(ops.matmul(hiddenUnits, head.weight2), head.bias2) // [B, K, P]
  const keep = ops.sub(g.float([1], []), head.smooth)
  const floor = ops.div(head.smooth, ops.castTo(dims.streams, 'float32'))
  const mix = ops.add(ops.mul(ops.softmax(scored, -1), keep), floor) // [B, K, P]
  const perStream = ops.unsqueeze(ops.transpose(mix, [0, 2, 1]), [3]) // [B, P, K, 1]
  return {mixed: ops.reshape(ops.reduceSum(ops.mul(streams, perStream), [1], 0), ops.shapeOf([-1, H])), weights: mix}
}
