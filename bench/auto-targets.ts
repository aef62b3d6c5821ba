// `npm run bench:auto`: issue 21's targets for `--parallel auto`, as ratios measured in one run, on
// a random-weight P-family of about 1 GB of fp32 weights (P = 1, 2, 4, 8), max batch 8, 2 threads:
// - the cost profile's first measurement: ≤ 10 s on the default model, ≤ 30 s on the 0.5b synthetic;
// - serve --parallel auto --auto-budget 2: a lone request runs at P = 8, latency ≤ 1.2× a fixed P = 8 server's;
// - the default budget: a lone request gets the largest P whose measured step fits 1.25× P = 1's;
// - 24 concurrent clients: throughput ≥ 0.9× a fixed P = 1 server's, mean chosen P < 8;
// and the curves behind docs/auto-parallel.md (chosen P, tokens/s, latency against concurrency for
// fixed P = 1, fixed P = 8 and auto). Settings (environment): BENCH_THREADS (2), BENCH_CONCURRENCY
// (1,4,8,24), BENCH_REQUESTS_PER_CLIENT (2), BENCH_MAX_TOKENS (16), BENCH_SKIP_05B=1 (no 0.5b
// measurement: building its 2 GB package takes minutes the first time), BENCH_PLOT=FILE.svg.
// Run it under the bench lock: flock /tmp/parscale-bench.lock npm run bench:auto
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import {fileURLToPath} from 'node:url'

import {loadCurves, loadModes, measureLoad, startServeChild, type LoadCurve} from '../src/core/bench/auto-load.js'
import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import {SYNTHETIC_PRESETS, type SyntheticShape} from '../src/core/checkpoint/synthetic.js'
import {ParScaleModel} from '../src/core/engine/model.js'
import {resolveModel} from '../src/core/package/resolve.js'
import {measureProfile, PROFILE_FILE, saveProfile, stepMs, type CostProfile} from '../src/core/parallel/cost-profile.js'
import {DEFAULT_AUTO_BUDGET} from '../src/core/parallel/policy.js'
import {renderLoadTable} from '../src/ui/load-report.js'

const threads = Number(process.env.BENCH_THREADS ?? 2)
const concurrencies = (process.env.BENCH_CONCURRENCY ?? '1,4,8,24').split(',').map(Number)
const requestsPerClient = Number(process.env.BENCH_REQUESTS_PER_CLIENT ?? 2)
const maxTokens = Number(process.env.BENCH_MAX_TOKENS ?? 16)
const maxBatch = 8
const family = [1, 2, 4, 8]
const log = (line: string) => process.stderr.write(`${line}\n`)
/** dist/bench → the repository. */
const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..')

/**
 * About 1 GB of fp32 weights: 22 layers of hidden 1024 (GQA 16/4, MLP 2816), and the default
 * model's vocabulary (4032), so the served copy below can use its tokenizer.
 */
const SHAPE_1GB: SyntheticShape = {hiddenSize: 1024, numLayers: 22, numHeads: 16, numKvHeads: 4, intermediateSize: 2816, vocabSize: 4032, tieWordEmbeddings: true}

/**
 * serve needs a tokenizer, which a synthetic package has none of: a folder of links to the
 * package's files plus the default model's tokenizer (same vocabulary size). Its cost profile is its own.
 */
function servableCopy(dir: string): string {
  const served = `${dir}-served`
  fs.mkdirSync(served, {recursive: true})
  for (const name of fs.readdirSync(dir)) {
    if (name === PROFILE_FILE || fs.existsSync(path.join(served, name))) continue
    fs.symlinkSync(path.join(dir, name), path.join(served, name))
  }
  for (const name of ['tokenizer.json', 'tokenizer_config.json']) fs.copyFileSync(path.join(REPO_ROOT, 'fixtures', 'default-model', name), path.join(served, name))
  return served
}

async function measureFresh(packageDir: string): Promise<CostProfile> {
  const model = await ParScaleModel.open(packageDir, {threads})
  try {
    const profile = await measureProfile(model, {threads, device: 'cpu'}, maxBatch)
    saveProfile(packageDir, profile)
    return profile
  } finally {
    await model.release()
  }
}

