import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, it} from 'node:test'

import {Checkpoint, expectedTensorShapes} from '../src/core/checkpoint/checkpoint.js'
import {readTensorFloat32} from '../src/core/checkpoint/dtype.js'
import {FileFormatError} from '../src/core/errors.js'
import {readTensorBytes} from '../src/core/checkpoint/safetensors.js'
import {copyCheckpointWith, editJson, f32Bytes, goldenDir, makeTempDir, rewriteSafetensors} from './helpers/safetensors-writer.js'

const tmp = makeTempDir()
after(() => fs.rmSync(tmp, {recursive: true, force: true}))
let counter = 0

const P1 = goldenDir('tiny-p1')
const P4 = goldenDir('tiny-p4')
const TIED = goldenDir('tiny-p2-tied')
const SHARD1 = 'model-00001-of-00002.safetensors'
const SHARD2 = 'model-00002-of-00002.safetensors'
const INDEX = 'model.safetensors.index.json'

function broken(src: string, mutate: (dir: string) => void): string {
  return copyCheckpointWith(src, path.join(tmp, `c${counter++}`), mutate)
}

function refuses(dir: string, file: string, ...parts: string[]): void {
  assert.throws(() => Checkpoint.open(dir), (err: unknown) => {
    assert.ok(err instanceof FileFormatError, `expected FileFormatError, got ${String(err)}`)
    assert.equal(err.file, file)
    assert.ok(err.message.startsWith(`${file}: `))
    assert.ok(!err.message.includes('\n'))
    for (const p of parts) assert.ok(err.message.includes(p), `"${err.message}" lacks "${p}"`)
    return true
  })
}

/** Independent decoders over raw bytes, for comparing with src/core/dtype. */
function bf16At(bytes: Buffer, i: number): number {
  const dv = new DataView(new ArrayBuffer(4))
  dv.setUint16(2, bytes.readUInt16LE(2 * i), true)
  return dv.getFloat32(0, true)
}
function f16At(bytes: Buffer, i: number): number {
  const h = bytes.readUInt16LE(2 * i)
  const s = h >> 15 ? -1 : 1
  const e = (h >> 10) & 31
  const m = h & 1023
  return e === 0 ? s * m * 2 ** -24 : s * (1 + m / 1024) * 2 ** (e - 15)
}

