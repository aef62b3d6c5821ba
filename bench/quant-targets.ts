// `npm run bench:quant`: issue 10's targets for quantized packages, on the 0.5b synthetic shape
// (batch 1, prompt 64, 32 new tokens, 2 threads), as ratios against llama.cpp measured in the
// same run through node-llama-cpp on GGUF files of the same shape. llama.cpp is not a
// dependency of parscale: PARSCALE_PEERS names a folder set up as ../shared/peers/README.md
// says (node-llama-cpp installed, the peer scripts and 0.5b-q8_0.gguf / 0.5b-q4_0.gguf in it).
// Without it, parscale's own figures are printed and the ratios are skipped. llama.cpp, int8 and
// int4 run in paired, alternating rounds (BENCH_ROUNDS, default 3); each target is the median
// of the per-round ratios, printed with its spread.
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import {renderTable} from '../src/ui/bench-report.js'
import {benchMachine, benchPackage, type BenchReport} from '../src/core/bench/run-bench.js'
import {loadLine, pairedRounds, perRound, roundsFromEnv, targetLine, type PairedTarget} from '../src/core/bench/paired.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import type {RunResult} from '../src/core/bench/types.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'
import {readManifest} from '../src/core/package/manifest.js'
import {quantScheme, type QuantName} from '../src/core/quant/scheme.js'

const threads = Number(process.env.BENCH_THREADS ?? 2)
const repeat = Number(process.env.BENCH_REPEAT ?? 3)
const blockSize = process.env.BENCH_BLOCK_SIZE ? Number(process.env.BENCH_BLOCK_SIZE) : undefined
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
  const quant = quantScheme(name, blockSize)
  const packageDir = ensureSyntheticPackage(shape, {parallel, quant, onProgress: log})
  const results = await benchPackage(packageDir, {parallel, batch: [1], promptLengths: [PROMPT], newTokens: NEW_TOKENS, threads, repeat, onStatus: log})
  const report: BenchReport = {machine: benchMachine(threads), model: `synthetic 0.5b, ${name}`, quant: readManifest(packageDir).quant ?? null, results}
  return {report, results}
}

const peers = process.env.PARSCALE_PEERS ? path.resolve(process.env.PARSCALE_PEERS) : undefined
const problem = peerSetupProblem(peers)
if (problem) log(`llama.cpp peers skipped: ${problem}`)

/** One side's result in a round: llama.cpp's two formats, or parscale's runs of one format. */
interface Measured {
  peer?: Partial<Record<'q8_0' | 'q4_0', PeerResult>>
  runs?: RunResult[]
  report?: BenchReport
}
function measurePeers(): Measured {
  const peer: Measured['peer'] = {}
  for (const format of ['q8_0', 'q4_0'] as const) {
    log(`llama.cpp ${format}: prompt ${PROMPT}, ${NEW_TOKENS} new tokens, ${threads} threads`)
    const r = runPeer(peers!, 'llamacpp_peer_bench.mjs', [`0.5b-${format}.gguf`, String(PROMPT), String(NEW_TOKENS), String(threads)])
    if (typeof r === 'string') log(r)
    else peer[format] = r as PeerResult
  }
  return {peer}
}
const asMeasured = async (name: QuantName, parallel: number[]): Promise<Measured> => {
  const {report, results} = await measure(name, parallel)
  return {runs: results, report}
}
const rounds = await pairedRounds<Measured>(roundsFromEnv(), [
  ...(problem ? [] : [{name: 'llama.cpp', run: async () => measurePeers()}]),
  {name: 'int8', run: () => asMeasured('int8', [1])},
  {name: 'int4', run: () => asMeasured('int4', [1, 8])},
], log)
let peerBatch8: number | undefined
if (!problem) {
  log('llama.cpp q4_0, 8 sequences at once (reference for P = 8)')
  const batch = runPeer(peers!, 'llamacpp_batch_bench.mjs', ['0.5b-q4_0.gguf', '8', String(PROMPT), String(NEW_TOKENS), String(threads)])
  if (typeof batch === 'string') log(batch)
  else peerBatch8 = (batch as {decode_ms_per_step_median: number}).decode_ms_per_step_median
}

const decodeMs = (r: RunResult) => r.decode_ms_per_token.median
const prefillMs = (r: RunResult) => r.prefill_ms.median
const run = (m: Record<string, Measured>, side: 'int8' | 'int4', parallel: number) => m[side]!.runs!.find((r) => r.parallel === parallel)!
const peerOf = (m: Record<string, Measured>, format: 'q8_0' | 'q4_0') => m['llama.cpp']?.peer?.[format]
const last = rounds.at(-1)!.results
console.log(renderTable(last.int8!.report!))
console.log(renderTable(last.int4!.report!))

