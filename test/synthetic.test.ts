import assert from 'node:assert/strict'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import {test} from 'node:test'

import {Checkpoint} from '../src/core/checkpoint/checkpoint.js'
import {readTensorFloat32} from '../src/core/checkpoint/dtype.js'
import {SYNTHETIC_PRESETS, syntheticShape, writeSyntheticCheckpoint} from '../src/core/checkpoint/synthetic.js'
import {shapeParameters} from '../src/core/bench/scaling-law.js'

const tiny = syntheticShape(undefined, {hiddenSize: 64, numLayers: 2, vocabSize: 300})

function tmp(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-synthetic-'))
}

test('a synthetic checkpoint opens as a valid checkpoint, P > 1, sharded, bf16', () => {
  const dir = tmp()
  try {
    const config = writeSyntheticCheckpoint(dir, tiny, {parallel: 4, prefixTokens: 8, dtype: 'bf16', maxShardBytes: 30_000})
    assert.equal(config.parallel, 4)
    const cp = Checkpoint.open(dir)
    assert.ok(fs.existsSync(path.join(dir, 'model.safetensors.index.json')))
    assert.equal(cp.get('model.layers.0.self_attn.prefix_k').dtype, 'BF16')
    assert.deepEqual(cp.get('model.layers.1.self_attn.prefix_v').shape, [4, 2, 8, 16])
    const norm = readTensorFloat32(cp.get('model.norm.weight'))
    assert.ok(norm.every((v) => v === 1))
    const q = readTensorFloat32(cp.get('model.layers.0.self_attn.q_proj.weight'))
    assert.ok(q.every((v) => Math.abs(v) <= 0.036) && q.some((v) => v !== 0))
  } finally {
    fs.rmSync(dir, {recursive: true, force: true})
  }
})

test('one seed gives one backbone for every P; another seed differs', () => {
  const [a, b, c] = [tmp(), tmp(), tmp()]
  try {
    writeSyntheticCheckpoint(a, tiny, {parallel: 1, seed: 7})
    writeSyntheticCheckpoint(b, tiny, {parallel: 2, prefixTokens: 4, seed: 7})
    writeSyntheticCheckpoint(c, tiny, {parallel: 1, seed: 8})
    const w = (dir: string) => readTensorFloat32(Checkpoint.open(dir).get('model.layers.1.mlp.down_proj.weight'))
    assert.deepEqual(w(a), w(b))
    assert.notDeepEqual(w(a), w(c))
  } finally {
    for (const d of [a, b, c]) fs.rmSync(d, {recursive: true, force: true})
  }
})

test('presets have the published sizes', () => {
  assert.ok(Math.abs(shapeParameters(SYNTHETIC_PRESETS['0.5b']!) - 494e6) < 2e6)
  assert.ok(Math.abs(shapeParameters(SYNTHETIC_PRESETS['3b']!) - 3.09e9) < 0.02e9)
  assert.throws(() => syntheticShape('7b'), /unknown synthetic shape "7b"/)
})
