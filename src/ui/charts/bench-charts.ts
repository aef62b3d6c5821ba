// Vega-Lite specs of a bench report: decode, prefill and peak RSS against P (with the roofline
// floors and, after --vs-params, the parameter-scaling curve), and against batch and prompt
// length when several were measured. Rendering is vega's job (render-svg.ts).
import type {TopLevelSpec} from 'vega-lite'

import type {BenchReport} from '../../core/bench/run-bench.js'
import type {RunResult} from '../../core/bench/types.js'
import {formatBytes} from '../../core/format.js'
import {bandwidth, ms} from '../bench-report.js'

/** One plotted value. `label` becomes the mark's aria-label: what a reader (or a test) finds per point. */
export interface ChartPoint {
  x: number
  y: number
  series: string
  label: string
  /** p90 above the median, drawn as a whisker. */
  p90?: number
}

interface SeriesStyle {
  name: string
  color: string
  dash?: number[]
  /** Points drawn on the line (measured values; floors and references have none). */
  points: boolean
  /** Named on the line itself instead of in the legend (a reference among per-P lines). */
  labelOnLine?: boolean
}

interface Panel {
  title: string
  subtitle?: string
  xTitle: string
  yTitle: string
  xValues: number[]
  xScale: 'log2' | 'linear'
  data: ChartPoint[]
  series: SeriesStyle[]
}

const PARSCALE = '#4c78a8'
const PARAMS = ['#e45756', '#f58518', '#b279a2']
const REFERENCE = '#888888'
// Per-P colours (charts against batch or context): the Tableau palette, P = 1 first.
const P_COLORS = ['#4c78a8', '#f58518', '#54a24b', '#e45756', '#72b7b2', '#b279a2', '#eeca3b', '#9d755d']

const WIDTH = 250
const HEIGHT = 200

/** GB for real models, MB for the tiny ones: axis numbers stay short. */
function memoryUnit(report: BenchReport): {name: string; of: (bytes: number) => number} {
  const largest = Math.max(...report.results.map((r) => r.peak_rss_bytes), ...(report.vs_params?.rows.map((r) => r.result.peak_rss_bytes) ?? []))
  const scale = largest >= 1e9 ? 1e9 : 1e6
  return {name: scale === 1e9 ? 'GB' : 'MB', of: (bytes) => bytes / scale}
}
const unique = (values: number[]) => [...new Set(values)].sort((a, b) => a - b)
export const seriesOfP = (parallel: number) => `P=${parallel}`

/** The setting the charts against P use when several were measured: the smallest batch and prompt. */
export function baseSetting(report: BenchReport): {batch: number; promptLength: number} {
  return {batch: Math.min(...report.results.map((r) => r.batch)), promptLength: Math.min(...report.results.map((r) => r.prompt_length))}
}

function byP(results: RunResult[]): RunResult[] {
  return [...results].sort((a, b) => a.parallel - b.parallel)
}

