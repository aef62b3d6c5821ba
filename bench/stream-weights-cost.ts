// `npm run bench:stream-weights [-- default|0.5b [P] [rounds]]`: what the graph's
// `stream_weights` output costs when nobody reads it. The same package runs with its graph, with
// a copy whose only change is that output removed (with the nodes that only fed it), and with a
// second session on the unchanged graph as an A/A control; decode steps and a 256-token scoring
// prefill rotate between the three sessions in one process, so all see the same machine.
// Run it under flock /tmp/parscale-bench.lock.
import {readFileSync, rmSync, writeFileSync} from 'node:fs'
import path from 'node:path'

import onnxProto from 'onnx-proto'

import {greedyDecodeStepMs} from '../src/core/bench/decode-steps.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'
import {io} from '../src/core/onnx/parscale-graph.js'
import {readManifest} from '../src/core/package/manifest.js'
import {resolveModel} from '../src/core/package/resolve.js'
import {ParScaleModel} from '../src/core/engine/model.js'

const {onnx} = onnxProto
const which = process.argv[2] ?? 'default'
const parallel = Number(process.argv[3] ?? 8)
const rounds = Number(process.argv[4] ?? 30)
const threads = Number(process.env.BENCH_THREADS ?? 2)
const log = (t: string) => process.stderr.write(`${t}\n`)

const packageDir = which === '0.5b'
  ? ensureSyntheticPackage(SYNTHETIC_PRESETS['0.5b']!, {parallel: [parallel], onProgress: log})
  : resolveModel(undefined, {parallel}).packageDir
const manifest = readManifest(packageDir)
// Next to the original, so the external weight files resolve the same way.
const strippedName = 'model.without-stream-weights.onnx'
const proto = onnx.ModelProto.decode(readFileSync(path.join(packageDir, manifest.graph)))
const outputs = proto.graph!.output!
proto.graph!.output = outputs.filter((o) => o.name !== io.streamWeights)
if (proto.graph!.output.length !== outputs.length - 1) throw new Error(`${manifest.graph} has no ${io.streamWeights} output`)
type NodeProto = NonNullable<NonNullable<typeof proto.graph>['node']>[number]
/** Every name a node reads, its `If` branches' nodes included (they read the outer graph's values by name). */
const reads = (node: NodeProto): string[] => [
  ...(node.input ?? []),
  ...(node.attribute ?? []).flatMap((a) => (a.g?.node ?? []).flatMap(reads)),
]
// Then the nodes that only fed it (the Reshape and its shape arithmetic), until none is left.
for (let removed = true; removed; ) {
  const used = new Set([...proto.graph!.output.map((o) => o.name), ...proto.graph!.node!.flatMap(reads)])
  const nodes = proto.graph!.node!.filter((n) => (n.output ?? []).some((o) => used.has(o)))
  removed = nodes.length < proto.graph!.node!.length
  proto.graph!.node = nodes
}
writeFileSync(path.join(packageDir, strippedName), onnx.ModelProto.encode(proto).finish())

const vocab = manifest.model.vocabSize
const prompt = Array.from({length: 64}, (_, i) => (i * 7919 + 13) % vocab)
const scored = Array.from({length: 256}, (_, i) => (i * 104729 + 7) % vocab)
const steps = 16

/** One round: prefill 64 tokens, `steps` greedy decode steps (ms each), then a 256-token prefill with every position's logits. */
async function round(model: ParScaleModel): Promise<{decode: number[]; score: number}> {
  const decode = await greedyDecodeStepMs(model, parallel, prompt, steps)
  const scoring = model.newCache(parallel)
  scoring.reserve(1, scored.length)
  scoring.reset(0)
  const t0 = performance.now()
  await model.forward(scoring, 0, [scored], 0)
  return {decode, score: performance.now() - t0}
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2
}

type Name = 'with' | 'without' | 'control'
try {
  // `control` is a second session on the unchanged graph: the A/A difference shows the noise.
  const models: Record<Name, ParScaleModel> = {
    with: await ParScaleModel.open(packageDir, {threads}),
    without: await ParScaleModel.open(packageDir, {threads, graphFile: strippedName}),
    control: await ParScaleModel.open(packageDir, {threads}),
  }
  const names: Name[] = ['with', 'without', 'control']
  const decode: Record<Name, number[]> = {with: [], without: [], control: []}
  const score: Record<Name, number[]> = {with: [], without: [], control: []}
  for (const name of names) await round(models[name]) // warm-up
  for (let r = 0; r < rounds; r++) {
    // Rotate the order, so drift in the machine's load falls on all three alike.
    for (let i = 0; i < names.length; i++) {
      const name = names[(i + r) % names.length]!
      const t = await round(models[name])
      decode[name].push(median(t.decode))
      score[name].push(t.score)
    }
  }
  // Paired per round, then the median and the middle half of those differences.
  const spread = (a: number[], b: number[]) => {
    const d = a.map((x, i) => x - b[i]!).sort((x, y) => x - y)
    return {median: median(d), low: d[Math.floor(d.length / 4)]!, high: d[Math.floor((3 * d.length) / 4)]!}
  }
  const line = (what: string, times: Record<Name, number[]>, digits: number) => {
    const base = median(times.without)
    const ab = spread(times.with, times.without)
    const aa = spread(times.control, times.with)
    const f = (v: number) => v.toFixed(digits)
    return `${what}: without ${f(base)} ms; with − without ${f(ab.median)} ms (${((ab.median / base) * 100).toFixed(2)} %, middle half ${f(ab.low)} … ${f(ab.high)}); ` +
      `A/A control − with ${f(aa.median)} ms (middle half ${f(aa.low)} … ${f(aa.high)})`
  }
  console.log(`${which} model, P=${parallel}, ${threads} threads, ${rounds} rounds; per round and session: the median of ${steps} decode steps (batch 1, after a 64-token prompt) and one 256-token scoring prefill (logits for every position)`)
  console.log(line('decode step', decode, 3))
  console.log(line('scoring prefill', score, 2))
  await Promise.all(names.map((name) => models[name].release()))
} finally {
  rmSync(path.join(packageDir, strippedName), {force: true})
}
