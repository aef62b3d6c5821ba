// Decode steps of one model at several context lengths, interleaved step by step in one
// process: the ratio of two context lengths' steps is then measured milliseconds apart, on
// the same weights in the same memory, instead of minutes apart in separate processes (where
// a burst of other work on this shared machine decides the ratio; see docs/benchmarks.md).
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {prefill} from '../generation/generation.js'
import {ParScaleModel} from '../engine/model.js'
import {median} from './stats.js'

export interface InterleavedOptions {
  packageDir: string
  parallel: number
  /** Prompt lengths; each gets a cache of its own, prefilled once. */
  prompts: number[]
  /** Timed decode steps per prompt (after two untimed ones each). */
  steps: number
  threads: number
  /** Writes an ONNX Runtime profile (`<prefix>_<time>.json`) and sums its kernels per prompt (`opMs`). */
  profilePrefix?: string
  /** Another graph file in the package's folder over the same weights (A/B of graph versions). */
  graphFile?: string
  onStatus?: (line: string) => void
}

export interface InterleavedResult {
  /** Per prompt, every timed step's milliseconds in order. */
  stepMs: Record<number, number[]>
  /** Per timed step, each prompt's step over the first prompt's step of the same turn. */
  ratios: Record<number, number[]>
  prefillMs: Record<number, number>
  /** 1-minute load average at the first and the last timed step. */
  load: [number, number]
  /** With a profile: per prompt, kernel milliseconds per timed step by operator ("op (attn)" inside attention). */
  opMs?: Record<number, Record<string, number>>
}

/**
 * Prefills one cache per prompt length, then runs one decode step on each in turn, the order
 * reversed every turn (so no length always runs right after another's cache traffic).
 */
export async function interleavedDecode(options: InterleavedOptions): Promise<InterleavedResult> {
  const {parallel, prompts, steps} = options
  const model = await ParScaleModel.open(options.packageDir, {
    threads: options.threads,
    parallel: [parallel],
    ...(options.profilePrefix ? {profilePrefix: options.profilePrefix} : {}),
    ...(options.graphFile ? {graphFile: options.graphFile} : {}),
  })
  const runOrder: number[] = [] // the prompt of every timed step, in the order they ran
  let result: Omit<InterleavedResult, 'opMs'>
  try {
    const vocab = Math.min(model.vocabSize, 150000)
    const sequences = []
    const prefillMs: Record<number, number> = {}
    for (const length of prompts) {
      const cache = model.newCache(parallel)
      cache.reserve(1, length + steps + 3)
      cache.reset(0)
      const ids = Array.from({length}, (_, i) => (i * 7919 + 13) % vocab)
      options.onStatus?.(`prefilling ${length} tokens at P=${parallel}`)
      const t0 = performance.now()
      await prefill(model, cache, 0, ids)
      prefillMs[length] = performance.now() - t0
      sequences.push({length, cache, next: 11})
    }
    const stepMs: Record<number, number[]> = Object.fromEntries(prompts.map((p) => [p, []]))
    const load: [number, number] = [0, 0]
    for (let turn = -2; turn < steps; turn++) {
      if (turn === 0) load[0] = os.loadavg()[0]!
      const order = turn % 2 === 0 ? sequences : [...sequences].reverse()
      for (const sequence of order) {
        const t0 = performance.now()
        await model.forward(sequence.cache, 0, [[sequence.next]], 1)
        const ms = performance.now() - t0
        sequence.next = (sequence.next * 31 + 7) % vocab
        if (turn >= 0) stepMs[sequence.length]!.push(ms)
        if (turn >= 0) runOrder.push(sequence.length)
      }
    }
    load[1] = os.loadavg()[0]!
    for (const {cache} of sequences) cache.dispose()
    const base = stepMs[prompts[0]!]!
    const ratios = Object.fromEntries(prompts.map((p) => [p, stepMs[p]!.map((ms, i) => ms / base[i]!)]))
    result = {stepMs, ratios, prefillMs, load}
  } finally {
    await model.release()
  }
  return options.profilePrefix ? {...result, opMs: profiledOps(options.profilePrefix, runOrder, steps)} : result
}

interface ProfileEvent {
  cat: string
  name: string
  ts: number
  dur: number
  args?: {op_name?: string}
}

/** Kernel time per operator and prompt from the newest profile under `prefix`: its last runs are the timed steps. */
function profiledOps(prefix: string, runOrder: number[], steps: number): Record<number, Record<string, number>> {
  const dir = path.dirname(prefix)
  const base = path.basename(prefix)
  const file = fs.readdirSync(dir).filter((f) => f.startsWith(`${base}_`) && f.endsWith('.json')).sort().at(-1)
  if (!file) throw new Error(`no ONNX Runtime profile ${prefix}_*.json`)
  const events = JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8')) as ProfileEvent[]
  const runs = events.filter((e) => e.cat === 'Session' && e.name === 'model_run').sort((a, b) => a.ts - b.ts).slice(-runOrder.length)
  const kernels = events.filter((e) => e.cat === 'Node' && e.name.endsWith('_kernel_time'))
  const out: Record<number, Record<string, number>> = {}
  runs.forEach((run, i) => {
    const ops = (out[runOrder[i]!] ??= {})
    for (const k of kernels) {
      if (k.ts < run.ts || k.ts > run.ts + run.dur) continue
      const op = `${k.args?.op_name ?? '?'}${k.name.includes('/attn/') ? ' (attn)' : ''}`
      ops[op] = (ops[op] ?? 0) + k.dur / 1000 / steps
    }
  })
  return out
}

/** Median and the quartiles of a list, as "median (q1–q3)". */
export function medianWithQuartiles(values: readonly number[], digits = 2): string {
  const sorted = [...values].sort((a, b) => a - b)
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.round(q * (sorted.length - 1)))]!
  return `${median(values).toFixed(digits)} (${at(0.25).toFixed(digits)}–${at(0.75).toFixed(digits)})`
}