const x = (a: number | undefined, b: number | undefined) => (a !== undefined && b !== undefined ? `${(a / b).toFixed(2)}×` : '–')
const ms = (v: number | undefined, digits = 1) => (v === undefined ? '–' : v.toFixed(digits))
console.log('')
console.log('| round | load | llama.cpp q8_0 decode | q4_0 decode | q4_0 prefill | int8 P=1 decode | int4 P=1 decode | int4 P=1 prefill | int4 P=8 decode | int8/q8_0 | int4/q4_0 | P=8/q4_0 | prefill/q4_0 |')
console.log('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
for (const {round, load, results: m} of rounds) {
  const [q8, q4] = [peerOf(m, 'q8_0'), peerOf(m, 'q4_0')]
  const [i8, i4, i4p8] = [run(m, 'int8', 1), run(m, 'int4', 1), run(m, 'int4', 8)]
  console.log(`| ${round} | ${load.toFixed(2)} | ${ms(q8?.decode_ms_per_token)} | ${ms(q4?.decode_ms_per_token)} | ${ms(q4?.ttft_ms, 0)} | ${ms(decodeMs(i8))} | ${ms(decodeMs(i4))} | ${ms(prefillMs(i4), 0)} | ${ms(decodeMs(i4p8))} | ` +
    `${x(decodeMs(i8), q8?.decode_ms_per_token)} | ${x(decodeMs(i4), q4?.decode_ms_per_token)} | ${x(decodeMs(i4p8), q4?.decode_ms_per_token)} | ${x(prefillMs(i4), q4?.ttft_ms)} |`)
}
console.log(loadLine(rounds))
if (peerBatch8) console.log(`llama.cpp q4_0, 8 sequences at once: ${peerBatch8.toFixed(1)} ms/step (after the rounds)`)

const mb = (bytes: number) => (bytes / 1e6).toFixed(0)
const ratio = (side: 'int8' | 'int4', parallel: number, format: 'q8_0' | 'q4_0', key: 'decode' | 'prefill') => perRound(rounds, (m) => {
  const peer = peerOf(m, format)
  if (!peer) return undefined
  const r = run(m, side, parallel)
  return key === 'decode' ? decodeMs(r) / peer.decode_ms_per_token : prefillMs(r) / peer.ttft_ms
})
const rssShare = (side: 'int8' | 'int4', parallel: number) => perRound(rounds, (m) => {
  const r = run(m, side, parallel)
  return r.peak_rss_bytes / (1.25 * r.weight_bytes + 300e6)
})
const i8p1 = run(last, 'int8', 1)
const i4p1 = run(last, 'int4', 1)
const i4p8 = run(last, 'int4', 8)
const targets: PairedTarget[] = [
  {name: 'int8 P=1 decode / llama.cpp q8_0 decode (≤ 1.0)', figure: ratio('int8', 1, 'q8_0', 'decode'), limit: 1},
  {name: 'int4 P=1 decode / llama.cpp q4_0 decode (≤ 0.9)', figure: ratio('int4', 1, 'q4_0', 'decode'), limit: 0.9},
  {name: 'int4 P=8 decode / llama.cpp q4_0 P=1 decode (≤ 1.6)', figure: ratio('int4', 8, 'q4_0', 'decode'), limit: 1.6},
  {name: 'int4 prefill 64 tokens P=1 / llama.cpp q4_0 (≤ 1.0)', figure: ratio('int4', 1, 'q4_0', 'prefill'), limit: 1},
  {name: `peak RSS int8 P=1 (last ${mb(i8p1.peak_rss_bytes)} MB) / (1.25 × ${mb(i8p1.weight_bytes)} MB weights + 300 MB) (≤ 1)`, figure: rssShare('int8', 1), limit: 1},
  {name: `peak RSS int4 P=1 (last ${mb(i4p1.peak_rss_bytes)} MB) / (1.25 × ${mb(i4p1.weight_bytes)} MB weights + 300 MB) (≤ 1)`, figure: rssShare('int4', 1), limit: 1},
]
for (const target of targets) console.log(targetLine(target))
// The RSS target is for P = 1; the P = 8 path may widen weights in memory, so its RSS is reported beside its speed.
console.log(`REPORT peak RSS int4 P=8 (decode on ${i4p8.kernels?.decode ?? 'the stored graph'}) ${mb(i4p8.peak_rss_bytes)} MB at ${decodeMs(i4p8).toFixed(1)} ms/token (last round): ` +
  `${(i4p8.peak_rss_bytes / (1.25 * i4p8.weight_bytes + 300e6)).toFixed(2)} × (1.25 × weights + 300 MB)`)
if (process.env.BENCH_JSON) fs.writeFileSync(process.env.BENCH_JSON, JSON.stringify({rounds, peerBatch8}, null, 2) + '\n')
