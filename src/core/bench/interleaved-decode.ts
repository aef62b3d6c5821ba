// Decode steps of one model at several context lengths, interleaved step by step in one
// process: the ratio of two context lengths' steps is then measured milliseconds apart, on
// the same weights in the same memory, instead of minutes apart in separate processes (where
// a burst of other work on this shared machine decides the ratio; see docs/benchmarks.md).
import os from 'node:os'

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
}

/**
 * Prefills one cache per prompt length, then runs one decode step on each in turn, the order
 * reversed every turn (so no length always runs right after another's cache traffic).
 */
export async function interleavedDecode(options: InterleavedOptions): Promise<InterleavedResult> {
  const {parallel, prompts, steps} = options
  const model = await ParScaleModel.open(options.packageDir, {threads: options.threads, parallel: [parallel]})
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
      }
    }
    load[1] = os.loadavg()[0]!
    for (const {cache} of sequences) cache.dispose()
    const base = stepMs[prompts[0]!]!
    const ratios = Object.fromEntries(prompts.map((p) => [p, stepMs[p]!.map((ms, i) => ms / base[i]!)]))
    return {stepMs, ratios, prefillMs, load}
  } finally {
    await model.release()
  }
}

/** Median and the quartiles of a list, as "median (q1–q3)". */
export function medianWithQuartiles(values: readonly number[], digits = 2): string {
  const sorted = [...values].sort((a, b) => a - b)
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.round(q * (sorted.length - 1)))]!
  return `${median(values).toFixed(digits)} (${at(0.25).toFixed(digits)}–${at(0.75).toFixed(digits)})`
}
