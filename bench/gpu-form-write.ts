// `npm run bench:gpu-form-write`: time to write a package's gpu-form.weights (the GPU form's
// transposed float matrices, written at the first WebGPU open), and the peak RSS of doing so.
// The file is removed first so every run measures the first open's write.
// Env: BENCH_SHAPE (0.5b), BENCH_DIMS (JSON overrides).
import fs from 'node:fs'
import {join} from 'node:path'

import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import {syntheticShape} from '../src/core/checkpoint/synthetic.js'
import {packageLaidOutWeights} from '../src/core/engine/gpu-form.js'
import {GPU_FORM_WEIGHTS} from '../src/core/engine/gpu-form-weights.js'
import {readManifest} from '../src/core/package/manifest.js'

const preset = process.env.BENCH_SHAPE ?? '0.5b'
const shape = syntheticShape(preset, JSON.parse(process.env.BENCH_DIMS ?? '{}') as Record<string, number>)
const packageDir = ensureSyntheticPackage(shape, {parallel: [1], onProgress: (t) => process.stderr.write(`${t}\n`)})
for (const name of [GPU_FORM_WEIGHTS, 'gpu-form.json']) fs.rmSync(join(packageDir, name), {force: true})
const manifest = readManifest(packageDir)
const rssBefore = process.memoryUsage().rss
const started = performance.now()
packageLaidOutWeights(packageDir, manifest)
const seconds = (performance.now() - started) / 1000
const bytes = fs.statSync(join(packageDir, GPU_FORM_WEIGHTS)).size
const peakMB = Number(/VmHWM:\s+(\d+)/.exec(fs.readFileSync('/proc/self/status', 'utf8'))?.[1] ?? 0) / 1024
console.log(JSON.stringify({shape: preset, bytes, seconds: Number(seconds.toFixed(2)), gbPerSecond: Number((bytes / 1e9 / seconds).toFixed(2)), rssBeforeMB: Math.round(rssBefore / 2 ** 20), peakRssMB: Math.round(peakMB)}))
