// Renders a bench report: table (cli-table3), CSV, JSON.
import {formatBytes, snakeCaseKeys} from '../core/format.js'
import type {BenchReport} from '../core/bench/run-bench.js'
import type {GpuStepCost, ProbeResult, RunResult} from '../core/bench/types.js'
import {describeProfile} from '../core/bench/profile-summary.js'
import {createTable} from './table.js'

/** Milliseconds as the report prints them. */
export const ms = (v: number) => (v >= 100 ? v.toFixed(0) : v.toFixed(1))
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

function describeWeights(quant: BenchReport['quant'], device: string | undefined): string {
  if (!quant) return 'unquantized'
  // the GPU form gathers the quantized table on the device (GatherBlockQuantized)
  const embedding = device === 'webgpu' ? 'embedding rows gathered and dequantized on the device' : 'embedding rows read and dequantized by the engine'
  const fallbacks = Object.keys(quant.blockFallbacks).length
  return `${quant.scheme}, block ${quant.blockSize}${fallbacks ? ` (${fallbacks} matrices in smaller blocks)` : ''}, MatMulNBits accuracy level ${quant.accuracyLevel}, ${embedding}; prefixes and aggregation float32`
}

function baseline(results: RunResult[], r: RunResult): RunResult | undefined {
  return results.find((b) => b.parallel === 1 && b.batch === r.batch && b.prompt_length === r.prompt_length)
}

/** A table as text cells: the terminal table and the HTML report print the same numbers. */
export interface TextTable {
  head: string[]
  rows: string[][]
}

/** The lines above the table: model, machine, roofline. */
export function reportHeader(report: BenchReport): string[] {
  const {machine, roofline} = report
  const lines = [
    `model: ${report.model}`,
    `weights: ${describeWeights(report.quant, machine.device)}`,
    `machine: ${machine.cpu_model}, ${machine.cores} cores, ${formatBytes(machine.memory_bytes)}; ${machine.threads} threads; onnxruntime ${machine.onnxruntime_version}, node ${machine.node_version}`,
    `device: ${machine.device ?? 'cpu'}${machine.adapter ? `, adapter ${machine.adapter}` : ''}`,
  ]
  if (roofline) {
    const reduce = roofline.reduce_bytes_per_s > 0 ? `, ReduceSum ${(roofline.reduce_bytes_per_s / 1e9).toFixed(1)}` : ''
    lines.push(`roofline (ONNX Runtime): read ${(bandwidth(roofline) / 1e9).toFixed(1)} GB/s (matmul chain at 1 row ${(roofline.gemv_bytes_per_s / 1e9).toFixed(1)}${reduce}), matmul ${(roofline.matmul_flops_per_s / 1e9).toFixed(0)} GFLOP/s`)
  }
  return lines
}

export function resultsTable(report: BenchReport): TextTable {
  const {roofline} = report
  // A prompt column only when several prompt lengths were measured.
  const prompts = new Set(report.results.map((r) => r.prompt_length)).size > 1
  const head = ['P', 'batch', ...(prompts ? ['prompt'] : []), 'prefill ms', 'TTFT ms', 'decode ms/tok (p90)', 'tok/s', 'peak RSS', 'weights', 'KV cache']
  if (roofline) head.push('decode vs floor', 'prefill vs FLOP rate')
  // on webgpu: launches per decode step (the GPU form, and the WebGPU graph before fusion) and the adapter's floor
  const gpu = report.results.some((r) => r.gpu_step)
  if (gpu) head.push('dispatches/step (before fusion)', 'GPU floor ms/tok')
  head.push('decode vs P=1', 'RSS vs P=1')
  const rows = report.results.map((r) => {
    const b = baseline(report.results, r)
    const row = [
      String(r.parallel), String(r.batch), ...(prompts ? [String(r.prompt_length)] : []), ms(r.prefill_ms.median), ms(r.ttft_ms.median),
      `${ms(r.decode_ms_per_token.median)} (${ms(r.decode_ms_per_token.p90)})`, r.tokens_per_s.toFixed(1),
      formatBytes(r.peak_rss_bytes), formatBytes(r.weight_bytes), formatBytes(r.kv_cache_bytes),
    ]
    if (roofline) row.push(`${(decodeVsFloor(r, roofline) * 100).toFixed(0)}%`, `${(prefillVsRate(r, roofline) * 100).toFixed(0)}%`)
    if (gpu) {
      const step = r.gpu_step
      row.push(step ? `${step.dispatches_per_step} (${step.dispatches_before_fusion})` : '–', step?.floor_ms_per_token != null ? floorMs(step.floor_ms_per_token) : '–')
    }
    row.push(b ? ratio(r.decode_ms_per_token.median, b.decode_ms_per_token.median) : '–', b ? ratio(r.peak_rss_bytes, b.peak_rss_bytes) : '–')
    return row
  })
  return {head, rows}
}

