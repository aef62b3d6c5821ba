/**
 * A ParScale Qwen2 decode step in hand-written WebGPU kernels (issue 23's "fewer, larger
 * dispatches"): per layer five dispatches (norm + q·k·v + rotary + cache write; attention;
 * o_proj + residual; norm + gate·up + SiLU·product; down + residual), then the final norm, the
 * stream aggregation and the head: 5·layers + 4 dispatches at P > 1 (5·layers + 2 at P = 1),
 * against ONNX Runtime's ~375 at P = 8 for 24 layers.
 *
 * One sequence, a fixed-capacity cache on the GPU ([P, kv, capacity, d] per layer and kind, the
 * prefixes in its first slots), float32 weights as stored; only the logits and stream weights
 * are read back (or nothing, to time the GPU alone). A prompt goes in calls of several tokens
 * (the same kernels over token·P rows, compiled once more for that row count).
 */
import {rotaryTables} from '../onnx/blocks.js'
import type {ModelConfig} from '../checkpoint/config.js'
import {UserError} from '../errors.js'
import {attentionKernel, finalNormKernel, type LayerShape, matvecKernel, matvecTiles, mixKernel, qkvKernel, qkvTiles, STEP_WORDS} from './kernels.js'
import {openWgslDevice, type WgslDevice} from './dawn.js'
import {COPY_DST, COPY_SRC, MAP_MODE_READ, MAP_READ, STORAGE, UNIFORM, type GpuBindGroup, type GpuBuffer, type GpuComputePipeline, type GpuDevice} from './webgpu-types.js'

/** Where the weights come from: a checkpoint, or a synthetic generator. Tensors by checkpoint name, widened to float32. */
export interface TensorSource {
  readonly config: ModelConfig
  read(name: string): Float32Array
  /** q_proj's weight and bias already carry attention's 1/√d (a converted package's do), so scores are not scaled again. */
  readonly queryScaled?: boolean
}

/** One layer's weights and cache on the GPU. */
interface LayerBuffers {
  qkvW: GpuBuffer
  qkvB: GpuBuffer
  ln1: GpuBuffer
  wo: GpuBuffer
  ln2: GpuBuffer
  gateUp: GpuBuffer
  down: GpuBuffer
  kc: GpuBuffer
  vc: GpuBuffer
}

/** Rows (token · P + stream) a prompt call holds at most: the matvec keeps rows × tile rows accumulators per invocation. */
const PROMPT_ROWS = 32

interface Dispatch {
  pipeline: GpuComputePipeline
  group: GpuBindGroup
  x: number
  y: number
}

const MAX_GROUPS_X = 65535

function grid(tiles: number): {x: number; y: number} {
  return tiles <= MAX_GROUPS_X ? {x: tiles, y: 1} : {x: MAX_GROUPS_X, y: Math.ceil(tiles / MAX_GROUPS_X)}
}

export interface StepResult {
  /** [vocab] of the step's position. */
  logits: Float32Array
  /** [P]: the aggregation's weight of each stream. */
  streamWeights: Float32Array
}

export interface WgslDecoderOptions {
  /** Token positions the cache holds (the prefix comes on top). */
  positions: number
}

export class WgslDecoder {
  /** Dispatches of a one-token step, and of a prompt call (`promptTokens` tokens). */
  private readonly stepPlan: Dispatch[] = []
  private readonly promptPlan: Dispatch[] = []
  /** Embedding rows: [chunk buffer, first row] so a token's row is one copy. */
  private readonly embedChunks: {buffer: GpuBuffer; first: number; rows: number}[] = []
  private readonly buffers: GpuBuffer[] = []
  private readonly stepData = new Uint32Array(STEP_WORDS)
  private readonly readBack: GpuBuffer
  /** ParScale's per-stream weights of the step (P > 1), read back beside the logits. */
  private streamWeights: GpuBuffer | undefined
  private position = 0
  /** Tokens a prompt call holds. */
  readonly promptTokens: number

  private constructor(
    private readonly gpu: WgslDevice,
    readonly config: ModelConfig,
    readonly positions: number,
    private readonly x: GpuBuffer,
    private readonly logits: GpuBuffer,
    private readonly stepBuffer: GpuBuffer,
  ) {
    this.promptTokens = Math.max(1, Math.floor(PROMPT_ROWS / config.parallel))
    this.readBack = this.buffer((config.vocabSize + config.parallel) * 4, MAP_READ | COPY_DST)
  }

