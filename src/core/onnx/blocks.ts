import type {ModelConfig} from '../checkpoint/config.js'
import type {GraphBuilder} from './builder.js'
import type {Ops} from './ops.js'
import type {WeightProvider} from './weights.js'

/**
 * What every block needs: the primitives, the weights and the run-time sizes.
 * Compute layout: the P streams of batch row b are rows b·P … b·P+P−1 ("(b p)"), so the
 * KV cache can keep streams inside its head axis, [batch, P·kv_heads, seq, head_dim].
 */
export interface DecoderContext {
  g: GraphBuilder
  ops: Ops
  weights: WeightProvider
  config: ModelConfig
  /** 1-element int64 tensors: batch, new tokens, batch·P. */
  dims: {batch: string; seq: string; batchStreams: string}
}

/** Rotary inputs: positions of the new tokens [batch, seq] and cos/sin tables [max_positions, head_dim / 2]. */
export interface Rotary {
  positions: string
  cosTable: string
  sinTable: string
}

/** Token embeddings copied into P streams: [batch·P·seq, hidden]. */
export function embedTokens(ctx: DecoderContext, inputIds: string): string {
  const {ops, config, dims} = ctx
  const embedded = ops.gather(ctx.weights.get('model.embed_tokens.weight'), inputIds) // [B, S, H]
  if (config.parallel === 1) return ops.reshape(embedded, ops.shapeOf([-1, config.hiddenSize]))
  const streams = ops.expand(ops.unsqueeze(embedded, [1]), ops.shapeOf([dims.batch, config.parallel, dims.seq, config.hiddenSize]))
  return ops.reshape(streams, ops.shapeOf([-1, config.hiddenSize]))
}

/** Qwen2 RMSNorm over the last axis: x / sqrt(mean(x²) + eps) · weight. */
export function rmsNorm(ctx: DecoderContext, x: string, weightName: string): string {
  const {ops, g} = ctx
  const variance = ops.reduceMean(g.node('Pow', [x, g.float([2], [])]), [-1])
  const normalized = ops.div(x, ops.sqrt(ops.add(variance, g.float([ctx.config.rmsNormEps], []))))
  return ops.mul(normalized, ctx.weights.get(weightName))
}

/**
 * Rotary tables from the attention mask: a real token's position is the number of real
 * tokens before it (cumsum − 1), so left padding and the prefix tokens shift nothing.
 */
export function rotaryFromMask(ctx: DecoderContext, attentionMask: string): Rotary {
  const {ops, g, config, dims} = ctx
  const counted = ops.sub(ops.cumsum(attentionMask, 1), g.int64([1], [])) // [B, past+S]
  const padded = ops.equal(attentionMask, g.int64([0], []))
  const clamped = ops.where(padded, g.int64([1], []), counted)
  const total = ops.shape(attentionMask, 1, 2)
  const positions = ops.slice(clamped, ops.sub(total, dims.seq), total, 1) // [B, S]
  const {cos, sin} = rotaryTables(config)
  const tableShape = [config.maxPositionEmbeddings, config.headDim / 2]
  return {positions, cosTable: ctx.weights.computed('rotary.cos_table', cos, tableShape), sinTable: ctx.weights.computed('rotary.sin_table', sin, tableShape)}
}

/**
 * cos and sin of position · inverse frequency for every position the model supports, with
 * the angle rounded to float32 as the reference computes it in float32.
 */
export function rotaryTables(config: ModelConfig): {cos: Float32Array; sin: Float32Array} {
  const half = config.headDim / 2
  const invFreq = Array.from({length: half}, (_, i) => Math.fround(1 / Math.fround(config.ropeTheta ** Math.fround((2 * i) / config.headDim))))
  const cos = new Float32Array(config.maxPositionEmbeddings * half)
  const sin = new Float32Array(cos.length)
  for (let position = 0; position < config.maxPositionEmbeddings; position++) {
    for (let i = 0; i < half; i++) {
      const angle = Math.fround(position * invFreq[i])
      cos[position * half + i] = Math.cos(angle)
      sin[position * half + i] = Math.sin(angle)
    }
  }
  return {cos, sin}
}

/** x·cos + rotate_half(x)·sin for x [batch, heads, seq, head_dim], one fused ONNX Runtime op. */
export function applyRotary(ctx: DecoderContext, x: string, rotary: Rotary): string {
  return ctx.g.node('RotaryEmbedding', [x, rotary.positions, rotary.cosTable, rotary.sinTable], {interleaved: 0}, 'com.microsoft')
}

