import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, it} from 'node:test'

import {parseModelConfig, readModelConfig} from '../src/core/checkpoint/config.js'
import {FileFormatError} from '../src/core/errors.js'
import {goldenDir, makeTempDir} from './helpers/safetensors-writer.js'

const FILE = '/ckpt/config.json'

function base(): Record<string, unknown> {
  return JSON.parse(fs.readFileSync(path.join(goldenDir('tiny-p4'), 'config.json'), 'utf8')) as Record<string, unknown>
}

/** Expects a FileFormatError naming `file` whose message contains every `parts`. */
function refuses(fn: () => unknown, file: string, ...parts: string[]): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof FileFormatError, `expected FileFormatError, got ${String(err)}`)
    assert.equal(err.file, file)
    assert.ok(err.message.startsWith(`${file}: `), err.message)
    for (const p of parts) assert.ok(err.message.includes(p), `"${err.message}" lacks "${p}"`)
    assert.ok(!err.message.includes('\n'), 'one line')
    return true
  })
}

function refusesWith(edit: (c: Record<string, unknown>) => void, ...parts: string[]): void {
  const c = base()
  edit(c)
  refuses(() => parseModelConfig(c, FILE), FILE, ...parts)
}

describe('config: golden fixtures', () => {
  it('reads tiny-p1 (qwen2, P = 1)', () => {
    const c = readModelConfig(goldenDir('tiny-p1'))
    assert.equal(c.modelType, 'qwen2')
    assert.deepEqual(
      [c.vocabSize, c.hiddenSize, c.intermediateSize, c.numLayers, c.numHeads, c.numKvHeads, c.headDim],
      [272, 64, 128, 2, 4, 2, 16],
    )
    assert.equal(c.parallel, 1)
    assert.equal(c.prefixTokens, 0)
    assert.equal(c.attnSmooth, 0)
    assert.equal(c.tieWordEmbeddings, false)
    assert.equal(c.rmsNormEps, 1e-6)
    assert.equal(c.ropeTheta, 10000)
    assert.equal(c.maxPositionEmbeddings, 4096)
    assert.equal(c.torchDtype, 'float32')
    assert.equal(c.raw.architectures instanceof Array, true)
  })

  it('reads tiny-p4 (qwen2_parscale, P = 4, 48 prefix tokens)', () => {
    const c = readModelConfig(goldenDir('tiny-p4'))
    assert.equal(c.modelType, 'qwen2_parscale')
    assert.deepEqual([c.parallel, c.prefixTokens, c.attnSmooth], [4, 48, 0.01])
    assert.deepEqual([c.numLayers, c.intermediateSize, c.headDim], [3, 160, 16])
    assert.equal(c.torchDtype, 'bfloat16')
  })

  it('reads tiny-p2-tied (P = 2, tied head, no GQA)', () => {
    const c = readModelConfig(goldenDir('tiny-p2-tied'))
    assert.deepEqual([c.parallel, c.prefixTokens, c.numHeads, c.numKvHeads, c.headDim], [2, 16, 6, 6, 16])
    assert.equal(c.tieWordEmbeddings, true)
    assert.equal(c.ropeTheta, 1000000)
  })
})

describe('config: accepted variants', () => {
  it('honours head_dim and defaults num_key_value_heads to the head count', () => {
    const c = base()
    c.head_dim = 32
    delete c.num_key_value_heads
    const m = parseModelConfig(c, FILE)
    assert.equal(m.headDim, 32)
    assert.equal(m.numKvHeads, 4)
  })

  it('accepts rope_scaling: null and use_sliding_window: false', () => {
    const c = base()
    c.rope_scaling = null
    c.use_sliding_window = false
    assert.equal(parseModelConfig(c, FILE).parallel, 4)
  })

  it('qwen2_parscale with parscale_n = 1 is plain Qwen2', () => {
    const c = base()
    c.parscale_n = 1
    const m = parseModelConfig(c, FILE)
    assert.deepEqual([m.parallel, m.prefixTokens, m.attnSmooth], [1, 0, 0])
  })

  it('ignores parscale fields in a qwen2 config', () => {
    const c = base()
    c.model_type = 'qwen2'
    assert.equal(parseModelConfig(c, FILE).parallel, 1)
  })
})

