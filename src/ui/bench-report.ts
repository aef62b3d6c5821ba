// Renders a bench report: table (cli-table3), CSV, JSON.
import {formatBytes} from '../core/format.js'
import type {BenchReport} from '../core/bench/run-bench.js'
import type {ProbeResult, RunResult} from '../core/bench/types.js'
import {createTable} from './table.js'

const ms = (v: number) => (v >= 100 ? v.toFixed(0) : v.toFixed(1))
const ratio = (v: number, base: number) => (base > 0 ? `${(v / base).toFixed(2)}×` : '–')

/** The bandwidth a decode step can hope for: the better of the two read probes. */
export function bandwidth(roofline: ProbeResult): number {
  return Math.max(roofline.gemv_bytes_per_s, roofline.reduce_bytes_per_s)
}

/** Floor ÷ measured: 1.0 means decode streams the weights as fast as the probe reads memory. */
export function decodeVsFloor(result: RunResult, roofline: ProbeResult): number {
  return (result.weight_bytes / bandwidth(roofline)) * 1000 / result.decode_ms_per_token.median
}

export function prefillVsRate(result: RunResult, roofline: ProbeResult): number {
  return result.prefill_flops / (result.prefill_ms.median / 1000) / roofline.matmul_flops_per_s
}

function baseline(results: RunResult[], r: RunResult): RunResult | undefined {
  return results.find((b) => b.parallel === 1 && b.batch === r.batch && b.prompt_length === r.prompt_length)
}

export function renderTable(report: BenchReport): string {
  const {machine, roofline} = report
  const lines: string[] = []
  lines.push(`model: ${report.model}`)
  lines.push(`machine: ${machine.cpu_model}, ${machine.cores} cores, ${formatBytes(machine.memory_bytes)}; ${machine.threads} threads; onnxruntime ${machine.onnxruntime_version}, node ${machine.node_version}`)
  lines.push(`device: ${machine.device ?? 'cpu'}${machine.adapter ? `, adapter ${machine.adapter}` : ''}`)
  if (roofline) {
    const reduce = roofline.reduce_bytes_per_s > 0 ? `, ReduceSum ${(roofline.reduce_bytes_per_s / 1e9).toFixed(1)}` : ''
    lines.push(`roofline (ONNX Runtime): read ${(bandwidth(roofline) / 1e9).toFixed(1)} GB/s (matmul chain at 1 row ${(roofline.gemv_bytes_per_s / 1e9).toFixed(1)}${reduce}), matmul ${(roofline.matmul_flops_per_s / 1e9).toFixed(0)} GFLOP/s`)
  }
  const sweep = new Set(report.results.map((r) => r.prompt_length)).size > 1
  const head = ['P', 'batch', ...(sweep ? ['prompt'] : []), 'prefill ms', 'TTFT ms', 'decode ms/tok (p90)', 'tok/s', 'peak RSS', 'weights', 'KV cache']
  if (roofline) head.push('decode vs floor', 'prefill vs FLOP rate')
  head.push('decode vs P=1', 'RSS vs P=1')
  const table = createTable(head)
  for (const r of report.results) {
    const b = baseline(report.results, r)
    const row = [
      String(r.parallel), String(r.batch), ...(sweep ? [String(r.prompt_length)] : []), ms(r.prefill_ms.median), ms(r.ttft_ms.median),
      `${ms(r.decode_ms_per_token.median)} (${ms(r.decode_ms_per_token.p90)})`, r.tokens_per_s.toFixed(1),
      formatBytes(r.peak_rss_bytes), formatBytes(r.weight_bytes), formatBytes(r.kv_cache_bytes),
    ]
    if (roofline) row.push(`${(decodeVsFloor(r, roofline) * 100).toFixed(0)}%`, `${(prefillVsRate(r, roofline) * 100).toFixed(0)}%`)
    row.push(b ? ratio(r.decode_ms_per_token.median, b.decode_ms_per_token.median) : '–', b ? ratio(r.peak_rss_bytes, b.peak_rss_bytes) : '–')
    table.push(row)
  }
  lines.push(table.toString())
  if (sweep) lines.push(renderContextCost(report.results))
  if (report.vs_params) lines.push(renderVsParams(report))
  return lines.join('\n')
}