export function renderTable(report: BenchReport): string {
  const lines = reportHeader(report)
  lines.push(renderTextTable(resultsTable(report)))
  const step = report.results.find((r) => r.gpu_step)?.gpu_step
  if (step) lines.push(gpuStepLine(step))
  const widened = report.results.filter((r) => r.kernels && r.kernels.decode !== r.kernels.prefill)
  if (widened.length) lines.push(`P = ${[...new Set(widened.map((r) => r.parallel))].join(', ')}: decode steps ran on ${widened[0]!.kernels!.decode}, prompts on ${widened[0]!.kernels!.prefill}`)
  for (const r of report.results) {
    if (!r.profile) continue
    const whose = r.profile[0]?.clock === 'hand-written kernels' ? "the hand-written kernels' profile" : `ONNX Runtime's profile${r.profile.length === 1 ? '' : 's'}`
    lines.push('', `P=${r.parallel}, batch ${r.batch}, prompt ${r.prompt_length}: ${whose}`)
    if (r.profile.length === 0) lines.push('no profile file was written')
    for (const summary of r.profile) lines.push(...describeProfile(summary))
  }
  const context = contextCostTable(report)
  if (context) lines.push('', CONTEXT_COST_TITLE, renderTextTable(context))
  const vs = vsParamsTable(report)
  if (vs) lines.push('', vsParamsTitle(report), renderTextTable(vs))
  return lines.join('\n')
}

/** A floor in ms: GPU floors are fractions of a millisecond. */
const floorMs = (v: number) => (v >= 10 ? ms(v) : v.toPrecision(2))

/** What the GPU columns mean, and where the floor's bandwidth comes from. */
export function gpuStepLine(step: GpuStepCost): string {
  const floor = step.floor_ms_per_token === null || step.bandwidth_bytes_per_s === null
    ? `no floor: bandwidth ${step.bandwidth_source}`
    : `floor = ${(step.weight_bytes_per_step / 1e9).toFixed(2)} GB of weights a step ÷ ${(step.bandwidth_bytes_per_s / 1e9).toFixed(0)} GB/s (${step.bandwidth_source}) = ${floorMs(step.floor_ms_per_token)} ms/token`
  return `GPU: dispatches/step = nodes launching kernels per decode step in the GPU form (in brackets: the WebGPU graph before fusion), counted from the optimized graphs, or the hand-written kernels' dispatches where they run (PARSCALE_WEBGPU_ROUTE=wgsl); ${floor}`
}

export const CONTEXT_COST_TITLE = 'decode against context length (relative to the shortest prompt):'

/** Decode ms/token against the context it runs over, per P × batch, relative to the shortest prompt (when several were measured). */
export function contextCostTable(report: BenchReport): TextTable | undefined {
  const {results} = report
  const lengths = [...new Set(results.map((r) => r.prompt_length))].sort((a, b) => a - b)
  if (lengths.length < 2) return undefined
  const keys = [...new Set(results.map((r) => `${r.parallel}:${r.batch}`))]
  const rows = keys.map((key) => {
    const runs = results.filter((r) => `${r.parallel}:${r.batch}` === key)
    const shortest = runs.find((r) => r.prompt_length === lengths[0])
    return [String(runs[0]!.parallel), String(runs[0]!.batch), ...lengths.map((n) => {
      const r = runs.find((x) => x.prompt_length === n)
      if (!r) return '–'
      const cost = ms(r.decode_ms_per_token.median)
      return shortest && n !== lengths[0] ? `${cost} (${ratio(r.decode_ms_per_token.median, shortest.decode_ms_per_token.median)})` : cost
    })]
  })
  return {head: ['P', 'batch', ...lengths.map((n) => `decode ms/tok at prompt ${n}`)], rows}
}

function renderTextTable({head, rows}: TextTable): string {
  const table = createTable(head)
  for (const row of rows) table.push(row)
  return table.toString()
}

export function vsParamsTitle(report: BenchReport): string {
  const n = report.vs_params?.base_parameters ?? 0
  return `parallel vs parameter scaling: N′ = N·(k·ln P + 1) with N = ${(n / 1e9).toFixed(3)}B (k per dataset: the paper's fit, approximate)`
}

export function vsParamsTable(report: BenchReport): TextTable | undefined {
  const vs = report.vs_params
  if (!vs) return undefined
  const head = ['dataset', 'P', 'N′ (same loss)', 'measured P=1 size', 'memory increase: parallel / params', 'latency increase: parallel / params']
  const rows = vs.rows.map((row) => {
    const base = report.results.find((r) => r.parallel === 1 && r.batch === row.result.batch && r.prompt_length === row.result.prompt_length)
    const par = report.results.find((r) => r.parallel === row.parallel && r.batch === row.result.batch && r.prompt_length === row.result.prompt_length)
    let memory = '–'
    let latency = '–'
    if (base && par) {
      const dm = (x: RunResult) => x.peak_rss_bytes - base.peak_rss_bytes
      const dl = (x: RunResult) => x.decode_ms_per_token.median - base.decode_ms_per_token.median
      memory = `${formatBytes(Math.max(0, dm(par)))} / ${formatBytes(Math.max(0, dm(row.result)))}`
      latency = `${ms(dl(par))} ms / ${ms(dl(row.result))} ms`
    }
    return [row.dataset, String(row.parallel), `${(row.equivalent_parameters / 1e9).toFixed(2)}B`,
      `${(row.measured_parameters / 1e9).toFixed(2)}B${row.scaled_to_fit ? ` (scaled to fit ${formatBytes(vs.memory_cap_bytes)})` : ''} h${row.measured_shape.hiddenSize}×${row.measured_shape.numLayers}`,
      memory, latency]
  })
  return {head, rows}
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
/** The report for --json and --json-file: snake_case keys throughout (the quant record and synthetic shapes included). */
export function toJson(report: BenchReport): unknown {
  return snakeCaseKeys({
    machine: report.machine,
    model: report.model,
    quant: report.quant ?? null,
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
  })
}
