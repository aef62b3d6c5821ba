import fs from 'node:fs'
import path from 'node:path'

import {FileFormatError} from '../errors.js'

/** The Qwen2 backbone's dimensions: what every P of one ParScale family shares. */
export interface BackboneShape {
  vocabSize: number
  hiddenSize: number
  intermediateSize: number
  numLayers: number
  numHeads: number
  numKvHeads: number
  /** hidden / heads unless config.json has head_dim. */
  headDim: number
  rmsNormEps: number
  ropeTheta: number
  maxPositionEmbeddings: number
  tieWordEmbeddings: boolean
}

export interface ModelConfig extends BackboneShape {
  modelType: 'qwen2' | 'qwen2_parscale'
  /** parscale_n; 1 for qwen2. */
  parallel: number
  /** parscale_n_tokens; 0 when parallel == 1. */
  prefixTokens: number
  /** parscale_attn_smooth; 0 when parallel == 1. */
  attnSmooth: number
  torchDtype?: string
  /** The parsed JSON as is. */
  raw: Record<string, unknown>
}

/** The backbone part of a config, and nothing else. */
export function backboneShape(config: BackboneShape): BackboneShape {
  const {vocabSize, hiddenSize, intermediateSize, numLayers, numHeads, numKvHeads, headDim, rmsNormEps, ropeTheta, maxPositionEmbeddings, tieWordEmbeddings} = config
  return {vocabSize, hiddenSize, intermediateSize, numLayers, numHeads, numKvHeads, headDim, rmsNormEps, ropeTheta, maxPositionEmbeddings, tieWordEmbeddings}
}

export const SUPPORTED_MODEL_TYPES = ['qwen2', 'qwen2_parscale'] as const

function show(v: unknown): string {
  return JSON.stringify(v) ?? String(v)
}

/** Reads the fields of one parsed config.json; every refusal names the file and the field. */
class ConfigFields {
  constructor(
    readonly c: Record<string, unknown>,
    private readonly file: string,
  ) {}

  fail(problem: string): never {
    throw new FileFormatError(this.file, problem)
  }

  has(k: string): boolean {
    return this.c[k] !== undefined && this.c[k] !== null
  }

  posInt(k: string, fallback?: number): number {
    if (!this.has(k)) return fallback ?? this.fail(`missing required field "${k}"`)
    const v = this.c[k]
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) this.fail(`field "${k}" must be a positive integer (found ${show(v)})`)
    return v as number
  }

  posNumber(k: string, fallback: number): number {
    if (!this.has(k)) return fallback
    const v = this.c[k]
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) this.fail(`field "${k}" must be a positive number (found ${show(v)})`)
    return v as number
  }
}

/** Validates a parsed config.json; every refusal names `file` and the field. */
export function parseModelConfig(raw: unknown, file: string): ModelConfig {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new FileFormatError(file, 'is not a JSON object')
  }
  const fields = new ConfigFields(raw as Record<string, unknown>, file)
  const modelType = parseModelType(fields)
  refuseUnsupportedFeatures(fields)
  const backbone = parseBackbone(fields)
  const streams = parseStreams(fields, modelType)

  // Newer transformers write "dtype" instead of "torch_dtype".
  const dt = fields.c.torch_dtype ?? fields.c.dtype
  const torchDtype = typeof dt === 'string' ? dt : undefined

  return {
    modelType,
    ...backbone,
    ...streams,
    ...(torchDtype === undefined ? {} : {torchDtype}),
    raw: fields.c,
  }
}

function parseModelType(fields: ConfigFields): ModelConfig['modelType'] {
  const modelType = fields.c.model_type
  if (modelType === undefined) fields.fail(`missing required field "model_type" (supported: ${SUPPORTED_MODEL_TYPES.join(', ')})`)
  if (!(SUPPORTED_MODEL_TYPES as readonly unknown[]).includes(modelType)) {
    fields.fail(`unsupported model_type ${show(modelType)} (supported: ${SUPPORTED_MODEL_TYPES.join(', ')})`)
  }
  return modelType as ModelConfig['modelType']
}

/** What parscale says about checkpoints whose weights are already quantized (GPTQ, AWQ, bitsandbytes, …). */
export const QUANTIZED_REFUSAL = 'parscale converts float checkpoints (F32, F16, BF16), not already-quantized ones: convert the original float weights, with --quant int8 or int4 for small ones'

function describeQuantization(config: unknown): string {
  const c = (typeof config === 'object' && config !== null ? config : {}) as Record<string, unknown>
  const method = c.quant_method ?? c.quant_type
  const bits = c.bits ?? c.w_bit
  return `the checkpoint is already quantized (quantization_config${typeof method === 'string' ? `: ${method}` : ''}${typeof bits === 'number' ? `, ${bits} bits` : ''})`
}