/** Decode ms/token against the context it runs over, per P × batch, relative to the shortest prompt. */
function renderContextCost(results: RunResult[]): string {
  const lengths = [...new Set(results.map((r) => r.prompt_length))].sort((a, b) => a - b)
  const table = createTable(['P', 'batch', ...lengths.map((n) => `decode ms/tok at prompt ${n}`)])
  const keys = [...new Set(results.map((r) => `${r.parallel}:${r.batch}`))]
  for (const key of keys) {
    const rows = results.filter((r) => `${r.parallel}:${r.batch}` === key)
    const shortest = rows.find((r) => r.prompt_length === lengths[0])
    table.push([String(rows[0].parallel), String(rows[0].batch), ...lengths.map((n) => {
      const r = rows.find((x) => x.prompt_length === n)
      if (!r) return '–'
      const cost = ms(r.decode_ms_per_token.median)
      return shortest && n !== lengths[0] ? `${cost} (${ratio(r.decode_ms_per_token.median, shortest.decode_ms_per_token.median)})` : cost
    })])
  }
  return ['', 'decode against context length (relative to the shortest prompt):', table.toString()].join('\n')
}

function renderVsParams(report: BenchReport): string {
  const vs = report.vs_params!
  const lines = [
    '',
    `parallel vs parameter scaling: N′ = N·(k·ln P + 1) with N = ${(vs.base_parameters / 1e9).toFixed(3)}B (k per dataset: the paper's fit, approximate)`,
  ]
  const table = createTable(['dataset', 'P', 'N′ (same loss)', 'measured P=1 size', 'memory increase: parallel / params', 'latency increase: parallel / params'])
  for (const row of vs.rows) {
    const base = report.results.find((r) => r.parallel === 1 && r.batch === row.result.batch)
    const par = report.results.find((r) => r.parallel === row.parallel && r.batch === row.result.batch)
    let memory = '–'
    let latency = '–'
    if (base && par) {
      const dm = (x: RunResult) => x.peak_rss_bytes - base.peak_rss_bytes
      const dl = (x: RunResult) => x.decode_ms_per_token.median - base.decode_ms_per_token.median
      memory = `${formatBytes(Math.max(0, dm(par)))} / ${formatBytes(Math.max(0, dm(row.result)))}`
      latency = `${ms(dl(par))} ms / ${ms(dl(row.result))} ms`
    }
    table.push([row.dataset, String(row.parallel), `${(row.equivalent_parameters / 1e9).toFixed(2)}B`,
      `${(row.measured_parameters / 1e9).toFixed(2)}B${row.scaled_to_fit ? ` (scaled to fit ${formatBytes(vs.memory_cap_bytes)})` : ''} h${row.measured_shape.hiddenSize}×${row.measured_shape.numLayers}`,
      memory, latency])
  }
  lines.push(table.toString())
  return lines.join('\n')
}

const CSV_COLUMNS = [
  'parallel', 'batch', 'prompt_length', 'new_tokens', 'threads', 'prefill_ms', 'prefill_p90_ms', 'ttft_ms',
  'decode_ms_per_token', 'decode_p90_ms', 'tokens_per_s', 'peak_rss_bytes', 'weight_bytes', 'kv_cache_bytes',
] as const

export function renderCsv(report: BenchReport): string {
  const rows = report.results.map((r) => [
    r.parallel, r.batch, r.prompt_length, r.new_tokens, r.threads, r.prefill_ms.median.toFixed(3), r.prefill_ms.p90.toFixed(3),
    r.ttft_ms.median.toFixed(3), r.decode_ms_per_token.median.toFixed(3), r.decode_ms_per_token.p90.toFixed(3),
    r.tokens_per_s.toFixed(3), r.peak_rss_bytes, r.weight_bytes, r.kv_cache_bytes,
  ].join(','))
  return [CSV_COLUMNS.join(','), ...rows].join('\n') + '\n'
}

/** `{"machine", "results"}` with flat numbers (medians) plus the detail. */
export function toJson(report: BenchReport): unknown {
  return {
    machine: report.machine,
    model: report.model,
    roofline: report.roofline,
    results: report.results.map((r) => ({
      ...r,
      prefill_ms: r.prefill_ms.median,
      prefill_p90_ms: r.prefill_ms.p90,
      ttft_ms: r.ttft_ms.median,
      decode_ms_per_token: r.decode_ms_per_token.median,
      decode_p90_ms: r.decode_ms_per_token.p90,
    })),
    ...(report.vs_params ? {vs_params: report.vs_params} : {}),
  }
}
