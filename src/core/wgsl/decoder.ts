/**
 * A ParScale Qwen2 decode step in hand-written WebGPU kernels (issue 23's "fewer, larger
 * dispatches"): the embedding rows, then per layer five dispatches (norm + q·k·v + rotary + cache
 * write; attention; o_proj + residual; norm + gate·up + SiLU·product; down + residual), then the
 * final norm, the stream aggregation and the head: 5·layers + 5 dispatches at P > 1 (5·layers + 3
 * at P = 1, a table in one binding), against ONNX Runtime's ~375 at P = 8 for 24 layers.
 *
 * `WgslModel` holds one P's weights on the GPU (f32, f16, or 8/4-bit block codes) and the kernels;
 * each `WgslSequence` its own fixed-capacity cache ([P, kv, capacity, d] per layer and kind, the
 * prefixes in its first slots), grown (copied into a bigger one) when it fills. A call runs one
 * sequence; only the logits and stream weights are read back (or nothing, to time the GPU alone).
 * A prompt goes in calls of up to 512 rows (tokens · P) through matrix-matrix tiles, seven
 * dispatches a layer. `WgslDecoder` is a model with one sequence.
 */
import {rotaryTables} from '../onnx/blocks.js'
import type {ModelConfig} from '../checkpoint/config.js'
import {UserError} from '../errors.js'
import {encodeFloat16} from '../checkpoint/dtype.js'
import {argmaxKernel, inputStaging, type InputStage, stagedChunk, WORKGROUP, qkvPairs, type MatvecSpec, attentionKernel, embedKernel, finalNormKernel, GEMM_TILE, gemmKernel, gemmSplits, interleaveRows, interleaveUnitWords, splitSumKernel, type LayerShape, columnRows, matvecColumnsBytes, matvecKernel, matvecColumns, matvecSlices, type LayerProduct, matvecTeam, matvecTiles, mixKernel, qkvKernel, mlpTileRows, residualTileRows, qkvTileCount, qkvTiles, ropeCacheKernel, siluKernel, STEP_WORDS, type WeightFormat} from './kernels.js'
import {quantizeRows, type QuantBits} from '../quant/blockwise.js'
import {blockSizeFor, DEFAULT_BLOCK_SIZES} from '../quant/scheme.js'
import {openWgslDevice, type WgslDevice} from './dawn.js'
import {COPY_DST, COPY_SRC, MAP_MODE_READ, MAP_READ, QUERY_RESOLVE, STORAGE, UNIFORM, type GpuBindGroup, type GpuBuffer, type GpuCommandEncoder, type GpuComputePipeline} from './webgpu-types.js'

/** Where the weights come from: a checkpoint, or a synthetic generator. Tensors by checkpoint name, widened to float32. */
export interface TensorSource {
  readonly config: ModelConfig
  read(name: string): Float32Array
  /** q_proj's weight and bias already carry attention's 1/√d (a converted package's do), so scores are not scaled again. */
  readonly queryScaled?: boolean
  /** The matrices are stored in half precision (an fp16 package): kept so on the GPU, nothing lost. */
  readonly halfWeights?: boolean
  /** The matrices are block-quantized (a --quant package): read as stored with `readQuantized`. */
  readonly quant?: {bits: QuantBits; blockSize: number}
  /** A quantized matrix's codes ([rows, K·bits/8] bytes) and scales ([rows, K / blockSize]), as the package holds them. */
  readQuantized?(name: string): QuantizedMatrix
}

export interface QuantizedMatrix {
  codes: Uint8Array
  scales: Float32Array
  blockSize: number
}

/**
 * How the big matrices (q·k·v, o, gate·up, down, embedding and head) lie on the GPU: float32,
 * half, or the packages' 8- and 4-bit block codes; every format is read into float32 sums.
 */
export type WgslWeights = 'f32' | 'f16' | 'q8' | 'q4'

export interface WgslModelOptions {
  /** Default: the source's own (q4/q8 for a quantized package, f16 for an fp16 one), else f32. */
  weights?: WgslWeights
  /** Inputs per scale when a float source is quantized here (q4, q8; default the converter's, 256 / 32). */
  blockSize?: number
}

/** A matrix on the GPU: its elements (binding 0) and, quantized, its scales (binding 9). */
interface GpuMatrix {
  data: GpuBuffer
  scales?: GpuBuffer
}

/** A matrix's bindings in a kernel's bind group. */
function matrixBindings(m: GpuMatrix): Record<number, GpuBuffer> {
  return m.scales ? {0: m.data, 9: m.scales} : {0: m.data}
}

/** One layer's weights on the GPU. */
interface LayerWeights {
  qkvW: GpuMatrix
  qkvB: GpuBuffer
  ln1: GpuBuffer
  wo: GpuMatrix
  ln2: GpuBuffer
  gateUp: GpuMatrix
  down: GpuMatrix
  /** [P·kv, prefix, d] keys and values of the prefixes (P > 1), copied into every new cache. */
  prefixK?: GpuBuffer
  prefixV?: GpuBuffer
}

/**
 * Rows (token · P + stream) a prompt call holds at most: its products are matrix-matrix tiles of
 * 64 rows, so a call of 64 tokens at P = 8 reads each weight 8 times, not 64.
 */
const PROMPT_ROWS = 512
/**
 * Dispatches of a one-token step: the embedding rows and the head in as many pieces as a storage
 * binding of `maxBindingBytes` needs, five a layer, the final norm, the aggregation's two at P > 1.
 */
export function wgslDispatchesPerStep(shape: {numLayers: number; vocabSize: number; hiddenSize: number}, parallel: number, maxBindingBytes: number, weights: WgslWeights = 'f32'): number {
  const chunks = Math.ceil(shape.vocabSize / rowsPerBinding(shape.hiddenSize, maxBindingBytes, weights))
  return chunks + 5 * shape.numLayers + 1 + (parallel > 1 ? 2 : 0) + chunks
}

/** Rows of a [rows, hidden] table (embedding, head) one storage binding holds: the chunks they are uploaded in. */
function rowsPerBinding(hidden: number, maxBindingBytes: number, weights: WgslWeights): number {
  const bytes = weights === 'f32' ? 4 : weights === 'f16' ? 2 : weights === 'q8' ? 1 : 0.5
  return Math.max(1, Math.floor(maxBindingBytes / (hidden * bytes)))
}

/** Tokens a prompt call holds at P streams. */
export function promptTokensAt(parallel: number): number {
  return Math.max(1, Math.floor(PROMPT_ROWS / parallel))
}

/** Cache positions a new sequence starts with, and the step it grows by. */
const POSITION_STEP = 256

