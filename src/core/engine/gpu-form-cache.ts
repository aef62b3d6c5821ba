/**
 * The GPU form's sequences as the engine's `SequenceCache` (decoder.ts), so `run`, `eval`,
 * `serve` and `bench` drive it through `ParScaleModel.forward` like the other forms. The GPU
 * form runs one sequence per call (batch 1: the P streams are on the head axis), so each slot
 * holds its own fixed-capacity tensors per layer, [1, P·kv, capacity, d], and `forward` runs a
 * batch's rows one after another (gpu-form.ts: `gpuFormStep`).
 */
import ort from 'onnxruntime-node'

import type {BackboneShape} from '../checkpoint/config.js'
import {encodeFloat16} from '../checkpoint/dtype.js'
import {GraphBuilder} from '../onnx/builder.js'
import type {SequenceCache} from './decoder.js'
import {webgpuSessionOptions} from './device.js'
import {cacheTensor, placePrefix, type GpuFormState} from './gpu-form.js'

/** Capacity grows in whole steps of this many slots (fewer regrowths, one shape per step size). */
const CAPACITY_STEP = 256

/**
 * Slots of one-sequence-a-call forms (the GPU form, the capture route): one fixed capacity for
 * all (prefix included), grown in whole steps; each slot's state knows how many are filled.
 */
export abstract class FixedCapacitySlots<State extends {filled: number}> {
  protected states: (State | undefined)[] = []
  protected cap = 0
  /** Bytes per cached value: 4, or 2 for the half GPU form. */
  protected elementBytes = 4

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

  /** Bytes of the slots' keys and values (where they live: device memory on a GPU). */
  get bytes(): number {
    const {numLayers, numKvHeads: kv, headDim: d} = this.shape
    return this.states.filter(Boolean).length * numLayers * 2 * this.parallel * kv * this.cap * d * this.elementBytes
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
    const half = this.elementBytes === 2
    this.states[slot] = {
      keys: layers.map((l) => cacheTensor(placePrefix(this.prefix.keys[l]!, heads, this.prefix.tokens, this.cap, d), dims, half)),
      values: layers.map((l) => cacheTensor(placePrefix(this.prefix.values[l]!, heads, this.prefix.tokens, this.cap, d), dims, half)),
      filled: this.prefix.tokens,
    }
  }

  move(from: number, to: number): void {
    if (from === to) return
    this.release(this.states[to])
    this.states[to] = this.states[from]
    this.states[from] = undefined // its tensors are `to`'s now
  }

  /**
   * One slot's tensors for a step (gpu-form.ts) in the session's cache type (`half`: float16; a
   * slot reset before the session opened is converted, on the host), grown first if `reserve`
   * raised the capacity: on the device by a one-node Pad graph (padCapacity), the host route
   * only for host tensors (the CPU provider).
   */
  async ready(slot: number, half = false): Promise<GpuFormState> {
    let state = this.states[slot]
    if (!state) throw new RangeError(`slot ${slot} of the GPU form's cache is not reset`)
    this.elementBytes = half ? 2 : 4
    const type = half ? 'float16' : 'float32'
    if (state.keys[0]!.type !== type) {
      // only a slot no step has run on yet is of the other type: the prefixes, on the host
      const convert = (t: ort.Tensor) => (t.type === 'float32' && half ? new ort.Tensor('float16', encodeFloat16(t.data as Float32Array), t.dims) : t)
      if (state.keys.some((t) => t.location !== 'cpu' || t.type !== 'float32')) throw new Error(`slot ${slot}: a ${state.keys[0]!.type} cache for a ${type} session`)
      state = {keys: state.keys.map(convert), values: state.values.map(convert), filled: state.filled}
      this.states[slot] = state
    }
    if (state.keys[0]!.dims[2]! === this.cap) return state
    const grown = {keys: await Promise.all(state.keys.map((t) => padCapacity(t, this.cap))), values: await Promise.all(state.values.map((t) => padCapacity(t, this.cap))), filled: state.filled}
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

const padSessions = new Map<string, Promise<ort.InferenceSession>>()

/**
 * A cache tensor [1, heads, had, d] grown to [1, heads, capacity, d] (new slots zero). A device
 * tensor grows on the device through a one-node Pad graph (a WebGPU session of its own, kept per
 * type); reading it back to the host instead crashed onnxruntime-node 1.30 (a `char const*`
 * thrown from the download of a device tensor: the process aborts), and would cost a round trip
 * of the whole cache. The old device tensor is released once the new one exists.
 */
export async function padCapacity(t: ort.Tensor, capacity: number): Promise<ort.Tensor> {
  const [one, heads, had, d] = t.dims as [number, number, number, number]
  if (had > capacity) throw new RangeError(`a cache of ${had} slots does not shrink to ${capacity}`)
  if (had === capacity) return t
  const type = t.type === 'float16' ? 'float16' : 'float32'
  if (t.location !== 'gpu-buffer') {
    const data = t.data as Float32Array | Uint16Array
    const out = type === 'float16' ? new Uint16Array(heads * capacity * d) : new Float32Array(heads * capacity * d)
    for (let h = 0; h < heads; h++) out.set(data.subarray(h * had * d, (h + 1) * had * d), h * capacity * d)
    return new ort.Tensor(type, out, [one, heads, capacity, d])
  }
  let session = padSessions.get(type)
  if (!session) {
    const g = new GraphBuilder('grow-cache')
    const x = g.input('x', type, [1, 'heads', 'had', 'd'])
    const pads = g.input('pads', 'int64', [8])
    g.output(g.node('Pad', [x, pads], {mode: 'constant'}), 'y', type, [1, 'heads', 'capacity', 'd'])
    session = ort.InferenceSession.create(g.toModelBytes('grow-cache'), {...webgpuSessionOptions(), logSeverityLevel: 3, preferredOutputLocation: 'gpu-buffer'})
    padSessions.set(type, session)
  }
  const out = await (await session).run({x: t, pads: new ort.Tensor('int64', BigInt64Array.of(0n, 0n, 0n, 0n, 0n, 0n, BigInt(capacity - had), 0n), [8])})
  t.dispose()
  return out.y!
}
