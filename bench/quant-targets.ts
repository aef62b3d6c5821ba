// `npm run bench:quant`: issue 10's targets for quantized packages, on the 0.5b synthetic shape
// (batch 1, prompt 64, 32 new tokens, 2 threads), as ratios against llama.cpp measured in the
// same run through node-llama-cpp on GGUF files of the same shape. llama.cpp is not a
// dependency of parscale: PARSCALE_PEERS names a folder set up as ../shared/peers/README.md
// says (node-llama-cpp installed, the peer scripts and 0.5b-q8_0.gguf / 0.5b-q4_0.gguf in it).
// Without it, parscale's own figures are printed and the ratios are skipped.
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {renderTable} from '../src/ui/bench-report.js'
import {benchMachine, benchPackage, type BenchReport} from '../src/core/bench/run-bench.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import type {RunResult} from '../src/core/bench/types.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'
import {readManifest} from '../src/core/package/manifest.js'
import {quantScheme, type QuantName} from '../src/core/quant/scheme.js'

const threads = Number(process.env.BENCH_THREADS ?? 2)
const repeat = Number(process.env.BENCH_REPEAT ?? 3)
const PROMPT = 64
const NEW_TOKENS = 32
const shape = SYNTHETIC_PRESETS['0.5b']!
const log = (t: string) => process.stderr.write(`${t}\n`)

interface PeerResult {
  decode_ms_per_token: number
  ttft_ms: number
  peak_rss_mb: number
}

/** One llama.cpp measurement (a JSON line from the peer script), or why there is none. */
function runPeer(peers: string, script: string, args: string[]): PeerResult | {decode_ms_per_step_median: number} | string {
  const child = spawnSync(process.execPath, [script, ...args], {cwd: peers, encoding: 'utf8', env: {...process.env, NODE_NO_WARNINGS: '1'}})
  const line = child.stdout?.trim().split('\n').at(-1) ?? ''
  if (child.status !== 0 || !line.startsWith('{')) return `${script} ${args.join(' ')} failed: ${(child.stderr || child.stdout || '').trim().split('\n').slice(-2).join(' ')}`
  return JSON.parse(line) as PeerResult
}

function peerSetupProblem(peers: string | undefined): string | undefined {
  const how = 'set PARSCALE_PEERS to a folder prepared as ../shared/peers/README.md says (npm i -E node-llama-cpp@3.21.1, the peer .mjs scripts, 0.5b-q8_0.gguf and 0.5b-q4_0.gguf from gguf_bench_model.py)'
  if (!peers) return `PARSCALE_PEERS is not set: ${how}`
  const missing = ['node_modules/node-llama-cpp', 'llamacpp_peer_bench.mjs', 'llamacpp_batch_bench.mjs', '0.5b-q8_0.gguf', '0.5b-q4_0.gguf'].filter((f) => !fs.existsSync(path.join(peers, f)))
  return missing.length ? `${peers} lacks ${missing.join(', ')}: ${how}` : undefined
}

async function measure(name: QuantName, parallel: number[]): Promise<{report: BenchReport; results: RunResult[]}> {
  const quant = quantScheme(name)
  const packageDir = ensureSyntheticPackage(shape, {parallel, quant, onProgress: log})
  const results = await benchPackage(packageDir, {parallel, batch: [1], promptLengths: [PROMPT], newTokens: NEW_TOKENS, threads, repeat, onStatus: log})
  const report: BenchReport = {machine: benchMachine(threads), model: `synthetic 0.5b, ${name}`, quant: readManifest(packageDir).quant ?? null, results}
  return {report, results}
}

const peers = process.env.PARSCALE_PEERS ? path.resolve(process.env.PARSCALE_PEERS) : undefined
const problem = peerSetupProblem(peers)
if (problem) log(`llama.cpp peers skipped: ${problem}`)

