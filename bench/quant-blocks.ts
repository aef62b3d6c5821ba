// `npm run bench:quant-blocks`: the int4 block size, measured. Speed: the 0.5b synthetic shape
// converted once per block size (32, 64, 128, 256), P = 1, batch 1, prompt 64, 32 new tokens,
// 2 threads, in paired, alternating rounds (BENCH_ROUNDS, default 3); decode and prefill per
// block size against block 32's in the same round. Quality: held-out NLL of the default model
// (fixtures/default-model, `eval --text-file heldout.py`) per block size against fp32, at P = 1
// and 8. int4's default block size (DEFAULT_BLOCK_SIZES) is chosen from these figures.
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import {fileURLToPath} from 'node:url'

import {benchPackage} from '../src/core/bench/run-bench.js'
import {loadLine, pairedRounds, perRound, roundsFromEnv} from '../src/core/bench/paired.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import type {RunResult} from '../src/core/bench/types.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'
import {readManifest} from '../src/core/package/manifest.js'
import {BLOCK_SIZES, DEFAULT_BLOCK_SIZES, quantScheme} from '../src/core/quant/scheme.js'

const threads = Number(process.env.BENCH_THREADS ?? 2)
const repeat = Number(process.env.BENCH_REPEAT ?? 3)
const blockSizes = process.env.BENCH_BLOCK_SIZES ? process.env.BENCH_BLOCK_SIZES.split(',').map(Number) : [...BLOCK_SIZES]
const shape = SYNTHETIC_PRESETS['0.5b']!
const log = (t: string) => process.stderr.write(`${t}\n`)
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..')

// Quality first (small model, seconds): NLL per block size against fp32.
const evalCache = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-quant-blocks-'))
const heldOut = path.join(root, 'fixtures', 'default-model', 'heldout.py')
function heldOutNll(parallel: number, blockSize?: number): number {
  const args = ['eval', '--text-file', heldOut, '--parallel', String(parallel), '--json', ...(blockSize ? ['--quant', 'int4', '--block-size', String(blockSize)] : [])]
  log(`eval ${args.slice(3).join(' ')}`)
  const r = spawnSync(process.execPath, [path.join(root, 'bin', 'run.js'), ...args], {encoding: 'utf8', env: {...process.env, PARSCALE_CACHE: evalCache, HF_HUB_OFFLINE: '1'}})
  if (r.status !== 0) throw new Error(`eval failed: ${r.stderr.trim()}`)
  return (JSON.parse(r.stdout) as {mean_nll: number}).mean_nll
}
const nll: Record<string, Record<number, number>> = {}
try {
  for (const parallel of [1, 8]) {
    nll.fp32 = {...nll.fp32, [parallel]: heldOutNll(parallel)}
    for (const b of blockSizes) nll[b] = {...nll[b], [parallel]: heldOutNll(parallel, b)}
  }
} finally {
  fs.rmSync(evalCache, {recursive: true, force: true})
}

// Speed: one package per block size, then paired rounds over them.
const packages = Object.fromEntries(blockSizes.map((b) => [b, ensureSyntheticPackage(shape, {parallel: [1], quant: quantScheme('int4', b), onProgress: log})]))
const measure = async (b: number): Promise<RunResult> =>
  (await benchPackage(packages[b]!, {parallel: [1], batch: [1], promptLengths: [64], newTokens: 32, threads, repeat, onStatus: (t) => log(`block ${b}: ${t}`)}))[0]!
const rounds = await pairedRounds(roundsFromEnv(), blockSizes.map((b) => ({name: String(b), run: () => measure(b)})), log)

const decode = (r: RunResult) => r.decode_ms_per_token.median
const prefill = (r: RunResult) => r.prefill_ms.median
const reference = blockSizes[0]!
console.log(`int4, 0.5b synthetic, P = 1, prompt 64, 32 new tokens, ${threads} threads; ratios against block ${reference} in the same round (median, min–max over ${rounds.length} rounds)`)
console.log('')
console.log(`| block | weights | fallbacks | decode ms (rounds) | decode / block ${reference} | prefill ms (rounds) | prefill / block ${reference} | NLL P=1 − fp32 | NLL P=8 − fp32 |`)
console.log('|---|---|---|---|---|---|---|---|---|')
for (const b of blockSizes) {
  const manifest = readManifest(packages[b]!)
  const fallbacks = Object.keys(manifest.quant?.blockFallbacks ?? {}).length
  const fmt = (f: ReturnType<typeof perRound>) => (f ? `${f.median.toFixed(2)} (${f.min.toFixed(2)}–${f.max.toFixed(2)})` : '–')
  const ds = rounds.map((r) => decode(r.results[String(b)]!).toFixed(1)).join(', ')
  const ps = rounds.map((r) => prefill(r.results[String(b)]!).toFixed(0)).join(', ')
  const d = perRound(rounds, (m) => decode(m[String(b)]!) / decode(m[String(reference)]!))
  const p = perRound(rounds, (m) => prefill(m[String(b)]!) / prefill(m[String(reference)]!))
  const delta = (parallel: number) => (nll[b]![parallel]! - nll.fp32![parallel]!).toFixed(4)
  console.log(`| ${b}${b === DEFAULT_BLOCK_SIZES.int4 ? ' (default)' : ''} | ${(manifest.quant!.weightBytes / 1e6).toFixed(0)} MB | ${fallbacks} | ${ds} | ${fmt(d)} | ${ps} | ${fmt(p)} | ${delta(1)} | ${delta(8)} |`)
}
console.log('')
console.log(`fp32 held-out NLL: P=1 ${nll.fp32![1]!.toFixed(4)}, P=8 ${nll.fp32![8]!.toFixed(4)}`)
console.log(loadLine(rounds))
const fastest = blockSizes.reduce((a, b) => ((perRound(rounds, (m) => decode(m[String(b)]!))?.median ?? Infinity) < (perRound(rounds, (m) => decode(m[String(a)]!))?.median ?? Infinity) ? b : a))
const within = blockSizes.every((b) => Math.abs(nll[b]![1]! - nll.fp32![1]!) < 0.1 && Math.abs(nll[b]![8]! - nll.fp32![8]!) < 0.1)
console.log(`fastest decode: block ${fastest}; every block size within 0.10 nats of fp32: ${within ? 'yes' : 'no'}; default now: block ${DEFAULT_BLOCK_SIZES.int4}`)
