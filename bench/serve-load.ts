// `npm run bench:serve`: a bounded load test of `parscale serve` on the default model with the
// official openai client. Starts the server (a child process, as deployed), then in paired,
// alternating rounds (BENCH_ROUNDS, 3) sends requests one after another and all at once
// (streaming), and prints each side's throughput and time to first token; the target is judged on
// the median of the rounds' concurrent ÷ sequential throughput (the machine is shared: both sides
// of a ratio are measured minutes apart). Every answer must equal the answer to the same prompt
// sent alone before the rounds (greedy): none lost, none mangled. Settings (environment):
// BENCH_REQUESTS (64), BENCH_SEQUENTIAL (16), BENCH_MAX_TOKENS (64), BENCH_PARALLEL (1),
// BENCH_MAX_BATCH (server --max-batch, 8), BENCH_THREADS, BENCH_ROUNDS, BENCH_MAX_LOAD / BENCH_MAX_WAIT;
// BENCH_URL=http://host:port load-tests a server already running instead (its own settings).
import OpenAI from 'openai'

import {loadLine, pairedRounds, perRound, roundsFromEnv, targetLine} from '../src/core/bench/paired.js'
import {percentile} from '../src/core/bench/stats.js'
import {spawnServe} from '../test/helpers/serve.js'

const setting = (name: string, fallback: number) => Number(process.env[name] ?? fallback)
const REQUESTS = setting('BENCH_REQUESTS', 64)
const SEQUENTIAL = setting('BENCH_SEQUENTIAL', 16)
const MAX_TOKENS = setting('BENCH_MAX_TOKENS', 64)
const PARALLEL = setting('BENCH_PARALLEL', 1)
const MAX_BATCH = setting('BENCH_MAX_BATCH', 8)
const THREADS = process.env.BENCH_THREADS
const ROUNDS = roundsFromEnv(3)

const PROMPTS = ['def fibonacci(n):', 'import os\n', 'class Parser:', 'for i in range(', 'def read_config(path):', 'import json\n\n', 'class Stack:\n    def push(self, item):', 'def main():\n']

interface Outcome {
  prompt: string
  text: string
  tokens: number
  finishReason: string | null
  ttftMs: number
  totalMs: number
}

const log = (line: string) => process.stderr.write(`${line}\n`)

async function startServer(): Promise<{url: string; stop: () => Promise<number | null>}> {
  if (process.env.BENCH_URL) return {url: process.env.BENCH_URL.replace(/\/$/, ''), stop: async () => 0}
  return spawnServe(['--max-batch', String(MAX_BATCH), '--max-queue', String(Math.max(64, REQUESTS)), ...(THREADS ? ['--threads', THREADS] : [])])
}

async function streamOne(client: OpenAI, prompt: string): Promise<Outcome> {
  const started = performance.now()
  const stream = await client.chat.completions.create({
    model: 'parscale-default',
    messages: [{role: 'user', content: prompt}],
    max_tokens: MAX_TOKENS,
    temperature: 0,
    stream: true,
    stream_options: {include_usage: true},
    parallel: PARALLEL,
  } as OpenAI.Chat.ChatCompletionCreateParamsStreaming)
  let text = ''
  let ttftMs = NaN
  let tokens = 0
  let finishReason: string | null = null
  for await (const chunk of stream) {
    const choice = chunk.choices[0]
    if (choice?.delta.content) {
      if (Number.isNaN(ttftMs)) ttftMs = performance.now() - started
      text += choice.delta.content
    }
    if (choice?.finish_reason) finishReason = choice.finish_reason
    if (chunk.usage) tokens = chunk.usage.completion_tokens
  }
  return {prompt, text, tokens, finishReason, ttftMs, totalMs: performance.now() - started}
}

interface SideResult {
  outcomes: Outcome[]
  seconds: number
}

const tokensOf = (outcomes: Outcome[]) => outcomes.reduce((sum, o) => sum + o.tokens, 0)
const tokensPerSecond = ({outcomes, seconds}: SideResult) => tokensOf(outcomes) / seconds

function summary(name: string, side: SideResult): void {
  const {outcomes, seconds} = side
  const tokens = tokensOf(outcomes)
  const tokensPerS = tokens / seconds
  const ttft = outcomes.map((o) => o.ttftMs).filter((ms) => !Number.isNaN(ms)) // NaN: no content came
  console.log(
    `${name.padEnd(26)} ${String(outcomes.length).padStart(4)} requests  ${String(tokens).padStart(6)} tokens  ${seconds.toFixed(2).padStart(7)} s  ` +
      `${tokensPerS.toFixed(1).padStart(7)} tokens/s  TTFT p50 ${percentile(ttft, 0.5).toFixed(0)} ms  p99 ${percentile(ttft, 0.99).toFixed(0)} ms`,
  )
}

async function timed(requests: () => Promise<Outcome[]>): Promise<SideResult> {
  const started = performance.now()
  const outcomes = await requests()
  return {outcomes, seconds: (performance.now() - started) / 1000}
}

const server = await startServer()
const client = new OpenAI({baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 600_000})
let failed = false
try {
  log(`server at ${server.url}: P = ${PARALLEL}, ${MAX_TOKENS} tokens at most per request, ${ROUNDS} rounds`)
  // each prompt once, alone: the reference answers, and first-call costs out of the figures
  const reference = new Map<string, Outcome>()
  for (const prompt of PROMPTS) reference.set(prompt, await streamOne(client, prompt))
  const sequential = async () => {
    const outcomes: Outcome[] = []
    for (let i = 0; i < SEQUENTIAL; i++) outcomes.push(await streamOne(client, PROMPTS[i % PROMPTS.length]))
    return outcomes
  }
  const concurrent = () => Promise.all(Array.from({length: REQUESTS}, (_, i) => streamOne(client, PROMPTS[i % PROMPTS.length])))
  const rounds = await pairedRounds(ROUNDS, [
    {name: 'sequential', run: () => timed(sequential)},
    {name: 'concurrent', run: () => timed(concurrent)},
  ], log)

  const settings = process.env.BENCH_URL ? server.url : `--max-batch ${MAX_BATCH}${THREADS ? ` --threads ${THREADS}` : ''}`
  console.log(`parscale serve load test · default model · P = ${PARALLEL} · ${settings} · max_tokens ${MAX_TOKENS} · greedy · streaming`)
  let answers = 0
  let mangled = 0
  for (const {round, results} of rounds) {
    summary(`round ${round}: sequential`, results.sequential!)
    summary(`round ${round}: ${REQUESTS} concurrent`, results.concurrent!)
    for (const o of [...results.sequential!.outcomes, ...results.concurrent!.outcomes]) {
      const ref = reference.get(o.prompt)!
      answers++
      if (o.text !== ref.text || o.tokens !== ref.tokens || o.finishReason !== ref.finishReason) mangled++
    }
    failed ||= results.concurrent!.outcomes.length !== REQUESTS
  }
  console.log(`answers: ${answers - mangled}/${answers} complete and equal to the same prompt's answer alone${mangled ? ` (${mangled} differ)` : ''}`)
  console.log(targetLine({name: 'concurrent / sequential throughput (≥ 3×)', figure: perRound(rounds, (r) => tokensPerSecond(r.concurrent!) / tokensPerSecond(r.sequential!)), limit: 3, atLeast: true}))
  console.log(loadLine(rounds))
  failed ||= mangled > 0
} finally {
  const code = await server.stop()
  if (code !== 0) {
    log(`parscale serve exited with ${code} after SIGTERM`)
    failed = true
  }
}
if (failed) process.exitCode = 1
