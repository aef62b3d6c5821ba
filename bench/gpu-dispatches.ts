// `npm run bench:gpu-dispatches`: kernel launches per decode step of the 0.5b synthetic's GPU
// graphs, before (WebGPU graph) and after (GPU form), at P = 1 and 8, counted from the graphs
// as ONNX Runtime optimizes them (no GPU needed), and the decode floor on an H200 (issue 23:
// ≤ 300 at P = 8). BENCH_SHAPE picks another preset (e.g. 1.8b).
import {describeGpuDispatches, gpuDispatches} from '../src/core/bench/gpu-dispatches.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'

const preset = process.env.BENCH_SHAPE ?? '0.5b'
const shape = SYNTHETIC_PRESETS[preset]!
const report = await gpuDispatches(shape, [1, 8], process.env.BENCH_ADAPTER ?? 'NVIDIA H200')
console.log(`synthetic ${preset} (${shape.numLayers} layers), fp32`)
for (const line of describeGpuDispatches(report)) console.log(line)
for (const row of report.rows) {
  console.log(`  P=${row.parallel} before by operator: ${JSON.stringify(row.before.byOp)}`)
  console.log(`  P=${row.parallel} after by operator:  ${JSON.stringify(row.after.byOp)}`)
}
const p8 = report.rows.find((r) => r.parallel === 8)!
console.log(`${p8.after.dispatches <= 300 ? 'MET   ' : 'MISSED'} dispatching nodes per decode step at P=8 (≤ 300): ${p8.after.dispatches}`)
console.log(`${p8.after.programs <= 300 ? 'MET   ' : 'MISSED'} estimated kernel launches per decode step at P=8 (≤ 300): ${p8.after.programs}`)