  /** Dispatches a one-token step encodes (kernel launches). */
  get dispatchCount(): number {
    return this.stepPlan.length
  }

  get adapterName(): string {
    return this.gpu.name
  }

  /** Tokens in the cache. */
  get length(): number {
    return this.position
  }

  static async open(source: TensorSource, options: WgslDecoderOptions): Promise<WgslDecoder> {
    const gpu = await openWgslDevice()
    if (typeof gpu === 'string') throw new UserError(gpu)
    const c = source.config
    const capacity = c.prefixTokens + options.positions
    if (!Number.isInteger(options.positions) || options.positions < 1) throw new UserError(`the cache needs at least one position (asked for ${options.positions})`)
    if (options.positions > c.maxPositionEmbeddings) throw new UserError(`the cache asks for ${options.positions} positions; the model has ${c.maxPositionEmbeddings}`)
    const limits = gpu.device.limits
    const scoresBytes = capacity * 4 + 2 * 256 * 4 + c.headDim * 4
    if (scoresBytes > limits.maxComputeWorkgroupStorageSize!) {
      throw new UserError(`a cache of ${capacity} slots does not fit the adapter's ${limits.maxComputeWorkgroupStorageSize} bytes of workgroup memory (the attention kernel keeps one score per slot)`)
    }
    if (c.hiddenSize % 4 !== 0 || c.intermediateSize % 4 !== 0 || c.headDim % 4 !== 0) throw new UserError(`hidden ${c.hiddenSize}, intermediate ${c.intermediateSize} and head ${c.headDim} sizes must be multiples of 4 for the hand-written kernels`)
    const device = gpu.device
    const make = (size: number, usage = STORAGE | COPY_DST | COPY_SRC) => device.createBuffer({size: Math.max(16, Math.ceil(size / 16) * 16), usage})
    const rows = c.parallel * Math.max(1, Math.floor(PROMPT_ROWS / c.parallel))
    const x = make(rows * c.hiddenSize * 4)
    const logits = make(c.vocabSize * 4)
    const stepBuffer = make(STEP_WORDS * 4, UNIFORM | COPY_DST)
    const d = new WgslDecoder(gpu, c, options.positions, x, logits, stepBuffer)
    d.buffers.push(x, logits, stepBuffer)
    // Validation errors arrive through the device's uncaptured-error event; one check after building.
    const errors: string[] = []
    device.onuncapturederror = (event) => errors.push(event.error.message)
    d.build(source, capacity)
    await device.queue.onSubmittedWorkDone()
    if (errors.length > 0) {
      d.release()
      throw new Error(`WebGPU refused the hand-written kernels: ${errors[0]}`)
    }
    return d
  }

  private buffer(size: number, usage = STORAGE | COPY_DST | COPY_SRC): GpuBuffer {
    const b = this.gpu.device.createBuffer({size: Math.max(16, Math.ceil(size / 16) * 16), usage})
    this.buffers.push(b)
    return b
  }

  private upload(data: Float32Array): GpuBuffer {
    const b = this.buffer(data.byteLength)
    this.gpu.device.queue.writeBuffer(b, 0, data)
    return b
  }

  private pipeline(code: string, label: string): GpuComputePipeline {
    const device: GpuDevice = this.gpu.device
    const module = device.createShaderModule({code, label})
    return device.createComputePipeline({layout: 'auto', compute: {module, entryPoint: 'main'}, label})
  }

  private add(plan: Dispatch[], pipeline: GpuComputePipeline, buffers: Record<number, GpuBuffer>, tiles: number): void {
    const entries = Object.entries(buffers).map(([binding, buffer]) => ({binding: Number(binding), resource: {buffer}}))
    const group = this.gpu.device.createBindGroup({layout: pipeline.getBindGroupLayout(0), entries})
    plan.push({pipeline, group, ...grid(tiles)})
  }

