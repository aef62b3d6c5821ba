import type {ModelConfig} from '../checkpoint/config.js'

/**
 * Bytes of weights one decode step reads: every matrix once (a tied embedding once), fp32;
 * `backboneBytes` replaces the backbone's share with what a quantized package stores.
 */
export function weightBytes(config: ModelConfig, backboneBytes?: number): number {
  const {hiddenSize: H, intermediateSize: I, numLayers, numHeads, numKvHeads, headDim, vocabSize: V, parallel: P, prefixTokens} = config
  const q = numHeads * headDim
  const kv = numKvHeads * headDim
  const perLayer = H * (q + 2 * kv) + q + 2 * kv + q * H + 3 * H * I + 2 * H
  const backbone = backboneBytes ?? 4 * (numLayers * perLayer + V * H + H + (config.tieWordEmbeddings ? 0 : V * H))
  // prefixes and the aggregation head are float32 in every package
  const streams = P > 1 ? numLayers * 2 * P * kv * prefixTokens + P * H * H + H + P * H + P : 0
  return backbone + 4 * streams
}

/** float32 KV cache bytes for `tokens` positions (the prefixes are weights, not cache). */
export function kvCacheBytes(config: ModelConfig, batch: number, tokens: number): number {
  return 2 * config.numLayers * batch * config.parallel * config.numKvHeads * tokens * config.headDim * 4
}

/** Matmul FLOPs (2·m·n·k) of a prefill of `tokens` per row that keeps the last position's logits. */
export function prefillFlops(config: ModelConfig, batch: number, tokens: number): number {
  const {hiddenSize: H, intermediateSize: I, numLayers, numHeads, numKvHeads, headDim, vocabSize: V, parallel: P, prefixTokens} = config
  const rows = batch * P * tokens
  const q = numHeads * headDim
  const kv = numKvHeads * headDim
  const projections = 2 * rows * (H * (q + 2 * kv) + q * H + 3 * H * I)
  // scores and context: each query sees the prefix and (causally) about half the prompt
  const attention = 2 * 2 * batch * P * numHeads * headDim * tokens * (prefixTokens + (tokens + 1) / 2)
  const aggregate = P > 1 ? 2 * batch * (P * H * H + H * P) : 0
  return numLayers * (projections + attention) + aggregate + 2 * batch * V * H
}