/** The panels against P: decode, prefill, peak RSS. */
function panelsAgainstP(report: BenchReport): Panel[] {
  const {batch, promptLength} = baseSetting(report)
  const memoryIn = memoryUnit(report)
  const runs = byP(report.results.filter((r) => r.batch === batch && r.prompt_length === promptLength))
  const xValues = unique(runs.map((r) => r.parallel))
  const setting = `batch ${batch}, prompt ${promptLength} tokens`
  const parscale = `ParScale (P streams)`
  const style = (extra: SeriesStyle[]): SeriesStyle[] => [{name: parscale, color: PARSCALE, points: true}, ...extra]

  // --vs-params: a P = 1 model of N′(P) parameters, placed at the P it stands in for.
  const params = paramsSeries(report, batch, promptLength)
  const paramsStyles = params.map((p, i) => ({name: p.name, color: PARAMS[i % PARAMS.length]!, dash: [6, 3], points: true}))
  const paramPoints = (value: (r: RunResult) => number, text: (r: RunResult) => string): ChartPoint[] =>
    params.flatMap((p) => p.runs.map(({parallel, result, parameters}) => ({
      x: parallel, y: value(result), series: p.name,
      label: `${p.name} at P=${parallel}: ${(parameters / 1e9).toFixed(2)}B parameters, ${text(result)}`,
    })))

  const decode: Panel = {
    title: 'Decode latency', subtitle: `${setting}; whisker: p90`, xTitle: 'P (streams)', yTitle: 'ms per token', xValues, xScale: 'log2',
    data: [
      ...runs.map((r) => ({
        x: r.parallel, y: r.decode_ms_per_token.median, p90: r.decode_ms_per_token.p90, series: parscale,
        label: `${seriesOfP(r.parallel)}: decode ${ms(r.decode_ms_per_token.median)} ms/token (p90 ${ms(r.decode_ms_per_token.p90)})`,
      })),
      ...paramPoints((r) => r.decode_ms_per_token.median, (r) => `decode ${ms(r.decode_ms_per_token.median)} ms/token`),
    ],
    series: style(paramsStyles),
  }
  const prefill: Panel = {
    title: 'Prefill', subtitle: `${setting}; whisker: p90`, xTitle: 'P (streams)', yTitle: 'ms', xValues, xScale: 'log2',
    data: [
      ...runs.map((r) => ({
        x: r.parallel, y: r.prefill_ms.median, p90: r.prefill_ms.p90, series: parscale,
        label: `${seriesOfP(r.parallel)}: prefill ${ms(r.prefill_ms.median)} ms (p90 ${ms(r.prefill_ms.p90)})`,
      })),
      ...paramPoints((r) => r.prefill_ms.median, (r) => `prefill ${ms(r.prefill_ms.median)} ms`),
    ],
    series: style(paramsStyles),
  }
  const memory: Panel = {
    title: 'Peak memory (RSS)', subtitle: setting, xTitle: 'P (streams)', yTitle: memoryIn.name, xValues, xScale: 'log2',
    data: [
      ...runs.map((r) => ({x: r.parallel, y: memoryIn.of(r.peak_rss_bytes), series: parscale, label: `${seriesOfP(r.parallel)}: peak RSS ${formatBytes(r.peak_rss_bytes)}`})),
      ...paramPoints((r) => memoryIn.of(r.peak_rss_bytes), (r) => `peak RSS ${formatBytes(r.peak_rss_bytes)}`),
      ...runs.map((r) => ({x: r.parallel, y: memoryIn.of(r.weight_bytes), series: 'weights', label: `${seriesOfP(r.parallel)}: weights ${formatBytes(r.weight_bytes)}`})),
    ],
    series: style([...paramsStyles, {name: 'weights', color: REFERENCE, dash: [2, 2], points: false}]),
  }

  const {roofline} = report
  if (roofline) {
    // The roofline floors: decode streams every weight once per token; prefill is matmul FLOPs.
    const read = bandwidth(roofline)
    const decodeFloor = `roofline floor (weights ÷ ${(read / 1e9).toFixed(1)} GB/s)`
    decode.data.push(...runs.map((r) => ({x: r.parallel, y: (r.weight_bytes / read) * 1000, series: decodeFloor, label: `${seriesOfP(r.parallel)}: decode floor ${ms((r.weight_bytes / read) * 1000)} ms`})))
    decode.series.push({name: decodeFloor, color: REFERENCE, dash: [4, 4], points: false})
    const prefillFloor = `FLOP floor (${(roofline.matmul_flops_per_s / 1e9).toFixed(0)} GFLOP/s)`
    prefill.data.push(...runs.map((r) => ({x: r.parallel, y: (r.prefill_flops / roofline.matmul_flops_per_s) * 1000, series: prefillFloor, label: `${seriesOfP(r.parallel)}: prefill floor ${ms((r.prefill_flops / roofline.matmul_flops_per_s) * 1000)} ms`})))
    prefill.series.push({name: prefillFloor, color: REFERENCE, dash: [4, 4], points: false})
  }
  return [decode, prefill, memory]
}

