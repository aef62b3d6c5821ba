// Random-weight checkpoints in the real Hugging Face layout, for benchmarks and tests.
// Tensors are generated and written chunk by chunk, so a 20 GB checkpoint needs a few MB of memory.
import fs from 'node:fs'
import path from 'node:path'

import {parseModelConfig, type ModelConfig} from './config.js'
import {expectedTensorShapes, SINGLE_WEIGHTS_FILE, WEIGHTS_INDEX_FILE} from './checkpoint.js'
import {UsageError, UserError} from '../errors.js'

export interface SyntheticShape {
  hiddenSize: number
  numLayers: number
  numHeads: number
  numKvHeads: number
  intermediateSize: number
  vocabSize: number
  tieWordEmbeddings: boolean
}

/**
 * Backbone shapes. 0.5b and 3b are Qwen2.5-0.5B / Qwen2.5-3B; 1.8b is Qwen1.5-1.8B
 * (full multi-head attention, untied, 1.84 B parameters); 4.7b is our Qwen2.5-style
 * widening (hidden 2560, 36 layers, GQA 20/4, tied), 4.78 B parameters: no published
 * Qwen model has that size.
 */
export const SYNTHETIC_PRESETS: Readonly<Record<string, SyntheticShape>> = {
  '0.5b': {hiddenSize: 896, numLayers: 24, numHeads: 14, numKvHeads: 2, intermediateSize: 4864, vocabSize: 151936, tieWordEmbeddings: true},
  '1.8b': {hiddenSize: 2048, numLayers: 24, numHeads: 16, numKvHeads: 16, intermediateSize: 5504, vocabSize: 151936, tieWordEmbeddings: false},
  '3b': {hiddenSize: 2048, numLayers: 36, numHeads: 16, numKvHeads: 2, intermediateSize: 11008, vocabSize: 151936, tieWordEmbeddings: true},
  '4.7b': {hiddenSize: 2560, numLayers: 36, numHeads: 20, numKvHeads: 4, intermediateSize: 13824, vocabSize: 151936, tieWordEmbeddings: true},
}

export type SyntheticDtype = 'f32' | 'bf16'

export interface SyntheticOptions {
  /** P; 1 writes a plain `qwen2` checkpoint. */
  parallel?: number
  /** parscale_n_tokens when P > 1 (the paper uses 48). */
  prefixTokens?: number
  dtype?: SyntheticDtype
  /** Same seed → same bytes; backbone tensors do not depend on P, so checkpoints of one seed share a backbone. */
  seed?: number
  /** Split into shards (with an index) above this many bytes; default 4 GiB. */
  maxShardBytes?: number
}

/** The config.json object a synthetic checkpoint carries. */
export function syntheticConfigJson(shape: SyntheticShape, parallel = 1, prefixTokens = 48, dtype: SyntheticDtype = 'f32'): Record<string, unknown> {
  const c: Record<string, unknown> = {
    architectures: [parallel > 1 ? 'Qwen2ParScaleForCausalLM' : 'Qwen2ForCausalLM'],
    model_type: parallel > 1 ? 'qwen2_parscale' : 'qwen2',
    vocab_size: shape.vocabSize,
    hidden_size: shape.hiddenSize,
    intermediate_size: shape.intermediateSize,
    num_hidden_layers: shape.numLayers,
    num_attention_heads: shape.numHeads,
    num_key_value_heads: shape.numKvHeads,
    hidden_act: 'silu',
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    rope_theta: 1000000.0,
    tie_word_embeddings: shape.tieWordEmbeddings,
    use_sliding_window: false,
    torch_dtype: dtype === 'bf16' ? 'bfloat16' : 'float32',
    bos_token_id: 151643,
    eos_token_id: 151643,
  }
  if (parallel > 1) Object.assign(c, {parscale_n: parallel, parscale_n_tokens: prefixTokens, parscale_attn_smooth: 0.01})
  return c
}

/** Parameter count of the checkpoint (backbone plus, for P > 1, prefixes and aggregation). */
export function syntheticParameterCount(config: ModelConfig): number {
  let n = 0
  for (const shape of expectedTensorShapes(config).values()) n += shape.reduce((a, b) => a * b, 1)
  return n
}

/** FNV-1a of the tensor name, mixed with the seed: each tensor gets its own stream. */
function tensorSeed(seed: number, name: string): number {
  let h = 0x811c9dc5 ^ (seed >>> 0)
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193)
  return (h >>> 0) || 1
}

