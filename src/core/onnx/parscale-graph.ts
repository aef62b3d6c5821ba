import type {ModelConfig} from '../checkpoint/config.js'
import {aggregateStreams, attention, attentionBias, embedTokens, lmHead, mlp, rmsNorm, rotaryFromMask, type DecoderContext} from './blocks.js'
import {GraphBuilder} from './builder.js'
import {Ops} from './ops.js'
import type {WeightProvider} from './weights.js'

/**
 * Bumped whenever the graph a conversion writes changes (ops, layout of stored weights), so
 * packages cached by an older parscale are converted again instead of silently reused.
 */
export const GRAPH_VERSION = 4

/** Names of the decoder's inputs and outputs, as Hugging Face's ONNX decoder exports use. */
export const io = {
  inputIds: 'input_ids',
  attentionMask: 'attention_mask',
  numLogitsToKeep: 'num_logits_to_keep',
  logits: 'logits',
  pastKey: (layer: number) => `past_key_values.${layer}.key`,
  pastValue: (layer: number) => `past_key_values.${layer}.value`,
  presentKey: (layer: number) => `present.${layer}.key`,
  presentValue: (layer: number) => `present.${layer}.value`,
} as const

/**
 * The whole ParScale decoder as one graph: embeddings copied into P streams, Qwen2 layers
 * whose attention sees each stream's prefix, the final norm, the stream aggregation and
 * the LM head. P = 1 is plain Qwen2. `makeWeights` binds the weights to the builder.
 */
export function buildDecoderGraph(config: ModelConfig, makeWeights: (g: GraphBuilder) => WeightProvider): GraphBuilder {
  const g = new GraphBuilder(`parscale-p${config.parallel}`)
  const ops = new Ops(g)
  const P = config.parallel
  const cacheHeads = P * config.numKvHeads
  const cacheShape = ['batch', cacheHeads, 'past_sequence_length', config.headDim]
  const presentShape = ['batch', cacheHeads, 'total_sequence_length', config.headDim]

  const inputIds = g.input(io.inputIds, 'int64', ['batch', 'sequence_length'])
  const attentionMask = g.input(io.attentionMask, 'int64', ['batch', 'total_sequence_length'])
  const caches = Array.from({length: config.numLayers}, (_, layer) => ({
    pastKey: g.input(io.pastKey(layer), 'float32', cacheShape),
    pastValue: g.input(io.pastValue(layer), 'float32', cacheShape),
  }))
  const numLogitsToKeep = g.input(io.numLogitsToKeep, 'int64', [])

  const weights = makeWeights(g)
  const batch = ops.shape(inputIds, 0, 1)
  const dims = {batch, seq: ops.shape(inputIds, 1, 2), batchStreams: ops.mul(batch, g.int64([P]))}
  const ctx: DecoderContext = {g, ops, weights, config, dims}

  let hidden = g.within('embed', () => embedTokens(ctx, inputIds))
  const rotary = g.within('rotary', () => rotaryFromMask(ctx, attentionMask))
  const bias = g.within('mask', () => attentionBias(ctx, attentionMask))

  for (let layer = 0; layer < config.numLayers; layer++) {
    g.within(`layers.${layer}`, () => {
      const prefix = `model.layers.${layer}`
      const attn = g.within('attn', () =>
        attention(ctx, layer, rmsNorm(ctx, hidden, `${prefix}.input_layernorm.weight`), rotary, bias, caches[layer]),
      )
      hidden = ops.add(hidden, attn.output)
      hidden = ops.add(hidden, g.within('mlp', () => mlp(ctx, layer, rmsNorm(ctx, hidden, `${prefix}.post_attention_layernorm.weight`))))
      g.output(attn.presentKey, io.presentKey(layer), 'float32', presentShape)
      g.output(attn.presentValue, io.presentValue(layer), 'float32', presentShape)
    })
  }

  const logits = g.within('head', () => {
    const normed = rmsNorm(ctx, hidden, 'model.norm.weight')
    // Keep only the positions whose logits are wanted before the (costly) head: 0 keeps all.
    const perRow = ops.reshape(normed, ops.shapeOf([dims.batchStreams, -1, config.hiddenSize]))
    const start = ops.neg(ops.reshape(numLogitsToKeep, g.int64([1])))
    const kept = ops.slice(perRow, start, g.int64([Number.MAX_SAFE_INTEGER]), 1)
    const rows = ops.reshape(kept, ops.shapeOf([-1, config.hiddenSize]))
    const mixed = P > 1 ? g.within('aggregate', () => aggregateStreams(ctx, rows)) : rows
    return ops.reshape(lmHead(ctx, mixed), ops.shapeOf([batch, -1, config.vocabSize]))
  })
  g.output(logits, io.logits, 'float32', ['batch', 'logits_sequence_length', config.vocabSize])
  return g
}
