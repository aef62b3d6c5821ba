/**
 * The KV cache of one P kept in device (GPU) memory, for the WebGPU form of the decoder
 * (webgpu-graph.ts). JavaScript never holds its contents: each call feeds the cache tensors
 * the last call returned and gets them back one step longer (`present.*`, a Concat on the GPU).
 *
 * Layout per layer, as the graph takes it: keys [rows, kv, head_dim, T] (transposed), values
 * [rows, kv, T, head_dim], rows = slots × P. All rows of a tensor share its length T, so a row
 * can hold positions it does not use (another slot's longer prompt, the placeholder a P = 1
 * cache starts with); JavaScript keeps, per slot, which positions are real and masks the
 * others (`attention_mask`).
 *
 * Sequences join and leave a running batch (continuous batching) through two small device
 * graphs, run only when the batch changes: a new sequence is prefilled in a tensor of its own
 * (starting from the P's stream prefixes, uploaded once) and joined to the batch (rows
 * appended, the shorter side padded); a finished one is dropped by gathering the remaining
 * rows. `reset` and `move` only record what to do; the next `forward` does it on the device.
 */
import ort from 'onnxruntime-node'

import {GraphBuilder} from '../onnx/builder.js'
import {Ops} from '../onnx/ops.js'
import type {CacheShape} from './kv-cache.js'
import type {StreamWeights} from './stream-weights.js'

/** One sequence: its real tokens, and which of its segment's positions it may attend to. */
interface Slot {
  tokens: number
  valid: Uint8Array
}

/** Tensors holding some slots' rows, all of one length. */
interface Segment {
  keys: ort.Tensor[]
  values: ort.Tensor[]
  length: number
  /** False while the tensors are the shared prefix tensors of the P (never disposed here). */
  owned: boolean
  /** Physical order of the slots in the rows. */
  slots: Slot[]
  /** Not yet materialized: the P's prefix tensors are taken on first use. */
  fresh: boolean
}

/** The initial contents of a sequence at one P: its streams' prefixes (or one masked placeholder). */
export interface InitialCache {
  keys: ort.Tensor[]
  values: ort.Tensor[]
  valid: Uint8Array
}

/** Device work the cache needs, provided by the model (its sessions share the device). */
export interface DeviceCacheHost {
  initialCache(parallel: number): Promise<InitialCache>
  /** Rows `rows` of every tensor, in that order (each tensor's axis 0). */
  select(tensors: ort.Tensor[], rows: number[]): Promise<ort.Tensor[]>
  /** Rows of `a` then rows of `b`, both padded at the end of their position axis to `length`. */
  join(a: Segment, b: Segment, length: number): Promise<{keys: ort.Tensor[]; values: ort.Tensor[]}>
}

export type {Segment as DeviceSegment}

/** What one call runs on: a segment whose slots are exactly the call's, in order. */
export interface PreparedCall {
  segment: Segment
}

export class DeviceKvCache {
  private main: Segment | undefined
  /** Sequences reset but not yet joined to `main`, each in a segment of its own. */
  private waiting: Segment[] = []
  /** Logical slot → sequence (`move` reorders; a finished sequence is simply overwritten). */
  private logical: Slot[] = []
  private reservedSlots = 0
  private reservedTokens = 0

  constructor(
    readonly shape: CacheShape,
    readonly streams: StreamWeights,
    private readonly host: DeviceCacheHost,
  ) {}

  get parallel(): number {
    return this.streams.parallel
  }

  get prefixTokens(): number {
    return this.streams.prefixTokens
  }

  get slots(): number {
    return Math.max(this.reservedSlots, this.logical.length)
  }

  /** Positions a slot can take without the cache growing: it grows by itself, so what was reserved. */
  get capacity(): number {
    const longest = Math.max(0, ...this.segments().map((s) => s.length))
    return Math.max(longest, this.prefixTokens + this.reservedTokens)
  }

  tokens(slot: number): number {
    return this.slot(slot).tokens
  }

  /** Device bytes of the tensors this cache owns. */
  get bytes(): number {
    const {numKvHeads: kv, headDim: d, numLayers} = this.shape
    return this.segments().reduce((sum, s) => sum + (s.owned ? s.slots.length * this.parallel * kv * d * s.length * 4 * 2 * numLayers : 0), 0)
  }

  /** Growth is on the device, by the calls themselves: this only records the size for `capacity`. */
  reserve(slots: number, tokens: number): void {
    this.reservedSlots = Math.max(this.reservedSlots, slots)
    this.reservedTokens = Math.max(this.reservedTokens, tokens)
  }