interface ParamsSeries {
  name: string
  runs: {parallel: number; result: RunResult; parameters: number}[]
}

/** Per dataset fit: P = 1 (the measured base) and the P = 1 models of N′ for each P > 1. */
function paramsSeries(report: BenchReport, batch: number, promptLength: number): ParamsSeries[] {
  const vs = report.vs_params
  if (!vs) return []
  const base = report.results.find((r) => r.parallel === 1 && r.batch === batch && r.prompt_length === promptLength)
  const datasets = [...new Set(vs.rows.map((r) => r.dataset))]
  return datasets.map((dataset) => ({
    name: `parameter scaling (${dataset})`,
    runs: [
      ...(base ? [{parallel: 1, result: base, parameters: vs.base_parameters}] : []),
      ...vs.rows.filter((r) => r.dataset === dataset).sort((a, b) => a.parallel - b.parallel)
        .map((r) => ({parallel: r.parallel, result: r.result, parameters: r.measured_parameters})),
    ],
  }))
}

/** One line per P against another measured axis (batch or prompt length). */
function panelPerP(results: RunResult[], axis: (r: RunResult) => number, axisName: string, what: {title: string; subtitle: string; xTitle: string; yTitle: string; xScale: 'log2' | 'linear'; value: (r: RunResult) => number; text: (r: RunResult) => string}): Panel {
  const ps = unique(results.map((r) => r.parallel))
  return {
    title: what.title, subtitle: what.subtitle, xTitle: what.xTitle, yTitle: what.yTitle, xScale: what.xScale,
    xValues: unique(results.map(axis)),
    data: [...results].sort((a, b) => axis(a) - axis(b)).map((r) => ({
      x: axis(r), y: what.value(r), series: seriesOfP(r.parallel), label: `${seriesOfP(r.parallel)}, ${axisName} ${axis(r)}: ${what.text(r)}`,
    })),
    series: ps.map((p, i) => ({name: seriesOfP(p), color: P_COLORS[i % P_COLORS.length]!, points: true})),
  }
}

function panelsAgainstBatch(report: BenchReport): Panel[] {
  const memoryIn = memoryUnit(report)
  const {promptLength} = baseSetting(report)
  const results = report.results.filter((r) => r.prompt_length === promptLength)
  if (unique(results.map((r) => r.batch)).length < 2) return []
  const subtitle = `prompt ${promptLength} tokens, one line per P`
  const batch = (r: RunResult) => r.batch
  return [
    panelPerP(results, batch, 'batch', {title: 'Decode latency against batch', subtitle, xTitle: 'batch', yTitle: 'ms per step', xScale: 'log2', value: (r) => r.decode_ms_per_token.median, text: (r) => `decode ${ms(r.decode_ms_per_token.median)} ms/step`}),
    panelPerP(results, batch, 'batch', {title: 'Throughput against batch', subtitle, xTitle: 'batch', yTitle: 'tokens/s', xScale: 'log2', value: (r) => r.tokens_per_s, text: (r) => `${r.tokens_per_s.toFixed(1)} tokens/s`}),
    panelPerP(results, batch, 'batch', {title: 'Peak memory against batch', subtitle, xTitle: 'batch', yTitle: memoryIn.name, xScale: 'log2', value: (r) => memoryIn.of(r.peak_rss_bytes), text: (r) => `peak RSS ${formatBytes(r.peak_rss_bytes)}`}),
  ]
}

