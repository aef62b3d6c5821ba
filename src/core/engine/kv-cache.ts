/**
 * The KV cache of one P, owned by JavaScript and fed to ONNX Runtime as inputs: onnxruntime-node
 * wraps input buffers without copying, whereas every CPU output comes back as a fresh copy.
 * So the graph returns only the new keys and values of a call and they are appended here, in
 * place; a step never copies the cache.
 *
 * Layout per layer, one slot per sequence, the P streams of a slot next to each other:
 * keys `[slots·P, kv, capacity, head_dim]` and values `[slots·P, kv, head_dim, capacity]`
 * (transposed): each is the first operand of its attention product, which the CPU's GEMM
 * reads in place (the second operand it copies into a packed buffer; blocks.ts `attention`).
 * The first `prefixTokens` positions of every stream hold its learned prefix; a slot's
 * tokens follow. A call runs consecutive slots, so
 * finished sequences are compacted away (`move`).
 */
import {transposeLastTwo, type StreamWeights} from './stream-weights.js'

export interface CacheShape {
  numLayers: number
  numKvHeads: number
  headDim: number
}

/** Positions added when a cache has to grow, so a chat does not copy its cache every turn. */
const GROWTH_SLACK = 256
/** Capacity is a multiple of this (fewer distinct shapes for ONNX Runtime to plan for). */
const CAPACITY_STEP = 64

export class KvCache {
  private keys: Float32Array[] = []
  private values: Float32Array[] = []
  private filled: number[] = []
  private slotCount = 0
  private cap = 0
  private prefix: {keys: Float32Array[]; values: Float32Array[]} | undefined

  constructor(
    readonly shape: CacheShape,
    readonly streams: StreamWeights,
  ) {}

  get parallel(): number {
    return this.streams.parallel
  }

  get prefixTokens(): number {
    return this.streams.prefixTokens
  }

  /** Slots allocated. */
  get slots(): number {
    return this.slotCount
  }

  /** Positions each stream of a slot can hold (prefix included). */
  get capacity(): number {
    return this.cap
  }

  /** Real tokens a slot holds (its prefix excluded). */
  tokens(slot: number): number {
    return this.filled[slot] - this.prefixTokens
  }

  /** Filled positions of a slot, prefix included. */
  length(slot: number): number {
    return this.filled[slot]
  }

  get bytes(): number {
    return this.keys.reduce((sum, k) => sum + k.byteLength, 0) * 2
  }

  /** Makes room for `slots` sequences of `tokens` real tokens each (kept contents stay). */
  reserve(slots: number, tokens: number): void {
    const needed = this.prefixTokens + tokens
    if (slots <= this.slotCount && needed <= this.cap) return
    const capacity = needed <= this.cap ? this.cap : roundUp(this.slotCount === 0 ? needed : needed + GROWTH_SLACK, CAPACITY_STEP)
    this.reallocate(Math.max(slots, this.slotCount), capacity)
  }

  /** Empties a slot: only the stream prefixes remain. */
  reset(slot: number): void {
    this.checkSlot(slot)
    const {numLayers, numKvHeads: kv, headDim: d} = this.shape
    const n = this.prefixTokens
    const P = this.parallel
    const prefix = n > 0 ? this.prefixInLayout() : undefined
    for (let layer = 0; layer < numLayers && prefix; layer++) {
      const keys = this.keys[layer]
      const values = this.values[layer]
      for (let head = 0; head < P * kv; head++) {
        const cacheHead = slot * P * kv + head
        keys.set(prefix.keys[layer].subarray(head * n * d, (head + 1) * n * d), cacheHead * this.cap * d)
        for (let j = 0; j < d; j++) values.set(prefix.values[layer].subarray((head * d + j) * n, (head * d + j + 1) * n), (cacheHead * d + j) * this.cap)
      }
    }
    this.filled[slot] = n
  }

  /** The stream prefixes in this cache's layout, made once: keys [P·kv, n, d], values [P·kv, d, n]. */
  private prefixInLayout(): {keys: Float32Array[]; values: Float32Array[]} {
    if (!this.prefix) {
      const {numKvHeads: kv, headDim: d} = this.shape
      const heads = this.parallel * kv
      const n = this.prefixTokens
      // stream-weights keeps keys transposed [P·kv, d, n] (the WebGPU graph's layout) and values [P·kv, n, d]
      this.prefix = {
        keys: this.streams.prefixKeys.map((stored) => transposeLastTwo(stored, heads, d, n)),
        values: this.streams.prefixValues.map((stored) => transposeLastTwo(stored, heads, n, d)),
      }
    }
    return this.prefix
  }

