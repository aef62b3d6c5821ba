// `npm run bench:context`: long-context targets (issue 11) on the 0.5b synthetic shape, fp32,
// 2 threads, 33 new tokens: decode against context length at P = 1 and 8, P = 8 prefill of
// 1024 tokens against P = 1's, peak RSS against weights + KV cache, and the prompt-64 figures
// against the previous parscale (PARSCALE_BASELINE) in the same run.
import {formatBytes} from '../src/core/format.js'
import {benchMachine, benchPackage, type BenchReport} from '../src/core/bench/run-bench.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'
import {renderTable} from '../src/ui/bench-report.js'
import {BASELINE_HOWTO, runBaseline} from './baseline.js'

const threads = Number(process.env.BENCH_THREADS ?? 2)
const repeat = Number(process.env.BENCH_REPEAT ?? 1)
const newTokens = 33
const shape = SYNTHETIC_PRESETS['0.5b']!
const log = (t: string) => process.stderr.write(`${t}\n`)
const packageDir = ensureSyntheticPackage(shape, {parallel: [1, 8], onProgress: log})
const common = {batch: [1], newTokens, threads, repeat, onStatus: log}
const results = [
  ...(await benchPackage(packageDir, {...common, parallel: [1], promptLengths: [64, 1024, 2048]})),
  ...(await benchPackage(packageDir, {...common, parallel: [8], promptLengths: [64, 1024]})),
]
const report: BenchReport = {machine: benchMachine(threads), model: 'synthetic 0.5b, fp32', results}
console.log(renderTable(report))

const at = (parallel: number, prompt: number) => results.find((r) => r.parallel === parallel && r.prompt_length === prompt)!
const decode = (parallel: number, prompt: number) => at(parallel, prompt).decode_ms_per_token.median
const p8long = at(8, 1024)
const rssBudget = p8long.weight_bytes + p8long.kv_cache_bytes + 400e6
const checks: [string, number, number][] = [
  ['P=1 decode at prompt 2048 / at prompt 64 (≤ 1.10)', decode(1, 2048) / decode(1, 64), 1.1],
  ['P=8 decode at prompt 1024 / at prompt 64 (≤ 1.20)', decode(8, 1024) / decode(8, 64), 1.2],
  ['P=8 prefill of 1024 tokens / P=1 prefill of 1024 (≤ 9.0)', p8long.prefill_ms.median / at(1, 1024).prefill_ms.median, 9],
  [`P=8 peak RSS at prompt 1024 / (weights + KV + 400 MB = ${formatBytes(rssBudget)}) (≤ 1)`, p8long.peak_rss_bytes / rssBudget, 1],
]

const before = runBaseline(['--synthetic', '0.5b', '--parallel', '1,8', '--prompt-len', '64', '--new-tokens', String(newTokens), '--repeat', String(repeat), '--threads', String(threads), '--no-roofline'], log)
if (before.length === 0) log(`prompt-64 figures vs the previous parscale: ${BASELINE_HOWTO}`)
for (const old of before) {
  const now = at(old.parallel, 64)
  checks.push([`P=${old.parallel} prompt-64 decode / previous parscale's (${old.decode_ms_per_token.toFixed(1)} ms) (≤ 1.10, noise)`, now.decode_ms_per_token.median / old.decode_ms_per_token, 1.1])
  checks.push([`P=${old.parallel} prompt-64 prefill / previous parscale's (${old.prefill_ms.toFixed(0)} ms) (≤ 1.10, noise)`, now.prefill_ms.median / old.prefill_ms, 1.1])
}
for (const [name, value, target] of checks) console.log(`${value <= target ? 'MET   ' : 'MISSED'} ${name}: ${value.toFixed(2)}`)
