import fs from 'node:fs'
import path from 'node:path'

import {QUANTIZED_REFUSAL, type ModelConfig, readModelConfig} from './config.js'
import {FileFormatError} from '../errors.js'
import {isQuantizedTensorName, SafetensorsFile, type TensorInfo} from './safetensors.js'

export const SINGLE_WEIGHTS_FILE = 'model.safetensors'
export const WEIGHTS_INDEX_FILE = 'model.safetensors.index.json'

/** Names and shapes of every tensor the config requires, in a stable order. */
export function expectedTensorShapes(config: ModelConfig): Map<string, number[]> {
  const {vocabSize: V, hiddenSize: H, intermediateSize: I, numHeads, numKvHeads, headDim: hd, parallel: P} = config
  const q = numHeads * hd
  const kv = numKvHeads * hd
  const m = new Map<string, number[]>()
  m.set('model.embed_tokens.weight', [V, H])
  for (let n = 0; n < config.numLayers; n++) {
    const l = `model.layers.${n}`
    m.set(`${l}.input_layernorm.weight`, [H])
    m.set(`${l}.post_attention_layernorm.weight`, [H])
    m.set(`${l}.self_attn.q_proj.weight`, [q, H])
    m.set(`${l}.self_attn.q_proj.bias`, [q])
    m.set(`${l}.self_attn.k_proj.weight`, [kv, H])
    m.set(`${l}.self_attn.k_proj.bias`, [kv])
    m.set(`${l}.self_attn.v_proj.weight`, [kv, H])
    m.set(`${l}.self_attn.v_proj.bias`, [kv])
    m.set(`${l}.self_attn.o_proj.weight`, [H, q])
    m.set(`${l}.mlp.gate_proj.weight`, [I, H])
    m.set(`${l}.mlp.up_proj.weight`, [I, H])
    m.set(`${l}.mlp.down_proj.weight`, [H, I])
    if (P > 1) {
      m.set(`${l}.self_attn.prefix_k`, [P, numKvHeads, config.prefixTokens, hd])
      m.set(`${l}.self_attn.prefix_v`, [P, numKvHeads, config.prefixTokens, hd])
    }
  }
  if (P > 1) {
    m.set('model.aggregate_layer.0.weight', [H, P * H])
    m.set('model.aggregate_layer.0.bias', [H])
    m.set('model.aggregate_layer.2.weight', [P, H])
    m.set('model.aggregate_layer.2.bias', [P])
  }
  m.set('model.norm.weight', [H])
  if (!config.tieWordEmbeddings) m.set('lm_head.weight', [V, H])
  return m
}

function describe(config: ModelConfig): string {
  const p = config.parallel > 1 ? `, P=${config.parallel}, ${config.prefixTokens} prefix tokens` : ''
  return `${config.modelType}, ${config.numLayers} layers${p}`
}

function fmtShape(s: readonly number[]): string {
  return `[${s.join(', ')}]`
}

function isFile(p: string): boolean {
  try {
    return fs.statSync(p).isFile() // follows symlinks, as shards may be links
  } catch {
    return false
  }
}

/** A shard name from an index must stay inside the checkpoint folder. */
function checkShardName(indexFile: string, shard: string): void {
  const parts = shard.split(/[\\/]/)
  if (shard === '' || path.isAbsolute(shard) || path.win32.isAbsolute(shard) || parts.includes('..')) {
    throw new FileFormatError(indexFile, `shard path ${JSON.stringify(shard)} is not a file name inside the checkpoint folder; refused`)
  }
}

export class Checkpoint {
  private constructor(
    readonly dir: string,
    readonly config: ModelConfig,
    readonly tensors: ReadonlyMap<string, TensorInfo>,
    /** The file that lists the weights: model.safetensors or the index. */
    readonly weightsFile: string,
  ) {
    let total = 0
    for (const t of tensors.values()) total += t.byteLength
    this.totalBytes = total
  }

  /** Sum of byteLength over all tensors. */
  readonly totalBytes: number