interface Dispatch {
  pipeline: GpuComputePipeline
  /** The kernel's name in a profile. */
  label: string
  group: GpuBindGroup
  /** Workgroups for a call of `rows` rows (tokens · P). */
  size: (rows: number) => {x: number; y: number; z?: number}
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

/** The capacity-dependent kernels (q·k·v writes the cache, attention reads it) of one capacity and call size. */
interface CacheKernels {
  qkv: GpuComputePipeline
  attention: GpuComputePipeline
  shape: LayerShape
}

/** The one-token step's products (matrix-vector), which do not depend on the cache. */
/** Greedy decoding on the GPU: the argmax dispatch, the tokens it wrote by position, two buffers their chunks are read through. */
interface GreedyParts {
  argmax: Dispatch
  tokens: GpuBuffer
  /** Stream weights by position (P > 1). */
  weights: GpuBuffer | undefined
  reads: GpuBuffer[]
  chunk: number
}

interface StepKernels {
  o: GpuComputePipeline
  mlp: GpuComputePipeline
  down: GpuComputePipeline
  mlpTiles: number
  oTiles: number
  downTiles: number
}

/** A prompt call's products (matrix-matrix tiles) and the elementwise kernels between them. */
interface PromptKernels {
  qkv: GpuComputePipeline
  /** The residual products, split along K where their input is wide (`splits` partial sums, then `sum` adds them in). */
  o: SplitProduct
  gateUp: GpuComputePipeline
  down: SplitProduct
  silu: GpuComputePipeline
}

interface SplitProduct {
  product: GpuComputePipeline
  splits: number
  sum?: GpuComputePipeline
}

export class WgslModel {
  private stepKernelSet: StepKernels | undefined
  private promptKernelSet: PromptKernels | undefined
  private readonly cacheKernels = new Map<string, CacheKernels>()
  private readonly labels = new Map<GpuComputePipeline, string>()
  /** Bytes written to the GPU since the last wait for it (`drainUploads`). */
  private stagedBytes = 0
  /**
   * Host milliseconds the calls spent (summed since the last reset): writing the step's place and
   * tokens, encoding the dispatches, Dawn's submit (where it records the Vulkan commands), from
   * submit to the logits mapped, and copying them out.
   */
  readonly hostTimes = {calls: 0, writeMs: 0, encodeMs: 0, submitMs: 0, waitMs: 0, copyMs: 0}
  /** The next decode step's commands, encoded while the last one ran on the GPU (valid for the plan they were made over). */
  private nextStep: {plan: Dispatch[]; commands: unknown} | undefined
  private greedyParts: GreedyParts | undefined
  /** The last call's settling (`exclusive`). */
  private turn: Promise<unknown> = Promise.resolve()
  private readonly layers: LayerWeights[] = []
  private readonly buffers: GpuBuffer[] = []
  private readonly stepData = new Uint32Array(STEP_WORDS)
  /** The call's embedding rows, a dispatch per chunk of the table. */
  private readonly head: Dispatch[] = []
  private readonly tail: Dispatch[] = []
  private readonly readBack: GpuBuffer
  private readonly ids: GpuBuffer
  private readonly x: GpuBuffer
  private readonly q: GpuBuffer
  private readonly attn: GpuBuffer
  private readonly hidden: GpuBuffer
  /** A prompt call's raw q·k·v and gate·up products. */
  private readonly qkvOut: GpuBuffer
  private readonly gateUpOut: GpuBuffer
  /** Partial sums of the prompt's residual products split along K. */
  private readonly partials: GpuBuffer
  private readonly scratch: GpuBuffer
  private readonly logits: GpuBuffer
  private readonly stepBuffer: GpuBuffer
  private readonly rope: GpuBuffer
  /** ParScale's per-stream weights of the step (P > 1), read back beside the logits. */
  private streamWeights: GpuBuffer | undefined
  private readonly outRows: number
  /** The layer products whose matrices are interleaved over their rows for the columns matrix-vector kernel (`PARSCALE_WGSL_MATVEC`). */
  private readonly columns: Set<LayerProduct>
  /** Quantized formats: the block size of the matrices of each input width, as uploaded. */
  private readonly blocks = new Map<number, number>()
  private readonly requestedBlock: number
  /** Tokens a prompt call holds. */
  readonly promptTokens: number
  /** Positions a sequence can grow to: the model's, and what the attention kernel's workgroup memory holds. */
  readonly maxPositions: number

  private constructor(
    private readonly gpu: WgslDevice,
    readonly config: ModelConfig,
    private readonly scoreScale: number,
    readonly weights: WgslWeights,
    requestedBlock: number | undefined,
  ) {
    const c = config
    this.requestedBlock = requestedBlock ?? DEFAULT_BLOCK_SIZES[weights === 'q8' ? 'int8' : 'int4']
    this.promptTokens = promptTokensAt(c.parallel)
    const workgroupBytes = gpu.device.limits.maxComputeWorkgroupStorageSize!
    const slotsThatFit = Math.floor((workgroupBytes - 2 * 256 * 4 - c.headDim * 4) / 4)
    this.maxPositions = Math.min(c.maxPositionEmbeddings, slotsThatFit - c.prefixTokens)
    if (this.maxPositions < 1) throw new UserError(`the adapter's ${workgroupBytes} bytes of workgroup memory hold no cache beyond the ${c.prefixTokens} prefix slots`)
    this.outRows = residualTileRows()
    // the columns kernel's largest tile (a rotary pair, or a gate and an up row, for every stream) must fit the workgroup's memory
    this.columns = matvecColumns()
    const columnsBytes = matvecColumnsBytes({streams: c.parallel, rows: 2})
    if (this.columns.size > 0 && columnsBytes > workgroupBytes) throw new UserError(`PARSCALE_WGSL_MATVEC=${process.env.PARSCALE_WGSL_MATVEC} needs ${columnsBytes} bytes of workgroup memory at P = ${c.parallel}; the adapter has ${workgroupBytes}`)
    const rows = c.parallel * this.promptTokens
    const qRows = c.numHeads * c.headDim
    this.ids = this.buffer(this.promptTokens * 4)
    this.x = this.buffer(rows * c.hiddenSize * 4)
    this.q = this.buffer(rows * qRows * 4)
    this.attn = this.buffer(rows * qRows * 4)
    this.hidden = this.buffer(rows * c.intermediateSize * 4)
    this.qkvOut = this.buffer(rows * (c.numHeads + 2 * c.numKvHeads) * c.headDim * 4)
    this.gateUpOut = this.buffer(rows * 2 * c.intermediateSize * 4)
    this.partials = this.buffer(Math.max(gemmSplits(c.intermediateSize), gemmSplits(qRows)) * rows * c.hiddenSize * 4)
    this.scratch = this.buffer(16) // the unused output of kernels that write elsewhere
    this.logits = this.buffer(c.vocabSize * 4)
    this.stepBuffer = this.buffer(STEP_WORDS * 4, UNIFORM | COPY_DST)
    this.readBack = this.buffer((c.vocabSize + c.parallel) * 4, MAP_READ | COPY_DST)
    // Rotary table [position][i][cos, sin] for every position a sequence can reach, as the ONNX graph computes it.
    const half = c.headDim / 2
    const {cos, sin} = rotaryTables({...c, maxPositionEmbeddings: this.maxPositions})
    const rope = new Float32Array(this.maxPositions * half * 2)
    for (let i = 0; i < this.maxPositions * half; i++) {
      rope[2 * i] = cos[i]!
      rope[2 * i + 1] = sin[i]!
    }
    this.rope = this.upload(rope)
  }

  get adapterName(): string {
    return this.gpu.name
  }

  /** Dispatches a one-token step encodes (kernel launches). */
  get dispatchCount(): number {
    return this.head.length + 5 * this.layers.length + this.tail.length
  }