/**
 * Additive attention mask [batch, 1, seq, prefix + past + seq]: prefix keys are visible to
 * every query; cached and new keys are visible when real (mask 1) and not in the future.
 * Masked scores get a large finite negative, so a fully padded row stays finite.
 */
export function attentionBias(ctx: DecoderContext, attentionMask: string): string {
  const {ops, g, config, dims} = ctx
  const total = ops.shape(attentionMask, 1, 2)
  const zero = g.int64([0], [])
  const one = g.int64([1], [])
  const totalScalar = ops.reshape(total, g.int64([], [0]))
  const keyIndex = ops.range(zero, totalScalar, one) // [T]
  const queryIndex = ops.range(ops.reshape(ops.sub(total, dims.seq), g.int64([], [0])), totalScalar, one) // [S]
  const causal = ops.lessOrEqual(ops.unsqueeze(keyIndex, [0]), ops.unsqueeze(queryIndex, [1])) // [S, T]
  const real = ops.unsqueeze(ops.castTo(attentionMask, 'bool'), [1, 2]) // [B, 1, 1, T]
  const visible = ops.and(causal, real) // [B, 1, S, T]
  const bias = ops.where(visible, g.float([0], []), g.float([-1e30], []))
  if (config.parallel === 1) return bias
  const prefix = ops.expand(g.float([0], []), ops.shapeOf([dims.batch, 1, dims.seq, config.prefixTokens]))
  return ops.concat([prefix, bias], 3)
}

export interface LayerCache {
  pastKey: string
  pastValue: string
}

/**
 * Grouped-query self-attention with the stream prefixes. Returns the output rows and the
 * updated cache ([batch, P·kv_heads, past + seq, head_dim], rotated keys, no prefix).
 */
export function attention(
  ctx: DecoderContext,
  layer: number,
  x: string,
  rotary: Rotary,
  bias: string,
  cache: LayerCache,
): {output: string; presentKey: string; presentValue: string} {
  const {ops, g, config, dims, weights} = ctx
  const {parallel: P, numHeads, numKvHeads, headDim} = config
  const name = (tensor: string) => `model.layers.${layer}.self_attn.${tensor}`
  const project = (proj: string) => ops.linear(x, weights.get(name(`${proj}.weight`)), weights.get(name(`${proj}.bias`)))

  // rows [(b p s), heads·d] → [b, p·heads, s, d]
  const toHeads = (rows: string, heads: number) => {
    const split = ops.reshape(rows, ops.shapeOf([dims.batch, P, dims.seq, heads, headDim]))
    return ops.reshape(ops.transpose(split, [0, 1, 3, 2, 4]), ops.shapeOf([dims.batch, P * heads, -1, headDim]))
  }

  const scale = g.float([1 / Math.sqrt(headDim)], [])
  const query = ops.mul(applyRotary(ctx, toHeads(project('q_proj'), numHeads), rotary), scale)
  const presentKey = ops.concat([cache.pastKey, applyRotary(ctx, toHeads(project('k_proj'), numKvHeads), rotary)], 2)
  const presentValue = ops.concat([cache.pastValue, toHeads(project('v_proj'), numKvHeads)], 2)

  // Queries of one KV head's group become extra rows: [b·p, kv, group·s, d] against [b·p, kv, keys, d].
  const perKvHead = (t: string) => ops.reshape(t, ops.shapeOf([dims.batchStreams, numKvHeads, -1, headDim]))
  const queries = perKvHead(query)
  let scores = ops.matmul(queries, ops.transpose(perKvHead(presentKey), [0, 1, 3, 2])) // [b·p, kv, group·s, past+s]
  const n = config.prefixTokens
  // Stream p's prefix [P, kv, n, d] scores against its queries, broadcast over the batch: the
  // cache is never copied next to the prefix, which would cost a copy of it per step.
  const perStream = (t: string, last: number) => ops.reshape(t, ops.shapeOf([dims.batch, P, numKvHeads, -1, last]))
  if (P > 1) {
    const prefixScores = ops.matmul(perStream(queries, headDim), ops.transpose(weights.get(name('prefix_k')), [0, 1, 3, 2]))
    scores = ops.concat([ops.reshape(prefixScores, ops.shapeOf([dims.batchStreams, numKvHeads, -1, n])), scores], 3)
  }
  const masked = ops.add(ops.reshape(scores, ops.shapeOf([dims.batch, P * numHeads, dims.seq, -1])), bias)
  const probs = ops.reshape(ops.softmax(masked, -1), ops.shapeOf([dims.batchStreams, numKvHeads, -1, 0]))
  let context: string // [b·p, kv, group·s, d]
  if (P > 1) {
    const prefixProbs = ops.slice(probs, g.int64([0]), g.int64([n]), 3)
    const cacheProbs = ops.slice(probs, g.int64([n]), g.int64([Number.MAX_SAFE_INTEGER]), 3)
    const fromPrefix = ops.matmul(perStream(prefixProbs, n), weights.get(name('prefix_v')))
    context = ops.add(ops.matmul(cacheProbs, perKvHead(presentValue)), ops.reshape(fromPrefix, ops.shapeOf([dims.batchStreams, numKvHeads, -1, headDim])))
  } else {
    context = ops.matmul(probs, perKvHead(presentValue))
  }
  const perToken = ops.transpose(ops.reshape(context, ops.shapeOf([dims.batch, P, numHeads, dims.seq, headDim])), [0, 1, 3, 2, 4])
  const rows = ops.reshape(perToken, ops.shapeOf([-1, numHeads * headDim]))
  return {output: ops.linear(rows, weights.get(name('o_proj.weight'))), presentKey, presentValue}
}

