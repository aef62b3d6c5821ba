import type {BackboneShape} from '../checkpoint/config.js'
import type {GraphBuilder} from './builder.js'
import type {Ops} from './ops.js'
import type {LinearPart, WeightProvider} from './weights.js'

/**
 * What every block needs: the primitives, the weights and the run-time sizes.
 * Compute layout: the P streams of batch row b are rows b·P … b·P+P−1 ("(b p)"), and P is a
 * run-time size: one graph serves every P of a package. The KV cache keeps the streams in its
 * batch axis, [batch·P, kv_heads, …].
 */
export interface DecoderContext {
  g: GraphBuilder
  ops: Ops
  weights: WeightProvider
  config: BackboneShape
  /** 1-element int64 tensors: batch, new tokens, streams P, batch·P. */
  dims: {batch: string; seq: string; streams: string; batchStreams: string}
}

/** Rotary inputs: positions of the new tokens per stream row [batch·P, seq] and cos/sin tables [max_positions, head_dim / 2]. */
export interface Rotary {
  positions: string
  cosTable: string
  sinTable: string
}

/** Token embeddings copied into P streams: [batch·P·seq, hidden]. */
export function embedTokens(ctx: DecoderContext, inputIds: string): string {
  return embeddingsIntoStreams(ctx, ctx.weights.embed('model.embed_tokens.weight', inputIds))
}