/**
 * Fills `out` with uniform values in ±scale from a xorshift32 state; returns the new state.
 * Uniform, not normal: cheap, and its magnitude (never denormal) is all a benchmark needs.
 */
function fillUniform(out: Float32Array, state: number, scale: number): number {
  let s = state
  const k = (2 * scale) / 4294967296
  for (let i = 0; i < out.length; i++) {
    s ^= s << 13
    s ^= s >>> 17
    s ^= s << 5
    out[i] = (s >>> 0) * k - scale
  }
  return s
}

interface PlannedTensor {
  name: string
  shape: number[]
  elements: number
  /** Constant fill (norm weights are 1), or a random range. */
  fill: {constant: number} | {scale: number}
}

function planTensors(config: ModelConfig): PlannedTensor[] {
  const out: PlannedTensor[] = []
  for (const [name, shape] of expectedTensorShapes(config)) {
    const elements = shape.reduce((a, b) => a * b, 1)
    const isNorm = name.endsWith('layernorm.weight') || name === 'model.norm.weight'
    // ±0.035 ≈ std 0.02 (the Qwen initializer range); biases and prefixes a little smaller.
    const scale = name.endsWith('.bias') ? 0.01 : 0.035
    out.push({name, shape, elements, fill: isNorm ? {constant: 1} : {scale}})
  }
  return out
}

const CHUNK_ELEMENTS = 1 << 20 // 4 MB of f32 per write

function writeTensor(fd: number, t: PlannedTensor, seed: number, bf16: boolean): void {
  const buf = new Float32Array(Math.min(CHUNK_ELEMENTS, t.elements))
  const half = bf16 ? new Uint16Array(buf.length) : undefined
  const bits = new Uint32Array(buf.buffer)
  let state = tensorSeed(seed, t.name)
  for (let done = 0; done < t.elements; done += buf.length) {
    const n = Math.min(buf.length, t.elements - done)
    const view = n === buf.length ? buf : buf.subarray(0, n)
    if ('constant' in t.fill) view.fill(t.fill.constant)
    else state = fillUniform(view, state, t.fill.scale)
    let bytes: Uint8Array
    if (half) {
      for (let i = 0; i < n; i++) half[i] = (bits[i]! + 0x7fff + ((bits[i]! >>> 16) & 1)) >>> 16 // round to nearest even
      bytes = new Uint8Array(half.buffer, 0, n * 2)
    } else {
      bytes = new Uint8Array(buf.buffer, 0, n * 4)
    }
    let off = 0
    while (off < bytes.length) off += fs.writeSync(fd, bytes, off, bytes.length - off)
  }
}

function writeShard(file: string, tensors: PlannedTensor[], seed: number, dtype: SyntheticDtype): void {
  const size = dtype === 'bf16' ? 2 : 4
  const header: Record<string, unknown> = {__metadata__: {format: 'pt', generator: 'parscale synthetic'}}
  let offset = 0
  for (const t of tensors) {
    const len = t.elements * size
    header[t.name] = {dtype: dtype === 'bf16' ? 'BF16' : 'F32', shape: t.shape, data_offsets: [offset, offset + len]}
    offset += len
  }
  let text = JSON.stringify(header)
  text += ' '.repeat((8 - (Buffer.byteLength(text) % 8)) % 8) // data section 8-byte aligned, as the format asks
  const headerBytes = Buffer.from(text, 'utf8')
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(BigInt(headerBytes.length))
  const fd = fs.openSync(file, 'w')
  try {
    fs.writeSync(fd, len)
    fs.writeSync(fd, headerBytes)
    for (const t of tensors) writeTensor(fd, t, seed, dtype === 'bf16')
  } finally {
    fs.closeSync(fd)
  }
}

/**
 * Writes config.json, generation_config.json and safetensors weights (one file, or shards
 * plus model.safetensors.index.json) into `dir`, which is created. Returns the parsed config.
 */