/** Features that change the arithmetic and that the converter does not implement. */
function refuseUnsupportedFeatures(fields: ConfigFields): void {
  const c = fields.c
  if (fields.has('quantization_config')) fields.fail(`${describeQuantization(c.quantization_config)}; ${QUANTIZED_REFUSAL}`)
  if (fields.has('rope_scaling')) fields.fail(`field "rope_scaling" is not supported (found ${show(c.rope_scaling)}; only plain RoPE)`)
  if (c.use_sliding_window === true) fields.fail('field "use_sliding_window" is true; sliding-window attention is not supported')
  if (fields.has('hidden_act') && c.hidden_act !== 'silu') fields.fail(`field "hidden_act" is ${show(c.hidden_act)}; only "silu" is supported`)
}

/** The Qwen2 dimensions, with transformers' Qwen2Config defaults. */
function parseBackbone(fields: ConfigFields): BackboneShape {
  const vocabSize = fields.posInt('vocab_size')
  const hiddenSize = fields.posInt('hidden_size')
  const intermediateSize = fields.posInt('intermediate_size')
  const numLayers = fields.posInt('num_hidden_layers')
  const numHeads = fields.posInt('num_attention_heads')
  const numKvHeads = fields.posInt('num_key_value_heads', numHeads)
  if (numHeads % numKvHeads !== 0) {
    fields.fail(`"num_attention_heads" (${numHeads}) is not divisible by "num_key_value_heads" (${numKvHeads})`)
  }
  let headDim: number
  if (fields.has('head_dim')) {
    headDim = fields.posInt('head_dim')
  } else {
    if (hiddenSize % numHeads !== 0) fields.fail(`"hidden_size" (${hiddenSize}) is not divisible by "num_attention_heads" (${numHeads}) and there is no "head_dim"`)
    headDim = hiddenSize / numHeads
  }
  if (headDim % 2 !== 0) fields.fail(`head dimension ${headDim} is odd; rotary embeddings need an even one`)
  const rmsNormEps = fields.posNumber('rms_norm_eps', 1e-6)
  const ropeTheta = fields.posNumber('rope_theta', 10000)
  const maxPositionEmbeddings = fields.posInt('max_position_embeddings', 32768)
  let tieWordEmbeddings = false
  if (fields.has('tie_word_embeddings')) {
    const tie = fields.c.tie_word_embeddings
    if (typeof tie !== 'boolean') fields.fail(`field "tie_word_embeddings" must be true or false (found ${show(tie)})`)
    tieWordEmbeddings = tie as boolean
  }
  return {vocabSize, hiddenSize, intermediateSize, numLayers, numHeads, numKvHeads, headDim, rmsNormEps, ropeTheta, maxPositionEmbeddings, tieWordEmbeddings}
}

/** ParScale's fields (parscale_n, _n_tokens, _attn_smooth); one plain stream for qwen2. */
function parseStreams(fields: ConfigFields, modelType: ModelConfig['modelType']): Pick<ModelConfig, 'parallel' | 'prefixTokens' | 'attnSmooth'> {
  let parallel = 1
  let prefixTokens = 0
  let attnSmooth = 0
  if (modelType === 'qwen2_parscale') {
    const c = fields.c
    const n = c.parscale_n
    if (n === undefined || n === null) fields.fail('missing required field "parscale_n"')
    if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 1) fields.fail(`field "parscale_n" must be an integer ≥ 1 (found ${show(n)})`)
    parallel = n as number
    if (parallel > 1) {
      const t = c.parscale_n_tokens
      if (t === undefined || t === null) fields.fail('missing required field "parscale_n_tokens" (parscale_n > 1)')
      if (typeof t !== 'number' || !Number.isSafeInteger(t) || t < 1) fields.fail(`field "parscale_n_tokens" must be an integer ≥ 1 when parscale_n > 1 (found ${show(t)})`)
      prefixTokens = t as number
      const s = c.parscale_attn_smooth
      if (s === undefined || s === null) fields.fail('missing required field "parscale_attn_smooth" (parscale_n > 1)')
      if (typeof s !== 'number' || !(s >= 0 && s < 1)) fields.fail(`field "parscale_attn_smooth" must be a number in [0, 1) (found ${show(s)})`)
      attnSmooth = s as number
    }
  }
  return {parallel, prefixTokens, attnSmooth}
}

/** Reads and validates `dir/config.json`. */
export function readModelConfig(dir: string): ModelConfig {
  const file = path.join(dir, 'config.json')
  let text: string
  try {
    text = fs.readFileSync(file, 'utf8') // a few KB: reading it whole is fine
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    throw new FileFormatError(file, code === 'ENOENT' ? 'not found (a checkpoint folder needs config.json)' : `cannot read (${code ?? String(err)})`)
  }
  let raw: unknown
  try {
    raw = JSON.parse(text)
  } catch (err) {
    throw new FileFormatError(file, `is not valid JSON (${(err as Error).message})`)
  }
  return parseModelConfig(raw, file)
}