/**
 * The machine is shared and its speed drifts by more than the margins measured here, so
 * llama.cpp and parscale run in turns, ROUNDS times (peers, int8, int4, peers, int8, …).
 * Each target compares the best (least disturbed) figure of each side; every round's own
 * ratio is printed too.
 */
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2)
const peerRuns: Record<string, PeerResult[]> = {q8_0: [], q4_0: []}
const batchRuns: number[] = []
function measurePeers(): void {
  if (problem) return
  for (const format of ['q8_0', 'q4_0']) {
    log(`llama.cpp ${format}: prompt ${PROMPT}, ${NEW_TOKENS} new tokens, ${threads} threads`)
    const r = runPeer(peers!, 'llamacpp_peer_bench.mjs', [`0.5b-${format}.gguf`, String(PROMPT), String(NEW_TOKENS), String(threads)])
    if (typeof r === 'string') log(r)
    else peerRuns[format]!.push(r as PeerResult)
  }
}

const int8Rounds: RunResult[][] = []
const int4Rounds: RunResult[][] = []
let int8Report: BenchReport | undefined
let int4Report: BenchReport | undefined
for (let round = 0; round < ROUNDS; round++) {
  measurePeers()
  const int8 = await measure('int8', [1])
  const int4 = await measure('int4', [1, 8])
  int8Rounds.push(int8.results)
  int4Rounds.push(int4.results)
  int8Report ??= int8.report
  int4Report ??= int4.report
}
if (!problem) {
  log('llama.cpp q4_0, 8 sequences at once (reference for P = 8)')
  const batch = runPeer(peers!, 'llamacpp_batch_bench.mjs', ['0.5b-q4_0.gguf', '8', String(PROMPT), String(NEW_TOKENS), String(threads)])
  if (typeof batch === 'string') log(batch)
  else batchRuns.push((batch as {decode_ms_per_step_median: number}).decode_ms_per_step_median)
}

/** The round with the fastest decode (prefill: the fastest prefill) of a configuration. */
const best = (rounds: RunResult[][], parallel: number, key: (r: RunResult) => number): RunResult =>
  rounds.map((results) => results.find((r) => r.parallel === parallel)!).reduce((a, b) => (key(a) <= key(b) ? a : b))
const decodeMs = (r: RunResult) => r.decode_ms_per_token.median
const prefillMs = (r: RunResult) => r.prefill_ms.median
const int8 = {results: [best(int8Rounds, 1, decodeMs)]}
const int4 = {results: [best(int4Rounds, 1, decodeMs), best(int4Rounds, 8, decodeMs)]}
int8Report!.results = int8.results
int4Report!.results = int4.results
console.log(renderTable(int8Report!))
console.log(renderTable(int4Report!))

const bestPeer = (runs: PeerResult[]): PeerResult | undefined =>
  runs.length ? {decode_ms_per_token: Math.min(...runs.map((r) => r.decode_ms_per_token)), ttft_ms: Math.min(...runs.map((r) => r.ttft_ms)), peak_rss_mb: Math.max(...runs.map((r) => r.peak_rss_mb))} : undefined