  /**
   * Starts a new sequence in `slot`; slots after it are given up (the batcher starts a sequence
   * right after those decoding). Its prefix is taken at the next call.
   */
  reset(slot: number): void {
    if (!(slot >= 0 && slot <= this.logical.length)) throw new RangeError(`slot ${slot}: the cache holds ${this.logical.length}`)
    if (slot === 0) this.disposeAll()
    const state: Slot = {tokens: 0, valid: new Uint8Array(0)}
    this.logical[slot] = state
    this.logical.length = slot + 1
    const live = new Set(this.logical)
    for (const s of this.waiting.filter((w) => !live.has(w.slots[0]))) {
      this.disposeSegment(s)
      this.waiting.splice(this.waiting.indexOf(s), 1)
    }
    this.waiting.push({keys: [], values: [], length: 0, owned: false, slots: [state], fresh: true})
  }

  /** Slot `from`'s sequence now answers to `to` (compaction); the device rows follow lazily. */
  move(from: number, to: number): void {
    if (from === to) return
    this.logical[to] = this.slot(from)
  }

  /**
   * The segment holding exactly slots first … first+count−1, in order: the slot's own segment
   * for a sequence still being prefilled, else the batch, after joining waiting sequences and
   * dropping, on the device, the batch's sequences the call leaves out (finished).
   */
  async prepare(first: number, count: number): Promise<Segment> {
    const wanted = Array.from({length: count}, (_, i) => this.slot(first + i))
    for (const s of this.waiting) if (s.fresh) await this.materialize(s)
    if (count === 1) {
      const own = this.waiting.find((s) => s.slots[0] === wanted[0])
      if (own) return own
    }
    // A call over the batch runs all its sequences: those it leaves out have finished and are
    // dropped. Then what waits joins, in slot order.
    if (this.main && this.main.slots.some((s) => !wanted.includes(s))) await this.reorder(this.main, this.main.slots.filter((s) => wanted.includes(s)))
    for (const s of [...this.waiting]) {
      if (!wanted.includes(s.slots[0])) continue
      this.waiting.splice(this.waiting.indexOf(s), 1)
      if (!this.main || this.main.slots.length === 0) {
        this.disposeSegment(this.main)
        this.main = s
        continue
      }
      const length = Math.max(this.main.length, s.length)
      const joined = await this.host.join(this.main, s, length)
      const slots = [...this.main.slots, ...s.slots]
      for (const slot of slots) slot.valid = padTo(slot.valid, length)
      this.disposeSegment(this.main)
      this.disposeSegment(s)
      this.main = {...joined, length, owned: true, slots, fresh: false}
    }
    if (!this.main || wanted.some((s) => !this.main!.slots.includes(s))) throw new Error('cache slots out of step with the batch')
    if (this.main.slots.some((s, i) => s !== wanted[i])) await this.reorder(this.main, wanted)
    return this.main
  }

  /** After a call on `segment`: its tensors are now `keys`/`values`, `added` positions longer. */
  commit(segment: Segment, keys: ort.Tensor[], values: ort.Tensor[], added: number): void {
    this.disposeSegment(segment)
    segment.keys = keys
    segment.values = values
    segment.length += added
    segment.owned = true
    for (const slot of segment.slots) {
      const valid = padTo(slot.valid, segment.length)
      valid.fill(1, segment.length - added)
      slot.valid = valid
      slot.tokens += added
    }
  }

  /** Releases the device memory this cache owns; the cache is empty afterwards. */
  dispose(): void {
    this.disposeAll()
    this.logical = []
  }

  private async reorder(segment: Segment, order: Slot[]): Promise<void> {
    const P = this.parallel
    const rows = order.flatMap((s) => {
      const at = segment.slots.indexOf(s)
      return Array.from({length: P}, (_, p) => at * P + p)
    })
    if (order.length === 0) {
      this.disposeSegment(segment)
      Object.assign(segment, {keys: [], values: [], owned: false, slots: []})
      return
    }
    const layers = this.shape.numLayers
    const out = await this.host.select([...segment.keys, ...segment.values], rows)
    this.disposeSegment(segment)
    segment.keys = out.slice(0, layers)
    segment.values = out.slice(layers)
    segment.owned = true
    segment.slots = order
  }

  private async materialize(segment: Segment): Promise<void> {
    const initial = await this.host.initialCache(this.parallel)
    segment.keys = initial.keys
    segment.values = initial.values
    segment.length = initial.valid.length
    segment.owned = false
    segment.fresh = false
    for (const slot of segment.slots) slot.valid = Uint8Array.from(initial.valid)
  }

  private segments(): Segment[] {
    return [...(this.main ? [this.main] : []), ...this.waiting]
  }

  private slot(slot: number): Slot {
    const state = this.logical[slot]
    if (!state) throw new RangeError(`slot ${slot} holds no sequence`)
    return state
  }

  private disposeSegment(segment: Segment | undefined): void {
    if (!segment?.owned) return
    for (const t of [...segment.keys, ...segment.values]) t.dispose()
    segment.owned = false
  }

  private disposeAll(): void {
    for (const s of this.segments()) this.disposeSegment(s)
    this.main = undefined
    this.waiting = []
  }
}

