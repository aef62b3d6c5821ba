// `node dist/bench/graph-ab.js PACKAGE_DIR OTHER_GRAPH.onnx [P] [rounds]`: decode-step time of a
// package's graph against another graph over the same weights (e.g. the previous GRAPH_VERSION's
// model.onnx, converted from the same checkpoint), in one process: the package's graph, the
// other graph, and a second session on the package's graph as an A/A control take turns, a
// round each (a 64-token prompt, then 16 decode steps), the order rotated every round, so all
// see the same machine. Prints per-round medians and the median (min–max) of the per-round
// ratios. The other graph is copied next to the package's so its external weights resolve;
// it must read the same weight file layout. Run it under flock /tmp/parscale-bench.lock.
import {copyFileSync, rmSync} from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {greedyDecodeStepMs} from '../src/core/bench/decode-steps.js'
import {median} from '../src/core/bench/stats.js'
import {ParScaleModel} from '../src/core/engine/model.js'
import {readManifest} from '../src/core/package/manifest.js'

const [packageDir, otherGraph] = process.argv.slice(2)
if (!packageDir || !otherGraph) {
  console.error('usage: graph-ab PACKAGE_DIR OTHER_GRAPH.onnx [P] [rounds]')
  process.exit(1)
}
const parallel = Number(process.argv[4] ?? 1)
const rounds = Number(process.argv[5] ?? 9)
const threads = Number(process.env.BENCH_THREADS ?? 2)
const steps = 16
const manifest = readManifest(packageDir)
const otherName = 'model.graph-ab-other.onnx'
copyFileSync(otherGraph, path.join(packageDir, otherName))

const vocab = manifest.model.vocabSize
const prompt = Array.from({length: 64}, (_, i) => (i * 7919 + 13) % vocab)

/** One round: prefill the prompt, then `steps` greedy decode steps; the median step ms. */
const round = async (model: ParScaleModel) => median(await greedyDecodeStepMs(model, parallel, prompt, steps))

type Name = 'package' | 'other' | 'control'
try {
  // widenDecode off: the other graph has no widened twin of its own (P ≥ 4 of a quantized package would run the package's)
  const open = (graphFile?: string) => ParScaleModel.open(packageDir, {threads, parallel: [parallel], widenDecode: false, ...(graphFile ? {graphFile} : {})})
  // Sessions opened first can run faster or slower than later ones over the same weights (seen
  // at fp32: where the kernel packs them); GRAPH_AB_OTHER_FIRST=1 opens the other graph first.
  const otherFirst = process.env.GRAPH_AB_OTHER_FIRST === '1'
  const first = otherFirst ? await open(otherName) : await open()
  const models: Record<Name, ParScaleModel> = otherFirst ? {other: first, package: await open(), control: await open()} : {package: first, other: await open(otherName), control: await open()}
  const names: Name[] = ['package', 'other', 'control']
  const ms: Record<Name, number[]> = {package: [], other: [], control: []}
  const loads: number[] = []
  for (const name of names) await round(models[name]) // warm-up
  for (let r = 0; r < rounds; r++) {
    loads.push(os.loadavg()[0]!)
    for (let i = 0; i < names.length; i++) {
      const name = names[(i + r) % names.length]!
      ms[name].push(await round(models[name]))
    }
  }
  const ratio = (a: number[], b: number[]) => {
    const rs = a.map((x, i) => x / b[i]!)
    return `${median(rs).toFixed(3)} (${Math.min(...rs).toFixed(3)}–${Math.max(...rs).toFixed(3)})`
  }
  console.log(`${packageDir}, P=${parallel}, opened ${otherFirst ? 'other, package, control' : 'package, other, control'}, ${threads} threads, ${rounds} rounds of ${steps} decode steps after a 64-token prompt; load ${loads.map((l) => l.toFixed(2)).join(' ')}`)
  for (const name of names) console.log(`${name}: median ${median(ms[name]).toFixed(2)} ms/step (rounds ${ms[name].map((v) => v.toFixed(1)).join(' ')})`)
  console.log(`package / other: ${ratio(ms.package, ms.other)}; control / other: ${ratio(ms.control, ms.other)}; control / package (A/A): ${ratio(ms.control, ms.package)}`)
  await Promise.all(names.map((name) => models[name].release()))
} finally {
  rmSync(path.join(packageDir, otherName), {force: true})
}
