// `npm run bench:decode`: the performance targets on the 0.5b synthetic shape (fp32, batch 1,
// prompt 64, 32 new tokens, 2 threads). P = 1 and P = 8 run in paired, alternating rounds
// (BENCH_ROUNDS, default 3); each ratio is judged per round and reported as median and spread.
import {decodeVsFloor, prefillVsRate, renderTable} from '../src/ui/bench-report.js'
import {benchMachine, benchPackage, probeRoofline, type BenchReport} from '../src/core/bench/run-bench.js'
import {loadLine, pairedRounds, perRound, roundsFromEnv, targetLine} from '../src/core/bench/paired.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import type {RunResult} from '../src/core/bench/types.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'

const threads = Number(process.env.BENCH_THREADS ?? 2)
const repeat = Number(process.env.BENCH_REPEAT ?? 3)
const shape = SYNTHETIC_PRESETS['0.5b']!
const log = (t: string) => process.stderr.write(`${t}\n`)
const packageDir = ensureSyntheticPackage(shape, {parallel: [1, 8], onProgress: log})
const roofline = await probeRoofline(threads, shape.hiddenSize, shape.intermediateSize, log)
const one = async (parallel: number): Promise<RunResult> =>
  (await benchPackage(packageDir, {parallel: [parallel], batch: [1], promptLengths: [64], newTokens: 32, threads, repeat, onStatus: log}))[0]!
const rounds = await pairedRounds(roundsFromEnv(), [{name: 'p1', run: () => one(1)}, {name: 'p8', run: () => one(8)}], log)
const last = rounds.at(-1)!.results
const report: BenchReport = {machine: benchMachine(threads), model: 'synthetic 0.5b, fp32 (last round)', roofline, results: [last.p1!, last.p8!]}
console.log(renderTable(report))

const decode = (r: RunResult) => r.decode_ms_per_token.median
console.log('')
console.log('| round | load | P=1 decode ms | P=8 decode ms | P=8 / P=1 |')
console.log('|---|---|---|---|---|')
for (const r of rounds) console.log(`| ${r.round} | ${r.load.toFixed(2)} | ${decode(r.results.p1!).toFixed(1)} | ${decode(r.results.p8!).toFixed(1)} | ${(decode(r.results.p8!) / decode(r.results.p1!)).toFixed(2)} |`)
console.log(loadLine(rounds))
const targets = [
  {name: 'decode P=1 vs bandwidth floor (≥ 0.75)', figure: perRound(rounds, (r) => decodeVsFloor(r.p1!, roofline)), limit: 0.75, atLeast: true},
  {name: 'decode P=8 / decode P=1 (≤ 1.2)', figure: perRound(rounds, (r) => decode(r.p8!) / decode(r.p1!)), limit: 1.2, rule: 'every round' as const},
  {name: 'prefill P=8 vs matmul FLOP rate (≥ 0.70)', figure: perRound(rounds, (r) => prefillVsRate(r.p8!, roofline)), limit: 0.7, atLeast: true},
  ...(['p1', 'p8'] as const).map((side) => ({
    name: `peak RSS ${side.toUpperCase()} / (1.25 × weights + 300 MB) (≤ 1)`,
    figure: perRound(rounds, (r) => r[side]!.peak_rss_bytes / (1.25 * r[side]!.weight_bytes + 300e6)), limit: 1,
  })),
]
for (const target of targets) console.log(targetLine(target))
