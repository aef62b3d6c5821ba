// `node dist/bench/attention-layouts.js [CAPACITY...]`: the decode step's attention core alone
// (scores against the cache, softmax, values), 24 layers of the 0.5b shape at P = 8, for each
// cache layout, so the cost of reading the cache can be compared without the weights around it.
// Layouts run in paired, alternating rounds (BENCH_ROUNDS, default 5); each round times
// BENCH_STEPS runs (default 20) of each layout and keeps the median.
//   keys-transposed: q [g, d] · Kᵀ [d, C], p [g, C] · V [C, d] (graph 8: the cache is MatMul's second operand)
//   cache-first:     K [C, d] · qᵀ [d, g], Vᵀ [d, C] · pᵀ [C, g] (the cache is the first operand; scores transposed to rows)
//   rows-per-head:   every query head a 1-row product: q [1, d] · (K [C, d])ᵀ, p [1, C] · V [C, d] (cache in rows)
//   hybrid:          scores as rows-per-head, values as cache-first
//   values-in-blocks: as cache-first, values stored [C / 64, d, 64] (a sum over blocks of Vᵀ·pᵀ)
//   values-rows:     as cache-first, values stored in rows [C, d] like the keys; Vᵀ·pᵀ through transA
//                    (MLAS transposes A's blocks into its own panel as it goes: the cache read in rows)
//   graph10:         the decode branch as shipped (blocks.ts attentionCore): cache first, results
//                    turned to rows by I·Xᵀ, the mask added, the new token's score concatenated, softmax,
//                    two slices, the new token's value added
//   graph10-reduce:  the same products, the softmax taken apart so nothing of [g, C] is concatenated
//                    or sliced: max over the cache and the new token, exp, sums, one division of [g, d]
import os from 'node:os'

import ort from 'onnxruntime-node'

import {GraphBuilder} from '../src/core/onnx/builder.js'
import {Ops} from '../src/core/onnx/ops.js'
import {pairedRounds} from '../src/core/bench/paired.js'
import {median} from '../src/core/bench/stats.js'

const layers = 24
const rows = 8 // batch · P
const kv = 2
const group = 7
const d = 64
const capacities = process.argv.slice(2).map(Number).filter((n) => n > 0)
if (capacities.length === 0) capacities.push(128, 1088)
const rounds = Number(process.env.BENCH_ROUNDS ?? 5)
const steps = Number(process.env.BENCH_STEPS ?? 20)
const threads = Number(process.env.BENCH_THREADS ?? 2)

type Layout = 'keys-transposed' | 'cache-first' | 'rows-per-head' | 'hybrid' | 'values-in-blocks' | 'values-rows' | 'graph10' | 'graph10-reduce'
const layouts: Layout[] = (process.env.BENCH_LAYOUTS?.split(',') as Layout[] | undefined) ?? ['keys-transposed', 'cache-first', 'rows-per-head', 'hybrid', 'values-in-blocks', 'values-rows']
/** The layouts of graph 10's decode branch and its taken-apart softmax, which also read the new token's key and value and the mask. */
const decodeBranch = (layout: Layout) => layout === 'graph10' || layout === 'graph10-reduce'
/** Positions per block of the blocked value layout [C / block, d, block]. */
const block = 64
/** Each layout's cache shapes [keys, values] for capacity C. */
function cacheDims(layout: Layout, capacity: number | string): [(number | string)[], (number | string)[]] {
  const rowsOf = [rows, kv, capacity, d]
  const transposed = [rows, kv, d, capacity]
  if (layout === 'keys-transposed') return [transposed, rowsOf]
  if (layout === 'cache-first' || layout === 'hybrid' || decodeBranch(layout)) return [rowsOf, transposed]
  if (layout === 'values-in-blocks') return [rowsOf, [rows, kv, typeof capacity === 'number' ? capacity / block : 'blocks', d, block]]
  return [rowsOf, rowsOf]
}