export function writeSyntheticCheckpoint(dir: string, shape: SyntheticShape, options: SyntheticOptions = {}): ModelConfig {
  const parallel = options.parallel ?? 1
  const prefixTokens = options.prefixTokens ?? 48
  const dtype = options.dtype ?? 'f32'
  const seed = options.seed ?? 0
  const maxShard = options.maxShardBytes ?? 4 * 1024 ** 3
  if (!Number.isSafeInteger(parallel) || parallel < 1) throw new UserError(`parallel must be a positive integer (found ${parallel})`)
  if (parallel > 1 && (!Number.isSafeInteger(prefixTokens) || prefixTokens < 1)) throw new UserError(`prefix tokens must be a positive integer (found ${prefixTokens})`)
  const raw = syntheticConfigJson(shape, parallel, prefixTokens, dtype)
  const configFile = path.join(dir, 'config.json')
  const config = parseModelConfig(raw, configFile) // the same validation a real checkpoint gets

  fs.mkdirSync(dir, {recursive: true})
  fs.writeFileSync(configFile, JSON.stringify(raw, null, 2) + '\n')
  fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify({bos_token_id: 151643, eos_token_id: 151643}, null, 2) + '\n')

  const size = dtype === 'bf16' ? 2 : 4
  const shards: PlannedTensor[][] = [[]]
  let shardBytes = 0
  for (const t of planTensors(config)) {
    const bytes = t.elements * size
    if (shardBytes > 0 && shardBytes + bytes > maxShard) {
      shards.push([])
      shardBytes = 0
    }
    shards.at(-1)!.push(t)
    shardBytes += bytes
  }
  if (shards.length === 1) {
    writeShard(path.join(dir, SINGLE_WEIGHTS_FILE), shards[0]!, seed, dtype)
    return config
  }
  const weightMap: Record<string, string> = {}
  let total = 0
  shards.forEach((tensors, i) => {
    const name = `model-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`
    writeShard(path.join(dir, name), tensors, seed, dtype)
    for (const t of tensors) {
      weightMap[t.name] = name
      total += t.elements * size
    }
  })
  fs.writeFileSync(path.join(dir, WEIGHTS_INDEX_FILE), JSON.stringify({metadata: {total_size: total}, weight_map: weightMap}, null, 2) + '\n')
  return config
}

/** Parses "0.5b" or explicit dims into a shape; unknown names list the presets. */
export function syntheticShape(preset: string | undefined, overrides: Partial<SyntheticShape> = {}): SyntheticShape {
  let base: SyntheticShape
  if (preset === undefined) {
    base = {hiddenSize: 64, numLayers: 2, numHeads: 4, numKvHeads: 2, intermediateSize: 160, vocabSize: 272, tieWordEmbeddings: true}
  } else {
    const p = SYNTHETIC_PRESETS[preset.toLowerCase()]
    if (!p) throw new UsageError(`unknown synthetic shape "${preset}" (presets: ${Object.keys(SYNTHETIC_PRESETS).join(', ')})`)
    base = p
  }
  const shape = {...base}
  for (const [k, v] of Object.entries(overrides) as [keyof SyntheticShape, SyntheticShape[keyof SyntheticShape] | undefined][]) {
    if (v !== undefined) (shape as Record<string, unknown>)[k] = v
  }
  return shape
}

/**
 * The tensors a synthetic checkpoint of `shape` would hold, made in memory as float32 when read
 * (the same values `writeSyntheticCheckpoint` writes in f32): for runtimes that take tensors
 * rather than files, without writing gigabytes first.
 */
export function syntheticTensors(shape: SyntheticShape, options: Omit<SyntheticOptions, 'dtype' | 'maxShardBytes'> = {}): {config: ModelConfig; read(name: string): Float32Array} {
  const parallel = options.parallel ?? 1
  const config = parseModelConfig(syntheticConfigJson(shape, parallel, options.prefixTokens ?? 48), '<synthetic>')
  const planned = new Map(planTensors(config).map((t) => [t.name, t]))
  const seed = options.seed ?? 0
  return {
    config,
    read(name: string): Float32Array {
      const t = planned.get(name)
      if (!t) throw new UserError(`the synthetic ${config.modelType} model has no tensor "${name}"`)
      const out = new Float32Array(t.elements)
      if ('constant' in t.fill) out.fill(t.fill.constant)
      else {
        // chunk by chunk, as writeTensor draws them, so the values equal the file's
        let state = tensorSeed(seed, t.name)
        for (let done = 0; done < t.elements; done += CHUNK_ELEMENTS) state = fillUniform(out.subarray(done, Math.min(t.elements, done + CHUNK_ELEMENTS)), state, t.fill.scale)
      }
      return out
    },
  }
}