  /** Uploads one P's weights (from a checkpoint, a package or a generator) and makes its kernels. */
  static async open(source: TensorSource, options: WgslModelOptions = {}): Promise<WgslModel> {
    const gpu = await openWgslDevice()
    if (typeof gpu === 'string') throw new UserError(gpu)
    const c = source.config
    if (c.hiddenSize % 4 !== 0 || c.intermediateSize % 4 !== 0 || c.headDim % 4 !== 0) throw new UserError(`hidden ${c.hiddenSize}, intermediate ${c.intermediateSize} and head ${c.headDim} sizes must be multiples of 4 for the hand-written kernels`)
    if (c.intermediateSize % 2 !== 0) throw new UserError(`intermediate size ${c.intermediateSize} is odd; the MLP kernel pairs gate and up rows`)
    // Validation errors arrive through the device's uncaptured-error event; one check after building.
    const errors: string[] = []
    gpu.device.onuncapturederror = (event) => errors.push(event.error.message)
    const own: WgslWeights = source.quant ? (source.quant.bits === 4 ? 'q4' : 'q8') : source.halfWeights ? 'f16' : 'f32'
    const weights = options.weights ?? own
    if (source.quant && weights !== own) throw new UserError(`the package's matrices are ${own} codes; the hand-written kernels read them as they are, not as ${weights}`)
    const model = new WgslModel(gpu, c, source.queryScaled ? 1 : 1 / Math.sqrt(c.headDim), weights, options.blockSize ?? source.quant?.blockSize)
    await model.uploadWeights(source)
    model.stepKernels()
    if (model.promptTokens > 1) model.promptKernels()
    await gpu.device.queue.onSubmittedWorkDone()
    if (errors.length > 0) {
      model.release()
      throw new Error(`WebGPU refused the hand-written kernels: ${errors[0]}`)
    }
    return model
  }

  private buffer(size: number, usage = STORAGE | COPY_DST | COPY_SRC): GpuBuffer {
    const b = this.gpu.device.createBuffer({size: Math.max(16, Math.ceil(size / 16) * 16), usage})
    this.buffers.push(b)
    return b
  }

  private upload(data: Float32Array | Uint16Array | Uint8Array | Uint32Array): GpuBuffer {
    const b = this.buffer(data.byteLength)
    this.gpu.device.queue.writeBuffer(b, 0, data)
    this.stagedBytes += data.byteLength
    return b
  }

  /**
   * Lets the GPU take what `upload` staged once it passes `threshold` bytes: Dawn copies each write into host
   * memory of its own until the copy has run, so a model written without a pause held a second copy
   * of its weights in the process (peak RSS, issue 23).
   */
  private async drainUploads(threshold = 256 << 20): Promise<void> {
    if (this.stagedBytes < threshold) return
    this.gpu.device.queue.submit([])
    await this.gpu.device.queue.onSubmittedWorkDone()
    this.stagedBytes = 0
  }

  /**
   * How a row-tile product of input width `k` and `tiles` tiles is run: the invocations a tile gets,
   * and the adapter's one subgroup width where it has one (the tile's butterfly sums).
   */
  private rowTiles(k: number, tiles: number): {team: number; subgroup: number | undefined} {
    return {team: matvecTeam(k, tiles, this.gpu.subgroupMax), subgroup: this.gpu.subgroupWidth}
  }

  /**
   * A layer product's decode row kernel with its input staged in workgroup memory where asked for
   * (`inputStaging`), where a workgroup holds several tiles to share the copy (at 0.5b: gate·up 8,
   * q·k·v 2; o_proj and down one, which would only pay the copy), in chunks that fit (`stagedChunk`).
   */
  private withStagedInput<T extends Pick<MatvecSpec, 'k' | 'streams' | 'rows' | 'normEps' | 'team' | 'slices'>>(spec: T): T & {stage?: InputStage} {
    const kind = inputStaging(this.weights)
    if (kind === undefined || spec.slices !== undefined || WORKGROUP / (spec.team ?? WORKGROUP) < 2) return spec
    const stage = stagedChunk(spec, kind, this.gpu.device.limits.maxComputeWorkgroupStorageSize!)
    return stage === undefined ? spec : {...spec, stage}
  }

  /**
   * How matrices of input width `k` are stored (the quantized formats' block as uploaded); a layer
   * `product`'s matrix of `rows` rows is interleaved where the columns kernel runs that product.
   */
  private format(k: number, product?: {name: LayerProduct; rows: number}): WeightFormat {
    const columns = product && this.columns.has(product.name) ? {columns: product.rows} : {}
    if (this.weights === 'f32' || this.weights === 'f16') return {kind: this.weights, ...columns}
    const block = this.blocks.get(k)
    if (block === undefined) throw new Error(`no quantized matrix of input width ${k} was uploaded`)
    return {kind: this.weights, block, ...columns}
  }

  /**
   * A big matrix (the rows of `names`, stacked) in the model's weight format: float32 or half from
   * the source's floats; quantized from the source's codes as stored, or quantized here from its
   * floats with the converter's rule (the same codes a --quant package of that checkpoint holds).
   */
  private uploadMatrix(source: TensorSource, names: string[], k: number, product: LayerProduct): GpuMatrix {
    // the columns kernel's layout: each row's units side by side with its neighbours' (`interleaveRows`)
    const laid = (data: Float32Array | Uint16Array | Uint8Array, elements: number) => (this.columns.has(product) ? interleaveRows(data, elements / k, interleaveUnitWords(this.weights)) : data)
    if (this.weights === 'f32' || this.weights === 'f16') {
      const parts = names.map((n) => source.read(n))
      const values = parts.length === 1 ? parts[0]! : concat(parts)
      return {data: this.upload(laid(this.weights === 'f16' ? encodeFloat16(values) : values, values.length))}
    }
    const bits = this.weights === 'q4' ? 4 : 8
    const parts = names.map((n): QuantizedMatrix => {
      if (source.readQuantized) return source.readQuantized(n)
      const values = source.read(n)
      const blockSize = blockSizeFor(k, this.requestedBlock, n)
      return {...quantizeRows(values, values.length / k, {bits, blockSize, k}), blockSize}
    })
    const block = parts[0]!.blockSize
    if (parts.some((p) => p.blockSize !== block) || (this.blocks.get(k) ?? block) !== block) throw new UserError(`${names.join(', ')}: quantization blocks differ between matrices of input width ${k}; the hand-written kernels take one block size per width`)
    if (k % block !== 0) throw new UserError(`${names[0]}: rows of ${k} inputs are not whole blocks of ${block}`)
    this.blocks.set(k, block)
    const codes = parts.length === 1 ? parts[0]!.codes : concat(parts.map((p) => p.codes))
    const scales = parts.length === 1 ? parts[0]!.scales : concat(parts.map((p) => p.scales))
    return {data: this.upload(laid(codes, (codes.length * 8) / bits)), scales: this.upload(scales)}
  }

  private pipeline(code: string, label: string): GpuComputePipeline {
    const module = this.gpu.device.createShaderModule({code, label})
    const pipeline = this.gpu.device.createComputePipeline({layout: 'auto', compute: {module, entryPoint: 'main'}, label})
    this.labels.set(pipeline, label)
    return pipeline
  }

  /** A dispatch of a fixed size (`tiles` workgroups), or one sized by the call's rows. */
  private dispatch(pipeline: GpuComputePipeline, buffers: Record<number, GpuBuffer>, tiles: number | Dispatch['size']): Dispatch {
    const entries = Object.entries(buffers).map(([binding, buffer]) => ({binding: Number(binding), resource: {buffer}}))
    const group = this.gpu.device.createBindGroup({layout: pipeline.getBindGroupLayout(0), entries})
    const fixed = typeof tiles === 'number' ? grid(tiles) : undefined
    return {pipeline, label: this.labels.get(pipeline) ?? 'kernel', group, size: typeof tiles === 'number' ? () => fixed! : tiles}
  }