describe('checkpoint: golden fixtures', () => {
  it('opens tiny-p1 (one F32 file)', () => {
    const c = Checkpoint.open(P1)
    assert.equal(c.dir, P1)
    assert.equal(c.config.parallel, 1)
    assert.equal(c.tensors.size, 27)
    assert.equal(c.totalBytes, 436480)
    assert.ok(c.has('lm_head.weight'))
    assert.equal(c.get('model.layers.1.mlp.down_proj.weight').dtype, 'F32')
    assert.deepEqual(c.get('model.layers.1.mlp.down_proj.weight').shape, [64, 128])
  })

  it('opens tiny-p4 (BF16 in two shards with an index)', () => {
    const c = Checkpoint.open(P4)
    assert.deepEqual([c.config.parallel, c.config.prefixTokens], [4, 48])
    assert.equal(c.tensors.size, 49)
    assert.equal(c.totalBytes, 436488) // the index's metadata.total_size
    assert.equal(path.basename(c.get('lm_head.weight').file), SHARD1)
    assert.equal(path.basename(c.get('model.layers.2.self_attn.prefix_v').file), SHARD2)
    assert.deepEqual(c.get('model.aggregate_layer.0.weight').shape, [64, 256])
  })

  it('opens tiny-p2-tied (F16, no lm_head)', () => {
    const c = Checkpoint.open(TIED)
    assert.equal(c.config.tieWordEmbeddings, true)
    assert.equal(c.has('lm_head.weight'), false)
    assert.equal(c.tensors.size, 34)
    assert.throws(() => c.get('lm_head.weight'), (e: unknown) => e instanceof FileFormatError && e.message.includes('"lm_head.weight"'))
  })

  it('expectedTensorShapes lists exactly the golden tensors', () => {
    for (const dir of [P1, P4, TIED]) {
      const c = Checkpoint.open(dir)
      const exp = expectedTensorShapes(c.config)
      assert.deepEqual([...exp.keys()].sort(), [...c.tensors.keys()].sort())
      for (const [name, shape] of exp) assert.deepEqual(c.get(name).shape, shape, name)
    }
  })

  it('decodes BF16 tensors like an independent decoder', () => {
    const c = Checkpoint.open(P4)
    for (const name of ['model.layers.2.self_attn.prefix_v', 'model.norm.weight', 'lm_head.weight']) {
      const t = c.get(name)
      const raw = readTensorBytes(t)
      const f = readTensorFloat32(t)
      assert.equal(f.length, t.byteLength / 2)
      for (const i of [0, 1, 7, f.length >> 1, f.length - 1]) assert.equal(f[i], bf16At(raw, i), `${name}[${i}]`)
      assert.ok(f.some((v) => v !== 0))
    }
  })

  it('decodes F16 tensors like an independent decoder', () => {
    const c = Checkpoint.open(TIED)
    for (const name of ['model.embed_tokens.weight', 'model.layers.0.self_attn.prefix_k', 'model.aggregate_layer.2.bias']) {
      const t = c.get(name)
      const raw = readTensorBytes(t)
      const f = readTensorFloat32(t)
      for (let i = 0; i < f.length; i += 37) assert.equal(f[i], f16At(raw, i), `${name}[${i}]`)
    }
  })

  it('works through relative symlinks to shared shard files', () => {
    const shared = path.join(tmp, 'shared-backbone')
    fs.mkdirSync(shared)
    fs.copyFileSync(path.join(P4, SHARD1), path.join(shared, SHARD1))
    const variant = path.join(tmp, 'variant')
    fs.mkdirSync(variant)
    for (const f of ['config.json', INDEX, SHARD2]) fs.copyFileSync(path.join(P4, f), path.join(variant, f))
    fs.symlinkSync(path.join('..', 'shared-backbone', SHARD1), path.join(variant, SHARD1))
    const c = Checkpoint.open(variant)
    assert.equal(c.tensors.size, 49)
    assert.deepEqual(readTensorFloat32(c.get('lm_head.weight')), readTensorFloat32(Checkpoint.open(P4).get('lm_head.weight')))
  })

  it('ignores extra tensors such as rotary_emb.inv_freq', () => {
    const dir = broken(P1, (d) => rewriteSafetensors(path.join(d, 'model.safetensors'), (ts) => {
      ts.push({name: 'model.rotary_emb.inv_freq', dtype: 'F32', shape: [8], data: f32Bytes(new Array(8).fill(1))})
    }))
    const c = Checkpoint.open(dir)
    assert.ok(c.has('model.rotary_emb.inv_freq'))
  })

  it('accepts an lm_head.weight stored with a tied head when its shape is right', () => {
    const dir = broken(TIED, (d) => rewriteSafetensors(path.join(d, 'model.safetensors'), (ts) => {
      const emb = ts.find((t) => t.name === 'model.embed_tokens.weight')!
      ts.push({...emb, name: 'lm_head.weight'})
    }))
    assert.ok(Checkpoint.open(dir).has('lm_head.weight'))
  })
})

