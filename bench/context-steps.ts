// `npm run bench:context-steps`: P = 8 decode at prompt 1024 against prompt 64 (issue 24's
// target ≤ 1.10), measured step by step in one process: both caches prefilled once, then one
// decode step on each in turn (BENCH_STEPS turns, default 40). Each turn gives one ratio; the
// target is judged on their median, printed with the quartiles and the load average.
// BENCH_PROMPTS (default "64,1024") and BENCH_PARALLEL (default 8) pick other shapes;
// BENCH_GRAPH=FILE.onnx runs another graph over the same package (A/B of graph versions);
// BENCH_PROFILE=PREFIX writes an ONNX Runtime profile and prints kernel ms per step by operator
// (an If's time includes its branch's kernels, which are listed too).
import {copyFileSync, rmSync} from 'node:fs'
import path from 'node:path'

import {interleavedDecode, medianWithQuartiles, type InterleavedResult} from '../src/core/bench/interleaved-decode.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import {median} from '../src/core/bench/stats.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'

const threads = Number(process.env.BENCH_THREADS ?? 2)
const steps = Number(process.env.BENCH_STEPS ?? 40)
const parallel = Number(process.env.BENCH_PARALLEL ?? 8)
const prompts = (process.env.BENCH_PROMPTS ?? '64,1024').split(',').map(Number)
const log = (t: string) => process.stderr.write(`${t}\n`)
const packageDir = ensureSyntheticPackage(SYNTHETIC_PRESETS['0.5b']!, {parallel: [1, parallel], onProgress: log})
const profilePrefix = process.env.BENCH_PROFILE
// BENCH_GRAPH=FILE.onnx: that graph over the package's weights instead of its own (an older GRAPH_VERSION's
// model.onnx of the same package, for an A/B), copied next to it so its external weights resolve
const otherGraph = process.env.BENCH_GRAPH
const graphFile = otherGraph ? 'model.context-steps-other.onnx' : undefined
if (otherGraph) copyFileSync(otherGraph, path.join(packageDir, graphFile!))
let result: InterleavedResult
try {
  result = await interleavedDecode({packageDir, parallel, prompts, steps, threads, onStatus: log, ...(profilePrefix ? {profilePrefix} : {}), ...(graphFile ? {graphFile} : {})})
} finally {
  if (graphFile) rmSync(path.join(packageDir, graphFile), {force: true})
}

console.log(`0.5b synthetic fp32, P = ${parallel}, ${threads} threads, ${steps} interleaved decode steps per prompt; load ${result.load[0].toFixed(2)} → ${result.load[1].toFixed(2)}`)
console.log('')
console.log('| prompt | prefill s | decode ms/step, median (q1–q3) | step / prompt ' + prompts[0] + "'s, same turn: median (q1–q3) |")
console.log('|---|---|---|---|')
for (const p of prompts) {
  console.log(`| ${p} | ${(result.prefillMs[p]! / 1000).toFixed(1)} | ${medianWithQuartiles(result.stepMs[p]!, 1)} | ${medianWithQuartiles(result.ratios[p]!, 3)} |`)
}
const long = prompts.at(-1)!
const ratio = median(result.ratios[long]!)
console.log('')
console.log(`target: P=${parallel} decode at prompt ${long} / at prompt ${prompts[0]} ≤ 1.10: ${ratio.toFixed(3)} ${ratio <= 1.1 ? 'met' : 'MISSED'}`)

if (result.opMs) {
  const first = result.opMs[prompts[0]!] ?? {}
  const last = result.opMs[long] ?? {}
  const ops = [...new Set([...Object.keys(first), ...Object.keys(last)])].sort((a, b) => (last[b] ?? 0) - (last[a] ?? 0))
  console.log('')
  console.log(`| kernel ms per step (profiled) | prompt ${prompts[0]} | prompt ${long} | difference |`)
  console.log('|---|---|---|---|')
  for (const op of ops.filter((o) => Math.max(first[o] ?? 0, last[o] ?? 0) >= 0.2)) {
    console.log(`| ${op} | ${(first[op] ?? 0).toFixed(2)} | ${(last[op] ?? 0).toFixed(2)} | ${((last[op] ?? 0) - (first[op] ?? 0)).toFixed(2)} |`)
  }
}