  /** Copies slot `from` over slot `to` (compaction when a sequence leaves). */
  move(from: number, to: number): void {
    if (from === to) return
    this.checkSlot(from)
    this.checkSlot(to)
    const size = this.slotSize()
    for (let layer = 0; layer < this.shape.numLayers; layer++) {
      this.keys[layer].copyWithin(to * size, from * size, (from + 1) * size)
      this.values[layer].copyWithin(to * size, from * size, (from + 1) * size)
    }
    this.filled[to] = this.filled[from]
  }

  /** Nothing to free: the cache is JavaScript memory. */
  dispose(): void {}

  /** Views of slots first … first+count−1, as the graph's past inputs take them. */
  views(first: number, count: number): {keys: Float32Array[]; values: Float32Array[]; dims: {keys: number[]; values: number[]}} {
    const size = this.slotSize()
    const {numKvHeads: kv, headDim: d} = this.shape
    const rows = count * this.parallel
    return {
      keys: this.keys.map((k) => k.subarray(first * size, (first + count) * size)),
      values: this.values.map((v) => v.subarray(first * size, (first + count) * size)),
      dims: {keys: [rows, kv, this.cap, d], values: [rows, kv, d, this.cap]},
    }
  }

  /**
   * Appends a call's new keys ([count·P, kv, seq, head_dim] per layer) and values
   * ([count·P, kv, head_dim, seq]) to slots first … first+count−1.
   */
  append(first: number, count: number, seq: number, newKeys: Float32Array[], newValues: Float32Array[]): void {
    const {numLayers, numKvHeads: kv, headDim: d} = this.shape
    const P = this.parallel
    const cap = this.cap
    for (let r = 0; r < count; r++) {
      const slot = first + r
      const at = this.filled[slot]
      if (at + seq > cap) throw new RangeError(`slot ${slot} holds ${at} of ${cap} positions; ${seq} more do not fit`)
      for (let layer = 0; layer < numLayers; layer++) {
        const keys = this.keys[layer]
        const values = this.values[layer]
        const srcKeys = newKeys[layer]
        const srcValues = newValues[layer]
        for (let h = 0; h < P * kv; h++) {
          const src = r * P * kv + h
          const dst = slot * P * kv + h
          keys.set(srcKeys.subarray(src * seq * d, (src + 1) * seq * d), (dst * cap + at) * d)
          if (seq === 1) {
            for (let j = 0; j < d; j++) values[(dst * d + j) * cap + at] = srcValues[src * d + j]
          } else {
            for (let j = 0; j < d; j++) values.set(srcValues.subarray((src * d + j) * seq, (src * d + j + 1) * seq), (dst * d + j) * cap + at)
          }
        }
      }
      this.filled[slot] = at + seq
    }
  }

  private slotSize(): number {
    return this.parallel * this.shape.numKvHeads * this.shape.headDim * this.cap
  }

  private checkSlot(slot: number): void {
    if (!(slot >= 0 && slot < this.slotCount)) throw new RangeError(`slot ${slot} outside the ${this.slotCount} allocated`)
  }

  private reallocate(slots: number, capacity: number): void {
    const {numLayers, numKvHeads: kv, headDim: d} = this.shape
    const heads = slots * this.parallel * kv
    const oldCap = this.cap
    const oldHeads = this.slotCount * this.parallel * kv
    const grow = (old: Float32Array | undefined, transposed: boolean): Float32Array => {
      const next = new Float32Array(heads * d * capacity)
      if (!old || oldCap === 0) return next
      if (transposed) {
        // rows of one (head, dim) are `capacity` long: copy each row's filled prefix
        for (let row = 0; row < oldHeads * d; row++) next.set(old.subarray(row * oldCap, row * oldCap + oldCap), row * capacity)
      } else {
        for (let h = 0; h < oldHeads; h++) next.set(old.subarray(h * oldCap * d, (h + 1) * oldCap * d), h * capacity * d)
      }
      return next
    }
    this.keys = Array.from({length: numLayers}, (_, layer) => grow(this.keys[layer], false))
    this.values = Array.from({length: numLayers}, (_, layer) => grow(this.values[layer], true))
    this.filled = Array.from({length: slots}, (_, slot) => this.filled[slot] ?? 0)
    this.slotCount = slots
    this.cap = capacity
  }
}

function roundUp(n: number, step: number): number {
  return Math.ceil(n / step) * step
}