  private build(source: TensorSource, capacity: number): void {
    const c = this.config
    const P = c.parallel
    const H = c.hiddenSize
    const I = c.intermediateSize
    const hd = c.headDim
    const qRows = c.numHeads * hd
    const kvRows = c.numKvHeads * hd
    const maxRows = P * this.promptTokens
    if (I % 2 !== 0) throw new UserError(`intermediate size ${I} is odd; the MLP kernel pairs gate and up rows`)
    // The residual products (o_proj, down) have only `hidden` rows: fewer rows a workgroup keeps more workgroups in flight.
    const outRows = Number(process.env.PARSCALE_WGSL_OUT_ROWS ?? 2)
    if (![1, 2, 4].includes(outRows)) throw new UserError(`PARSCALE_WGSL_OUT_ROWS must be 1, 2 or 4, not "${process.env.PARSCALE_WGSL_OUT_ROWS}"`)

    const q = this.buffer(maxRows * qRows * 4)
    const attn = this.buffer(maxRows * qRows * 4)
    const hidden = this.buffer(maxRows * I * 4)
    const scratch = this.buffer(16) // the unused output of kernels that write elsewhere

    // Rotary table [position][i][cos, sin] for the cache's positions, as the ONNX graph computes it.
    const half = hd / 2
    const {cos, sin} = rotaryTables({...c, maxPositionEmbeddings: this.positions})
    const rope = new Float32Array(this.positions * half * 2)
    for (let i = 0; i < this.positions * half; i++) {
      rope[2 * i] = cos[i]!
      rope[2 * i + 1] = sin[i]!
    }
    const ropeBuffer = this.upload(rope)

    const layers: LayerBuffers[] = []
    for (let n = 0; n < c.numLayers; n++) {
      const l = `model.layers.${n}`
      const qkvW = new Float32Array((qRows + 2 * kvRows) * H)
      qkvW.set(source.read(`${l}.self_attn.q_proj.weight`), 0)
      qkvW.set(source.read(`${l}.self_attn.k_proj.weight`), qRows * H)
      qkvW.set(source.read(`${l}.self_attn.v_proj.weight`), (qRows + kvRows) * H)
      const qkvB = new Float32Array(qRows + 2 * kvRows)
      qkvB.set(source.read(`${l}.self_attn.q_proj.bias`), 0)
      qkvB.set(source.read(`${l}.self_attn.k_proj.bias`), qRows)
      qkvB.set(source.read(`${l}.self_attn.v_proj.bias`), qRows + kvRows)
      const kc = this.buffer(P * kvRows * capacity * 4)
      const vc = this.buffer(P * kvRows * capacity * 4)
      if (P > 1) {
        const pk = source.read(`${l}.self_attn.prefix_k`)
        const pv = source.read(`${l}.self_attn.prefix_v`)
        const block = c.prefixTokens * hd
        for (let s = 0; s < P * c.numKvHeads; s++) {
          this.gpu.device.queue.writeBuffer(kc, s * capacity * hd * 4, pk.subarray(s * block, (s + 1) * block))
          this.gpu.device.queue.writeBuffer(vc, s * capacity * hd * 4, pv.subarray(s * block, (s + 1) * block))
        }
      }
      const gateUp = new Float32Array(2 * I * H)
      gateUp.set(source.read(`${l}.mlp.gate_proj.weight`), 0)
      gateUp.set(source.read(`${l}.mlp.up_proj.weight`), I * H)
      layers.push({
        qkvW: this.upload(qkvW),
        qkvB: this.upload(qkvB),
        ln1: this.upload(source.read(`${l}.input_layernorm.weight`)),
        wo: this.upload(source.read(`${l}.self_attn.o_proj.weight`)),
        ln2: this.upload(source.read(`${l}.post_attention_layernorm.weight`)),
        gateUp: this.upload(gateUp),
        down: this.upload(source.read(`${l}.mlp.down_proj.weight`)),
        kc,
        vc,
      })
    }

    // The layers' dispatches for calls of `tokens` tokens (rows = tokens · P).
    const planLayers = (plan: Dispatch[], tokens: number, outRowsHere: number, mlpRows: number) => {
      const shape: LayerShape = {hidden: H, intermediate: I, heads: c.numHeads, kvHeads: c.numKvHeads, headDim: hd, streams: P, tokens, prefix: c.prefixTokens, capacity, eps: c.rmsNormEps, scoreScale: source.queryScaled ? 1 : 1 / Math.sqrt(hd)}
      const S = P * tokens
      const h = mlpRows / 2
      const qkvPipe = this.pipeline(qkvKernel(shape), 'qkv')
      const attnPipe = this.pipeline(attentionKernel(shape), 'attention')
      const oPipe = this.pipeline(matvecKernel({k: qRows, n: H, streams: S, rows: outRowsHere, epilogue: 'Y[s * N + row] += v;'}), 'o_proj')
      const mlpPipe = this.pipeline(
        matvecKernel({
          k: H,
          n: 2 * I,
          streams: S,
          rows: mlpRows,
          normEps: c.rmsNormEps,
          rowOf: `select(${I}u + t * ${h}u + r - ${h}u, t * ${h}u + r, r < ${h}u)`,
          extra: '@group(0) @binding(6) var<storage, read_write> HOUT: array<f32>;',
          tileEpilogue: `
    if (li < ${h}u * S) {
      let j = li / S;
      let s = li % S;
      let g = fin(j, s);
      let u = fin(j + ${h}u, s);
      HOUT[s * ${I}u + t * ${h}u + j] = g / (1.0 + exp(-g)) * u;
    }`,
        }),
        'gate_up',
      )
      const downPipe = this.pipeline(matvecKernel({k: I, n: H, streams: S, rows: outRowsHere, epilogue: 'Y[s * N + row] += v;'}), 'down')
      for (const w of layers) {
        this.add(plan, qkvPipe, {0: w.qkvW, 1: this.x, 2: q, 3: this.stepBuffer, 4: w.ln1, 5: w.qkvB, 6: w.kc, 7: w.vc, 8: ropeBuffer}, qkvTiles(shape))
        this.add(plan, attnPipe, {0: q, 1: w.kc, 2: w.vc, 3: this.stepBuffer, 4: attn}, S * c.numHeads)
        this.add(plan, oPipe, {0: w.wo, 1: attn, 2: this.x, 3: this.stepBuffer}, matvecTiles({n: H, rows: outRowsHere}))
        this.add(plan, mlpPipe, {0: w.gateUp, 1: this.x, 2: scratch, 3: this.stepBuffer, 4: w.ln2, 6: hidden}, I / h)
        this.add(plan, downPipe, {0: w.down, 1: hidden, 2: this.x, 3: this.stepBuffer}, matvecTiles({n: H, rows: outRowsHere}))
      }
    }
    planLayers(this.stepPlan, 1, outRows, 4)
    if (this.promptTokens > 1) planLayers(this.promptPlan, this.promptTokens, 1, 2)

    // Embedding table, in chunks a binding can hold; reused as the head when tied.
    const maxBinding = this.gpu.device.limits.maxStorageBufferBindingSize!
    const chunkRows = Math.max(1, Math.floor(maxBinding / (H * 4)))
    const table = source.read('model.embed_tokens.weight')
    this.embedChunks.push(...this.chunkRows(table, chunkRows))
    const headChunks = c.tieWordEmbeddings ? this.embedChunks : this.chunkRows(source.read('lm_head.weight'), chunkRows)

    // The last token's streams: final norm, aggregation and mixing (P > 1), the head.
    const rows = 4
    const tail: Dispatch[] = []
    const y = this.buffer(P * H * 4)
    this.add(tail, this.pipeline(finalNormKernel(H, c.rmsNormEps), 'final_norm'), {0: this.x, 1: this.upload(source.read('model.norm.weight')), 2: y, 3: this.stepBuffer}, P)
    let headInput = y
    if (P > 1) {
      const a = this.buffer(H * 4)
      const mixed = this.buffer(H * 4)
      this.streamWeights = this.buffer(P * 4)
      const w0 = source.read('model.aggregate_layer.0.weight')
      // columns from hidden-major (h·P + p) to stream-major (p·H + h), so the input is the normed streams as they lie
      const w0s = new Float32Array(w0.length)
      for (let r = 0; r < H; r++) for (let i = 0; i < H; i++) for (let p = 0; p < P; p++) w0s[r * P * H + p * H + i] = w0[r * P * H + i * P + p]!
      const agg0Pipe = this.pipeline(matvecKernel({k: P * H, n: H, streams: 1, rows, bias: true, epilogue: 'Y[row] = v / (1.0 + exp(-v));'}), 'aggregate')
      this.add(tail, agg0Pipe, {0: this.upload(w0s), 1: y, 2: a, 3: this.stepBuffer, 5: this.upload(source.read('model.aggregate_layer.0.bias'))}, matvecTiles({n: H, rows}))
      this.add(tail, this.pipeline(mixKernel(H, P, c.attnSmooth), 'mix'), {0: a, 1: this.upload(source.read('model.aggregate_layer.2.weight')), 2: this.upload(source.read('model.aggregate_layer.2.bias')), 3: y, 4: mixed, 5: this.streamWeights}, 1)
      headInput = mixed
    }
    for (const chunk of headChunks) {
      const pipe = this.pipeline(matvecKernel({k: H, n: chunk.rows, streams: 1, rows, epilogue: `Y[${chunk.first}u + row] = v;`}), 'lm_head')
      this.add(tail, pipe, {0: chunk.buffer, 1: headInput, 2: this.logits, 3: this.stepBuffer}, matvecTiles({n: chunk.rows, rows}))
    }
    this.stepPlan.push(...tail)
    this.promptPlan.push(...tail)
  }

