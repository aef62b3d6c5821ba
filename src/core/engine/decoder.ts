/**
 * What generation needs of a model: a KV cache of slots per P and a forward call over
 * consecutive slots. `ParScaleModel` (model.ts) is the real one; tests drive generation with a
 * fake that has the same shape.
 */

/** The KV cache of one P: slots of sequences, each with its own length. */
export interface SequenceCache {
  readonly parallel: number
  readonly slots: number
  /** Positions a slot can hold (its stream prefix included). */
  readonly capacity: number
  /** Real tokens a slot holds. */
  tokens(slot: number): number
  /** Makes room for `slots` sequences of `tokens` real tokens each. */
  reserve(slots: number, tokens: number): void
  /** Empties a slot. */
  reset(slot: number): void
  /** Copies one slot over another (compaction). */
  move(from: number, to: number): void
  /** Frees what the cache holds outside JavaScript's heap (device memory); optional. */
  dispose?(): void
}

export interface DecoderOutput {
  /** [rows, positions, vocab] */
  logits: Float32Array
  dims: [number, number, number]
  /** [rows, positions, P] */
  streamWeights?: Float32Array
}

export interface Decoder<C extends SequenceCache> {
  /** The P values the model runs. */
  readonly parallelValues: number[]
  newCache(parallel: number): C
  /** Tokens per prefill call at this P and cache capacity. */
  prefillChunk(parallel: number, capacity: number, logitsForEveryToken?: boolean): number
  /** Runs equally long `inputIds` for slots first … first+rows−1, appending to their cache. */
  forward(cache: C, first: number, inputIds: number[][], numLogitsToKeep: number): Promise<DecoderOutput>
  /**
   * Greedy tokens of one slot chained on the device, without the logits coming back (the
   * hand-written WebGPU kernels; optional): up to `count` tokens after `token`, each handed to
   * `accept` in order with its stream weights, which says whether to stop there. The slot then
   * holds the inputs up to the last token accepted, which is not yet fed, as after `forward`.
   * Resolves false, having done nothing, where this cache's device cannot.
   */
  decodeGreedy?(cache: C, slot: number, token: number, count: number, accept: (token: number, streamWeights: Float32Array) => boolean): Promise<boolean>
}
