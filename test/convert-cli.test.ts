// `parscale convert` on real files: bad input gives one line naming the file, exit 1 and
// nothing written; good input gives a package that a session loads.
import assert from 'node:assert/strict'
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, test} from 'node:test'

import {convertCheckpoints} from '../src/core/package/convert.js'
import {readManifest} from '../src/core/package/manifest.js'
import {ParScaleModel} from '../src/core/engine/model.js'
import {runCli} from './helpers/cli.js'
import {copyCheckpointWith, editJson, goldenDir, makeTempDir, readSafetensorsForTest, rewriteSafetensors, writeSafetensors} from './helpers/safetensors-writer.js'

const work = makeTempDir()
after(() => fs.rmSync(work, {recursive: true, force: true}))

let counter = 0
function brokenCopy(source: string, mutate: (dir: string) => void): string {
  return copyCheckpointWith(goldenDir(source), path.join(work, `case-${counter++}`), mutate)
}

interface BadCase {
  name: string
  make: () => string
  /** The file the message must name, relative to the checkpoint folder. */
  file: string
  /** Words the problem description must contain. */
  words: RegExp
}

const shard2 = 'model-00002-of-00002.safetensors'
const cases: BadCase[] = [
  {
    name: 'truncated safetensors file',
    make: () => brokenCopy('tiny-p1', (dir) => fs.truncateSync(path.join(dir, 'model.safetensors'), fs.statSync(path.join(dir, 'model.safetensors')).size - 100)),
    file: 'model.safetensors',
    words: /truncat|past the end|shorter/i,
  },
  {
    name: 'header length past the end of the file',
    make: () =>
      brokenCopy('tiny-p1', (dir) => {
        const fd = fs.openSync(path.join(dir, 'model.safetensors'), 'r+')
        const len = Buffer.alloc(8)
        len.writeBigUInt64LE(10_000_000n)
        fs.writeSync(fd, len, 0, 8, 0)
        fs.closeSync(fd)
      }),
    file: 'model.safetensors',
    words: /header/i,
  },
  {
    name: 'offsets out of range',
    make: () =>
      brokenCopy('tiny-p1', (dir) =>
        rewriteSafetensors(path.join(dir, 'model.safetensors'), () => undefined, {
          editHeader: (h) => {
            const entry = h['model.norm.weight'] as {data_offsets: number[]}
            entry.data_offsets = [entry.data_offsets[0] + 1_000_000, entry.data_offsets[1] + 1_000_000]
            return h
          },
        }),
      ),
    file: 'model.safetensors',
    words: /model\.norm\.weight/,
  },
  {
    name: 'overlapping tensors',
    make: () =>
      brokenCopy('tiny-p1', (dir) =>
        rewriteSafetensors(path.join(dir, 'model.safetensors'), () => undefined, {
          editHeader: (h) => {
            const norm = h['model.norm.weight'] as {data_offsets: number[]}
            const embed = h['model.embed_tokens.weight'] as {data_offsets: number[]}
            norm.data_offsets = [embed.data_offsets[0], embed.data_offsets[0] + (norm.data_offsets[1] - norm.data_offsets[0])]
            return h
          },
        }),
      ),
    file: 'model.safetensors',
    words: /overlap/i,
  },
  {
    name: 'unknown dtype',
    make: () =>
      brokenCopy('tiny-p1', (dir) =>
        rewriteSafetensors(path.join(dir, 'model.safetensors'), (tensors) => {
          const norm = tensors.find((t) => t.name === 'model.norm.weight')!
          norm.dtype = 'F64'
          norm.shape = [norm.shape[0] / 2]
        }),
      ),
    file: 'model.safetensors',
    words: /F64/,
  },
  {
    name: 'byte size not matching the shape',
    make: () =>
      brokenCopy('tiny-p1', (dir) =>
        rewriteSafetensors(path.join(dir, 'model.safetensors'), (tensors) => {
          tensors.find((t) => t.name === 'model.norm.weight')!.shape = [3]
        }),
      ),
    file: 'model.safetensors',
    words: /model\.norm\.weight/,
  },
  {
    name: 'a tensor missing for the config',
    make: () =>
      brokenCopy('tiny-p1', (dir) =>
        rewriteSafetensors(path.join(dir, 'model.safetensors'), (tensors) => tensors.filter((t) => t.name !== 'model.layers.1.mlp.up_proj.weight')),
      ),
    file: 'model.safetensors',
    words: /model\.layers\.1\.mlp\.up_proj\.weight/,
  },
  {
    name: 'a tensor of the wrong shape for the config',
    make: () =>
      brokenCopy('tiny-p4', (dir) =>
        editJson(path.join(dir, 'config.json'), (c) => {
          c.parscale_n_tokens = 40
        }),
      ),
    file: 'model-00001-of-00002.safetensors|model-00002-of-00002.safetensors',
    words: /prefix_[kv].*expected/,
  },
  {
    name: 'an index naming a missing shard',
    make: () => brokenCopy('tiny-p4', (dir) => fs.rmSync(path.join(dir, shard2))),
    file: 'model.safetensors.index.json',
    words: new RegExp(shard2.replace(/\./g, '\\.')),
  },
  {
    name: 'config of another model type',
    make: () =>
      brokenCopy('tiny-p1', (dir) =>
        editJson(path.join(dir, 'config.json'), (c) => {
          c.model_type = 'llama'
        }),
      ),
    file: 'config.json',
    words: /model_type.*llama/,
  },
  {
    name: 'config with rope_scaling',
    make: () =>
      brokenCopy('tiny-p1', (dir) =>
        editJson(path.join(dir, 'config.json'), (c) => {
          c.rope_scaling = {type: 'yarn', factor: 4}
        }),
      ),
    file: 'config.json',
    words: /rope_scaling/,
  },
  {
    name: 'an already-quantized checkpoint (quantization_config)',
    make: () =>
      brokenCopy('tiny-p1', (dir) =>
        editJson(path.join(dir, 'config.json'), (c) => {
          c.quantization_config = {quant_method: 'gptq', bits: 4, group_size: 128}
        }),
      ),
    file: 'config.json',
    words: /already quantized \(quantization_config: gptq, 4 bits\).*float checkpoints/,
  },
  {
    name: 'GPTQ tensors without a quantization_config',
    make: () =>
      brokenCopy('tiny-p1', (dir) =>
        rewriteSafetensors(path.join(dir, 'model.safetensors'), (tensors) => {
          const q = tensors.findIndex((t) => t.name === 'model.layers.0.self_attn.q_proj.weight')
          tensors[q] = {name: 'model.layers.0.self_attn.q_proj.qweight', dtype: 'I32', shape: [8, 64], data: new Uint8Array(8 * 64 * 4)}
          tensors.push({name: 'model.layers.0.self_attn.q_proj.scales', dtype: 'F16', shape: [1, 64], data: new Uint8Array(128)})
        }),
      ),
    file: 'model.safetensors',
    words: /q_proj\.qweight" is a quantized weight \(GPTQ\/AWQ layout\).*float checkpoints/,
  },
]

