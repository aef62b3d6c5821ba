import type {BackboneShape} from '../checkpoint/config.js'
import {addAndNorm, aggregateStreams, attention, attentionMasks, embeddingsIntoStreams, lmHead, mlp, rmsNorm, rotary, type AggregationInputs, type DecoderContext} from './blocks.js'
import {GraphBuilder} from './builder.js'
import {Ops} from './ops.js'
import type {WeightProvider} from './weights.js'

/**
 * Bumped whenever the graph a conversion writes changes (ops, inputs, layout of stored
 * weights), so packages cached by an older parscale are converted again instead of reused.
 */
export const GRAPH_VERSION = 11

/** Names of the decoder's inputs and outputs. */
export const io = {
  /** int64 [batch, seq]: the WebGPU form's token ids (it gathers its rows on the GPU). */
  inputIds: 'input_ids',
  /** The tokens' rows of the embedding table [batch, seq, hidden], read by the engine (engine/embedding-rows.ts). */
  inputsEmbeds: 'inputs_embeds',
  positions: 'positions',
  cacheLengths: 'cache_lengths',
  numLogitsToKeep: 'num_logits_to_keep',
  pastKey: (layer: number) => `past_key_values.${layer}.key`,
  pastValue: (layer: number) => `past_key_values.${layer}.value`,
  aggregate: {
    weight0: 'aggregate.0.weight',
    bias0: 'aggregate.0.bias',
    weight2: 'aggregate.2.weight',
    bias2: 'aggregate.2.bias',
    smooth: 'aggregate.smooth',
  },
  logits: 'logits',
  streamWeights: 'stream_weights',
  newKey: (layer: number) => `cache_update.${layer}.key`,
  newValue: (layer: number) => `cache_update.${layer}.value`,
} as const

/**
 * The whole ParScale decoder as one graph for every P: the tokens' embeddings (fed: the engine
 * reads their rows of the table, so a long prompt does not fault in the whole mapped table) copied into P streams,
 * Qwen2 layers whose attention reads a cache that starts with each stream's prefix, the final
 * norm, the stream aggregation (its weights are inputs, so P is chosen per call) and the LM
 * head. P = 1 is plain Qwen2. `makeWeights` binds the backbone weights to the builder.
 */
export function buildDecoderGraph(config: BackboneShape, makeWeights: (g: GraphBuilder) => WeightProvider): GraphBuilder {
  const g = new GraphBuilder('parscale')
  const ops = new Ops(g)
  const {numKvHeads: kv, headDim, hiddenSize: H} = config
  const keyShape = ['batch_streams', kv, 'capacity', headDim]
  const valueShape = ['batch_streams', kv, headDim, 'capacity']

  const inputsEmbeds = g.input(io.inputsEmbeds, 'float32', ['batch', 'sequence_length', H])
  const positions = g.input(io.positions, 'int64', ['batch', 'sequence_length'])
  const cacheLengths = g.input(io.cacheLengths, 'int64', ['batch'])
  const caches = Array.from({length: config.numLayers}, (_, layer) => ({
    pastKey: g.input(io.pastKey(layer), 'float32', keyShape),
    pastValue: g.input(io.pastValue(layer), 'float32', valueShape),
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
  const batch = ops.shape(inputsEmbeds, 0, 1)
  const streams = ops.shape(head.weight2, 0, 1)
  const dims = {batch, seq: ops.shape(inputsEmbeds, 1, 2), streams, batchStreams: ops.mul(batch, streams)}
  const ctx: DecoderContext = {g, ops, weights, config, dims}

  const embedded = g.within('embed', () => embeddingsIntoStreams(ctx, inputsEmbeds))
  const tables = g.within('rotary', () => rotary(ctx, positions))
  const masks = g.within('mask', () => attentionMasks(ctx, cacheLengths, caches[0].pastKey))

  // The residual stream: each block's output is added to it by the norm that follows.
  let residual = embedded
  let normed = g.within('layers.0', () => rmsNorm(ctx, embedded, 'model.layers.0.input_layernorm.weight'))
  for (let layer = 0; layer < config.numLayers; layer++) {
    g.within(`layers.${layer}`, () => {
      const prefix = `model.layers.${layer}`
      const attn = g.within('attn', () => attention(ctx, layer, normed, tables, masks, caches[layer]))
      const afterAttention = addAndNorm(ctx, attn.output, residual, `${prefix}.post_attention_layernorm.weight`)
      const mlpOutput = g.within('mlp', () => mlp(ctx, layer, afterAttention.normed))
      const nextNorm = layer + 1 < config.numLayers ? `model.layers.${layer + 1}.input_layernorm.weight` : 'model.norm.weight'
      const afterMlp = addAndNorm(ctx, mlpOutput, afterAttention.sum, nextNorm)
      residual = afterMlp.sum
      normed = afterMlp.normed
      g.output(attn.newKey, io.newKey(layer), 'float32', ['batch_streams', kv, 'sequence_length', headDim])
      g.output(attn.newValue, io.newValue(layer), 'float32', ['batch_streams', kv, headDim, 'sequence_length'])
    })
  }

  const {logits, mix} = g.within('head', () => {
    // Keep only the positions whose logits are wanted before the (costly) head: 0 keeps all.
    const perRow = ops.reshape(normed, ops.shapeOf([dims.batchStreams, -1, H]))
    const start = ops.neg(ops.reshape(numLogitsToKeep, g.int64([1])))
    const kept = ops.slice(perRow, start, g.int64([Number.MAX_SAFE_INTEGER]), 1)
    const rows = ops.reshape(kept, ops.shapeOf([-1, H]))
    const aggregated = g.within('aggregate', () => aggregateStreams(ctx, rows, head))
    return {
      logits: ops.reshape(lmHead(ctx, aggregated.mixed), ops.shapeOf([batch, -1, config.vocabSize])),
      mix: ops.reshape(aggregated.weights, ops.shapeOf([batch, -1, streams])),
    }
  })
  g.output(logits, io.logits, 'float32', ['batch', 'logits_sequence_length', config.vocabSize])
  g.output(mix, io.streamWeights, 'float32', ['batch', 'logits_sequence_length', 'streams'])
  return g
}
