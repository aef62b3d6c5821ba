// `npm run bench:context`: long-context targets (issues 11 and 24) on the 0.5b synthetic shape,
// fp32, 2 threads, 33 new tokens: decode against context length at P = 1 and 8, P = 8 prefill of
// 1024 tokens against P = 1's, peak RSS against weights + KV cache, and the prompt-64 figures
// against the previous parscale (PARSCALE_BASELINE). Every configuration runs once per round, in
// paired, alternating rounds (BENCH_ROUNDS, default 3); ratios are per round, median and spread.
// The P = 8 decode ratio is also measured step by step in one process (both caches prefilled,
// decode steps interleaved: `bench:context-steps`), which load bursts of minutes cannot skew;
// BENCH_INTERLEAVED=0 skips it.
import {formatBytes} from '../src/core/format.js'
import {interleavedDecode, medianWithQuartiles} from '../src/core/bench/interleaved-decode.js'
import {benchMachine, benchPackage, type BenchReport} from '../src/core/bench/run-bench.js'
import {median} from '../src/core/bench/stats.js'
import {loadLine, pairedRounds, perRound, roundsFromEnv, targetLine, type PairedTarget, type Side} from '../src/core/bench/paired.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import type {RunResult} from '../src/core/bench/types.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'
import {renderTable} from '../src/ui/bench-report.js'
import {BASELINE_HOWTO, baselineCheckout, runBaseline, type BaselineRun} from './baseline.js'

const threads = Number(process.env.BENCH_THREADS ?? 2)
const repeat = Number(process.env.BENCH_REPEAT ?? 1)
const newTokens = 33
const shape = SYNTHETIC_PRESETS['0.5b']!
const log = (t: string) => process.stderr.write(`${t}\n`)
const packageDir = ensureSyntheticPackage(shape, {parallel: [1, 8], onProgress: log})
const common = {batch: [1], newTokens, threads, repeat, onStatus: log}
const configs: [parallel: number, prompt: number][] = [[1, 64], [1, 1024], [1, 2048], [8, 64], [8, 1024]]
const key = (parallel: number, prompt: number) => `p${parallel}-${prompt}`

type Measured = RunResult | BaselineRun[]
const sides: Side<Measured>[] = configs.map(([parallel, prompt]) => ({
  name: key(parallel, prompt),
  run: async () => (await benchPackage(packageDir, {...common, parallel: [parallel], promptLengths: [prompt]}))[0]!,
}))
if (baselineCheckout()) {
  sides.push({
    name: 'baseline',
    run: async () => runBaseline(['--synthetic', '0.5b', '--parallel', '1,8', '--prompt-len', '64', '--new-tokens', String(newTokens), '--repeat', String(repeat), '--threads', String(threads), '--no-roofline'], log),
  })
} else log(`prompt-64 figures vs the previous parscale: ${BASELINE_HOWTO}`)
const rounds = await pairedRounds(roundsFromEnv(), sides, log)

const at = (m: Record<string, Measured>, parallel: number, prompt: number) => m[key(parallel, prompt)] as RunResult
const last = rounds.at(-1)!.results
const report: BenchReport = {machine: benchMachine(threads), model: 'synthetic 0.5b, fp32 (last round)', results: configs.map(([p, s]) => at(last, p, s))}
console.log(renderTable(report))
const decode = (m: Record<string, Measured>, parallel: number, prompt: number) => at(m, parallel, prompt).decode_ms_per_token.median
console.log('')
console.log('| round | load | P=1 64 | P=1 2048 | P=8 64 | P=8 1024 | P=8 1024 prefill s | P=8 1024 peak RSS |')
console.log('|---|---|---|---|---|---|---|---|')
for (const {round, load, results: m} of rounds) {
  const long = at(m, 8, 1024)
  console.log(`| ${round} | ${load.toFixed(2)} | ${decode(m, 1, 64).toFixed(1)} | ${decode(m, 1, 2048).toFixed(1)} | ${decode(m, 8, 64).toFixed(1)} | ${decode(m, 8, 1024).toFixed(1)} | ${(long.prefill_ms.median / 1000).toFixed(1)} | ${formatBytes(long.peak_rss_bytes)} |`)
}
console.log(loadLine(rounds))

const p8long = at(last, 8, 1024)
const budget = (r: RunResult) => r.weight_bytes + r.kv_cache_bytes + 400e6
const targets: PairedTarget[] = [
  {name: 'P=1 decode at prompt 2048 / at prompt 64 (≤ 1.10)', figure: perRound(rounds, (m) => decode(m, 1, 2048) / decode(m, 1, 64)), limit: 1.1},
  {name: 'P=8 decode at prompt 1024 / at prompt 64 (≤ 1.10)', figure: perRound(rounds, (m) => decode(m, 8, 1024) / decode(m, 8, 64)), limit: 1.1},
  {name: 'P=8 prefill of 1024 tokens / P=1 prefill of 1024 (≤ 9.0)', figure: perRound(rounds, (m) => at(m, 8, 1024).prefill_ms.median / at(m, 1, 1024).prefill_ms.median), limit: 9},
  {name: `P=8 peak RSS at prompt 1024 / (weights + KV + 400 MB = ${formatBytes(budget(p8long))}) (≤ 1)`, figure: perRound(rounds, (m) => at(m, 8, 1024).peak_rss_bytes / budget(at(m, 8, 1024))), limit: 1},
]
if (baselineCheckout()) {
  for (const parallel of [1, 8]) {
    const old = (m: Record<string, Measured>) => (m.baseline as BaselineRun[]).find((r) => r.parallel === parallel)
    targets.push({name: `P=${parallel} prompt-64 decode / previous parscale's (≤ 1.10, noise)`, figure: perRound(rounds, (m) => old(m) && decode(m, parallel, 64) / old(m)!.decode_ms_per_token), limit: 1.1})
    targets.push({name: `P=${parallel} prompt-64 prefill / previous parscale's (≤ 1.10, noise)`, figure: perRound(rounds, (m) => old(m) && at(m, parallel, 64).prefill_ms.median / old(m)!.prefill_ms), limit: 1.1})
  }
}
for (const target of targets) console.log(targetLine(target))

if (process.env.BENCH_INTERLEAVED !== '0') {
  const steps = Number(process.env.BENCH_STEPS ?? 30)
  const interleaved = await interleavedDecode({packageDir, parallel: 8, prompts: [64, 1024], steps, threads, onStatus: log})
  const ratios = interleaved.ratios[1024]!
  const ratio = median(ratios)
  console.log(
    `${ratio <= 1.1 ? 'MET   ' : 'MISSED'} P=8 decode at prompt 1024 / at prompt 64, ${steps} steps interleaved in one process (≤ 1.10): median ${medianWithQuartiles(ratios, 3)} (quartiles); ` +
      `steps ${medianWithQuartiles(interleaved.stepMs[64]!, 1)} and ${medianWithQuartiles(interleaved.stepMs[1024]!, 1)} ms; load ${interleaved.load[0].toFixed(2)} → ${interleaved.load[1].toFixed(2)}`,
  )
}