  /** Opens `dir` (config.json + model.safetensors or index + shards) and validates it against the config. */
  static open(dir: string): Checkpoint {
    let st: fs.Stats
    try {
      st = fs.statSync(dir)
    } catch {
      throw new FileFormatError(dir, 'checkpoint folder not found')
    }
    if (!st.isDirectory()) throw new FileFormatError(dir, 'is not a folder (a checkpoint is a folder with config.json and safetensors weights)')

    const config = readModelConfig(dir)
    const single = path.join(dir, SINGLE_WEIGHTS_FILE)
    const indexFile = path.join(dir, WEIGHTS_INDEX_FILE)
    let tensors: Map<string, TensorInfo>
    let weightsFile: string
    // transformers prefers the single file when both exist; so do we.
    if (isFile(single)) {
      weightsFile = single
      tensors = new Map(SafetensorsFile.open(single).tensors)
    } else if (isFile(indexFile)) {
      weightsFile = indexFile
      tensors = readSharded(dir, indexFile)
    } else {
      const bin = fs.existsSync(path.join(dir, 'pytorch_model.bin')) ? ' (pytorch_model.bin is not supported; convert it to safetensors)' : ''
      throw new FileFormatError(dir, `no ${SINGLE_WEIGHTS_FILE} and no ${WEIGHTS_INDEX_FILE}${bin}`)
    }

    const quantized = [...tensors.keys()].find(isQuantizedTensorName)
    if (quantized) throw new FileFormatError(tensors.get(quantized)!.file, `tensor "${quantized}" is a quantized weight (GPTQ/AWQ layout); ${QUANTIZED_REFUSAL}`)
    const cfgFile = path.join(dir, 'config.json')
    const expected = expectedTensorShapes(config)
    if (config.tieWordEmbeddings) expected.set('lm_head.weight', [config.vocabSize, config.hiddenSize]) // optional, checked if present
    for (const [name, shape] of expected) {
      const t = tensors.get(name)
      if (!t) {
        if (name === 'lm_head.weight' && config.tieWordEmbeddings) continue
        throw new FileFormatError(weightsFile, `missing tensor "${name}" ${fmtShape(shape)}, required by ${cfgFile} (${describe(config)})`)
      }
      if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
        throw new FileFormatError(t.file, `tensor "${name}" has shape ${fmtShape(t.shape)}, expected ${fmtShape(shape)} for ${cfgFile} (${describe(config)})`)
      }
    }
    return new Checkpoint(dir, config, tensors, weightsFile)
  }

  get(name: string): TensorInfo {
    const t = this.tensors.get(name)
    if (!t) throw new FileFormatError(this.weightsFile, `no tensor "${name}"`)
    return t
  }

  has(name: string): boolean {
    return this.tensors.has(name)
  }
}

/** The index is authoritative: only the tensors it lists are used, each from its shard. */
function readSharded(dir: string, indexFile: string): Map<string, TensorInfo> {
  let index: unknown
  try {
    index = JSON.parse(fs.readFileSync(indexFile, 'utf8'))
  } catch (err) {
    throw new FileFormatError(indexFile, `is not valid JSON (${(err as Error).message})`)
  }
  if (typeof index !== 'object' || index === null || Array.isArray(index)) throw new FileFormatError(indexFile, 'is not a JSON object')
  const weightMap = (index as Record<string, unknown>).weight_map
  if (typeof weightMap !== 'object' || weightMap === null || Array.isArray(weightMap)) {
    throw new FileFormatError(indexFile, 'has no "weight_map" object')
  }

  const shards = new Map<string, SafetensorsFile>()
  const tensors = new Map<string, TensorInfo>()
  for (const [name, shard] of Object.entries(weightMap)) {
    if (typeof shard !== 'string') throw new FileFormatError(indexFile, `"weight_map" entry for "${name}" is not a file name`)
    let file = shards.get(shard)
    if (!file) {
      checkShardName(indexFile, shard)
      const shardPath = path.join(dir, shard)
      if (!isFile(shardPath)) throw new FileFormatError(indexFile, `names shard "${shard}", which does not exist (${shardPath})`)
      file = SafetensorsFile.open(shardPath)
      shards.set(shard, file)
    }
    const t = file.tensors.get(name)
    if (!t) throw new FileFormatError(indexFile, `lists tensor "${name}" in shard "${shard}", but ${file.path} does not contain it`)
    tensors.set(name, t)
  }
  return tensors
}
