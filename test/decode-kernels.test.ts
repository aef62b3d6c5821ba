// A CPU decode step runs few kernels per layer (issue 24): each small kernel costs time of its
// own, so the graph lays out a decode step's q, k, v and context by reshapes, not transposes.
// Counted from ONNX Runtime's profile, i.e. after its own graph optimizations.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, test} from 'node:test'

import {nodesByRun, profileFiles, readProfileEvents} from '../src/core/bench/profile-summary.js'
import {ParScaleModel} from '../src/core/engine/model.js'
import {convertCheckpoints} from '../src/core/package/convert.js'
import {goldenDir, makeTempDir} from './helpers/safetensors-writer.js'

const work = makeTempDir()
after(() => fs.rmSync(work, {recursive: true, force: true}))

/** Kernels of each model run (in order) that ran in one decoder layer: op names by node. */
function layerKernelsPerRun(file: string, layer: number): string[][] {
  return nodesByRun(readProfileEvents(file)).map(({nodes}) => nodes.filter((k) => k.name.startsWith(`layers.${layer}/`)).map((k) => k.args?.op_name ?? '?'))
}

for (const name of ['tiny-p1', 'tiny-p4']) {
  test(`${name}: a decode step runs at most 35 kernels in a layer and no Transpose, its logits as golden`, async () => {
    const out = path.join(work, name)
    convertCheckpoints({sources: [goldenDir(name)], outDir: out, dtype: 'fp32'})
    const golden = JSON.parse(fs.readFileSync(path.join(goldenDir(name), 'golden.json'), 'utf8')) as {logits: {prompt_ids: number[]; values: number[][]}}
    const prefix = path.join(work, `${name}-profile`)
    const model = await ParScaleModel.open(out, {threads: 1, profilePrefix: prefix})
    const ids = golden.logits.prompt_ids
    const steps = 3
    const cache = model.newCache(Math.max(...model.parallelValues))
    cache.reserve(1, ids.length)
    cache.reset(0)
    await model.forward(cache, 0, [ids.slice(0, ids.length - steps)], 1)
    let max = 0
    for (let t = ids.length - steps; t < ids.length; t++) {
      const step = await model.forward(cache, 0, [[ids[t]!]], 1)
      golden.logits.values[t]!.forEach((v, j) => (max = Math.max(max, Math.abs(v - step.logits[j]!))))
    }
    const layers = model.manifest.model.numLayers
    await model.release() // writes the profile
    assert.ok(max < 5e-5, `decode logits differ from golden by ${max}`)

    const [file] = profileFiles(prefix)
    assert.ok(file, 'no profile written')
    // the last layer: work done once per step (the first norm, shared shapes) is named under the first
    const runs = layerKernelsPerRun(file, layers - 1)
    const decodeRuns = runs.slice(-steps)
    assert.equal(decodeRuns.length, steps)
    for (const ops of decodeRuns) {
      // graph 9 ran 34 per layer at 0.5b (q, k, v and the context transposed); graph 10 ran 30; graph 11
      // runs 35: its decode softmax, taken apart, trades Concat, Softmax and two Slices of the
      // [group, capacity] scores for nine kernels that make fewer passes over them (docs/benchmarks.md)
      assert.ok(ops.length <= 35, `${ops.length} kernels in a layer: ${ops.join(' ')}`)
      assert.ok(!ops.includes('Transpose'), `a decode step transposes in its layers: ${ops.join(' ')}`)
    }
  })
}