/** The graph of one layout: inputs q [rows, kv, g, d] per call and per layer K, V in the layout's order. */
function build(layout: Layout): Uint8Array {
  const g = new GraphBuilder(layout)
  const ops = new Ops(g)
  const transB = (a: string, b: string) => g.node('FusedMatMul', [a, b], {transB: 1}, 'com.microsoft')
  const q = g.input('q', 'float32', [rows, kv, group, d])
  // the shipped decode branch's other inputs: the new token's key and value, the cache mask
  const shipped = decodeBranch(layout)
  const newKey = shipped ? g.input('newKey', 'float32', [rows, kv, 1, d]) : ''
  const newValue = shipped ? g.input('newValue', 'float32', [rows, kv, d, 1]) : ''
  const mask = shipped ? g.input('mask', 'float32', [rows, 1, 1, 'C']) : ''
  const identity = g.float(Array.from({length: group * group}, (_, i) => (i % (group + 1) === 0 ? 1 : 0)), [group, group])
  const toRows = (x: string) => transB(identity, x)
  const outs: string[] = []
  for (let layer = 0; layer < layers; layer++) {
    const [keyShape, valueShape] = cacheDims(layout, 'C')
    const k = g.input(`k${layer}`, 'float32', keyShape)
    const v = g.input(`v${layer}`, 'float32', valueShape)
    let context: string
    if (layout === 'keys-transposed') {
      // graph 8: q·Kᵀ and p·V, the cache as the second operand
      context = ops.matmul(ops.softmax(ops.matmul(q, k), -1), v) // [rows, kv, g, d]
    } else if (layout === 'cache-first') {
      // K·qᵀ turned to rows for the softmax, Vᵀ·pᵀ turned back
      const probs = ops.softmax(ops.transpose(transB(k, q), [0, 1, 3, 2]), -1) // [rows, kv, g, C]
      context = ops.transpose(transB(v, probs), [0, 1, 3, 2])
    } else if (layout === 'graph10') {
      const scores = ops.add(toRows(transB(k, q)), mask) // [rows, kv, g, C]
      const probs = ops.softmax(ops.concat([scores, transB(q, newKey)], 3), -1)
      const onCache = ops.slice(probs, g.int64([0]), g.int64([-1]), 3)
      const onNew = ops.slice(probs, g.int64([-1]), g.int64([Number.MAX_SAFE_INTEGER]), 3)
      context = ops.add(toRows(transB(v, onCache)), transB(onNew, newValue))
    } else if (layout === 'graph10-reduce') {
      const scores = ops.add(toRows(transB(k, q)), mask) // [rows, kv, g, C]
      const own = transB(q, newKey) // [rows, kv, g, 1]
      const top = g.node('Max', [g.node('ReduceMax', [scores], {axes: [-1], keepdims: 1}), own])
      const weights = g.node('Exp', [ops.sub(scores, top)])
      const ownWeight = g.node('Exp', [ops.sub(own, top)])
      const total = ops.add(ops.reduceSum(weights, [-1]), ownWeight)
      context = ops.div(ops.add(toRows(transB(v, weights)), transB(ownWeight, newValue)), total)
    } else if (layout === 'values-rows') {
      // as cache-first, values in rows [C, d]: Vᵀ·pᵀ with transA (MLAS transposes blocks of A as it reads them)
      const probs = ops.softmax(ops.transpose(transB(k, q), [0, 1, 3, 2]), -1) // [rows, kv, g, C]
      context = ops.transpose(g.node('FusedMatMul', [v, probs], {transA: 1, transB: 1}, 'com.microsoft'), [0, 1, 3, 2])
    } else if (layout === 'values-in-blocks') {
      // as cache-first, values stored [C / block, d, block]: each block's product reads contiguous memory
      const probs = ops.softmax(ops.transpose(transB(k, q), [0, 1, 3, 2]), -1) // [rows, kv, g, C]
      const perBlock = ops.transpose(ops.reshape(probs, g.int64([rows, kv, group, -1, block])), [0, 1, 3, 2, 4]) // [rows, kv, blocks, g, block]
      context = ops.transpose(ops.reduceSum(transB(v, perBlock), [2], 0), [0, 1, 3, 2]) // Σ over blocks of [d, g]
    } else {
      // one 1-row product per query head: q_h·Kᵀ reads K in rows (MLAS's M = 1 kernels pack nothing)
      const probs = ops.softmax(transB(ops.unsqueeze(q, [3]), ops.unsqueeze(k, [2])), -1) // [rows, kv, g, 1, C]
      context =
        layout === 'rows-per-head'
          ? ops.reshape(ops.matmul(probs, ops.unsqueeze(v, [2])), g.int64([rows, kv, group, d]))
          : ops.transpose(transB(v, ops.reshape(probs, g.int64([rows, kv, group, -1]))), [0, 1, 3, 2])
    }
    outs.push(context)
  }
  g.output(ops.concat(outs, 0), 'out', 'float32', null)
  return g.toModelBytes('bench')
}

