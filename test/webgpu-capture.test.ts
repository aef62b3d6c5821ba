// The WebGPU capture route (issue 23): onnxruntime-web on Dawn, prefill through the dynamic GPU
// form, decode through the captured decode-only form, one GPU buffer per layer and kind as past
// and present. Its logits against the exact CPU graph (onnxruntime-node's CPU provider) on the
// default model at every P, over a prompt and 10 decode steps (the first records, the rest
// replay), then again after reset (the same buffers rewritten). Skips itself where
// onnxruntime-web and Dawn do not load or Dawn finds no adapter; runs on lavapipe with
// PARSCALE_ORTWEB=<a node_modules with onnxruntime-web@1.30.0 and webgpu@0.6.2>.
import assert from 'node:assert/strict'
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import {after, before, describe, test} from 'node:test'
import {fileURLToPath} from 'node:url'

import {ParScaleModel} from '../src/core/engine/model.js'
import {CapturedGpuFormModel, chooseWebGpuRoute, loadCaptureRuntime, type CaptureRuntime} from '../src/core/engine/webgpu-capture.js'
import {resolveModel} from '../src/core/package/resolve.js'
import {makeTempDir} from './helpers/safetensors-writer.js'

const work = makeTempDir()
after(() => fs.rmSync(work, {recursive: true, force: true}))

let runtime: CaptureRuntime | string = 'not loaded'
let packageDir = ''
before(async () => {
  process.env.PARSCALE_CACHE ??= path.join(work, 'cache')
  runtime = await loadCaptureRuntime()
  packageDir = resolveModel(undefined, {parallel: 8}).packageDir
})

const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  assert.equal(a.length, b.length)
  let worst = 0
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!))
  return worst
}
const argmax = (xs: Float32Array) => xs.reduce((best, x, i) => (x > xs[best]! ? i : best), 0)

describe('WebGPU graph capture route: logits equal the CPU graph\'s', () => {
  for (const parallel of [8, 4, 2, 1]) {
    test(`P = ${parallel}: a 20-token prompt, then 10 decode steps (recorded, then replayed), twice`, async (t) => {
      if (typeof runtime === 'string') return t.skip(runtime)
      const capacity = 48 + 40
      const gpu = await CapturedGpuFormModel.open(packageDir, {parallel, capacity}, runtime)
      const cpu = await ParScaleModel.open(packageDir)
      const cache = cpu.newCache(parallel)
      cache.reserve(1, capacity)
      const prompt = Array.from({length: 20}, (_, i) => (i * 37 + 11) % 4000)
      const worst: number[] = []
      try {
        for (let round = 0; round < 2; round++) {
          gpu.reset()
          cache.reset(0)
          let g = await gpu.step(prompt) // 16 + 4 tokens: two calls of the dynamic form
          let c = await cpu.forward(cache, 0, [prompt], 1)
          worst.push(maxDiff(g.logits, c.logits))
          for (let s = 0; s < 10; s++) {
            const next = argmax(c.logits)
            g = await gpu.step([next])
            c = await cpu.forward(cache, 0, [[next]], 1)
            worst.push(maxDiff(g.logits, c.logits))
            if (c.streamWeights) assert.ok(maxDiff(g.streamWeights, c.streamWeights) < 1e-5, 'stream weights')
            assert.ok(Math.abs(g.streamWeights.reduce((a, b) => a + b, 0) - 1) < 1e-5, 'stream weights sum to 1')
          }
          assert.equal(gpu.length, 30)
          assert.ok(gpu.captured)
        }
      } finally {
        cache.dispose()
        await cpu.release()
        await gpu.release()
      }
      const most = Math.max(...worst)
      if (process.env.PARSCALE_SHOW_DIFFS) console.log(`P=${parallel} on ${runtime.adapter}: worst |logit diff| ${most.toExponential(2)} over ${worst.length} steps`)
      assert.ok(most < 1e-4, `P=${parallel}: worst |logit diff| ${most}`)
    })
  }

  test('a full cache is refused in one line', async (t) => {
    if (typeof runtime === 'string') return t.skip(runtime)
    const gpu = await CapturedGpuFormModel.open(packageDir, {parallel: 1, capacity: 4}, runtime)
    try {
      await gpu.step([1, 2, 3])
      await gpu.step([4])
      await assert.rejects(gpu.step([5]), /the cache holds 4 tokens; 5 do not fit/)
    } finally {
      await gpu.release()
    }
  })
})

