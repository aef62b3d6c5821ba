/**
 * The hand-written kernels' sequences (src/core/wgsl/) as the engine's `SequenceCache`, so `run`,
 * `bench`, `eval` and `serve` drive them through `ParScaleModel.forward` on
 * `PARSCALE_WEBGPU_ROUTE=wgsl`. Each slot owns a `WgslSequence` (its own cache on the GPU, grown
 * there when it fills); the model of the P (weights and kernels) is shared and opened once.
 */
import type {BackboneShape} from '../checkpoint/config.js'
import type {WgslModel, WgslSequence} from '../wgsl/decoder.js'
import type {SequenceCache} from './decoder.js'
import {FixedCapacitySlots} from './gpu-form-cache.js'

interface WgslSlot {
  filled: number
  sequence?: WgslSequence
}

export class WgslCache extends FixedCapacitySlots<WgslSlot> implements SequenceCache {
  constructor(
    shape: BackboneShape,
    parallel: number,
    prefixTokens: number,
    /** The P's model, opened on first use. */
    readonly model: () => Promise<WgslModel>,
  ) {
    super(shape, parallel, prefixTokens, "the hand-written kernels' cache")
  }

  reset(slot: number): void {
    if (slot >= this.states.length || this.cap === 0) throw new RangeError(`slot ${slot}: reserve first`)
    const state = this.states[slot]
    state?.sequence?.reset() // its buffers are kept for the next sequence
    this.states[slot] = {filled: this.prefixTokens, ...(state?.sequence ? {sequence: state.sequence} : {})}
  }

  move(from: number, to: number): void {
    if (from === to) return
    this.states[to]?.sequence?.release()
    this.states[to] = this.states[from]
    this.states[from] = undefined
  }

  /** The slot's sequence on the GPU, made at its first call with room for the reserved capacity. */
  async sequence(slot: number): Promise<WgslSequence> {
    const state = this.states[slot]
    if (!state) throw new RangeError(`slot ${slot} of the hand-written kernels' cache is not reset`)
    state.sequence ??= (await this.model()).sequence(this.cap - this.prefixTokens)
    return state.sequence
  }

  /** After a call: the slot's filled count, as its sequence has it. */
  update(slot: number): void {
    const state = this.states[slot]
    if (state?.sequence) state.filled = this.prefixTokens + state.sequence.length
  }

  dispose(): void {
    for (const state of this.states) state?.sequence?.release()
    this.states = []
  }
}
