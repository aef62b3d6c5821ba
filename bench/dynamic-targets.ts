// `npm run bench:dynamic`: dynamic-P targets (issue 12) on the 0.5b synthetic family (P = 1, 2,
// 4, 8 over one backbone), fp32, 2 threads: peak RSS of one process running a mixed batch
// against the same batch at P = 8 alone, decode per P against the previous parscale's
// single-P sessions (PARSCALE_BASELINE), and the cost of switching P (its prefixes and head).
import {formatBytes} from '../src/core/format.js'
import {runWorker} from '../src/core/bench/child.js'
import {benchMachine, benchPackage, type BenchReport} from '../src/core/bench/run-bench.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'
import {renderTable} from '../src/ui/bench-report.js'
import {BASELINE_HOWTO, runBaseline} from './baseline.js'

const threads = Number(process.env.BENCH_THREADS ?? 2)
const repeat = Number(process.env.BENCH_REPEAT ?? 1)
const family = [1, 2, 4, 8]
const shape = SYNTHETIC_PRESETS['0.5b']!
const log = (t: string) => process.stderr.write(`${t}\n`)
const packageDir = ensureSyntheticPackage(shape, {parallel: family, onProgress: log})

const batch = {packageDir, batchSize: 4, promptLength: 32, newTokens: 8, threads}
log('mixed batch: 8 requests, two at each of P = 1, 2, 4, 8')
const mixed = await runWorker({kind: 'mixed', ...batch, parallel: family.flatMap((p) => [p, p])})
log('the same batch at P = 8 alone')
const single = await runWorker({kind: 'mixed', ...batch, parallel: family.flatMap(() => [8, 8])})
const results = await benchPackage(packageDir, {parallel: family, batch: [1], promptLengths: [64], newTokens: 33, threads, repeat, onStatus: log})
const report: BenchReport = {machine: benchMachine(threads), model: 'synthetic 0.5b family, fp32', results}
console.log(renderTable(report))
console.log(`mixed batch (P = 1, 2, 4, 8): peak RSS ${formatBytes(mixed.peak_rss_bytes)}, ${mixed.seconds.toFixed(1)} s; P = 8 alone: ${formatBytes(single.peak_rss_bytes)}, ${single.seconds.toFixed(1)} s`)
console.log(`first switch to each P (prefixes + aggregation head read, cache made): ${Object.entries(mixed.switch_ms).map(([p, ms]) => `P=${p} ${ms.toFixed(1)} ms`).join(', ')}`)

const checks: [string, number, number][] = [
  ['peak RSS mixed P=1,2,4,8 / same batch at P=8 alone (≤ 1.15)', mixed.peak_rss_bytes / single.peak_rss_bytes, 1.15],
  ['slowest switch to a P, excluding the re-encode, ms (≤ 50)', Math.max(...Object.values(mixed.switch_ms)), 50],
]
const before = runBaseline(['--synthetic', '0.5b', '--parallel', family.join(','), '--prompt-len', '64', '--new-tokens', '33', '--repeat', String(repeat), '--threads', String(threads), '--no-roofline'], log)
if (before.length === 0) log(`decode per P vs single-P sessions: ${BASELINE_HOWTO}`)
for (const old of before) {
  const now = results.find((r) => r.parallel === old.parallel)!
  checks.push([`P=${old.parallel} decode / previous single-P session's (${old.decode_ms_per_token.toFixed(1)} ms) (≤ 1.05)`, now.decode_ms_per_token.median / old.decode_ms_per_token, 1.05])
}
for (const [name, value, target] of checks) console.log(`${value <= target ? 'MET   ' : 'MISSED'} ${name}: ${value.toFixed(2)}`)