  private chunkRows(matrix: Float32Array, chunkRows: number): {buffer: GpuBuffer; first: number; rows: number}[] {
    const H = this.config.hiddenSize
    const out = []
    for (let first = 0; first < this.config.vocabSize; first += chunkRows) {
      const rowsHere = Math.min(chunkRows, this.config.vocabSize - first)
      out.push({buffer: this.upload(matrix.subarray(first * H, (first + rowsHere) * H)), first, rows: rowsHere})
    }
    return out
  }

  /** Forgets the sequence (the prefixes stay in their slots). */
  reset(): void {
    this.position = 0
  }

  /**
   * Runs one token through the model at the next position. With `read` the logits of that
   * position come back (a copy) with the stream weights (P > 1; [1] at P = 1); without, the step
   * is only submitted (for timing the GPU).
   */
  step(token: number, read = true): Promise<StepResult | undefined> {
    return this.run([token], read)
  }

  /**
   * Runs `tokens` at the next positions, `promptTokens` a call, and returns the last one's
   * logits and stream weights (with `read`).
   */
  async prompt(tokens: readonly number[], read = true): Promise<StepResult | undefined> {
    if (tokens.length === 0) throw new UserError('a prompt needs at least one token')
    let out: StepResult | undefined
    for (let first = 0; first < tokens.length; first += this.promptTokens) {
      const piece = tokens.slice(first, first + this.promptTokens)
      out = await this.run(piece, read && first + piece.length === tokens.length)
    }
    return out
  }