function padTo(valid: Uint8Array, length: number): Uint8Array {
  if (valid.length === length) return valid
  const out = new Uint8Array(length)
  out.set(valid.subarray(0, Math.min(valid.length, length)))
  return out
}

/** The mask of one call: [slots, 1, seq, T + seq], 0 where a new token may attend. */
export function attentionMask(segment: Segment, seq: number, masked: number): Float32Array {
  const T = segment.length
  const width = T + seq
  const mask = new Float32Array(segment.slots.length * seq * width)
  segment.slots.forEach((slot, b) => {
    for (let s = 0; s < seq; s++) {
      const row = (b * seq + s) * width
      for (let t = 0; t < T; t++) if (!slot.valid[t]) mask[row + t] = masked
      for (let j = s + 1; j < seq; j++) mask[row + T + j] = masked
    }
  })
  return mask
}

/**
 * The small device graphs the cache needs: gather rows (a sequence leaves), pad and join
 * (a sequence joins), and upload (host data into a device tensor). Each handles every layer's
 * keys and values in one call.
 */
export class DeviceOps {
  private constructor(
    private readonly selectSession: ort.InferenceSession,
    private readonly joinSession: ort.InferenceSession,
    private readonly uploadSession: ort.InferenceSession,
    private readonly layers: number,
  ) {}

  static async create(layers: number, options: ort.InferenceSession.SessionOptions): Promise<DeviceOps> {
    const tensors = 2 * layers
    const select = new GraphBuilder('cache-select')
    const rows = select.input('rows', 'int64', ['rows'])
    for (let i = 0; i < tensors; i++) {
      const x = select.input(`x${i}`, 'float32', ['r', 'a', 'b', 'c'])
      select.output(select.node('Gather', [x, rows], {axis: 0}), `y${i}`, 'float32', ['rows', 'a', 'b', 'c'])
    }
    const join = new GraphBuilder('cache-join')
    const ops = new Ops(join)
    const pads = ['keys_a', 'keys_b', 'values_a', 'values_b'].map((name) => join.input(`pads_${name}`, 'int64', [8]))
    for (let i = 0; i < tensors; i++) {
      const key = i < layers
      const a = join.input(`a${i}`, 'float32', ['ra', 'a', 'b', 'c'])
      const b = join.input(`b${i}`, 'float32', ['rb', 'a', 'b', 'c'])
      const padded = [join.node('Pad', [a, pads[key ? 0 : 2]]), join.node('Pad', [b, pads[key ? 1 : 3]])]
      join.output(ops.concat(padded, 0), `y${i}`, 'float32', ['r', 'a', 'b', 'c'])
    }
    const upload = new GraphBuilder('upload')
    const data = upload.input('data', 'float32', ['n'])
    const shape = upload.input('shape', 'int64', ['rank'])
    upload.output(upload.node('Reshape', [data, shape]), 'y', 'float32', null)
    const open = (g: GraphBuilder) => ort.InferenceSession.create(g.toModelBytes('parscale'), options)
    return new DeviceOps(await open(select), await open(join), await open(upload), layers)
  }

  async upload(data: Float32Array, dims: number[]): Promise<ort.Tensor> {
    const out = await this.uploadSession.run({
      data: new ort.Tensor('float32', data, [data.length]),
      shape: new ort.Tensor('int64', BigInt64Array.from(dims, BigInt), [dims.length]),
    })
    return out.y
  }

  async select(tensors: ort.Tensor[], rows: number[]): Promise<ort.Tensor[]> {
    const feeds: Record<string, ort.Tensor> = {rows: new ort.Tensor('int64', BigInt64Array.from(rows, BigInt), [rows.length])}
    tensors.forEach((t, i) => (feeds[`x${i}`] = t))
    const out = await this.selectSession.run(feeds)
    return tensors.map((_, i) => out[`y${i}`])
  }

  /** Keys pad their last axis, values their third. */
  async join(a: Segment, b: Segment, length: number): Promise<{keys: ort.Tensor[]; values: ort.Tensor[]}> {
    const pad = (axis: number, by: number) => {
      const p = new BigInt64Array(8)
      p[4 + axis] = BigInt(by)
      return new ort.Tensor('int64', p, [8])
    }
    const feeds: Record<string, ort.Tensor> = {
      pads_keys_a: pad(3, length - a.length), pads_keys_b: pad(3, length - b.length),
      pads_values_a: pad(2, length - a.length), pads_values_b: pad(2, length - b.length),
    }
    const all = (s: Segment) => [...s.keys, ...s.values]
    all(a).forEach((t, i) => (feeds[`a${i}`] = t))
    all(b).forEach((t, i) => (feeds[`b${i}`] = t))
    const out = await this.joinSession.run(feeds)
    const ys = all(a).map((_, i) => out[`y${i}`])
    return {keys: ys.slice(0, this.layers), values: ys.slice(this.layers)}
  }

  async release(): Promise<void> {
    await Promise.all([this.selectSession.release(), this.joinSession.release(), this.uploadSession.release()])
  }
}