  private async uploadWeights(source: TensorSource): Promise<void> {
    const c = this.config
    const P = c.parallel
    const H = c.hiddenSize
    const I = c.intermediateSize
    const qRows = c.numHeads * c.headDim
    const kvRows = c.numKvHeads * c.headDim
    for (let n = 0; n < c.numLayers; n++) {
      const l = `model.layers.${n}`
      const qkvB = new Float32Array(qRows + 2 * kvRows)
      qkvB.set(source.read(`${l}.self_attn.q_proj.bias`), 0)
      qkvB.set(source.read(`${l}.self_attn.k_proj.bias`), qRows)
      qkvB.set(source.read(`${l}.self_attn.v_proj.bias`), qRows + kvRows)
      this.layers.push({
        qkvW: this.uploadMatrix(source, [`${l}.self_attn.q_proj.weight`, `${l}.self_attn.k_proj.weight`, `${l}.self_attn.v_proj.weight`], H, 'qkv'),
        qkvB: this.upload(qkvB),
        ln1: this.upload(source.read(`${l}.input_layernorm.weight`)),
        wo: this.uploadMatrix(source, [`${l}.self_attn.o_proj.weight`], qRows, 'o_proj'),
        ln2: this.upload(source.read(`${l}.post_attention_layernorm.weight`)),
        gateUp: this.uploadMatrix(source, [`${l}.mlp.gate_proj.weight`, `${l}.mlp.up_proj.weight`], H, 'gate_up'),
        down: this.uploadMatrix(source, [`${l}.mlp.down_proj.weight`], I, 'down'),
        ...(P > 1 ? {prefixK: this.upload(source.read(`${l}.self_attn.prefix_k`)), prefixV: this.upload(source.read(`${l}.self_attn.prefix_v`))} : {}),
      })
      await this.drainUploads()
    }

    // Embedding table, in chunks a binding can hold; reused as the head when tied. A token's row is read by the chunk that holds it.
    const chunkRows = rowsPerBinding(H, this.gpu.device.limits.maxStorageBufferBindingSize!, this.weights)
    const embedChunks = await this.chunkRows(source, 'model.embed_tokens.weight', chunkRows)
    for (const chunk of embedChunks) {
      this.head.push(this.dispatch(this.pipeline(embedKernel(H, P, chunk, this.format(H)), 'embed'), {...matrixBindings(chunk.matrix), 1: this.ids, 2: this.x, 3: this.stepBuffer}, (rows) => grid(rows)))
    }
    const headChunks = c.tieWordEmbeddings ? embedChunks : await this.chunkRows(source, 'lm_head.weight', chunkRows)

    // The last token's streams: final norm, aggregation and mixing (P > 1), the head.
    const rows = 4
    const y = this.buffer(P * H * 4)
    this.tail.push(this.dispatch(this.pipeline(finalNormKernel(H, c.rmsNormEps), 'final_norm'), {0: this.x, 1: this.upload(source.read('model.norm.weight')), 2: y, 3: this.stepBuffer}, P))
    let headInput = y
    if (P > 1) {
      const a = this.buffer(H * 4)
      const mixed = this.buffer(H * 4)
      this.streamWeights = this.buffer(P * 4)
      const w0 = source.read('model.aggregate_layer.0.weight')
      // columns from hidden-major (h·P + p) to stream-major (p·H + h), so the input is the normed streams as they lie
      const w0s = new Float32Array(w0.length)
      for (let r = 0; r < H; r++) for (let i = 0; i < H; i++) for (let p = 0; p < P; p++) w0s[r * P * H + p * H + i] = w0[r * P * H + i * P + p]!
      // half pairs wherever the layers are not float32: the step's largest matrix after the head (H × P·H,
      // 25.7 MB in float32 at 0.5b and P = 8), read only where P > 1, so its bytes are P = 8's own cost
      const half = this.weights !== 'f32'
      const aggregate = {k: P * H, n: H, streams: 1, rows, bias: true, weights: {kind: half ? 'f16' : 'f32'} as const, ...this.rowTiles(P * H, Math.ceil(H / rows)), epilogue: 'Y[row] = v / (1.0 + exp(-v));'}
      this.tail.push(this.dispatch(this.pipeline(matvecKernel(aggregate), 'aggregate'), {0: this.upload(half ? encodeFloat16(w0s) : w0s), 1: y, 2: a, 3: this.stepBuffer, 5: this.upload(source.read('model.aggregate_layer.0.bias'))}, matvecTiles(aggregate)))
      this.tail.push(this.dispatch(this.pipeline(mixKernel(H, P, c.attnSmooth), 'mix'), {0: a, 1: this.upload(source.read('model.aggregate_layer.2.weight')), 2: this.upload(source.read('model.aggregate_layer.2.bias')), 3: y, 4: mixed, 5: this.streamWeights}, 1))
      headInput = mixed
    }
    for (const chunk of headChunks) {
      const head = {k: H, n: chunk.rows, streams: 1, rows, weights: this.format(H), ...this.rowTiles(H, Math.ceil(chunk.rows / rows)), epilogue: `Y[${chunk.first}u + row] = v;`}
      this.tail.push(this.dispatch(this.pipeline(matvecKernel(head), 'lm_head'), {...matrixBindings(chunk.matrix), 1: headInput, 2: this.logits, 3: this.stepBuffer}, matvecTiles(head)))
    }
  }

  /**
   * A [vocab, hidden] table (embedding, untied head) in chunks of `chunkRows` rows, one binding
   * each. It is most of a small model: float tables go in slices of 64 MB, each let through before
   * the next; quantized ones are a quarter or an eighth of that.
   */
  private async chunkRows(source: TensorSource, name: string, chunkRows: number): Promise<{matrix: GpuMatrix; first: number; rows: number}[]> {
    const H = this.config.hiddenSize
    const V = this.config.vocabSize
    const out = []
    if (this.weights === 'f32' || this.weights === 'f16') {
      const table = source.read(name)
      for (let first = 0; first < V; first += chunkRows) {
        const rowsHere = Math.min(chunkRows, V - first)
        const rows = table.subarray(first * H, (first + rowsHere) * H)
        const data = this.weights === 'f16' ? encodeFloat16(rows) : rows
        const buffer = this.buffer(data.byteLength)
        const slice = (64 << 20) / data.BYTES_PER_ELEMENT
        for (let at = 0; at < data.length; at += slice) {
          this.gpu.device.queue.writeBuffer(buffer, at * data.BYTES_PER_ELEMENT, data, at, Math.min(slice, data.length - at))
          this.stagedBytes += Math.min(slice, data.length - at) * data.BYTES_PER_ELEMENT
          await this.drainUploads(64 << 20)
        }
        out.push({matrix: {data: buffer}, first, rows: rowsHere})
      }
      return out
    }
    // quantized: the whole table's codes, then each chunk's rows of codes and scales
    const bits = this.weights === 'q4' ? 4 : 8
    let table: QuantizedMatrix
    if (source.readQuantized) table = source.readQuantized(name)
    else {
      const values = source.read(name)
      const blockSize = blockSizeFor(H, this.requestedBlock, name)
      table = {...quantizeRows(values, V, {bits, blockSize, k: H}), blockSize}
    }
    if ((this.blocks.get(H) ?? table.blockSize) !== table.blockSize) throw new UserError(`${name}: its quantization block (${table.blockSize}) differs from the other matrices of input width ${H}`)
    this.blocks.set(H, table.blockSize)
    const rowBytes = (H * bits) / 8
    const rowScales = H / table.blockSize
    for (let first = 0; first < V; first += chunkRows) {
      const rowsHere = Math.min(chunkRows, V - first)
      const matrix = {data: this.upload(table.codes.subarray(first * rowBytes, (first + rowsHere) * rowBytes)), scales: this.upload(table.scales.subarray(first * rowScales, (first + rowsHere) * rowScales))}
      await this.drainUploads()
      out.push({matrix, first, rows: rowsHere})
    }
    return out
  }