describe('convert refuses bad input', () => {
  for (const bad of cases) {
    test(bad.name, async () => {
      const source = bad.make()
      const out = path.join(work, `out-${counter++}`)
      const result = await runCli(['convert', source, '--out', out])
      assert.equal(result.code, 1, `exit code; stderr: ${result.stderr}`)
      assert.equal(result.stdout, '')
      const lines = result.stderr.trimEnd().split('\n')
      assert.equal(lines.length, 1, `one line on stderr, got:\n${result.stderr}`)
      assert.match(lines[0], /^parscale: /)
      assert.match(lines[0], new RegExp(`${source.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}/(${bad.file})`), 'names the file')
      assert.match(lines[0], bad.words)
      assert.equal(fs.existsSync(out), false, 'nothing written at --out')
      assert.deepEqual(fs.readdirSync(work).filter((n) => n.includes('.partial-')), [], 'no temporary folder left')
    })
  }

  test('an unknown model path', async () => {
    const result = await runCli(['convert', path.join(work, 'does-not-exist')])
    assert.equal(result.code, 1)
    assert.match(result.stderr, /^parscale: .*does-not-exist/)
    assert.equal(result.stderr.trimEnd().split('\n').length, 1)
  })

  test('an interrupted conversion leaves only a work folder, which the next conversion removes', async () => {
    const out = path.join(work, 'interrupted')
    // A process id that is not running stands for a conversion killed by Ctrl-C.
    const dead = path.join(work, 'interrupted.partial-999999999-1')
    const live = path.join(work, `interrupted.partial-${process.pid}-1`)
    fs.mkdirSync(dead)
    fs.mkdirSync(live)
    const result = await runCli(['convert', goldenDir('tiny-p1'), '--out', out])
    assert.equal(result.code, 0, result.stderr)
    assert.equal(fs.existsSync(dead), false, 'abandoned work removed')
    assert.equal(fs.existsSync(live), true, 'a running conversion is left alone')
    fs.rmSync(live, {recursive: true})
  })

  test('a full disk: one line, exit 1, nothing left', async (t) => {
    // A 300 kB tmpfs stands for a full disk; mounting needs root, as CI has.
    const small = path.join(work, 'small-disk')
    fs.mkdirSync(small)
    if (spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=300k', 'tmpfs', small]).status !== 0) {
      t.skip('cannot mount a tmpfs here (not root)')
      return
    }
    try {
      const result = await runCli(['convert', goldenDir('tiny-p1'), '--out', path.join(small, 'out')])
      assert.equal(result.code, 1)
      assert.match(result.stderr, /^parscale: .*small-disk\/out: no space left on device/)
      assert.equal(result.stderr.trimEnd().split('\n').length, 1)
      assert.deepEqual(fs.readdirSync(small), [], 'nothing written')
    } finally {
      spawnSync('umount', [small])
    }
  })

  test('an existing output folder is kept unless --force', async () => {
    const out = path.join(work, 'existing')
    fs.mkdirSync(out)
    fs.writeFileSync(path.join(out, 'keep.txt'), 'mine')
    const refused = await runCli(['convert', goldenDir('tiny-p1'), '--out', out])
    assert.equal(refused.code, 1)
    assert.match(refused.stderr, /--force/)
    assert.equal(fs.readFileSync(path.join(out, 'keep.txt'), 'utf8'), 'mine')
    const forced = await runCli(['convert', goldenDir('tiny-p1'), '--out', out, '--force', '--json'])
    assert.equal(forced.code, 0, forced.stderr)
    assert.equal(fs.existsSync(path.join(out, 'keep.txt')), false)
    assert.deepEqual(readManifest(out).parallel, [1])
  })
})