function panelsAgainstContext(report: BenchReport): Panel[] {
  const memoryIn = memoryUnit(report)
  const {batch} = baseSetting(report)
  const results = report.results.filter((r) => r.batch === batch)
  if (unique(results.map((r) => r.prompt_length)).length < 2) return []
  const subtitle = `batch ${batch}, one line per P`
  const context = (r: RunResult) => r.prompt_length
  const decode = panelPerP(results, context, 'prompt', {title: 'Decode latency against context', subtitle, xTitle: 'prompt tokens', yTitle: 'ms per token', xScale: 'linear', value: (r) => r.decode_ms_per_token.median, text: (r) => `decode ${ms(r.decode_ms_per_token.median)} ms/token`})
  const {roofline} = report
  if (roofline) {
    // The weights floor does not depend on the context: one level, at the smallest P's weights.
    const smallest = byP(results)[0]!
    const floor = (smallest.weight_bytes / bandwidth(roofline)) * 1000
    const name = `roofline floor (${seriesOfP(smallest.parallel)})`
    decode.data.push(...decode.xValues.map((x) => ({x, y: floor, series: name, label: `decode floor ${ms(floor)} ms`})))
    decode.series.push({name, color: REFERENCE, dash: [4, 4], points: false, labelOnLine: true})
  }
  return [
    decode,
    panelPerP(results, context, 'prompt', {title: 'Prefill against context', subtitle, xTitle: 'prompt tokens', yTitle: 'ms', xScale: 'linear', value: (r) => r.prefill_ms.median, text: (r) => `prefill ${ms(r.prefill_ms.median)} ms`}),
    panelPerP(results, context, 'prompt', {title: 'Peak memory against context', subtitle, xTitle: 'prompt tokens', yTitle: memoryIn.name, xScale: 'linear', value: (r) => memoryIn.of(r.peak_rss_bytes), text: (r) => `peak RSS ${formatBytes(r.peak_rss_bytes)}`}),
  ]
}

function xScaleOf(panel: Panel) {
  const lo = panel.xValues[0]!
  const hi = panel.xValues[panel.xValues.length - 1]!
  if (panel.xScale === 'linear') {
    const pad = lo === hi ? Math.max(1, lo / 2) : (hi - lo) * 0.04
    return {type: 'linear' as const, domain: [Math.max(0, lo - pad), hi + pad], nice: false, zero: false}
  }
  // Log 2: P = 1, 2, 4, 8 sit evenly; a little room at both ends for the points.
  return {type: 'log' as const, base: 2, domain: lo === hi ? [lo / 2, hi * 2] : [lo / 1.25, hi * 1.25], nice: false}
}

function panelSpec(panel: Panel) {
  const names = panel.series.map((s) => s.name)
  // Per-P legends fit on one line; named series (ParScale, parameter scaling, floors) one per line.
  const perP = panel.series.every((s) => !s.points || /^P=\d+$/.test(s.name))
  const inLegend = panel.series.filter((s) => !s.labelOnLine).map((s) => s.name)
  const onLine = panel.series.filter((s) => s.labelOnLine).map((s) => s.name)
  const legend = {orient: 'bottom' as const, direction: 'vertical' as const, labelLimit: 320, values: inLegend, ...(perP ? {columns: Math.min(4, inLegend.length), columnPadding: 12} : {})}
  const color = {field: 'series', type: 'nominal' as const, title: null, scale: {domain: names, range: panel.series.map((s) => s.color)}, legend}
  const strokeDash = {field: 'series', type: 'nominal' as const, legend: null, scale: {domain: names, range: panel.series.map((s) => s.dash ?? [1, 0])}}
  const x = {field: 'x', type: 'quantitative' as const, title: panel.xTitle, scale: xScaleOf(panel), axis: {values: panel.xValues, format: 'd', grid: false}}
  const y = {field: 'y', type: 'quantitative' as const, title: panel.yTitle, scale: {zero: true, nice: true}}
  const withPoints = panel.series.filter((s) => s.points).map((s) => s.name)
  return {
    title: {text: panel.title, ...(panel.subtitle ? {subtitle: panel.subtitle} : {})},
    width: WIDTH,
    height: HEIGHT,
    data: {values: panel.data},
    layer: [
      {mark: {type: 'line' as const, strokeWidth: 2}, encoding: {x, y, color, strokeDash, description: {field: 'series'}}},
      {
        transform: [{filter: 'isValid(datum.p90)'}],
        // The point beside it carries the label (p90 included): the whisker is not announced twice.
        mark: {type: 'rule' as const, strokeWidth: 1.5, aria: false},
        encoding: {x, y, y2: {field: 'p90'}, color: {...color, legend: null}},
      },
      {
        transform: [{filter: {field: 'series', oneOf: withPoints}}],
        mark: {type: 'point' as const, filled: true, size: 55, opacity: 1},
        encoding: {x, y, color: {...color, legend: null}, description: {field: 'label'}},
      },
      ...(onLine.length > 0 ? [{
        transform: [{filter: {field: 'series', oneOf: onLine}}, {filter: {field: 'x', equal: panel.xValues[panel.xValues.length - 1]!}}],
        // Floors lie below the measured lines: the name goes under the line.
        mark: {type: 'text' as const, align: 'right' as const, baseline: 'top' as const, dy: 4, fontSize: 10, aria: false},
        encoding: {x, y, text: {field: 'series'}, color: {...color, legend: null}},
      }] : []),
    ],
  }
}