describe('config: refused', () => {
  const tmp = makeTempDir()
  after(() => fs.rmSync(tmp, {recursive: true, force: true}))

  it('config.json that is not JSON', () => {
    const dir = path.join(tmp, 'notjson')
    fs.mkdirSync(dir)
    fs.writeFileSync(path.join(dir, 'config.json'), '{"model_type": "qwen2",')
    refuses(() => readModelConfig(dir), path.join(dir, 'config.json'), 'not valid JSON')
  })

  it('missing config.json', () => {
    const dir = path.join(tmp, 'empty')
    fs.mkdirSync(dir)
    refuses(() => readModelConfig(dir), path.join(dir, 'config.json'), 'not found')
  })

  it('JSON that is not an object', () => {
    refuses(() => parseModelConfig([1, 2], FILE), FILE, 'not a JSON object')
  })

  it('unknown model_type, naming it and the supported ones', () => {
    refusesWith((c) => (c.model_type = 'llama'), 'model_type', '"llama"', 'qwen2, qwen2_parscale')
    refusesWith((c) => delete c.model_type, '"model_type"', 'missing')
  })

  it('missing required field, naming it', () => {
    for (const f of ['vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads']) {
      refusesWith((c) => delete c[f], `missing required field "${f}"`)
    }
  })

  it('non-integer or non-positive field, naming it', () => {
    refusesWith((c) => (c.hidden_size = 64.5), '"hidden_size"', 'positive integer', '64.5')
    refusesWith((c) => (c.num_hidden_layers = '3'), '"num_hidden_layers"', 'positive integer')
    refusesWith((c) => (c.vocab_size = 0), '"vocab_size"')
    refusesWith((c) => (c.num_key_value_heads = -2), '"num_key_value_heads"')
    refusesWith((c) => (c.rms_norm_eps = 'tiny'), '"rms_norm_eps"')
    refusesWith((c) => (c.tie_word_embeddings = 'yes'), '"tie_word_embeddings"')
  })

  it('rope_scaling that is not null', () => {
    refusesWith((c) => (c.rope_scaling = {type: 'yarn', factor: 4}), '"rope_scaling"', 'not supported')
  })

  it('use_sliding_window: true', () => {
    refusesWith((c) => (c.use_sliding_window = true), '"use_sliding_window"', 'not supported')
  })

  it('hidden_act other than silu', () => {
    refusesWith((c) => (c.hidden_act = 'gelu'), '"hidden_act"', '"gelu"', 'silu')
  })

  it('heads not divisible by KV heads', () => {
    refusesWith((c) => (c.num_key_value_heads = 3), '"num_attention_heads" (4)', '"num_key_value_heads" (3)')
  })

  it('hidden size not divisible by heads without head_dim', () => {
    refusesWith((c) => (c.num_attention_heads = 6, c.num_key_value_heads = 6), '"hidden_size" (64)', 'not divisible')
  })

  it('invalid parscale fields', () => {
    refusesWith((c) => (c.parscale_n = 0), '"parscale_n"')
    refusesWith((c) => (c.parscale_n = 2.5), '"parscale_n"')
    refusesWith((c) => delete c.parscale_n, 'missing required field "parscale_n"')
    refusesWith((c) => (c.parscale_n_tokens = 0), '"parscale_n_tokens"')
    refusesWith((c) => delete c.parscale_n_tokens, '"parscale_n_tokens"')
    refusesWith((c) => (c.parscale_attn_smooth = 1), '"parscale_attn_smooth"', '[0, 1)')
    refusesWith((c) => (c.parscale_attn_smooth = -0.1), '"parscale_attn_smooth"')
    refusesWith((c) => (c.parscale_attn_smooth = '0.01'), '"parscale_attn_smooth"')
  })
})