const rows: [string, string, boolean][] = []
const check = (name: string, value: string, met: boolean) => rows.push([name, value, met])

log(`load average ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`)
const packageDir = servableCopy(ensureSyntheticPackage(SHAPE_1GB, {parallel: family, onProgress: log}))
const weightBytes = fs.readdirSync(packageDir).filter((f) => f.endsWith('.weights')).reduce((sum, f) => sum + fs.statSync(path.join(packageDir, f)).size, 0)
log(`synthetic family: ${packageDir} (${(weightBytes / 1e9).toFixed(2)} GB of weight files)`)

// 1. The profile's first measurement (measured afresh here, and saved: the servers below reuse it).
const defaultProfile = await measureFresh(resolveModel(undefined, {}).packageDir)
check('profile measurement, default model (≤ 10 s)', `${(defaultProfile.measureMs / 1000).toFixed(1)} s`, defaultProfile.measureMs <= 10_000)
if (process.env.BENCH_SKIP_05B !== '1') {
  const dir05 = ensureSyntheticPackage(SYNTHETIC_PRESETS['0.5b']!, {parallel: family, onProgress: log})
  const p05 = await measureFresh(dir05)
  check('profile measurement, 0.5b synthetic (≤ 30 s)', `${(p05.measureMs / 1000).toFixed(1)} s`, p05.measureMs <= 30_000)
}
const profile = await measureFresh(packageDir)
log(`1 GB family's decode step by rows: ${profile.decode.map((d) => `${d.rows}: ${d.ms.toFixed(1)} ms`).join(', ')} (measured in ${(profile.measureMs / 1000).toFixed(1)} s)`)

// 2. The default budget: a lone request's P is the largest whose measured step fits 1.25× P = 1's.
const expected = family.filter((p) => stepMs(profile, p) <= DEFAULT_AUTO_BUDGET * stepMs(profile, 1)).at(-1) ?? 1
const plain = await startServeChild(packageDir, ['--parallel', 'auto', '--threads', String(threads), '--max-batch', String(maxBatch)])
let loneParallel: number
try {
  const response = await fetch(`${plain.url}/v1/completions`, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify({prompt: 'def f(x):', max_tokens: 4, temperature: 0})})
  loneParallel = ((await response.json()) as {parallel: number}).parallel
} finally {
  await plain.stop()
}
check(`default budget: lone request's P = largest within ${DEFAULT_AUTO_BUDGET}× P=1's step (P=${expected})`, `P=${loneParallel}`, loneParallel === expected)

// 3. A lone request, fixed P = 8 against auto --auto-budget 2: alternating requests (paired
// rounds, order swapped each round), medians: the curves' rounds at one client are too few for this.
const serveArgs = ['--threads', String(threads), '--max-batch', String(maxBatch), '--max-queue', '256']
const pairs = Number(process.env.BENCH_LONE_ROUNDS ?? 4)
const fixedEight = await startServeChild(packageDir, [...serveArgs, '--parallel', '8'])
const autoTwo = await startServeChild(packageDir, [...serveArgs, '--parallel', 'auto', '--auto-budget', '2'])
const lone = {fixed: [] as number[], auto: [] as number[], autoParallel: [] as number[]}
try {
  const once = async (url: string) => {
    const started = performance.now()
    const response = await fetch(`${url}/v1/completions`, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify({prompt: 'def fibonacci(n):', max_tokens: maxTokens, temperature: 0})})
    const body = (await response.json()) as {parallel: number}
    return {ms: performance.now() - started, parallel: body.parallel}
  }
  await once(fixedEight.url)
  await once(autoTwo.url)
  for (let round = 0; round < pairs; round++) {
    // Apart by more than auto's recent-load window, so each request is alone.
    for (const which of round % 2 === 0 ? (['fixed', 'auto'] as const) : (['auto', 'fixed'] as const)) {
      await new Promise((resolve) => setTimeout(resolve, 400))
      const {ms, parallel} = await once(which === 'fixed' ? fixedEight.url : autoTwo.url)
      lone[which].push(ms)
      if (which === 'auto') lone.autoParallel.push(parallel)
    }
  }
} finally {
  await Promise.all([fixedEight.stop(), autoTwo.stop()])
}
const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]
log(`lone requests: fixed P=8 ${lone.fixed.map((v) => v.toFixed(0)).join(' ')} ms; auto ${lone.auto.map((v) => v.toFixed(0)).join(' ')} ms at P ${lone.autoParallel.join(' ')}`)
check('budget 2: a lone request runs at P = 8', `P ${[...new Set(lone.autoParallel)].join(', ')}`, lone.autoParallel.every((p) => p === 8))
{
  const ratio = median(lone.auto) / median(lone.fixed)
  check(`budget 2: lone latency / fixed P = 8 server's, medians of ${pairs} paired rounds (≤ 1.2)`, `${ratio.toFixed(2)} (${median(lone.auto).toFixed(0)} / ${median(lone.fixed).toFixed(0)} ms)`, ratio <= 1.2)
}

