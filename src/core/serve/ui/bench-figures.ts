/**
 * `serve --bench-json FILE`: a report `bench --json` wrote, read once at start, so the page can
 * chart what P costs on this machine before any request has run. Each P's figures come from
 * the report's base setting (smallest batch, shortest prompt), as bench's own charts take them.
 */
import {readFileSync} from 'node:fs'

import {UserError} from '../../errors.js'

/** The figures of one P in a bench report (snake_case: they leave as JSON). */
export interface BenchFiguresOfP {
  parallel: number
  ttft_ms: number
  decode_ms_per_token: number
  peak_rss_bytes: number
  weight_bytes: number
}

export interface BenchFigures {
  /** The measured model, and where and how: for the chart's subtitle. */
  model: string
  setting: string
  results: BenchFiguresOfP[]
}

const NUMBERS = ['parallel', 'batch', 'prompt_length', 'ttft_ms', 'decode_ms_per_token', 'peak_rss_bytes', 'weight_bytes'] as const

type ResultRow = Record<(typeof NUMBERS)[number], number>

export function readBenchFigures(file: string): BenchFigures {
  let text: string
  try {
    text = readFileSync(file, 'utf8')
  } catch (error) {
    throw new UserError(`--bench-json ${file}: cannot read it (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})`)
  }
  let report: unknown
  try {
    report = JSON.parse(text)
  } catch {
    throw new UserError(`--bench-json ${file}: not JSON (write one with \`parscale bench --json FILE\`)`)
  }
  return benchFigures(report, file)
}

/** Checks the fields the chart reads and keeps each P's row of the base setting. */
export function benchFigures(report: unknown, file: string): BenchFigures {
  const notReport = (problem: string) => new UserError(`--bench-json ${file}: not a \`parscale bench --json\` report (${problem})`)
  if (typeof report !== 'object' || report === null || !Array.isArray((report as {results?: unknown}).results)) throw notReport('no "results" array')
  const {results, model, machine} = report as {results: unknown[]; model?: unknown; machine?: {cpu_model?: unknown; device?: unknown}}
  if (results.length === 0) throw notReport('"results" is empty')
  const rows = results.map((row, i): ResultRow => {
    for (const field of NUMBERS) {
      const value = (row as Record<string, unknown> | null)?.[field]
      if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) throw notReport(`results[${i}].${field} is not a number`)
    }
    return row as ResultRow
  })
  const batch = Math.min(...rows.map((r) => r.batch))
  const promptLength = Math.min(...rows.map((r) => r.prompt_length))
  const base = rows.filter((r) => r.batch === batch && r.prompt_length === promptLength).sort((a, b) => a.parallel - b.parallel)
  const where = typeof machine?.cpu_model === 'string' ? ` on ${machine.cpu_model}${machine.device === 'webgpu' ? ' (WebGPU)' : ''}` : ''
  return {
    model: typeof model === 'string' ? model : 'unnamed model',
    setting: `batch ${batch}, prompt ${promptLength} tokens${where}`,
    results: base.map((r) => ({parallel: r.parallel, ttft_ms: r.ttft_ms, decode_ms_per_token: r.decode_ms_per_token, peak_rss_bytes: r.peak_rss_bytes, weight_bytes: r.weight_bytes})),
  }
}