/** SiLU-gated MLP: down(silu(gate(x)) · up(x)). */
export function mlp(ctx: DecoderContext, layer: number, x: string): string {
  const {ops, weights} = ctx
  const w = (proj: string) => weights.get(`model.layers.${layer}.mlp.${proj}.weight`)
  const gated = ops.mul(ops.silu(ops.linear(x, w('gate_proj'))), ops.linear(x, w('up_proj')))
  return ops.linear(gated, w('down_proj'))
}

/**
 * Mixes the P streams of each token: features concatenated hidden-major (h·P + p) →
 * Linear → SiLU → Linear → softmax (float32) → smoothed weights → weighted sum.
 * `hidden` is [batch·P·tokens, H]; returns [batch·tokens, H].
 */
export function aggregateStreams(ctx: DecoderContext, hidden: string): string {
  const {ops, g, config, dims, weights} = ctx
  const {parallel: P, hiddenSize: H, attnSmooth} = config
  const streams = ops.reshape(hidden, ops.shapeOf([dims.batch, P, -1, H])) // [B, P, K, H]
  const features = ops.reshape(ops.transpose(streams, [0, 2, 3, 1]), ops.shapeOf([-1, H * P])) // [(B K), H·P]
  const scored = ops.linear(
    ops.silu(ops.linear(features, weights.get('model.aggregate_layer.0.weight'), weights.get('model.aggregate_layer.0.bias'))),
    weights.get('model.aggregate_layer.2.weight'),
    weights.get('model.aggregate_layer.2.bias'),
  ) // [(B K), P]
  const mix = ops.add(ops.mul(ops.softmax(scored, -1), g.float([1 - attnSmooth], [])), g.float([attnSmooth / P], []))
  const perStream = ops.unsqueeze(ops.transpose(ops.reshape(mix, ops.shapeOf([dims.batch, -1, P])), [0, 2, 1]), [3]) // [B, P, K, 1]
  return ops.reshape(ops.reduceSum(ops.mul(streams, perStream), [1], 0), ops.shapeOf([-1, H]))
}

/** Largest slice of the LM head that ONNX Runtime repacks at once (see lmHead). */
const HEAD_BLOCK_BYTES = 64 << 20

/**
 * Vocabulary logits from hidden rows: lm_head, or the embedding matrix when tied.
 * Memory, not arithmetic, shapes this block. ONNX Runtime repacks each matmul weight into
 * a buffer of its own and then drops the file-mapped original; while it packs, both are
 * resident, so the head (the largest matrix) is split into vocabulary blocks to keep that
 * overlap small. A tied head reads its own stored copy of the embeddings, as an
 * initializer that Gather also reads would stay mapped next to its packed twin.
 */
export function lmHead(ctx: DecoderContext, rows: string): string {
  const {config, ops, weights} = ctx
  const blocks = config.tieWordEmbeddings
    ? weights.rowBlocks('model.embed_tokens.weight', 'lm_head.weight (tied to model.embed_tokens.weight)', HEAD_BLOCK_BYTES)
    : weights.rowBlocks('lm_head.weight', 'lm_head.weight', HEAD_BLOCK_BYTES)
  const logits = blocks.map((block) => ops.linear(rows, block))
  return logits.length === 1 ? logits[0] : ops.concat(logits, 1)
}