describe('convert output', () => {
  test('a package holds graph, external weights, configs, tokenizer and manifest; progress stays off a pipe', async () => {
    const out = path.join(work, 'pkg-p4')
    const result = await runCli(['convert', goldenDir('tiny-p4'), '--out', out])
    assert.equal(result.code, 0, result.stderr)
    assert.equal(result.stderr, '', 'no spinner on a pipe')
    assert.match(result.stdout, /P = 4/)
    const files = fs.readdirSync(out).sort()
    assert.deepEqual(files, ['backbone.weights', 'config.json', 'generation_config.json', 'model.onnx', 'model.webgpu.onnx', 'p4.weights', 'parscale.json', 'tokenizer.json', 'tokenizer_config.json'])
    const manifest = readManifest(out)
    assert.equal(manifest.variants[0].prefixTokens, 48)
    assert.equal(manifest.model.numKvHeads, 2)
    // Each layer's prefixes and the aggregation head, float32, indexed for the runtime.
    const tensors = manifest.variants[0].tensors
    assert.deepEqual(tensors['model.layers.0.self_attn.prefix_k'].shape, [4, 2, 48, 16])
    assert.equal(tensors['model.aggregate_layer.0.weight'].length, 64 * 4 * 64 * 4)
    assert.equal(Object.keys(tensors).length, 3 * 2 + 4)
    // The graph file holds structure only: the weights are external.
    assert.ok(fs.statSync(path.join(out, 'model.onnx')).size < 200_000)
  })

  test('P variants of one backbone share one package and one copy of the backbone', async () => {
    // A P = 1 checkpoint made from tiny-p4's backbone (its prefixes and aggregation dropped).
    const p1 = copyCheckpointWith(goldenDir('tiny-p4'), path.join(work, 'family-p1'), (dir) => {
      editJson(path.join(dir, 'config.json'), (c) => ({...c, model_type: 'qwen2', parscale_n: undefined, parscale_n_tokens: undefined, parscale_attn_smooth: undefined}))
      const tensors = fs
        .readdirSync(dir)
        .filter((n) => n.endsWith('.safetensors'))
        .flatMap((n) => readSafetensorsForTest(path.join(dir, n)).tensors)
        .filter((t) => !/prefix_|aggregate_layer/.test(t.name))
      for (const n of fs.readdirSync(dir).filter((n) => n.includes('safetensors'))) fs.rmSync(path.join(dir, n))
      writeSafetensors(path.join(dir, 'model.safetensors'), tensors)
    })
    const out = path.join(work, 'family')
    const manifest = convertCheckpoints({sources: [p1, goldenDir('tiny-p4')], outDir: out, dtype: 'fp32'})
    assert.deepEqual(manifest.parallel, [1, 4])
    const single = readManifest(path.join(work, 'pkg-p4'))
    assert.equal(manifest.backbone.bytes, single.backbone.bytes, 'backbone stored once')
    const golden = JSON.parse(fs.readFileSync(path.join(goldenDir('tiny-p4'), 'golden.json'), 'utf8')) as {logits: {prompt_ids: number[]; values: number[][]}}
    const model = await ParScaleModel.open(out)
    assert.deepEqual(model.parallelValues, [1, 4])
    const ids = golden.logits.prompt_ids
    const cache = model.newCache(4)
    cache.reserve(1, ids.length)
    cache.reset(0)
    const {logits, dims} = await model.forward(cache, 0, [ids], 1)
    golden.logits.values[ids.length - 1].forEach((v, j) => assert.ok(Math.abs(v - logits[j]) < 2e-3))
    assert.equal(dims[1], 1)
    assert.equal(model.newCache(1).prefixTokens, 0, 'P = 1 of the same model has no prefix')
    await model.release()
  })

  test('a family whose backbones differ is refused', async () => {
    const result = await runCli(['convert', goldenDir('tiny-p4'), goldenDir('tiny-p2-tied'), '--out', path.join(work, 'mixed')])
    assert.equal(result.code, 1)
    assert.match(result.stderr, /backbone/)
    assert.equal(fs.existsSync(path.join(work, 'mixed')), false)
  })
})