describe('checkpoint: refused', () => {
  it('a folder that does not exist', () => {
    const dir = path.join(tmp, 'absent')
    refuses(dir, dir, 'not found')
  })

  it('no config.json', () => {
    const dir = broken(P1, (d) => fs.rmSync(path.join(d, 'config.json')))
    refuses(dir, path.join(dir, 'config.json'), 'not found')
  })

  it('an invalid config.json', () => {
    const dir = broken(P4, (d) => editJson(path.join(d, 'config.json'), (c) => void (c.rope_scaling = {type: 'linear', factor: 2})))
    refuses(dir, path.join(dir, 'config.json'), '"rope_scaling"')
  })

  it('no model.safetensors and no index', () => {
    const dir = broken(P1, (d) => fs.rmSync(path.join(d, 'model.safetensors')))
    refuses(dir, dir, 'no model.safetensors', INDEX)
  })

  it('an index that is not JSON', () => {
    const dir = broken(P4, (d) => fs.writeFileSync(path.join(d, INDEX), '{"weight_map": '))
    refuses(dir, path.join(dir, INDEX), 'not valid JSON')
  })

  it('an index without weight_map', () => {
    const dir = broken(P4, (d) => editJson(path.join(d, INDEX), (j) => void delete j.weight_map))
    refuses(dir, path.join(dir, INDEX), '"weight_map"')
  })

  it('an index naming a missing shard (names index and shard)', () => {
    const dir = broken(P4, (d) => fs.rmSync(path.join(d, SHARD2)))
    refuses(dir, path.join(dir, INDEX), `"${SHARD2}"`, 'does not exist')
  })

  it('an index listing a tensor that its shard does not contain', () => {
    const dir = broken(P4, (d) => editJson(path.join(d, INDEX), (j) => {
      const wm = j.weight_map as Record<string, string>
      const moved = Object.keys(wm).find((k) => wm[k] === SHARD2)!
      wm[moved] = SHARD1
    }))
    refuses(dir, path.join(dir, INDEX), `in shard "${SHARD1}"`, 'does not contain it')
  })

  it('a tensor found in no shard (not in the index)', () => {
    const dir = broken(P4, (d) => editJson(path.join(d, INDEX), (j) => void delete (j.weight_map as Record<string, string>)['model.layers.1.mlp.up_proj.weight']))
    refuses(dir, path.join(dir, INDEX), 'missing tensor "model.layers.1.mlp.up_proj.weight"', '[160, 64]')
  })

  it('a tensor missing for the config (single file)', () => {
    const dir = broken(P1, (d) => rewriteSafetensors(path.join(d, 'model.safetensors'), (ts) => ts.filter((t) => t.name !== 'model.norm.weight')))
    refuses(dir, path.join(dir, 'model.safetensors'), 'missing tensor "model.norm.weight"')
  })

  it('ParScale tensors missing', () => {
    const dir = broken(TIED, (d) => rewriteSafetensors(path.join(d, 'model.safetensors'), (ts) => ts.filter((t) => t.name !== 'model.layers.1.self_attn.prefix_v')))
    refuses(dir, path.join(dir, 'model.safetensors'), 'missing tensor "model.layers.1.self_attn.prefix_v"', '[2, 6, 16, 16]')
    const untied = broken(P1, (d) => rewriteSafetensors(path.join(d, 'model.safetensors'), (ts) => ts.filter((t) => t.name !== 'lm_head.weight')))
    refuses(untied, path.join(untied, 'model.safetensors'), 'missing tensor "lm_head.weight"')
  })

  it('a tensor of the wrong shape (names expected and actual)', () => {
    const dir = broken(P4, (d) => editJson(path.join(d, 'config.json'), (c) => void (c.parscale_n_tokens = 32)))
    refuses(dir, path.join(dir, SHARD1), 'tensor "model.layers.0.self_attn.prefix_k"', 'shape [4, 2, 48, 16]', 'expected [4, 2, 32, 16]')
    const p1 = broken(P1, (d) => editJson(path.join(d, 'config.json'), (c) => void (c.intermediate_size = 96)))
    refuses(p1, path.join(p1, 'model.safetensors'), 'tensor "model.layers.0.mlp.gate_proj.weight" has shape [128, 64], expected [96, 64]')
  })

  it('a tied lm_head.weight of the wrong shape', () => {
    const dir = broken(TIED, (d) => rewriteSafetensors(path.join(d, 'model.safetensors'), (ts) => {
      ts.push({name: 'lm_head.weight', dtype: 'F16', shape: [96, 272], data: new Uint8Array(96 * 272 * 2)})
    }))
    refuses(dir, path.join(dir, 'model.safetensors'), '"lm_head.weight"', 'expected [272, 96]')
  })

  it('shard paths that escape the folder', () => {
    for (const bad of [`../${SHARD2}`, path.join(P4, SHARD2), `sub/../../${SHARD2}`, '..\\x.safetensors']) {
      const dir = broken(P4, (d) => editJson(path.join(d, INDEX), (j) => {
        const wm = j.weight_map as Record<string, string>
        for (const k of Object.keys(wm)) if (wm[k] === SHARD2) wm[k] = bad
      }))
      refuses(dir, path.join(dir, INDEX), JSON.stringify(bad), 'refused')
    }
  })

  it('a broken shard names the shard file', () => {
    const dir = broken(P4, (d) => {
      const f = path.join(d, SHARD2)
      fs.truncateSync(f, fs.statSync(f).size - 10)
    })
    refuses(dir, path.join(dir, SHARD2), 'runs past the end of the file', 'truncated')
  })
})