/**
 * The charts of one report, as one Vega-Lite spec (rows: against P, against batch, against
 * context). `titled: false` leaves the model and machine to the page around the charts.
 */
export function benchChartSpec(report: BenchReport, {titled = true}: {titled?: boolean} = {}): TopLevelSpec {
  if (report.results.length === 0) throw new Error('a bench report without results has nothing to plot')
  const rows = [panelsAgainstP(report), panelsAgainstBatch(report), panelsAgainstContext(report)].filter((r) => r.length > 0)
  const {machine, roofline} = report
  const first = report.results[0]!
  const subtitle = [
    `${machine.cpu_model}, ${machine.cores} cores${machine.device === 'webgpu' ? ` · WebGPU${machine.adapter ? ` (${machine.adapter})` : ''}` : ''} · onnxruntime ${machine.onnxruntime_version}, ${first.threads} threads · ${first.new_tokens} new tokens · ${first.prefill_ms.samples} measured run${first.prefill_ms.samples === 1 ? '' : 's'} after a warm-up, each configuration in its own process`,
    roofline ? `roofline: read ${(bandwidth(roofline) / 1e9).toFixed(1)} GB/s, matmul ${(roofline.matmul_flops_per_s / 1e9).toFixed(0)} GFLOP/s (measured with ONNX Runtime in the same run)` : 'no roofline measured (--no-roofline)',
  ]
  const spec: TopLevelSpec = {
    ...(titled ? {title: {text: `parscale bench · ${report.model}`, subtitle, anchor: 'start' as const, fontSize: 16, subtitleFontSize: 12, subtitleColor: '#555'}} : {}),
    background: 'white',
    padding: 12,
    config: {
      font: 'Helvetica, Arial, sans-serif',
      view: {stroke: '#ddd'},
      axis: {labelFontSize: 11, titleFontSize: 11, titleFontWeight: 'normal' as const, gridColor: '#eee'},
      legend: {labelFontSize: 11, symbolStrokeWidth: 2, symbolSize: 120, rowPadding: 2},
      title: {fontSize: 13, subtitleFontSize: 11, subtitleColor: '#666', anchor: 'start' as const},
      concat: {spacing: 28},
    },
    // Each panel keeps its own scales and legend: panels measure different things.
    resolve: {scale: {color: 'independent' as const, strokeDash: 'independent' as const, x: 'independent' as const, y: 'independent' as const}, legend: {color: 'independent' as const}},
    vconcat: rows.map((row) => ({
      hconcat: row.map(panelSpec),
      resolve: {scale: {color: 'independent' as const, strokeDash: 'independent' as const, x: 'independent' as const, y: 'independent' as const}, legend: {color: 'independent' as const}},
    })),
  }
  return spec
}