// 4. The loaded target, fixed P = 1 against auto --auto-budget 2 at the most clients, in rounds
// ordered P1, auto, auto, P1 (a drift of the machine's other load hits both alike): totals.
const loadedClients = Math.max(...concurrencies)
const prompts = ['def fibonacci(n):', 'import os\n', 'class Parser:', 'for i in range(', 'def read_config(path):', 'import json\n\n', 'class Stack:', 'def main():\n']
{
  const fixedOne = await startServeChild(packageDir, [...serveArgs, '--parallel', '1'])
  const autoLoaded = await startServeChild(packageDir, [...serveArgs, '--parallel', 'auto', '--auto-budget', '2'])
  const totals = {fixed: {tokens: 0, seconds: 0}, auto: {tokens: 0, seconds: 0, parallel: 0, requests: 0}}
  try {
    for (const which of ['fixed', 'auto', 'auto', 'fixed'] as const) {
      await new Promise((resolve) => setTimeout(resolve, 400))
      log(`paired: ${which} at ${loadedClients} clients`)
      const point = await measureLoad(which === 'fixed' ? fixedOne.url : autoLoaded.url, {concurrency: loadedClients, requestsPerClient, maxTokens, prompts})
      totals[which].tokens += point.tokens
      totals[which].seconds += point.seconds
      if (which === 'auto') {
        totals.auto.parallel += point.meanParallel * point.requests
        totals.auto.requests += point.requests
      }
    }
  } finally {
    await Promise.all([fixedOne.stop(), autoLoaded.stop()])
  }
  const fixedRate = totals.fixed.tokens / totals.fixed.seconds
  const autoRate = totals.auto.tokens / totals.auto.seconds
  const ratio = autoRate / fixedRate
  check(`${loadedClients} concurrent: throughput / fixed P = 1 server's, rounds P1-auto-auto-P1 (≥ 0.9)`, `${ratio.toFixed(2)} (${autoRate.toFixed(1)} / ${fixedRate.toFixed(1)} tok/s)`, ratio >= 0.9)
  const meanP = totals.auto.parallel / totals.auto.requests
  check(`${loadedClients} concurrent: mean chosen P (< 8)`, meanP.toFixed(2), meanP < 8)
}

// 5. Curves: fixed P = 1, fixed P = 8, auto --auto-budget 2, at each concurrency, paired rounds.
const modes = loadModes(family, ['--auto-budget', '2'])
const curves: LoadCurve[] = await loadCurves(packageDir, modes, concurrencies, {requestsPerClient, maxTokens, prompts}, serveArgs, log)
console.log(`parscale --parallel auto · synthetic ${(weightBytes / 1e9).toFixed(2)} GB fp32 family P = ${family.join(', ')} · ${threads} threads · max batch ${maxBatch} · ${maxTokens} tokens per request, ${requestsPerClient} per client · load average ${os.loadavg()[0].toFixed(2)}`)
console.log(renderLoadTable(curves))
console.log('')
for (const [name, value, met] of rows) console.log(`${met ? 'PASS' : 'MISS'}  ${name}: ${value}`)
if (process.env.BENCH_PLOT) {
  const {writeLoadPlot} = await import('../src/ui/load-report.js')
  await writeLoadPlot(curves, process.env.BENCH_PLOT, `--parallel auto on a ${(weightBytes / 1e9).toFixed(1)} GB synthetic family, ${threads} threads`)
}
