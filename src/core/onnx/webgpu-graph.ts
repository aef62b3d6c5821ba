import type {BackboneShape} from '../checkpoint/config.js'
import {aggregateStreams, embedTokens, lmHead, rotary, type AggregationInputs, type DecoderContext, type Rotary} from './blocks.js'
import {GraphBuilder} from './builder.js'
import {Ops} from './ops.js'
import {io} from './parscale-graph.js'
import type {WeightProvider} from './weights.js'

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
 * Every kernel launch costs the GPU path far more than its arithmetic, so this graph is built
 * for few, large kernels: fused RMSNorm with the residual add (SkipSimplifiedLayerNormalization),
 * the query scale folded into its Gemm (alpha, beta), rotary on the projections as they come
 * out ([rows, seq, heads·d], positions per row), SiLU as QuickGelu(alpha = 1), one score MatMul
 * over the whole cache with the mask computed by the caller (valid slots and causality as one
 * additive [batch, 1, seq, total] input), one softmax.
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
} as const

/** The additive value of a masked position (finite, so a softmax row never sees only −inf). */
export const MASKED = -1e30

export function buildWebGpuDecoderGraph(config: BackboneShape, makeWeights: (g: GraphBuilder) => WeightProvider): GraphBuilder {
  const g = new GraphBuilder('parscale-webgpu')
  const ops = new Ops(g)
  const {numKvHeads: kv, headDim: d, hiddenSize: H, numHeads} = config
  const group = numHeads / kv

  const inputIds = g.input(webgpuIo.inputIds, 'int64', ['batch', 'sequence_length'])
  const positions = g.input(webgpuIo.positions, 'int64', ['batch_streams', 'sequence_length'])
  const mask = g.input(webgpuIo.attentionMask, 'float32', ['batch', 1, 'sequence_length', 'total_length'])
  const past = Array.from({length: config.numLayers}, (_, layer) => ({
    key: g.input(webgpuIo.pastKey(layer), 'float32', ['batch_streams', kv, d, 'past_length']),
    value: g.input(webgpuIo.pastValue(layer), 'float32', ['batch_streams', kv, 'past_length', d]),
  }))
  const head: AggregationInputs = {
    weight0: g.input(io.aggregate.weight0, 'float32', ['aggregate_hidden', 'streams_hidden']),
    bias0: g.input(io.aggregate.bias0, 'float32', ['aggregate_hidden']),
    weight2: g.input(io.aggregate.weight2, 'float32', ['streams', 'aggregate_hidden']),
    bias2: g.input(io.aggregate.bias2, 'float32', ['streams']),
    smooth: g.input(io.aggregate.smooth, 'float32', []),
  }
  const numLogitsToKeep = g.input(io.numLogitsToKeep, 'int64', [])

  const weights = makeWeights(g)
  const batch = ops.shape(inputIds, 0, 1)
  const seq = ops.shape(inputIds, 1, 2)
  const streams = ops.shape(head.weight2, 0, 1)
  const rows = ops.mul(batch, streams)
  const dims = {batch, seq, streams, batchStreams: rows}
  const ctx: DecoderContext = {g, ops, weights, config, dims}
  const eps = {float: config.rmsNormEps}
  const w = (name: string) => weights.get(name)
  const linear = (x: string, name: string, bias?: string, scale?: number) =>
    g.node('Gemm', bias ? [x, w(name), w(bias)] : [x, w(name)], scale === undefined ? {transB: 1} : {transB: 1, alpha: {float: scale}, beta: {float: scale}})
  const flat = (x: string, width: number) => ops.reshape(x, ops.shapeOf([-1, width]))
  const perRow = (x: string, width: number) => ops.reshape(x, ops.shapeOf([rows, seq, width]))

  // The residual stream as [rows, seq, H]: the fused norms take 3-D input.
  let residual = perRow(g.within('embed', () => embedTokens(ctx, inputIds)), H)
  const tables: Rotary = g.within('rotary', () => rotary(ctx, positions))
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
      const x = flat(norm(name('input_layernorm.weight')), H)
      const attn = g.within('attn', () => {
        const proj = (p: string, scale?: number) => linear(x, name(`self_attn.${p}.weight`), name(`self_attn.${p}.bias`), scale)
        const q = rope(perRow(proj('q_proj', 1 / Math.sqrt(d)), numHeads * d)) // [R, S, heads·d]
        const k = rope(perRow(proj('k_proj'), kv * d))
        const v = proj('v_proj')
        // queries of one KV head's group become rows: [R, kv, group·S, d]
        const queries = ops.reshape(
          ops.transpose(ops.reshape(q, ops.shapeOf([rows, seq, kv, group, d])), [0, 2, 3, 1, 4]),
          ops.shapeOf([rows, kv, -1, d]),
        )
        const newKey = ops.transpose(ops.reshape(k, ops.shapeOf([rows, seq, kv, d])), [0, 2, 3, 1]) // [R, kv, d, S]
        const newValue = ops.transpose(ops.reshape(v, ops.shapeOf([rows, seq, kv, d])), [0, 2, 1, 3]) // [R, kv, S, d]
        const keys = ops.concat([past[layer].key, newKey], 3)
        const values = ops.concat([past[layer].value, newValue], 2)
        const total = ops.shape(keys, 3, 4)
        // scores [R, kv, group·S, T] viewed as [B, P·kv·group, S, T] take the mask [B, 1, S, T]
        const scores = ops.add(ops.reshape(ops.matmul(queries, keys), ops.shapeOf([batch, -1, seq, total])), mask)
        const probs = ops.reshape(ops.softmax(scores, -1), ops.shapeOf([rows, kv, -1, total]))
        const context = ops.reshape(ops.matmul(probs, values), ops.shapeOf([rows, kv, group, seq, d]))
        const perToken = ops.reshape(ops.transpose(context, [0, 3, 1, 2, 4]), ops.shapeOf([-1, numHeads * d]))
        // declared once all their consumers exist (outputs are renamed in place)
        g.output(keys, webgpuIo.presentKey(layer), 'float32', ['batch_streams', kv, d, 'total_length'])
        g.output(values, webgpuIo.presentValue(layer), 'float32', ['batch_streams', kv, 'total_length', d])
        return linear(perToken, name('self_attn.o_proj.weight'))
      })
      pending = perRow(attn, H)
      const y = flat(norm(name('post_attention_layernorm.weight')), H)
      const mlp = g.within('mlp', () => {
        const gate = g.node('QuickGelu', [linear(y, name('mlp.gate_proj.weight'))], {alpha: {float: 1}}, 'com.microsoft') // x·sigmoid(x): SiLU
        return linear(ops.mul(gate, linear(y, name('mlp.up_proj.weight'))), name('mlp.down_proj.weight'))
      })
      pending = perRow(mlp, H)
    })
  }

  const {logits, mix} = g.within('head', () => {
    const normed = norm('model.norm.weight') // [R, S, H]
    // Keep only the positions whose logits are wanted before the (costly) head: 0 keeps all.
    const start = ops.neg(ops.reshape(numLogitsToKeep, g.int64([1])))
    const kept = flat(ops.slice(normed, start, g.int64([Number.MAX_SAFE_INTEGER]), 1), H)
    const aggregated = g.within('aggregate', () => aggregateStreams(ctx, kept, head))
    return {
      logits: ops.reshape(lmHead(ctx, aggregated.mixed), ops.shapeOf([batch, -1, config.vocabSize])),
      mix: ops.reshape(aggregated.weights, ops.shapeOf([batch, -1, streams])),
    }
  })
  g.output(logits, io.logits, 'float32', ['batch', 'logits_sequence_length', config.vocabSize])
  g.output(mix, io.streamWeights, 'float32', ['batch', 'logits_sequence_length', 'streams'])
  return g
}