  /** The one-token step's matrix-vector kernels that do not depend on the cache. */
  private stepKernels(): StepKernels {
    if (!this.stepKernelSet) {
      const c = this.config
      const S = c.parallel
      const I = c.intermediateSize
      // gate (and up) rows a row tile takes (mlpTileRows); the columns kernel owns one gate and one up row, one residual row an invocation
      const h = this.columns.has('gate_up') ? 1 : mlpTileRows(S, I)
      const outRows = (product: LayerProduct) => (this.columns.has(product) ? columnRows() : this.outRows)
      const qRows = c.numHeads * c.headDim
      const split = (product: LayerProduct, k: number, tiles: number) => (this.columns.has(product) ? {slices: matvecSlices(k, tiles)} : this.rowTiles(k, tiles))
      const residual = (product: 'o_proj' | 'down', k: number) => {
        const rows = outRows(product)
        return this.withStagedInput({k, n: c.hiddenSize, streams: S, rows, weights: this.format(k, {name: product, rows: c.hiddenSize}), ...split(product, k, Math.ceil(c.hiddenSize / rows)), epilogue: 'Y[s * N + row] += v;'})
      }
      const o = residual('o_proj', qRows)
      const down = residual('down', I)
      const mlpSplit = split('gate_up', c.hiddenSize, Math.ceil(I / h))
      this.stepKernelSet = {
        o: this.pipeline(matvecKernel(o), 'o_proj'),
        mlp: this.pipeline(
          matvecKernel({
            ...this.withStagedInput({k: c.hiddenSize, streams: S, rows: 2 * h, normEps: c.rmsNormEps, ...mlpSplit}),
            n: 2 * I,
            weights: this.format(c.hiddenSize, {name: 'gate_up', rows: 2 * I}),
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
        ),
        down: this.pipeline(matvecKernel(down), 'down'),
        mlpTiles: matvecTiles({n: 2 * I, rows: 2 * h, ...mlpSplit}),
        oTiles: matvecTiles(o),
        downTiles: matvecTiles(down),
      }
    }
    return this.stepKernelSet
  }

  /** A prompt call's matrix-matrix kernels and the elementwise ones between them (cache-free). */
  private promptKernels(): PromptKernels {
    if (!this.promptKernelSet) {
      const c = this.config
      const P = c.parallel
      const H = c.hiddenSize
      const I = c.intermediateSize
      const qkvWidth = (c.numHeads + 2 * c.numKvHeads) * c.headDim
      this.promptKernelSet = {
        qkv: this.pipeline(gemmKernel({k: H, n: qkvWidth, streams: P, normEps: c.rmsNormEps, bias: true, weights: this.format(H, {name: 'qkv', rows: qkvWidth})}), 'qkv_prompt'),
        o: this.splitProduct(c.numHeads * c.headDim, 'o_proj'),
        gateUp: this.pipeline(gemmKernel({k: H, n: 2 * I, streams: P, normEps: c.rmsNormEps, weights: this.format(H, {name: 'gate_up', rows: 2 * I})}), 'gate_up_prompt'),
        down: this.splitProduct(I, 'down'),
        silu: this.pipeline(siluKernel(I, P), 'silu_prompt'),
      }
    }
    return this.promptKernelSet
  }

  /** A prompt product into the residual (hidden columns) from inputs `k` wide, split along K where that is wide. */
  private splitProduct(k: number, name: 'o_proj' | 'down'): SplitProduct {
    const c = this.config
    const splits = gemmSplits(k)
    const product = this.pipeline(gemmKernel({k, n: c.hiddenSize, streams: c.parallel, accumulate: true, weights: this.format(k, {name, rows: c.hiddenSize}), splits}), `${name}_prompt`)
    return splits > 1 ? {product, splits, sum: this.pipeline(splitSumKernel(c.hiddenSize, c.parallel, splits), 'split_sum')} : {product, splits}
  }

  /** The cache kernels (q·k·v or the prompt's rotary writes, and attention) for a cache of `capacity` slots and calls of `tokens` tokens. */
  private cacheKernelsFor(capacity: number, tokens: number): CacheKernels {
    const key = `${capacity}:${tokens}`
    let kernels = this.cacheKernels.get(key)
    if (!kernels) {
      const c = this.config
      const qkvWidth = (c.numHeads + 2 * c.numKvHeads) * c.headDim
      const base: LayerShape = {hidden: c.hiddenSize, intermediate: c.intermediateSize, heads: c.numHeads, kvHeads: c.numKvHeads, headDim: c.headDim, streams: c.parallel, tokens, prefix: c.prefixTokens, capacity, eps: c.rmsNormEps, scoreScale: this.scoreScale, weights: this.format(c.hiddenSize, {name: 'qkv', rows: qkvWidth})}
      // the columns kernel's tiles are one rotary pair each (any `slices` counts them so)
      let shape: LayerShape
      if (this.columns.has('qkv')) shape = {...base, slices: matvecSlices(c.hiddenSize, qkvTileCount({...base, slices: 1}))}
      else {
        shape = {...base, ...this.rowTiles(c.hiddenSize, qkvTileCount(base))}
        // a decode step's q·k·v may stage its input (a prompt call's rotary kernel reads no matrix)
        if (tokens === 1) shape = {...shape, ...this.withStagedInput({k: c.hiddenSize, streams: c.parallel, rows: 2 * qkvPairs(shape), normEps: c.rmsNormEps, team: shape.team})}
      }
      kernels = {qkv: this.pipeline(tokens === 1 ? qkvKernel(shape) : ropeCacheKernel(shape), tokens === 1 ? 'qkv' : 'rope_cache'), attention: this.pipeline(attentionKernel(shape), 'attention'), shape}
      this.cacheKernels.set(key, kernels)
    }
    return kernels
  }

  /** A sequence's dispatches over its caches for calls of `tokens` tokens: matrix-vector for one, matrix-matrix tiles for a prompt call. */
  plan(caches: {k: GpuBuffer; v: GpuBuffer}[], capacity: number, tokens: number): Dispatch[] {
    const c = this.config
    const cache = this.cacheKernelsFor(capacity, tokens)
    const heads = (rows: number) => grid(rows * c.numHeads)
    const out: Dispatch[] = []
    if (tokens === 1) {
      const row = this.stepKernels()
      for (const [n, w] of this.layers.entries()) {
        const {k, v} = caches[n]!
        out.push(this.dispatch(cache.qkv, {...matrixBindings(w.qkvW), 1: this.x, 2: this.q, 3: this.stepBuffer, 4: w.ln1, 5: w.qkvB, 6: k, 7: v, 8: this.rope}, qkvTiles(cache.shape)))
        out.push(this.dispatch(cache.attention, {0: this.q, 1: k, 2: v, 3: this.stepBuffer, 4: this.attn}, heads))
        out.push(this.dispatch(row.o, {...matrixBindings(w.wo), 1: this.attn, 2: this.x, 3: this.stepBuffer}, row.oTiles))
        out.push(this.dispatch(row.mlp, {...matrixBindings(w.gateUp), 1: this.x, 2: this.scratch, 3: this.stepBuffer, 4: w.ln2, 6: this.hidden}, row.mlpTiles))
        out.push(this.dispatch(row.down, {...matrixBindings(w.down), 1: this.hidden, 2: this.x, 3: this.stepBuffer}, row.downTiles))
      }
      return out
    }
    const prompt = this.promptKernels()
    const tiles = (columns: number, splits = 1) => (rows: number) => ({x: Math.ceil(columns / GEMM_TILE.cols), y: Math.ceil(rows / GEMM_TILE.rows), z: splits})
    const perRow = (rows: number) => grid(rows)
    const intoResidual = (p: SplitProduct, weights: GpuMatrix, input: GpuBuffer) => {
      if (!p.sum) return out.push(this.dispatch(p.product, {...matrixBindings(weights), 1: input, 2: this.x, 3: this.stepBuffer}, tiles(c.hiddenSize)))
      out.push(this.dispatch(p.product, {...matrixBindings(weights), 1: input, 2: this.partials, 3: this.stepBuffer}, tiles(c.hiddenSize, p.splits)))
      return out.push(this.dispatch(p.sum, {0: this.partials, 1: this.x, 2: this.stepBuffer}, perRow))
    }
    const qkvWidth = (c.numHeads + 2 * c.numKvHeads) * c.headDim
    for (const [n, w] of this.layers.entries()) {
      const {k, v} = caches[n]!
      out.push(this.dispatch(prompt.qkv, {...matrixBindings(w.qkvW), 1: this.x, 2: this.qkvOut, 3: this.stepBuffer, 4: w.ln1, 5: w.qkvB}, tiles(qkvWidth)))
      out.push(this.dispatch(cache.qkv, {0: this.qkvOut, 1: this.q, 2: k, 3: v, 4: this.rope, 5: this.stepBuffer}, perRow))
      out.push(this.dispatch(cache.attention, {0: this.q, 1: k, 2: v, 3: this.stepBuffer, 4: this.attn}, heads))
      intoResidual(prompt.o, w.wo, this.attn)
      out.push(this.dispatch(prompt.gateUp, {...matrixBindings(w.gateUp), 1: this.x, 2: this.gateUpOut, 3: this.stepBuffer, 4: w.ln2}, tiles(2 * c.intermediateSize)))
      out.push(this.dispatch(prompt.silu, {0: this.gateUpOut, 1: this.hidden, 2: this.stepBuffer}, perRow))
      intoResidual(prompt.down, w.down, this.hidden)
    }
    return out
  }

  /** A cache of `capacity` slots per layer and kind, its first slots the prefixes; `from` (a smaller one) copied in. */
  caches(capacity: number, from?: {caches: {k: GpuBuffer; v: GpuBuffer}[]; capacity: number; slots: number}): {k: GpuBuffer; v: GpuBuffer}[] {
    const c = this.config
    const blocks = c.parallel * c.numKvHeads
    const blockBytes = capacity * c.headDim * 4
    const encoder = this.gpu.device.createCommandEncoder()
    const out = this.layers.map((w, n) => {
      const k = this.gpu.device.createBuffer({size: blocks * blockBytes, usage: STORAGE | COPY_DST | COPY_SRC})
      const v = this.gpu.device.createBuffer({size: blocks * blockBytes, usage: STORAGE | COPY_DST | COPY_SRC})
      for (let b = 0; b < blocks; b++) {
        if (from) {
          const old = from.capacity * c.headDim * 4
          const used = from.slots * c.headDim * 4
          encoder.copyBufferToBuffer(from.caches[n]!.k, b * old, k, b * blockBytes, used)
          encoder.copyBufferToBuffer(from.caches[n]!.v, b * old, v, b * blockBytes, used)
        } else if (w.prefixK && w.prefixV) {
          const prefixBytes = c.prefixTokens * c.headDim * 4
          encoder.copyBufferToBuffer(w.prefixK, b * prefixBytes, k, b * blockBytes, prefixBytes)
          encoder.copyBufferToBuffer(w.prefixV, b * prefixBytes, v, b * blockBytes, prefixBytes)
        }
      }
      return {k, v}
    })
    this.gpu.device.queue.submit([encoder.finish()])
    return out
  }

  /** A new, empty sequence with room for `positions` tokens (it grows beyond them when it must). */
  sequence(positions = POSITION_STEP): WgslSequence {
    return new WgslSequence(this, positions)
  }

  private checkCall(tokens: readonly number[]): void {
    if (tokens.length < 1 || tokens.length > this.promptTokens) throw new RangeError(`a call runs 1 to ${this.promptTokens} tokens, not ${tokens.length}`)
    for (const token of tokens) {
      if (!Number.isInteger(token) || token < 0 || token >= this.config.vocabSize) throw new UserError(`token id ${token} is outside the vocabulary (0…${this.config.vocabSize - 1})`)
    }
  }

  /** The call's place (the Step uniform) and its token ids, written before it is encoded. */
  private writeStep(sequence: WgslSequence, tokens: readonly number[] | undefined): void {
    const c = this.config
    const T = tokens?.length ?? 1
    this.stepData[0] = sequence.length
    this.stepData[1] = c.prefixTokens + sequence.length
    this.stepData[2] = c.prefixTokens + sequence.length + 1
    this.stepData[3] = (T - 1) * c.parallel
    this.stepData[4] = T
    this.gpu.device.queue.writeBuffer(this.stepBuffer, 0, this.stepData)
    // without tokens the call's input is what the last one's argmax left in IDS (greedy, chained on the GPU)
    if (tokens) this.gpu.device.queue.writeBuffer(this.ids, 0, Uint32Array.from(tokens))
  }

  /**
   * Runs `tokens` of `sequence` at its next positions in one call (at most `promptTokens`); with
   * `read`, the last token's logits and stream weights come back.
   */
  run(sequence: WgslSequence, tokens: readonly number[], read: boolean): Promise<StepResult | undefined> {
    return this.exclusive(() => this.runNow(sequence, tokens, read))
  }

  /**
   * One call at a time on the model: a call's step place, token ids and read-back buffer are the
   * model's, and greedy decoding keeps its next input in the ids buffer between submits.
   */
  private exclusive<T>(call: () => Promise<T>): Promise<T> {
    const result = this.turn.then(call)
    this.turn = result.catch(() => undefined)
    return result
  }

  private async runNow(sequence: WgslSequence, tokens: readonly number[], read: boolean): Promise<StepResult | undefined> {
    const c = this.config
    const T = tokens.length
    this.checkCall(tokens)
    const plan = sequence.planFor(T)
    const device = this.gpu.device
    const tw = performance.now()
    this.writeStep(sequence, tokens)
    const t0 = performance.now()
    this.hostTimes.writeMs += t0 - tw
    // a decode step's commands were encoded while the last step ran, if it was this sequence's with the same plan
    const ready = this.nextStep
    this.nextStep = undefined
    const commands = ready && ready.plan === plan && T === 1 && read ? ready.commands : this.encode(plan, T, read).finish()
    const t1 = performance.now()
    device.queue.submit([commands])
    const t2 = performance.now()
    this.hostTimes.encodeMs += t1 - t0
    this.hostTimes.submitMs += t2 - t1
    this.hostTimes.calls++
    sequence.advance(T)
    if (!read) return undefined
    const mapped = this.readBack.mapAsync(MAP_MODE_READ)
    // while the GPU runs this step, encode the sequence's next one (its tokens and place are written at submit)
    if (sequence.length < sequence.room) {
      const nextPlan = sequence.planFor(1)
      this.nextStep = {plan: nextPlan, commands: this.encode(nextPlan, 1, true).finish()}
    }
    await mapped
    const t3 = performance.now()
    const bytes = this.readBack.getMappedRange().slice(0, (c.vocabSize + c.parallel) * 4)
    this.readBack.unmap()
    this.hostTimes.waitMs += t3 - t2
    this.hostTimes.copyMs += performance.now() - t3
    const logits = new Float32Array(bytes, 0, c.vocabSize)
    const streamWeights = this.streamWeights ? new Float32Array(bytes, c.vocabSize * 4, c.parallel) : new Float32Array([1])
    return {logits, streamWeights}
  }

  /** The commands of a call of `tokens` tokens over `plan`: the embedding rows, the layers, the tail, and with `read` the copy of the logits. */
  private encode(plan: Dispatch[], tokens: number, read: boolean, after: Dispatch[] = []): GpuCommandEncoder {
    const c = this.config
    const encoder = this.gpu.device.createCommandEncoder()
    const pass = encoder.beginComputePass()
    const rows = tokens * c.parallel
    for (const d of [...this.head, ...plan, ...this.tail, ...after]) {
      const {x, y, z} = d.size(rows)
      pass.setPipeline(d.pipeline)
      pass.setBindGroup(0, d.group)
      pass.dispatchWorkgroups(x, y, z ?? 1)
    }
    pass.end()
    if (read) {
      encoder.copyBufferToBuffer(this.logits, 0, this.readBack, 0, c.vocabSize * 4)
      if (this.streamWeights) encoder.copyBufferToBuffer(this.streamWeights, 0, this.readBack, c.vocabSize * 4, c.parallel * 4)
    }
    return encoder
  }

  /** The argmax kernel, the record of greedy tokens (and stream weights) by position, and two buffers to read chunks of it back (made at first use). */
  private greedyKernels(chunk: number): GreedyParts {
    const P = this.config.parallel
    if (!this.greedyParts) {
      const tokens = this.buffer(this.maxPositions * 4)
      const weights = P > 1 ? this.buffer(this.maxPositions * P * 4) : undefined
      const bindings: Record<number, GpuBuffer> = {0: this.logits, 1: this.ids, 2: tokens, 3: this.stepBuffer}
      if (weights && this.streamWeights) Object.assign(bindings, {4: this.streamWeights, 5: weights})
      const argmax = this.dispatch(this.pipeline(argmaxKernel(this.config.vocabSize, P), 'argmax'), bindings, 1)
      this.greedyParts = {argmax, tokens, weights, reads: [], chunk: 0}
    }
    const parts = this.greedyParts
    if (parts.chunk < chunk) {
      for (const b of parts.reads) b.destroy()
      // a chunk's ids, then (P > 1) its stream weights
      parts.reads = [0, 1].map(() => this.gpu.device.createBuffer({size: Math.ceil((chunk * (1 + (P > 1 ? P : 0))) / 4) * 16, usage: MAP_READ | COPY_DST}))
      parts.chunk = chunk
    }
    return parts
  }

  /**
   * Greedy decoding chained on the GPU: `count` tokens after `token` (the sequence's next input),
   * each step's argmax the next step's input, so steps go to the GPU back to back and only token
   * ids (and stream weights) come back, `chunk` at a time while the next chunk runs. `stop` sees
   * each token in order with the step's stream weights; the first for which it says yes ends it:
   * the steps sent past it are taken back (the sequence rewinds), so the sequence holds the inputs
   * up to it and the returned tokens end with it, unfed, as after `run`. Ties go to the lowest id,
   * as the host's argmax.
   */
  greedy(sequence: WgslSequence, token: number, count: number, stop?: (token: number, streamWeights: Float32Array) => boolean, chunk = 16): Promise<number[]> {
    return this.exclusive(() => this.greedyNow(sequence, token, count, stop, chunk))
  }

  private async greedyNow(sequence: WgslSequence, token: number, count: number, stop: ((token: number, streamWeights: Float32Array) => boolean) | undefined, chunk: number): Promise<number[]> {
    this.checkCall([token])
    if (!Number.isInteger(count) || count < 1) throw new RangeError(`greedy decoding makes at least one token, not ${count}`)
    if (sequence.length + count > this.maxPositions) throw new UserError(`the sequence needs ${sequence.length + count} positions; the hand-written kernels hold ${this.maxPositions} at this P`)
    const P = this.config.parallel
    const parts = this.greedyKernels(chunk)
    this.nextStep = undefined
    const device = this.gpu.device
    const out: number[] = []
    let sent = 0
    const send = (n: number, read: GpuBuffer): {n: number; read: GpuBuffer; mapped: Promise<void>} => {
      const first = sequence.length
      for (let i = 0; i < n; i++) {
        const plan = sequence.planFor(1)
        this.writeStep(sequence, sent === 0 ? [token] : undefined)
        const encoder = this.encode(plan, 1, false, [parts.argmax])
        if (i === n - 1) {
          encoder.copyBufferToBuffer(parts.tokens, first * 4, read, 0, n * 4)
          if (parts.weights) encoder.copyBufferToBuffer(parts.weights, first * P * 4, read, n * 4, n * P * 4)
        }
        device.queue.submit([encoder.finish()])
        sequence.advance(1)
        sent++
      }
      return {n, read, mapped: read.mapAsync(MAP_MODE_READ)}
    }
    let pending = send(Math.min(chunk, count), parts.reads[0]!)
    for (let k = 1; ; k++) {
      const left = count - sent
      const next = left > 0 ? send(Math.min(chunk, left), parts.reads[k % 2]!) : undefined
      await pending.mapped
      const bytes = pending.read.getMappedRange().slice(0, pending.n * (1 + (parts.weights ? P : 0)) * 4)
      pending.read.unmap()
      const ids = new Uint32Array(bytes, 0, pending.n)
      for (const [i, id] of ids.entries()) {
        out.push(id)
        const weights = parts.weights ? new Float32Array(bytes, (pending.n + i * P) * 4, P) : new Float32Array([1])
        let stopped = true // a listener that throws stops it here too
        try {
          stopped = stop?.(id, weights) ?? false
        } finally {
          if (stopped) await this.settleGreedy(sequence, next, sent - out.length)
        }
        if (stopped) return out
      }
      if (!next) return out
      pending = next
    }
  }

  /** After a stop: the chunk in flight read and let go (its buffer is mapped again next time), the steps past the stop taken back. */
  private async settleGreedy(sequence: WgslSequence, next: {read: GpuBuffer; mapped: Promise<void>} | undefined, past: number): Promise<void> {
    if (next) await next.mapped.then(() => next.read.unmap())
    sequence.rewind(past)
  }

  /**
   * GPU time of each kernel of one call of `tokens` (the sequence advances), from timestamps
   * around each dispatch in a pass of its own: milliseconds summed by kernel name, in order of
   * first use (and into `dispatches`, how many there were of each). Needs the adapter's
   * timestamp-query feature. The passes add their own gaps, so the sum is a little above a step's
   * time; the split is what it is for.
   */
  async profile(sequence: WgslSequence, tokens: readonly number[], dispatches?: Map<string, number>): Promise<Map<string, number>> {
    const device = this.gpu.device
    if (!device.features.has('timestamp-query')) throw new UserError(`the WebGPU adapter (${this.gpu.name}) has no timestamp queries, which a per-kernel profile needs`)
    const c = this.config
    this.checkCall(tokens)
    const plan = sequence.planFor(tokens.length)
    const all = [...this.head, ...plan, ...this.tail]
    const querySet = device.createQuerySet({type: 'timestamp', count: 2 * all.length})
    const resolved = device.createBuffer({size: 16 * all.length, usage: QUERY_RESOLVE | COPY_SRC})
    const read = device.createBuffer({size: 16 * all.length, usage: MAP_READ | COPY_DST})
    try {
      this.writeStep(sequence, tokens)
      const encoder = device.createCommandEncoder()
      const rows = tokens.length * c.parallel
      for (const [i, d] of all.entries()) {
        const pass = encoder.beginComputePass({timestampWrites: {querySet, beginningOfPassWriteIndex: 2 * i, endOfPassWriteIndex: 2 * i + 1}})
        const {x, y, z} = d.size(rows)
        pass.setPipeline(d.pipeline)
        pass.setBindGroup(0, d.group)
        pass.dispatchWorkgroups(x, y, z ?? 1)
        pass.end()
      }
      encoder.resolveQuerySet(querySet, 0, 2 * all.length, resolved, 0)
      encoder.copyBufferToBuffer(resolved, 0, read, 0, 16 * all.length)
      device.queue.submit([encoder.finish()])
      sequence.advance(tokens.length)
      await read.mapAsync(MAP_MODE_READ)
      const stamps = new BigUint64Array(read.getMappedRange().slice(0))
      read.unmap()
      const out = new Map<string, number>()
      for (const [i, d] of all.entries()) {
        out.set(d.label, (out.get(d.label) ?? 0) + Number(stamps[2 * i + 1]! - stamps[2 * i]!) / 1e6)
        dispatches?.set(d.label, (dispatches.get(d.label) ?? 0) + 1)
      }
      return out
    } finally {
      querySet.destroy()
      resolved.destroy()
      read.destroy()
    }
  }

  /** Waits for every submitted call. */
  async finish(): Promise<void> {
    await this.gpu.device.queue.onSubmittedWorkDone()
  }

  /** Frees the weights (sequences free their own caches; the device stays for the process). */
  release(): void {
    for (const b of this.buffers) b.destroy()
    this.buffers.length = 0
  }
}

/** One sequence's cache on the GPU and its dispatches over it. */
export class WgslSequence {
  private caches: {k: GpuBuffer; v: GpuBuffer}[]
  private positions: number
  private position = 0
  private readonly plans = new Map<number, Dispatch[]>()

  constructor(
    private readonly model: WgslModel,
    positions: number,
  ) {
    this.positions = Math.min(Math.max(1, positions), model.maxPositions)
    this.caches = model.caches(this.capacity)
  }

  /** Tokens in the cache. */
  get length(): number {
    return this.position
  }

  /** Tokens the cache holds before it grows. */
  get room(): number {
    return this.positions
  }

  private get capacity(): number {
    return this.model.config.prefixTokens + this.positions
  }

  /** The dispatches for a call of `tokens` tokens, after growing the cache if they do not fit. */
  planFor(tokens: number): Dispatch[] {
    if (this.position + tokens > this.positions) this.grow(this.position + tokens)
    const key = tokens === 1 ? 1 : this.model.promptTokens
    let plan = this.plans.get(key)
    if (!plan) {
      plan = this.model.plan(this.caches, this.capacity, key)
      this.plans.set(key, plan)
    }
    return plan
  }

  /** Makes room for `positions` tokens (in steps of 256), copying the cache over. */
  grow(positions: number): void {
    if (positions <= this.positions) return
    if (positions > this.model.maxPositions) throw new UserError(`the sequence needs ${positions} positions; the hand-written kernels hold ${this.model.maxPositions} at this P`)
    const next = Math.min(this.model.maxPositions, Math.ceil(positions / POSITION_STEP) * POSITION_STEP)
    const old = {caches: this.caches, capacity: this.capacity, slots: this.model.config.prefixTokens + this.position}
    this.positions = next
    this.caches = this.model.caches(this.capacity, old)
    for (const c of old.caches) {
      c.k.destroy()
      c.v.destroy()
    }
    this.plans.clear()
  }

  advance(tokens: number): void {
    this.position += tokens
  }

  /** Takes back the last `tokens` (their cache slots are written over by the next ones). */
  rewind(tokens: number): void {
    if (tokens < 0 || tokens > this.position) throw new RangeError(`cannot take back ${tokens} of ${this.position} tokens`)
    this.position -= tokens
  }

  /** Forgets the tokens (the prefixes stay in their slots). */
  reset(): void {
    this.position = 0
  }

  release(): void {
    for (const c of this.caches) {
      c.k.destroy()
      c.v.destroy()
    }
    this.caches = []
    this.plans.clear()
  }
}

export interface WgslDecoderOptions extends WgslModelOptions {
  /** Token positions the cache holds (the prefix comes on top); more is refused. */
  positions: number
}

/** A model with one sequence of a fixed size: what the benchmark and the golden checks drive. */
export class WgslDecoder {
  private constructor(
    readonly model: WgslModel,
    private readonly sequence: WgslSequence,
    readonly positions: number,
  ) {}

  static async open(source: TensorSource, options: WgslDecoderOptions): Promise<WgslDecoder> {
    if (!Number.isInteger(options.positions) || options.positions < 1) throw new UserError(`the cache needs at least one position (asked for ${options.positions})`)
    if (options.positions > source.config.maxPositionEmbeddings) throw new UserError(`the cache asks for ${options.positions} positions; the model has ${source.config.maxPositionEmbeddings}`)
    const model = await WgslModel.open(source, options)
    if (options.positions > model.maxPositions) {
      model.release()
      throw new UserError(`a cache of ${options.positions} positions does not fit the adapter's workgroup memory (the attention kernel keeps one score per slot; ${model.maxPositions} fit)`)
    }
    return new WgslDecoder(model, model.sequence(options.positions), options.positions)
  }

  get config(): ModelConfig {
    return this.model.config
  }

  get dispatchCount(): number {
    return this.model.dispatchCount
  }

  get adapterName(): string {
    return this.model.adapterName
  }

  get promptTokens(): number {
    return this.model.promptTokens
  }

  /** Tokens in the cache. */
  get length(): number {
    return this.sequence.length
  }

  reset(): void {
    this.sequence.reset()
  }

  /** One token at the next position; `read`: its logits and stream weights (else only submitted, for timing). */
  step(token: number, read = true): Promise<StepResult | undefined> {
    return this.prompt([token], read)
  }

  /** `tokens` at the next positions, `promptTokens` a call; the last one's logits and stream weights. */
  async prompt(tokens: readonly number[], read = true): Promise<StepResult | undefined> {
    if (tokens.length === 0) throw new UserError('a prompt needs at least one token')
    if (this.sequence.length + tokens.length > this.positions) throw new UserError(`the cache is full (${this.positions} positions)`)
    let out: StepResult | undefined
    for (let first = 0; first < tokens.length; first += this.model.promptTokens) {
      const piece = tokens.slice(first, first + this.model.promptTokens)
      out = await this.model.run(this.sequence, piece, read && first + piece.length === tokens.length)
    }
    return out
  }

  /** `count` greedy tokens after `token`, chained on the GPU (see WgslModel.greedy). */
  greedy(token: number, count: number, stop?: (token: number, streamWeights: Float32Array) => boolean): Promise<number[]> {
    if (this.sequence.length + count > this.positions) throw new UserError(`the cache is full (${this.positions} positions)`)
    return this.model.greedy(this.sequence, token, count, stop)
  }

  finish(): Promise<void> {
    return this.model.finish()
  }

  /** GPU milliseconds per kernel name of one call of `tokens` at the next positions (see WgslModel.profile). */
  profile(tokens: readonly number[]): Promise<Map<string, number>> {
    if (this.sequence.length + tokens.length > this.positions) throw new UserError(`the cache is full (${this.positions} positions)`)
    return this.model.profile(this.sequence, tokens)
  }

  release(): void {
    this.sequence.release()
    this.model.release()
  }
}

/** The parts one after another, in an array of their own kind. */
function concat<T extends Float32Array | Uint8Array>(parts: T[]): T {
  const out = new (parts[0]!.constructor as new (length: number) => T)(parts.reduce((n, p) => n + p.length, 0))
  let at = 0
  for (const p of parts) {
    out.set(p, at)
    at += p.length
  }
  return out
}
