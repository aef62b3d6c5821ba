// The chart on serve's page: what each P costs on this server, as it measured its own requests
// (and, with `serve --bench-json`, as `bench` measured the model): decode time per token, time to
// first token, memory. Panels stacked in one column, to fit the page's side panel.
import type {TopLevelSpec} from 'vega-lite'

import type {FiguresOfP} from '../../core/serve/figures.js'
import type {BenchFigures} from '../../core/serve/ui/bench-figures.js'
import {formatBytes} from '../../core/format.js'
import {ms} from '../bench-report.js'

export interface ServedChartInput {
  /** Every P the model has: the x axis shows them all, measured or not. */
  parallelValues: number[]
  live: FiguresOfP[]
  bench?: BenchFigures
}

const LIVE = 'this server (its requests)'
const BENCH = 'bench --json'
const SERIES = [LIVE, BENCH]
const COLORS = ['#4c78a8', '#f58518']

interface Point {
  panel: string
  P: number
  y: number
  series: string
  label: string
}

export function servedChartSpec({parallelValues, live, bench}: ServedChartInput): TopLevelSpec {
  const largest = Math.max(0, ...live.map((f) => f.peak_rss_bytes), ...(bench?.results.map((r) => r.peak_rss_bytes) ?? []))
  const memoryScale = largest >= 1e9 ? 1e9 : 1e6
  const memoryTitle = `peak RSS (${memoryScale === 1e9 ? 'GB' : 'MB'})`
  const points: Point[] = []
  const add = (panel: string, P: number, y: number | null, series: string, label: string) => {
    if (y !== null && Number.isFinite(y)) points.push({panel, P, y, series, label: `${series}, P=${P}: ${label}`})
  }
  for (const f of live) {
    add('decode', f.parallel, f.decode_ms_per_token, LIVE, `decode ${ms(f.decode_ms_per_token ?? 0)} ms/token (median of recent ${f.generations} generations)`)
    add('ttft', f.parallel, f.ttft_ms, LIVE, `time to first token ${ms(f.ttft_ms)} ms`)
    add('memory', f.parallel, f.peak_rss_bytes / memoryScale, LIVE, `resident memory ${formatBytes(f.peak_rss_bytes)}`)
  }
  for (const r of bench?.results ?? []) {
    add('decode', r.parallel, r.decode_ms_per_token, BENCH, `decode ${ms(r.decode_ms_per_token)} ms/token`)
    add('ttft', r.parallel, r.ttft_ms, BENCH, `time to first token ${ms(r.ttft_ms)} ms`)
    add('memory', r.parallel, r.peak_rss_bytes / memoryScale, BENCH, `peak RSS ${formatBytes(r.peak_rss_bytes)}`)
  }
  const series = bench ? SERIES : [LIVE]
  const panels = [
    {panel: 'decode', title: 'Decode latency', yTitle: 'ms per token'},
    {panel: 'ttft', title: 'Time to first token', yTitle: 'ms'},
    {panel: 'memory', title: 'Memory', yTitle: memoryTitle},
  ]
  const x = {field: 'P', type: 'ordinal' as const, title: 'P (streams)', scale: {domain: parallelValues}, axis: {labelAngle: 0, grid: false}}
  const color = {field: 'series', type: 'nominal' as const, title: null, scale: {domain: series, range: COLORS.slice(0, series.length)}}
  return {
    background: 'white',
    padding: 8,
    config: {
      font: 'system-ui, Helvetica, Arial, sans-serif',
      view: {stroke: '#ddd'},
      axis: {labelFontSize: 11, titleFontSize: 11, titleFontWeight: 'normal' as const, gridColor: '#eee'},
      legend: {labelFontSize: 11, symbolStrokeWidth: 2, orient: 'bottom' as const, direction: 'vertical' as const, labelLimit: 280},
      title: {fontSize: 12, subtitleFontSize: 10, subtitleColor: '#666', anchor: 'start' as const},
      concat: {spacing: 18},
    },
    data: {values: points},
    resolve: {scale: {y: 'independent' as const}},
    vconcat: panels.map(({panel, title, yTitle}) => ({
      title,
      width: 250,
      height: 90,
      transform: [{filter: {field: 'panel', equal: panel}}],
      layer: [
        {mark: {type: 'line' as const, strokeWidth: 2}, encoding: {x, y: {field: 'y', type: 'quantitative' as const, title: yTitle, scale: {zero: true, nice: true}}, color, description: {field: 'series'}}},
        {mark: {type: 'point' as const, filled: true, size: 50, opacity: 1}, encoding: {x, y: {field: 'y', type: 'quantitative' as const}, color, description: {field: 'label'}}},
      ],
    })),
  }
}
