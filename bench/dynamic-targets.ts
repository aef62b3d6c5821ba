// `npm run bench:dynamic`: dynamic-P targets (issue 12) on the 0.5b synthetic family (P = 1, 2,
// 4, 8 over one backbone), fp32, 2 threads: peak RSS of one process running a mixed batch
// against the same batch at P = 8 alone, decode per P against the previous parscale's
// single-P sessions (PARSCALE_BASELINE), and the cost of switching P (its prefixes and head).
// Each side runs once per round, in paired, alternating rounds (BENCH_ROUNDS, default 3).
import {formatBytes} from '../src/core/format.js'
import {runWorker} from '../src/core/bench/child.js'
import {benchMachine, benchPackage, type BenchReport} from '../src/core/bench/run-bench.js'
import {loadLine, pairedRounds, perRound, roundsFromEnv, targetLine, type PairedTarget, type Side} from '../src/core/bench/paired.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import type {MixedResult, RunResult} from '../src/core/bench/types.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'
import {renderTable} from '../src/ui/bench-report.js'
import {BASELINE_HOWTO, baselineCheckout, runBaseline, type BaselineRun} from './baseline.js'

const threads = Number(process.env.BENCH_THREADS ?? 2)
const repeat = Number(process.env.BENCH_REPEAT ?? 1)
const family = [1, 2, 4, 8]
const shape = SYNTHETIC_PRESETS['0.5b']!
const log = (t: string) => process.stderr.write(`${t}\n`)
const packageDir = ensureSyntheticPackage(shape, {parallel: family, onProgress: log})

const batch = {packageDir, batchSize: 4, promptLength: 32, newTokens: 8, threads}
type Measured = MixedResult | RunResult[] | BaselineRun[]
const sides: Side<Measured>[] = [
  {name: 'mixed', run: () => (log('mixed batch: 8 requests, two at each of P = 1, 2, 4, 8'), runWorker({kind: 'mixed', ...batch, parallel: family.flatMap((p) => [p, p])}))},
  {name: 'single', run: () => (log('the same batch at P = 8 alone'), runWorker({kind: 'mixed', ...batch, parallel: family.flatMap(() => [8, 8])}))},
  {name: 'per-p', run: () => benchPackage(packageDir, {parallel: family, batch: [1], promptLengths: [64], newTokens: 33, threads, repeat, onStatus: log})},
]
if (baselineCheckout()) {
  sides.push({name: 'baseline', run: async () => runBaseline(['--synthetic', '0.5b', '--parallel', family.join(','), '--prompt-len', '64', '--new-tokens', '33', '--repeat', String(repeat), '--threads', String(threads), '--no-roofline'], log)})
} else log(`decode per P vs single-P sessions: ${BASELINE_HOWTO}`)
const rounds = await pairedRounds(roundsFromEnv(), sides, log)

const last = rounds.at(-1)!.results
const mixedOf = (m: Record<string, Measured>) => m.mixed as MixedResult
const singleOf = (m: Record<string, Measured>) => m.single as MixedResult
const report: BenchReport = {machine: benchMachine(threads), model: 'synthetic 0.5b family, fp32 (last round)', results: last['per-p'] as RunResult[]}
console.log(renderTable(report))
for (const {round, load, results: m} of rounds) {
  console.log(`round ${round} (load ${load.toFixed(2)}): mixed batch (P = 1, 2, 4, 8) peak RSS ${formatBytes(mixedOf(m).peak_rss_bytes)}, ${mixedOf(m).seconds.toFixed(1)} s; P = 8 alone ${formatBytes(singleOf(m).peak_rss_bytes)}, ${singleOf(m).seconds.toFixed(1)} s; ` +
    `first switch to each P: ${Object.entries(mixedOf(m).switch_ms).map(([p, ms]) => `P=${p} ${ms.toFixed(1)} ms`).join(', ')}`)
}
console.log(loadLine(rounds))

const targets: PairedTarget[] = [
  {name: 'peak RSS mixed P=1,2,4,8 / same batch at P=8 alone (≤ 1.15)', figure: perRound(rounds, (m) => mixedOf(m).peak_rss_bytes / singleOf(m).peak_rss_bytes), limit: 1.15},
  {name: 'slowest switch to a P, excluding the re-encode, ms (≤ 50)', figure: perRound(rounds, (m) => Math.max(...Object.values(mixedOf(m).switch_ms))), limit: 50},
]
if (baselineCheckout()) {
  for (const parallel of family) {
    targets.push({
      name: `P=${parallel} decode / previous single-P session's (≤ 1.05)`,
      figure: perRound(rounds, (m) => {
        const old = (m.baseline as BaselineRun[]).find((r) => r.parallel === parallel)
        const now = (m['per-p'] as RunResult[]).find((r) => r.parallel === parallel)!
        return old && now.decode_ms_per_token.median / old.decode_ms_per_token
      }),
      limit: 1.05,
    })
  }
}
for (const target of targets) console.log(targetLine(target))
