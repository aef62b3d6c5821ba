// `node dist/bench/gemm-rows.js [P]` (default 8): what ONNX Runtime's CPU GEMM (MLAS) charges for
// P rows against one, product by product, on a float32 model's layer products as the CPU graph
// runs them at decode (`Gemm`, weights [out, in] with transB, prepacked by ONNX Runtime at load):
// q·k·v (with its bias), o_proj, gate·up and down of the 0.5b shape (BENCH_SHAPE: 0.5b or 1.8b),
// one session of 24 products each, nothing else in the graph. Paired, alternating rounds
// (BENCH_ROUNDS, default 5) of BENCH_STEPS runs (default 5); prints the median ms of each row
// count, the weights' read rate at one row, and the median of the per-round ratios.
//
// Why: issue 24's "fp32 P = 8 ≤ 1.2 × P = 1" is a decode step whose time is these products, and
// the per-product ratio is a floor the graph cannot go under (docs/benchmarks.md, "fp32 P = 8
// against P = 1: the GEMM at 8 rows").
import os from 'node:os'

import ort from 'onnxruntime-node'

import {syntheticShape} from '../src/core/checkpoint/synthetic.js'
import {pairedRounds} from '../src/core/bench/paired.js'
import {median} from '../src/core/bench/stats.js'
import {GraphBuilder} from '../src/core/onnx/builder.js'

const parallel = Number(process.argv[2] ?? 8)
const rounds = Number(process.env.BENCH_ROUNDS ?? 5)
const steps = Number(process.env.BENCH_STEPS ?? 5)
const threads = Number(process.env.BENCH_THREADS ?? 2)
const shape = syntheticShape(process.env.BENCH_SHAPE ?? '0.5b')
const H = shape.hiddenSize
const qkv = (shape.numHeads + 2 * shape.numKvHeads) * (H / shape.numHeads)
const products: {name: string; k: number; n: number; bias: boolean}[] = [
  {name: 'q·k·v', k: H, n: qkv, bias: true},
  {name: 'o_proj', k: H, n: H, bias: false},
  {name: 'gate·up', k: H, n: 2 * shape.intermediateSize, bias: false},
  {name: 'down', k: shape.intermediateSize, n: H, bias: false},
]

/** Small random weights (their values do not change a float GEMM's time). */
function weights(n: number): Float32Array {
  const a = new Float32Array(n)
  for (let i = 0; i < n; i++) a[i] = (Math.random() - 0.5) * 0.02
  return a
}

/** `layers` independent products of one input [rows, k], each summed to a scalar so that every one runs. */
function build(k: number, n: number, bias: boolean): Uint8Array {
  const g = new GraphBuilder('gemm-rows')
  const x = g.input('x', 'float32', ['rows', k])
  let total: string | undefined
  for (let layer = 0; layer < shape.numLayers; layer++) {
    const inputs = [x, g.inlineFloat(`w${layer}`, weights(n * k), [n, k])]
    if (bias) inputs.push(g.inlineFloat(`b${layer}`, weights(n), [n]))
    const sum = g.node('ReduceSum', [g.node('Gemm', inputs, {transB: 1})], {keepdims: 0})
    total = total === undefined ? sum : g.node('Add', [total, sum])
  }
  g.output(total!, 'total', 'float32', null)
  return g.toModelBytes('bench')
}

const log = (t: string) => process.stderr.write(`${t}\n`)
console.log(`Gemm (transB, prepacked) at 1 and ${parallel} rows, ${shape.numLayers} products each, ${threads} threads; ${rounds} rounds × ${steps} runs; load ${os.loadavg()[0]!.toFixed(2)}`)
console.log('| product | k × n | 1 row ms | read rate at 1 row | ' + parallel + ' rows ms | ' + parallel + ' rows / 1 row (median, min–max) |')
console.log('|---|---|---|---|---|---|')
for (const p of products) {
  const session = await ort.InferenceSession.create(build(p.k, p.n, p.bias), {graphOptimizationLevel: 'all', executionMode: 'sequential', intraOpNumThreads: threads, interOpNumThreads: 1})
  const feeds = (rows: number) => ({x: new ort.Tensor('float32', weights(rows * p.k), [rows, p.k])})
  const side = (rows: number) => {
    const f = feeds(rows)
    return {
      name: String(rows),
      run: async () => {
        await session.run(f) // warm: the weights back in the cache hierarchy's steady state
        const times: number[] = []
        for (let i = 0; i < steps; i++) {
          const t0 = performance.now()
          await session.run(f)
          times.push(performance.now() - t0)
        }
        return median(times)
      },
    }
  }
  const result = await pairedRounds(rounds, [side(1), side(parallel)], log)
  const one = result.map((r) => r.results['1']!)
  const many = result.map((r) => r.results[String(parallel)]!)
  const ratios = result.map((r) => r.results[String(parallel)]! / r.results['1']!)
  const bytes = shape.numLayers * p.k * p.n * 4
  console.log(`| ${p.name} | ${p.k} × ${p.n} | ${median(one).toFixed(2)} | ${(bytes / median(one) / 1e6).toFixed(1)} GB/s | ${median(many).toFixed(2)} | ${median(ratios).toFixed(2)} (${Math.min(...ratios).toFixed(2)}–${Math.max(...ratios).toFixed(2)}) |`)
  await session.release()
}