/** Embedded tokens [batch, seq, hidden] (rows of the table, gathered or fed) copied into P streams: [batch·P·seq, hidden]. */
export function embeddingsIntoStreams(ctx: DecoderContext, embedded: string): string {
  const {ops, config, dims} = ctx
  const streams = ops.expand(ops.unsqueeze(embedded, [1]), ops.shapeOf([dims.batch, dims.streams, dims.seq, config.hiddenSize]))
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
 * The residual stream's next value, residual + x, and its RMSNorm, in one ONNX Runtime
 * kernel: a decode step runs some thousand small kernels, and each costs time of its own.
 */
export function addAndNorm(ctx: DecoderContext, x: string, residual: string, weightName: string): {sum: string; normed: string} {
  const [normed, , , sum] = ctx.g.nodeN('SkipSimplifiedLayerNormalization', [x, residual, ctx.weights.get(weightName)], 4, {epsilon: {float: ctx.config.rmsNormEps}}, 'com.microsoft')
  return {sum: sum!, normed: normed!}
}

/**
 * Rotary tables for the new tokens' positions. A position counts real tokens only (the caller
 * feeds them: 0 for a sequence's first token), so the stream prefixes shift nothing.
 */
export function rotary(ctx: DecoderContext, positions: string): Rotary {
  const {ops, dims} = ctx
  // every stream of a sequence has its positions: [B, S] → [B·P, S], once for all layers
  const perStream = ops.reshape(ops.expand(ops.unsqueeze(positions, [1]), ops.shapeOf([dims.batch, dims.streams, dims.seq])), ops.shapeOf([dims.batchStreams, dims.seq]))
  return {positions: perStream, ...rotaryInitializers(ctx)}
}

/** The cos/sin tables [max_positions, head_dim / 2] as backbone tensors, which every graph form reads. */
export function rotaryInitializers(ctx: DecoderContext): Pick<Rotary, 'cosTable' | 'sinTable'> {
  const {cos, sin} = rotaryTables(ctx.config)
  const tableShape = [ctx.config.maxPositionEmbeddings, ctx.config.headDim / 2]
  return {cosTable: ctx.weights.computed('rotary.cos_table', cos, tableShape), sinTable: ctx.weights.computed('rotary.sin_table', sin, tableShape)}
}

/**
 * cos and sin of position · inverse frequency for every position the model supports, with
 * the angle rounded to float32 as the reference computes it in float32.
 */
export function rotaryTables(config: BackboneShape): {cos: Float32Array; sin: Float32Array} {
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

/** x·cos + rotate_half(x)·sin for x [batch·P, seq, heads·head_dim] (token-major, as the projection writes it), one fused ONNX Runtime op. */
export function applyRotary(ctx: DecoderContext, x: string, rotary: Rotary, heads: number): string {
  return ctx.g.node('RotaryEmbedding', [x, rotary.positions, rotary.cosTable, rotary.sinTable], {interleaved: 0, num_heads: heads}, 'com.microsoft')
}

/**
 * Additive masks in the layout scores have, [batch·P, kv, group·seq, ·] (a KV head's group of
 * query heads as extra rows), built once and shared by every layer.
 */
export interface AttentionMasks {
  /** [batch·P, 1, 1, capacity]: a cache slot is visible when it is filled (prefix and earlier tokens). */
  cache: string
  /** [group·seq, seq]: a new token sees the new tokens up to itself. */
  causal: string
  /** The cache's capacity as a 1-element int64 tensor (where new-token scores start). */
  capacity: string
  /** bool [1]: the call runs one new token per row (a decode step), which picks the attention's product order. */
  oneToken: string
}

/**
 * Masked scores get a large finite negative rather than −inf, so a row with nothing visible
 * in one part still has a finite softmax. `pastKey` is a layer's cache keys [batch·P, kv, capacity, head_dim].
 */
export function attentionMasks(ctx: DecoderContext, cacheLengths: string, pastKey: string): AttentionMasks {
  const {ops, g, dims, config} = ctx
  const zero = g.int64([0], [])
  const one = g.int64([1], [])
  const blocked = g.float([-1e30], [])
  const open = g.float([0], [])
  const capacity = ops.shape(pastKey, 2, 3)
  const slot = ops.range(zero, ops.reshape(capacity, g.int64([], [0])), one) // [C]
  const filled = ops.less(ops.unsqueeze(slot, [0]), ops.unsqueeze(cacheLengths, [1])) // [B, C]
  const perBatch = ops.unsqueeze(ops.where(filled, open, blocked), [1, 2]) // [B, 1, 1, C]
  const cache = ops.reshape(ops.expand(perBatch, ops.shapeOf([dims.batch, dims.streams, 1, 1])), ops.shapeOf([dims.batchStreams, 1, 1, -1]))
  const seq = ops.reshape(dims.seq, g.int64([], [0]))
  const position = ops.range(zero, seq, one) // [S]
  const causal = ops.where(ops.lessOrEqual(ops.unsqueeze(position, [0]), ops.unsqueeze(position, [1])), open, blocked) // [S, S]
  const group = config.numHeads / config.numKvHeads
  const oneToken = g.node('Equal', [dims.seq, g.int64([1])])
  return {cache, causal: group === 1 ? causal : g.node('Tile', [causal, g.int64([group, 1])]), capacity, oneToken}
}

export interface LayerCache {
  /** [batch·P, kv, capacity, head_dim]: keys in rows, the score product's first operand. */
  pastKey: string
  /** [batch·P, kv, head_dim, capacity]: values transposed, the value product's first operand. */
  pastValue: string
}

/**
 * Grouped-query self-attention over the cache (whose first slots hold the stream's prefix)
 * and the new tokens. The cache is read where the caller keeps it, never copied: scores
 * against it and against the new keys are computed apart and joined before the softmax.
 * q, k and v come from one projection (one matmul), split and rotated in the token-major
 * layout [b·p, s, heads·d] the matmul writes; each `If` branch then lays them out as its
 * products need, which a decode step (one token per row) does with reshapes alone: a decode
 * step runs some thirty kernels per layer, and each small kernel costs about as much time
 * between kernels as in them.
 * Returns the output rows and the new keys [batch·P, kv, seq, head_dim] and values
 * [batch·P, kv, head_dim, seq], which the caller appends to its cache.
 */
export function attention(
  ctx: DecoderContext,
  layer: number,
  x: string,
  rotary: Rotary,
  masks: AttentionMasks,
  cache: LayerCache,
): {output: string; newKey: string; newValue: string} {
  const {ops, g, config, dims, weights} = ctx
  const {numHeads, numKvHeads, headDim} = config
  const name = (tensor: string) => `model.layers.${layer}.self_attn.${tensor}`
  const qkv = weights.linearConcat(x, queryKeyValueParts(layer, headDim), name('qkv_proj')) // [(b p s), (heads + 2·kv)·d]

  // [(b p s), (heads + 2 kv)·d] → [b·p, s, (heads + 2 kv)·d] → q, k, v, token-major
  const perRow = ops.reshape(qkv, ops.shapeOf([dims.batchStreams, dims.seq, (numHeads + 2 * numKvHeads) * headDim]))
  const [q, k, v] = g.nodeN('Split', [perRow, g.int64([numHeads * headDim, numKvHeads * headDim, numKvHeads * headDim])], 3, {axis: 2})
  const rotated = {q: applyRotary(ctx, q!, rotary, numHeads), k: applyRotary(ctx, k!, rotary, numKvHeads), v: v!}
  const shapes = attentionShapes(ctx)
  const branch = (decode: boolean) =>
    g.subgraph(decode ? 'decode' : 'prefill', () => ops.inSubgraph(() => (decode ? decodeAttention(ctx, rotated, masks, cache, shapes) : prefillAttention(ctx, rotated, masks, cache, shapes))))
  const [rows, newKey, newValue] = g.nodeN('If', [masks.oneToken], 3, {then_branch: {graph: branch(true)}, else_branch: {graph: branch(false)}})
  return {output: weights.linear(rows!, name('o_proj.weight')), newKey: newKey!, newValue: newValue!}
}

/**
 * The shapes the attention branches reshape to, all constants: Reshape's 0 keeps an input
 * dimension and −1 infers one, so no run-time shape is built (each would be a kernel per step).
 */
interface AttentionShapes {
  /** Decode: [b·p, kv, group, d] (queries), [b·p, kv, 1, d] (keys), [b·p, kv, d, 1] (values). */
  decodeQueries: string
  decodeKey: string
  decodeValue: string
  /** Prefill: [b·p, s, heads, d], [b·p, s, kv, d], [b·p, kv, group·s, d], [b·p, heads, s, d]. */
  tokenQueries: string
  tokenKeys: string
  groupedQueries: string
  headContext: string
  /** [b·p·s, heads·d] */
  rows: string
}

function attentionShapes(ctx: DecoderContext): AttentionShapes {
  const {g, config} = ctx
  const {numHeads, numKvHeads, headDim} = config
  return {
    decodeQueries: g.int64([-1, numKvHeads, numHeads / numKvHeads, headDim]),
    decodeKey: g.int64([-1, numKvHeads, 1, headDim]),
    decodeValue: g.int64([-1, numKvHeads, headDim, 1]),
    tokenQueries: g.int64([0, 0, numHeads, headDim]),
    tokenKeys: g.int64([0, 0, numKvHeads, headDim]),
    groupedQueries: g.int64([0, numKvHeads, -1, headDim]),
    headContext: g.int64([0, numHeads, -1, headDim]),
    rows: g.int64([-1, numHeads * headDim]),
  }
}

/** A layer's new q, k, v after rotary, token-major: [b·p, s, heads·d], [b·p, s, kv·d] twice. */
interface FreshProjections {
  q: string
  k: string
  v: string
}

/**
 * Attention of a decode step (one token per row, s = 1), as the `If`'s then-branch: at s = 1
 * the token-major q, k, v are already in the head-major order the products read, so reshapes
 * lay them out, and the context comes back to rows by a reshape too. The causal mask of one
 * token against itself is all zeros and is not added. Returns rows [b·p, heads·d], new keys
 * [b·p, kv, 1, d] and values [b·p, kv, d, 1].
 */
function decodeAttention(ctx: DecoderContext, fresh: FreshProjections, masks: AttentionMasks, cache: LayerCache, shapes: AttentionShapes): string[] {
  const {ops} = ctx
  const queries = ops.reshape(fresh.q, shapes.decodeQueries)
  const newKey = ops.reshape(fresh.k, shapes.decodeKey)
  const newValue = ops.reshape(fresh.v, shapes.decodeValue)
  const context = attentionCore(ctx, {queries, newKey, newValue}, masks, cache, true)
  return [ops.reshape(context, shapes.rows), newKey, newValue]
}

/** Attention of a prefill chunk (any s), as the `If`'s else-branch: q, k, v transposed to head-major, the context back to token-major rows. */
function prefillAttention(ctx: DecoderContext, fresh: FreshProjections, masks: AttentionMasks, cache: LayerCache, shapes: AttentionShapes): string[] {
  const {ops} = ctx
  // Queries of one KV head's group become extra rows: [b·p, kv, group·s, d].
  const queries = ops.reshape(ops.transpose(ops.reshape(fresh.q, shapes.tokenQueries), [0, 2, 1, 3]), shapes.groupedQueries)
  const newKey = ops.transpose(ops.reshape(fresh.k, shapes.tokenKeys), [0, 2, 1, 3]) // [b·p, kv, s, d]
  const newValue = ops.transpose(ops.reshape(fresh.v, shapes.tokenKeys), [0, 2, 3, 1]) // [b·p, kv, d, s]
  const context = attentionCore(ctx, {queries, newKey, newValue}, masks, cache, false) // [b·p, kv, group·s, d]
  const perToken = ops.transpose(ops.reshape(context, shapes.headContext), [0, 2, 1, 3])
  return [ops.reshape(perToken, shapes.rows), newKey, newValue]
}

/** A · Bᵀ over the last two axes (ONNX Runtime hands the transpose to the GEMM, which packs B and reads A in place). */
function matmulTransB(ctx: DecoderContext, a: string, b: string): string {
  return ctx.g.node('FusedMatMul', [a, b], {transB: 1}, 'com.microsoft')
}

/** The n × n identity matrix, a float32 constant. */
function identity(ctx: DecoderContext, n: number): string {
  return ctx.g.float(Array.from({length: n * n}, (_, i) => (i % (n + 1) === 0 ? 1 : 0)), [n, n])
}

/**
 * Scores, softmax and values against the cache and the new tokens: the context
 * [b·p, kv, group·s, d]. The CPU's GEMM (MLAS) copies its second operand into a packed
 * buffer before multiplying and reads the first in place. A decode step (`cacheFirst`) has
 * a KV head's few query rows (7 at 0.5b) against the whole cache, so the cache goes first and
 * streams once: K·qᵀ [C, group], turned to rows for the mask and the softmax, and Vᵀ·pᵀ
 * [d, group], turned back; what is packed is the queries and the probabilities. A prefill
 * chunk has many rows, over which one copy of the cache is shared, and turning its wide
 * scores costs more than that copy: q·Kᵀ and p·V, the cache second.
 */
function attentionCore(
  ctx: DecoderContext,
  fresh: {queries: string; newKey: string; newValue: string},
  masks: AttentionMasks,
  cache: LayerCache,
  cacheFirst: boolean,
): string {
  const {ops, g} = ctx
  const {queries, newKey, newValue} = fresh
  // A decode step's [·, group] results turned to rows as I·Xᵀ: MLAS's packing transposes far faster
  // than ONNX Runtime's Transpose on these narrow shapes, and multiplying by 1 and adding 0 is exact.
  const group = ctx.config.numHeads / ctx.config.numKvHeads
  const toRows = (x: string) => matmulTransB(ctx, identity(ctx, group), x)
  const scoresOnCache = cacheFirst ? toRows(matmulTransB(ctx, cache.pastKey, queries)) : matmulTransB(ctx, queries, cache.pastKey)
  const cacheScores = ops.add(scoresOnCache, masks.cache) // [b·p, kv, group·s, C]
  // One new token sees itself: its causal mask is zeros, added only when there are several.
  const ownScores = matmulTransB(ctx, queries, newKey)
  if (cacheFirst) return decodeSoftmaxValues(ctx, cacheScores, ownScores, cache.pastValue, newValue, toRows)
  const probs = ops.softmax(ops.concat([cacheScores, ops.add(ownScores, masks.causal)], 3), -1)
  const onCache = ops.slice(probs, g.int64([0]), masks.capacity, 3)
  const onNew = ops.slice(probs, masks.capacity, g.int64([Number.MAX_SAFE_INTEGER]), 3)
  return ops.add(matmulTransB(ctx, onCache, cache.pastValue), matmulTransB(ctx, onNew, newValue))
}

/**
 * A decode step's softmax and values, the softmax taken apart so that nothing of the
 * [group, capacity] scores is concatenated or sliced: the largest score (over the cache and the
 * token itself), the exponentials of both parts against it, their sums, and one division of the
 * [group, d] context. The same arithmetic as softmax then a weighted sum, in fewer passes over
 * the scores (at P = 8 and a 1152-position cache the attention core took 13.7 against 16.0 ms a
 * step: docs/benchmarks.md, "the decode softmax taken apart").
 */
function decodeSoftmaxValues(ctx: DecoderContext, cacheScores: string, ownScores: string, pastValue: string, newValue: string, toRows: (x: string) => string): string {
  const {ops, g} = ctx
  const top = g.node('Max', [g.node('ReduceMax', [cacheScores], {axes: [-1], keepdims: 1}), ownScores]) // [b·p, kv, group, 1]
  const onCache = g.node('Exp', [ops.sub(cacheScores, top)])
  const onNew = g.node('Exp', [ops.sub(ownScores, top)])
  const total = ops.add(ops.reduceSum(onCache, [-1]), onNew)
  return ops.div(ops.add(toRows(matmulTransB(ctx, pastValue, onCache)), matmulTransB(ctx, onNew, newValue)), total)
}

/**
 * q, k and v of a layer, stacked into one stored matrix (`qkv_proj`), which every graph form
 * reads. The 1/√d of the scores is folded into the query rows: rotary is linear, so it commutes.
 */
export function queryKeyValueParts(layer: number, headDim: number): LinearPart[] {
  const name = (tensor: string) => `model.layers.${layer}.self_attn.${tensor}`
  return ['q_proj', 'k_proj', 'v_proj'].map((proj) => ({weight: name(`${proj}.weight`), bias: name(`${proj}.bias`), ...(proj === 'q_proj' ? {scale: 1 / Math.sqrt(headDim)} : {})}))
}

/** gate and up of a layer's MLP, stacked into one stored matrix (`gate_up_proj`). */
export function gateUpParts(layer: number): LinearPart[] {
  return [{weight: `model.layers.${layer}.mlp.gate_proj.weight`}, {weight: `model.layers.${layer}.mlp.up_proj.weight`}]
}

/** SiLU-gated MLP: down(silu(gate(x)) · up(x)). */
export function mlp(ctx: DecoderContext, layer: number, x: string): string {
  const {ops, g, weights} = ctx
  const name = (proj: string) => `model.layers.${layer}.mlp.${proj}.weight`
  // gate and up read the same input: one matmul over both (quantized kernels then quantize x once)
  const gateUp = weights.linearConcat(x, gateUpParts(layer), `model.layers.${layer}.mlp.gate_up_proj`)
  const [gate, up] = g.nodeN('Split', [gateUp, g.int64([ctx.config.intermediateSize, ctx.config.intermediateSize])], 2, {axis: -1})
  return weights.linear(ops.mul(ops.silu(gate!), up!), name('down_proj'))
}

/** The aggregation head of the P in use, fed per call (see `io.aggregate`). */
export interface AggregationInputs {
  weight0: string // [H_agg, P·H]
  bias0: string
  weight2: string // [P, H_agg]
  bias2: string
  /** parscale_attn_smooth, a float scalar. */
  smooth: string
}

/**
 * Mixes the P streams of each token: features concatenated hidden-major (h·P + p) →
 * Linear → SiLU → Linear → softmax (float32) → smoothed weights → weighted sum.
 * `hidden` is [batch·P·tokens, H]; returns the mixed rows [batch·tokens, H] and the weights
 * [batch·tokens, P]. At P = 1 the caller feeds a one-unit zero head: the softmax over one
 * stream is exactly 1 and the rows pass through unchanged.
 */
export function aggregateStreams(ctx: DecoderContext, hidden: string, head: AggregationInputs): {mixed: string; weights: string} {
  const {ops, g, config, dims} = ctx
  const H = config.hiddenSize
  const streams = ops.reshape(hidden, ops.shapeOf([dims.batch, dims.streams, -1, H])) // [B, P, K, H]
  const featureWidth = ops.mul(dims.streams, g.int64([H]))
  const features = ops.reshape(ops.transpose(streams, [0, 2, 3, 1]), ops.shapeOf([-1, featureWidth])) // [(B K), H·P]
  const scored = ops.linear(ops.silu(ops.linear(features, head.weight0, head.bias0)), head.weight2, head.bias2) // [(B K), P]
  const keep = ops.sub(g.float([1], []), head.smooth)
  const floor = ops.div(head.smooth, ops.castTo(dims.streams, 'float32'))
  const mix = ops.add(ops.mul(ops.softmax(scored, -1), keep), floor) // [(B K), P]
  const perStream = ops.unsqueeze(ops.transpose(ops.reshape(mix, ops.shapeOf([dims.batch, -1, dims.streams])), [0, 2, 1]), [3]) // [B, P, K, 1]
  return {mixed: ops.reshape(ops.reduceSum(ops.mul(streams, perStream), [1], 0), ops.shapeOf([-1, H])), weights: mix}
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
  const logits = config.tieWordEmbeddings
    ? weights.linearByRowBlocks(rows, 'model.embed_tokens.weight', 'lm_head.weight (tied to model.embed_tokens.weight)', HEAD_BLOCK_BYTES)
    : weights.linearByRowBlocks(rows, 'lm_head.weight', 'lm_head.weight', HEAD_BLOCK_BYTES)
  return logits.length === 1 ? logits[0] : ops.concat(logits, 1)
}