const peer: Record<string, PeerResult | undefined> = {q8_0: bestPeer(peerRuns.q8_0!), q4_0: bestPeer(peerRuns.q4_0!)}
const peerBatch8 = batchRuns[0]
const int4PrefillBest = best(int4Rounds, 1, prefillMs)
const [i8p1] = int8.results
const [i4p1, i4p8] = [int4.results.find((r) => r.parallel === 1)!, int4.results.find((r) => r.parallel === 8)!]
if (!problem) {
  console.log('')
  console.log('| round | llama.cpp q8_0 decode | q4_0 decode | q4_0 prefill | int8 P=1 decode | int4 P=1 decode | int4 P=1 prefill | int4 P=8 decode | int8/q8_0 | int4/q4_0 | P=8/q4_0 | prefill/q4_0 |')
  console.log('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for (let round = 0; round < ROUNDS; round++) {
    const [q8, q4] = [peerRuns.q8_0![round], peerRuns.q4_0![round]]
    const [i8, i4, i4p8r] = [int8Rounds[round]![0]!, int4Rounds[round]!.find((r) => r.parallel === 1)!, int4Rounds[round]!.find((r) => r.parallel === 8)!]
    if (!q8 || !q4) continue
    const x = (a: number, b: number) => `${(a / b).toFixed(2)}×`
    console.log(`| ${round + 1} | ${q8.decode_ms_per_token} | ${q4.decode_ms_per_token} | ${q4.ttft_ms} | ${decodeMs(i8).toFixed(1)} | ${decodeMs(i4).toFixed(1)} | ${prefillMs(i4).toFixed(0)} | ${decodeMs(i4p8r).toFixed(1)} | ` +
      `${x(decodeMs(i8), q8.decode_ms_per_token)} | ${x(decodeMs(i4), q4.decode_ms_per_token)} | ${x(decodeMs(i4p8r), q4.decode_ms_per_token)} | ${x(prefillMs(i4), q4.ttft_ms)} |`)
  }
}
const mb = (bytes: number) => (bytes / 1e6).toFixed(0)
console.log('')
if (peer.q8_0 || peer.q4_0) {
  console.log(`llama.cpp (node-llama-cpp, same run, best of ${ROUNDS} rounds): q8_0 decode ${peer.q8_0?.decode_ms_per_token ?? '–'} ms/token, prefill ${peer.q8_0?.ttft_ms ?? '–'} ms, peak RSS ${peer.q8_0?.peak_rss_mb ?? '–'} MB; ` +
    `q4_0 decode ${peer.q4_0?.decode_ms_per_token ?? '–'} ms/token, prefill ${peer.q4_0?.ttft_ms ?? '–'} ms, peak RSS ${peer.q4_0?.peak_rss_mb ?? '–'} MB` +
    (peerBatch8 ? `; q4_0 8 sequences at once ${peerBatch8.toFixed(1)} ms/step` : ''))
}
console.log(`parscale: int8 P=1 decode ${i8p1!.decode_ms_per_token.median.toFixed(1)} ms/token, prefill ${i8p1!.prefill_ms.median.toFixed(0)} ms; ` +
  `int4 P=1 decode ${i4p1.decode_ms_per_token.median.toFixed(1)}, prefill ${int4PrefillBest.prefill_ms.median.toFixed(0)} ms; int4 P=8 decode ${i4p8.decode_ms_per_token.median.toFixed(1)} ms/token`)

type Check = [name: string, value: number | undefined, limit: number]
const checks: Check[] = [
  ['int8 P=1 decode / llama.cpp q8_0 decode (≤ 1.0)', peer.q8_0 && i8p1!.decode_ms_per_token.median / peer.q8_0.decode_ms_per_token, 1],
  ['int4 P=1 decode / llama.cpp q4_0 decode (≤ 1.0)', peer.q4_0 && i4p1.decode_ms_per_token.median / peer.q4_0.decode_ms_per_token, 1],
  ['int4 P=8 decode / llama.cpp q4_0 P=1 decode (≤ 2.0)', peer.q4_0 && i4p8.decode_ms_per_token.median / peer.q4_0.decode_ms_per_token, 2],
  ['int4 prefill 64 tokens P=1 / llama.cpp q4_0 (≤ 1.0)', peer.q4_0 && int4PrefillBest.prefill_ms.median / peer.q4_0.ttft_ms, 1],
  ...[['int8', i8p1!], ['int4', i4p1]].map(([name, r]): Check => {
    const result = r as RunResult
    return [`peak RSS ${name} P=${result.parallel} ${mb(result.peak_rss_bytes)} MB / (1.25 × ${mb(result.weight_bytes)} MB weights + 300 MB) (≤ 1)`,
      result.peak_rss_bytes / (1.25 * result.weight_bytes + 300e6), 1]
  }),
]
for (const [name, value, limit] of checks) {
  if (value === undefined) console.log(`SKIPPED ${name}: no llama.cpp figure (see PARSCALE_PEERS above)`)
  else console.log(`${value <= limit ? 'MET   ' : 'MISSED'} ${name}: ${value.toFixed(2)}`)
}
// The RSS target is for P = 1; the issue asks the P = 8 path, which widens weights in memory,
// to report its RSS beside its speed.
console.log(`REPORT peak RSS int4 P=8 (decode on int8 widened at load) ${mb(i4p8.peak_rss_bytes)} MB at ${decodeMs(i4p8).toFixed(1)} ms/token: ` +
  `${(i4p8.peak_rss_bytes / (1.25 * i4p8.weight_bytes + 300e6)).toFixed(2)} × (1.25 × weights + 300 MB)`)
if (process.env.BENCH_JSON) fs.writeFileSync(process.env.BENCH_JSON, JSON.stringify({peer, peerRuns, peerBatch8, int8Rounds, int4Rounds}, null, 2) + '\n')