function random(n: number): Float32Array {
  const a = new Float32Array(n)
  for (let i = 0; i < n; i++) a[i] = Math.random() - 0.5
  return a
}

const log = (t: string) => process.stderr.write(`${t}\n`)
const sessions = new Map<Layout, ort.InferenceSession>()
for (const layout of layouts) {
  sessions.set(layout, await ort.InferenceSession.create(build(layout), {graphOptimizationLevel: 'all', executionMode: 'sequential', intraOpNumThreads: threads, interOpNumThreads: 1}))
}
const q = new ort.Tensor('float32', random(rows * kv * group * d), [rows, kv, group, d])
const newKey = new ort.Tensor('float32', random(rows * kv * d), [rows, kv, 1, d])
const newValue = new ort.Tensor('float32', random(rows * kv * d), [rows, kv, d, 1])
console.log(`attention core, ${layers} layers, rows ${rows}, kv ${kv}, group ${group}, d ${d}, ${threads} threads; ${rounds} rounds × ${steps} runs; load ${os.loadavg()[0]!.toFixed(2)}`)
for (const capacity of capacities) {
  const feeds = new Map<Layout, Record<string, ort.Tensor>>()
  for (const layout of layouts) {
    const f: Record<string, ort.Tensor> = {q}
    // the decode branch's extra inputs (the last 32 positions empty, as a cache with room left)
    if (decodeBranch(layout)) Object.assign(f, {newKey, newValue, mask: new ort.Tensor('float32', Float32Array.from({length: rows * capacity}, (_, i) => (i % capacity < capacity - 32 ? 0 : -1e30)), [rows, 1, 1, capacity])})
    for (let layer = 0; layer < layers; layer++) {
      const [keyDims, valueDims] = cacheDims(layout, capacity) as [number[], number[]]
      if (capacity % block !== 0) throw new Error(`capacity ${capacity} is not a multiple of ${block}`)
      f[`k${layer}`] = new ort.Tensor('float32', random(rows * kv * d * capacity), keyDims)
      f[`v${layer}`] = new ort.Tensor('float32', random(rows * kv * d * capacity), valueDims)
    }
    feeds.set(layout, f)
    await sessions.get(layout)!.run(f) // warm-up
  }
  const result = await pairedRounds(
    rounds,
    layouts.map((layout) => ({
      name: layout,
      run: async () => {
        const times: number[] = []
        for (let i = 0; i < steps; i++) {
          const t0 = performance.now()
          await sessions.get(layout)!.run(feeds.get(layout)!)
          times.push(performance.now() - t0)
        }
        return median(times)
      },
    })),
    log,
  )
  const cacheBytes = 2 * layers * rows * kv * d * capacity * 4
  for (const layout of layouts) {
    const ms = result.map((r) => r.results[layout]!)
    const ratios = result.map((r) => r.results[layout]! / r.results['keys-transposed']!)
    console.log(`C ${capacity}: ${layout.padEnd(16)} ${median(ms).toFixed(2)} ms (${ms.map((m) => m.toFixed(1)).join(', ')}), ${(cacheBytes / median(ms) / 1e6).toFixed(1)} GB/s, vs keys-transposed ${median(ratios).toFixed(2)} (${Math.min(...ratios).toFixed(2)}–${Math.max(...ratios).toFixed(2)})`)
  }
}
