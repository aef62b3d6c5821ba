/**
 * The GPU form's sequences as the engine's `SequenceCache` (decoder.ts), so `run`, `eval`,
 * `serve` and `bench` drive it through `ParScaleModel.forward` like the other forms. The GPU
 * form runs one sequence per call (batch 1: the P streams are on the head axis), so each slot
 * holds its own fixed-capacity tensors per layer, [1, P·kv, capacity, d], and `forward` runs a
 * batch's rows one after another (gpu-form.ts: `gpuFormStep`).
 */
import ort from 'onnxruntime-node'

import type {BackboneShape} from '../checkpoint/config.js'
import type {SequenceCache} from './decoder.js'
import {placePrefix, type GpuFormState} from './gpu-form.js'

/** Capacity grows in whole steps of this many slots (fewer regrowths, one shape per step size). */
const CAPACITY_STEP = 256

/**
 * Slots of one-sequence-a-call forms (the GPU form, the capture route): one fixed capacity for
 * all (prefix included), grown in whole steps; each slot's state knows how many are filled.
 */
export abstract class FixedCapacitySlots<State extends {filled: number}> {
  protected states: (State | undefined)[] = []
  protected cap = 0

  constructor(
    protected readonly shape: BackboneShape,
    readonly parallel: number,
    readonly prefixTokens: number,
    private readonly what: string,
  ) {}

  get slots(): number {
    return this.states.length
  }

  /** Cache slots per sequence (prefix included). */
  get capacity(): number {
    return this.cap
  }

  /** Bytes of the slots' float32 keys and values (where they live: device memory on a GPU). */
  get bytes(): number {
    const {numLayers, numKvHeads: kv, headDim: d} = this.shape
    return this.states.filter(Boolean).length * numLayers * 2 * this.parallel * kv * this.cap * d * 4
  }

  tokens(slot: number): number {
    const state = this.states[slot]
    if (!state) throw new RangeError(`slot ${slot} of ${this.what} is not reset`)
    return state.filled - this.prefixTokens
  }

  reserve(slots: number, tokens: number): void {
    const most = this.prefixTokens + this.shape.maxPositionEmbeddings // the rotary table ends there
    const needed = this.prefixTokens + tokens
    if (needed > most) throw new RangeError(`${tokens} tokens exceed the model's ${this.shape.maxPositionEmbeddings} positions`)
    // rare (a conversation that outgrows its cache): existing slots grow at their next step (`ready`)
    if (needed > this.cap) this.cap = Math.min(most, Math.ceil(needed / CAPACITY_STEP) * CAPACITY_STEP)
    while (this.states.length < slots) this.states.push(undefined)
  }
}

export class GpuFormCache extends FixedCapacitySlots<GpuFormState> implements SequenceCache {
  constructor(
    shape: BackboneShape,
    parallel: number,
    /** Per layer, the prefixes [P·kv, n, d] (keys rotated as the graph needs). */
    private readonly prefix: {tokens: number; keys: Float32Array[]; values: Float32Array[]},
  ) {
    super(shape, parallel, prefix.tokens, "the GPU form's cache")
  }

  reset(slot: number): void {
    if (slot >= this.states.length || this.cap === 0) throw new RangeError(`slot ${slot}: reserve first`)
    this.release(this.states[slot])
    const {numLayers, numKvHeads: kv, headDim: d} = this.shape
    const heads = this.parallel * kv
    const dims = [1, heads, this.cap, d]
    const layers = Array.from({length: numLayers}, (_, l) => l)
    this.states[slot] = {
      keys: layers.map((l) => new ort.Tensor('float32', placePrefix(this.prefix.keys[l]!, heads, this.prefix.tokens, this.cap, d), dims)),
      values: layers.map((l) => new ort.Tensor('float32', placePrefix(this.prefix.values[l]!, heads, this.prefix.tokens, this.cap, d), dims)),
      filled: this.prefix.tokens,
    }
  }

  move(from: number, to: number): void {
    if (from === to) return
    this.release(this.states[to])
    this.states[to] = this.states[from]
    this.states[from] = undefined // its tensors are `to`'s now
  }

  /** One slot's tensors for a step (gpu-form.ts), grown first if `reserve` raised the capacity. */
  async ready(slot: number): Promise<GpuFormState> {
    const state = this.states[slot]
    if (!state) throw new RangeError(`slot ${slot} of the GPU form's cache is not reset`)
    const had = state.keys[0]!.dims[2]!
    if (had === this.cap) return state
    const {headDim: d} = this.shape
    const heads = this.parallel * this.shape.numKvHeads
    const dims = [1, heads, this.cap, d]
    const grow = async (t: ort.Tensor): Promise<ort.Tensor> => {
      const data = (t.location === 'gpu-buffer' ? await t.getData(true) : t.data) as Float32Array
      const out = new Float32Array(heads * this.cap * d)
      for (let h = 0; h < heads; h++) out.set(data.subarray(h * had * d, (h * had + state.filled) * d), h * this.cap * d)
      return new ort.Tensor('float32', out, dims)
    }
    const grown = {keys: await Promise.all(state.keys.map(grow)), values: await Promise.all(state.values.map(grow)), filled: state.filled}
    this.states[slot] = grown
    return grown
  }

  /** After a step: the slot's new tensors (the step released the old ones). */
  update(slot: number, state: GpuFormState): void {
    this.states[slot] = state
  }

  dispose(): void {
    for (const state of this.states) this.release(state)
    this.states = []
  }

  private release(state: GpuFormState | undefined): void {
    if (state) for (const t of [...state.keys, ...state.values]) if (t.location === 'gpu-buffer') t.dispose()
  }
}
