// `npm run bench:queue`: one `parscale worker` against `parscale run --batch` on the same file
// (the default model; BENCH_LINES lines, BENCH_TOKENS new tokens each, P = BENCH_P, batch 8,
// BENCH_THREADS ONNX Runtime threads, worker --concurrency BENCH_CONCURRENCY if set),
// alternating, BENCH_ROUNDS rounds. Linux (reads /proc).
//
// Two measures per round, and the median over rounds of worker ÷ run --batch for each:
// - rate: generated tokens per second from the first line started to the last one finished
//   (run --batch's summary line; the worker's counters, as `batch status` shows them);
// - CPU per token: the process's CPU seconds for the lines (run --batch: its CPU less that of a
//   one-line run, i.e. startup and model load; the worker: its CPU across the batch, after it
//   had loaded the model and served a first line). On a machine others share, the rate follows
//   whatever else runs; CPU time much less so.
// Target: the worker within 10% of run --batch.
import {spawn} from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {REPO_ROOT, runCli} from '../test/helpers/cli.js'
import {killWorkers, startWorker, waitForStatus} from '../test/helpers/queue.js'
import {startRedis} from '../test/helpers/redis-server.js'

const lines = Number(process.env.BENCH_LINES ?? 64)
const tokens = Number(process.env.BENCH_TOKENS ?? 32)
const parallel = Number(process.env.BENCH_P ?? 8)
const rounds = Number(process.env.BENCH_ROUNDS ?? 5)
const threads = process.env.BENCH_THREADS ?? '1'
const concurrency = process.env.BENCH_CONCURRENCY
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-bench-queue-'))
const env = {PARSCALE_CACHE: process.env.PARSCALE_CACHE ?? path.join(tmp, 'cache'), HF_HUB_OFFLINE: '1'}
const gen = (newTokens: number) => ['--max-new-tokens', String(newTokens), '--temperature', '0', '--parallel', String(parallel)]
const log = (line: string) => process.stderr.write(line + '\n')

const STARTS = ['def ', 'class ', 'import ', 'for ', 'while ', 'if ', 'return ', 'with ', 'try:\n    ', 'raise ']
function writeFile(name: string, count: number): string {
  const file = path.join(tmp, name)
  fs.writeFileSync(file, Array.from({length: count}, (_, i) => JSON.stringify({prompt: `${STARTS[i % STARTS.length]}item_${i}`})).join('\n') + '\n')
  return file
}
const file = writeFile('bench.jsonl', lines)
const one = writeFile('one.jsonl', 1)

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

/** CPU seconds (user + system) a live process has used. */
function cpuSeconds(pid: number): number {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')
  return (Number(fields[11]) + Number(fields[12])) / 100 // utime, stime (fields 14, 15) in clock ticks
}

/** `run --batch FILE`: its rate (from the summary line), generated tokens and CPU seconds. */
function runBatch(input: string, newTokens: number): Promise<{rate: number; tokens: number; cpu: number}> {
  const args = ['run', '--batch', input, ...gen(newTokens), '--batch-size', '8', '--threads', threads]
  return new Promise((resolve, reject) => {
    // bash's `times` prints the CPU time of the finished child.
    const child = spawn('bash', ['-c', `"${process.execPath}" bin/run.js ${args.map((a) => `'${a}'`).join(' ')} >/dev/null; code=$?; times >&2; exit $code`], {
      cwd: REPO_ROOT,
      env: {...process.env, ...env},
      stdio: ['ignore', 'ignore', 'pipe'],
    })
    let stderr = ''
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    child.on('close', (code) => {
      const summary = /(\d+) tokens in ([\d.]+) s/.exec(stderr)
      const times = [...stderr.matchAll(/(\d+)m([\d.]+)s/g)].slice(-2).map((m) => Number(m[1]) * 60 + Number(m[2]))
      if (code !== 0 || !summary || times.length < 2) return reject(new Error(`run --batch failed: ${stderr}`))
      resolve({rate: Number(summary[1]) / Number(summary[2]), tokens: Number(summary[1]), cpu: times[0] + times[1]})
    })
  })
}

async function submit(url: string, input: string, name: string): Promise<void> {
  const r = await runCli(['batch', 'submit', input, '--queue', url, '--name', name, ...gen(tokens)], {env})
  if (r.code !== 0) throw new Error(`submit failed: ${r.stderr}`)
}

/** One worker: serves a one-line batch (model loaded), then the file; rate, tokens and CPU for the file. */
async function worker(url: string, round: number): Promise<{rate: number; tokens: number; cpu: number}> {
  await submit(url, one, `warm-${round}`)
  const w = startWorker(['--queue', url, '--batch-size', '8', '--threads', threads, ...(concurrency ? ['--concurrency', concurrency] : [])], env)
  await waitForStatus(url, `warm-${round}`, (s) => s.done === 1, 10 * 60_000, 500)
  const before = cpuSeconds(w.child.pid!)
  await submit(url, file, `bench-${round}`)
  // Polled seldom: the rate comes from the worker's own counters, and polling takes CPU.
  const done = await waitForStatus(url, `bench-${round}`, (s) => s.done === lines, 30 * 60_000, 2000)
  const cpu = cpuSeconds(w.child.pid!) - before
  w.child.kill('SIGTERM')
  await w.exited
  return {rate: done.tokens_per_s ?? 0, tokens: done.tokens, cpu}
}

const redis = await startRedis()
try {
  await runBatch(one, 1) // converts the model once, outside the measurement
  const rateRatios: number[] = []
  const cpuRatios: number[] = []
  const rows: string[] = []
  for (let round = 0; round < rounds; round++) {
    const base = await runBatch(one, 1)
    const direct = await runBatch(file, tokens)
    const queued = await worker(redis.url, round)
    const directCpu = (direct.cpu - base.cpu) / direct.tokens
    const queuedCpu = queued.cpu / queued.tokens
    rateRatios.push(queued.rate / direct.rate)
    cpuRatios.push(directCpu / queuedCpu)
    const row = `round ${round + 1}: run --batch ${direct.rate.toFixed(1)} tokens/s, ${(directCpu * 1000).toFixed(2)} CPU ms/token; worker ${queued.rate.toFixed(1)} tokens/s, ${(queuedCpu * 1000).toFixed(2)} CPU ms/token`
    rows.push(row)
    log(row)
  }
  console.log(`default model, P=${parallel}, ${lines} lines × ${tokens} new tokens (greedy), batch 8, worker concurrency ${concurrency ?? 'default'}, ${threads} thread(s), ${rounds} rounds, ${os.cpus().length} cores`)
  for (const row of rows) console.log(row)
  const rate = median(rateRatios)
  const cpu = median(cpuRatios)
  console.log(`${rate >= 0.9 ? 'MET   ' : 'MISSED'} rate: worker / run --batch, median of rounds = ${rate.toFixed(3)} (target ≥ 0.90)`)
  console.log(`${cpu >= 0.9 ? 'MET   ' : 'MISSED'} CPU per token: run --batch / worker, median of rounds = ${cpu.toFixed(3)} (target ≥ 0.90)`)
} finally {
  await killWorkers()
  await redis.stop()
  fs.rmSync(tmp, {recursive: true, force: true})
}