test('PARSCALE_WEBGPU_ROUTE picks the route (node by default); a wrong value is one line', async () => {
  const previous = process.env.PARSCALE_WEBGPU_ROUTE
  try {
    delete process.env.PARSCALE_WEBGPU_ROUTE
    assert.deepEqual(await chooseWebGpuRoute(), {route: 'node'})
    process.env.PARSCALE_WEBGPU_ROUTE = 'node'
    assert.deepEqual(await chooseWebGpuRoute(), {route: 'node'})
    process.env.PARSCALE_WEBGPU_ROUTE = 'fast'
    await assert.rejects(chooseWebGpuRoute(), /PARSCALE_WEBGPU_ROUTE must be node, capture or wgsl, not "fast"/)
  } finally {
    if (previous === undefined) delete process.env.PARSCALE_WEBGPU_ROUTE
    else process.env.PARSCALE_WEBGPU_ROUTE = previous
  }
})

test('without onnxruntime-web and Dawn, the route falls back to onnxruntime-node with one reason', () => {
  // PARSCALE_ORTWEB, when set, is the only place looked in
  const here = path.dirname(fileURLToPath(import.meta.url))
  const script = `
    const m = await import(${JSON.stringify(path.join(here, '..', 'src', 'core', 'engine', 'webgpu-capture.js'))})
    console.log(JSON.stringify(await m.chooseWebGpuRoute()))`
  const child = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
    cwd: os.tmpdir(),
    env: {...process.env, PARSCALE_ORTWEB: path.join(work, 'nothing'), NODE_PATH: '', PARSCALE_WEBGPU_ROUTE: 'capture'},
    encoding: 'utf8',
  })
  const choice = JSON.parse(child.stdout.trim().split('\n').at(-1) ?? '{}') as {route?: string; fallback?: string}
  assert.equal(choice.route, 'node', child.stderr)
  assert.match(choice.fallback ?? '', /onnxruntime-web and webgpu \(Dawn\) are not installed/)
})

test('through ParScaleModel (run, bench): two sequences taking turns and a cache that grows, as on the CPU', async (t) => {
  if (typeof runtime === 'string') return t.skip(runtime)
  const parallel = 2
  const previous = process.env.PARSCALE_WEBGPU_ROUTE
  process.env.PARSCALE_WEBGPU_ROUTE = 'capture' // opt-in
  const gpu = await ParScaleModel.open(packageDir, {device: 'webgpu', parallel: [parallel]}).finally(() => {
    if (previous === undefined) delete process.env.PARSCALE_WEBGPU_ROUTE
    else process.env.PARSCALE_WEBGPU_ROUTE = previous
  })
  const cpu = await ParScaleModel.open(packageDir)
  const caches = [gpu.newCache(parallel), cpu.newCache(parallel)]
  let worst = 0
  try {
    assert.equal(gpu.webgpuRoute?.route, 'capture', gpu.webgpuRoute?.fallback)
    assert.match(gpu.kernels(parallel).decode, /captured graph replayed/)
    for (const cache of caches) {
      cache.reserve(2, 40)
      cache.reset(0)
      cache.reset(1)
    }
    const both = async (rows: number[][], keep: number) => {
      const [g, c] = [await gpu.forward(caches[0]!, 0, rows, keep), await cpu.forward(caches[1]!, 0, rows, keep)]
      assert.deepEqual(g.dims, c.dims)
      worst = Math.max(worst, maxDiff(g.logits, c.logits))
      return c
    }
    // two prompts (logits of the last 3 positions), then steps for both rows: each step swaps the sequences in and out
    let out = await both([[5, 6, 7, 8, 9], [11, 12, 13, 14, 15]], 3)
    const nextOf = (o: {logits: Float32Array; dims: [number, number, number]}) => [0, 1].map((r) => [argmax(o.logits.subarray((r * o.dims[1] + o.dims[1] - 1) * o.dims[2], (r * o.dims[1] + o.dims[1]) * o.dims[2]))])
    for (let s = 0; s < 3; s++) out = await both(nextOf(out), 1)
    // a longer answer than reserved: the model is opened again with room for it, the resident sequence copied over
    for (const cache of caches) cache.reserve(2, 300)
    for (let s = 0; s < 3; s++) out = await both(nextOf(out), 1)
    assert.equal(caches[0]!.tokens(0), caches[1]!.tokens(0))
    assert.equal(caches[0]!.tokens(1), caches[1]!.tokens(1))
  } finally {
    for (const cache of caches) cache.dispose?.()
    await cpu.release()
    await gpu.release()
  }
  if (process.env.PARSCALE_SHOW_DIFFS) console.log(`ParScaleModel on the capture route, P=${parallel}, two sequences: worst |logit diff| ${worst.toExponential(2)}`)
  assert.ok(worst < 1e-4, `worst |logit diff| ${worst}`)
})
