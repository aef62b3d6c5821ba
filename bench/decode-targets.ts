// `npm run bench:decode`: the performance targets on the 0.5b synthetic shape
// (fp32, batch 1, prompt 64, 32 new tokens, 2 threads). Prints each target, met or not.
import {decodeVsFloor, prefillVsRate, renderTable} from '../src/ui/bench-report.js'
import {benchMachine, benchPackage, probeRoofline, type BenchReport} from '../src/core/bench/run-bench.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'

const threads = Number(process.env.BENCH_THREADS ?? 2)
const shape = SYNTHETIC_PRESETS['0.5b']!
const log = (t: string) => process.stderr.write(`${t}\n`)
const packageDir = ensureSyntheticPackage(shape, {parallel: [1, 8], onProgress: log})
const roofline = await probeRoofline(threads, shape.hiddenSize, shape.intermediateSize, log)
const results = await benchPackage(packageDir, {parallel: [1, 8], batch: [1], promptLengths: [64], newTokens: 32, threads, repeat: 3, onStatus: log})
const report: BenchReport = {machine: benchMachine(threads), model: 'synthetic 0.5b, fp32', roofline, results}
console.log(renderTable(report))

const [p1, p8] = [results.find((r) => r.parallel === 1)!, results.find((r) => r.parallel === 8)!]
const checks: [string, number, number, boolean][] = [
  ['decode P=1 vs bandwidth floor (≥ 75%)', decodeVsFloor(p1, roofline), 0.75, true],
  ['decode P=8 / decode P=1 (≤ 1.3)', p8.decode_ms_per_token.median / p1.decode_ms_per_token.median, 1.3, false],
  ['prefill P=8 vs matmul FLOP rate (≥ 70%)', prefillVsRate(p8, roofline), 0.7, true],
  ...results.map((r): [string, number, number, boolean] => [
    `peak RSS P=${r.parallel} / (1.25 × weights + 300 MB) (≤ 1)`, r.peak_rss_bytes / (1.25 * r.weight_bytes + 300e6), 1, false,
  ]),
]
for (const [name, value, target, atLeast] of checks) {
  const met = atLeast ? value >= target : value <= target
  console.log(`${met ? 'MET   ' : 'MISSED'} ${name}: ${value.toFixed(2)}`)
}