  private async run(tokens: readonly number[], read: boolean): Promise<StepResult | undefined> {
    const c = this.config
    for (const token of tokens) {
      if (!Number.isInteger(token) || token < 0 || token >= c.vocabSize) throw new UserError(`token id ${token} is outside the vocabulary (0…${c.vocabSize - 1})`)
    }
    if (this.position + tokens.length > this.positions) throw new UserError(`the cache is full (${this.positions} positions)`)
    const device = this.gpu.device
    const T = tokens.length
    this.stepData[0] = this.position
    this.stepData[1] = c.prefixTokens + this.position
    this.stepData[2] = c.prefixTokens + this.position + 1
    this.stepData[3] = (T - 1) * c.parallel
    this.stepData[4] = T
    device.queue.writeBuffer(this.stepBuffer, 0, this.stepData)
    const encoder = device.createCommandEncoder()
    const rowBytes = c.hiddenSize * 4
    for (const [t, token] of tokens.entries()) {
      const chunk = this.embedChunks.find((e) => token < e.first + e.rows)!
      for (let s = 0; s < c.parallel; s++) encoder.copyBufferToBuffer(chunk.buffer, (token - chunk.first) * rowBytes, this.x, (t * c.parallel + s) * rowBytes, rowBytes)
    }
    const pass = encoder.beginComputePass()
    for (const d of T === 1 ? this.stepPlan : this.promptPlan) {
      pass.setPipeline(d.pipeline)
      pass.setBindGroup(0, d.group)
      pass.dispatchWorkgroups(d.x, d.y)
    }
    pass.end()
    if (read) {
      encoder.copyBufferToBuffer(this.logits, 0, this.readBack, 0, c.vocabSize * 4)
      if (this.streamWeights) encoder.copyBufferToBuffer(this.streamWeights, 0, this.readBack, c.vocabSize * 4, c.parallel * 4)
    }
    device.queue.submit([encoder.finish()])
    this.position += T
    if (!read) return undefined
    await this.readBack.mapAsync(MAP_MODE_READ)
    const bytes = this.readBack.getMappedRange().slice(0, (c.vocabSize + c.parallel) * 4)
    this.readBack.unmap()
    const logits = new Float32Array(bytes, 0, c.vocabSize)
    const streamWeights = this.streamWeights ? new Float32Array(bytes, c.vocabSize * 4, c.parallel) : new Float32Array([1])
    return {logits, streamWeights}
  }

  /** Waits for every submitted step. */
  async finish(): Promise<void> {
    await this.gpu.device.queue.onSubmittedWorkDone()
  }

  /** Frees the GPU buffers (the device stays for the process). */
  release(): void {
    for (const b of this.buffers) b.destroy()
    this.buffers.length = 0
  }
}
