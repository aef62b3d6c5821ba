// `bench --concurrency … --plot` and bench:auto: serve under load, one line per mode (fixed P = 1,
// fixed largest P, auto) against concurrency: throughput, latency, and the P the answers got.
import type {TopLevelSpec} from 'vega-lite'

import type {LoadCurve} from '../../core/bench/auto-load.js'

const COLORS = ['#4c78a8', '#f58518', '#54a24b', '#e45756']

export function loadChartSpec(curves: LoadCurve[], title?: string): TopLevelSpec {
  const points = curves.flatMap(({mode, points: pts}) =>
    pts.flatMap((p) => [
      {panel: 'throughput', mode, concurrency: p.concurrency, y: p.tokensPerS, label: `${mode}, ${p.concurrency} concurrent: ${p.tokensPerS.toFixed(1)} tokens/s`},
      {panel: 'latency', mode, concurrency: p.concurrency, y: p.meanLatencyMs, label: `${mode}, ${p.concurrency} concurrent: ${p.meanLatencyMs.toFixed(0)} ms per request`},
      {panel: 'parallel', mode, concurrency: p.concurrency, y: p.meanParallel, label: `${mode}, ${p.concurrency} concurrent: mean P ${p.meanParallel.toFixed(2)}`},
    ]),
  )
  const modes = curves.map((c) => c.mode)
  const concurrencies = [...new Set(curves.flatMap((c) => c.points.map((p) => p.concurrency)))].sort((a, b) => a - b)
  const x = {field: 'concurrency', type: 'ordinal' as const, title: 'concurrent clients', scale: {domain: concurrencies}, axis: {labelAngle: 0, grid: false}}
  const color = {field: 'mode', type: 'nominal' as const, title: null, scale: {domain: modes, range: COLORS.slice(0, modes.length)}}
  const panels = [
    {panel: 'throughput', title: 'Throughput', yTitle: 'tokens/s'},
    {panel: 'latency', title: 'Latency', yTitle: 'ms per request (mean)'},
    {panel: 'parallel', title: 'P the answers got', yTitle: 'mean P'},
  ]
  return {
    background: 'white',
    padding: 8,
    ...(title ? {title: {text: title, anchor: 'start' as const, fontSize: 13}} : {}),
    config: {
      font: 'system-ui, Helvetica, Arial, sans-serif',
      view: {stroke: '#ddd'},
      axis: {labelFontSize: 11, titleFontSize: 11, titleFontWeight: 'normal' as const, gridColor: '#eee'},
      legend: {labelFontSize: 11, symbolStrokeWidth: 2, orient: 'bottom' as const},
      title: {fontSize: 12, anchor: 'start' as const},
    },
    data: {values: points},
    resolve: {scale: {y: 'independent' as const}},
    hconcat: panels.map(({panel, title: panelTitle, yTitle}) => ({
      title: panelTitle,
      width: 220,
      height: 160,
      transform: [{filter: {field: 'panel', equal: panel}}],
      layer: [
        {mark: {type: 'line' as const, strokeWidth: 2}, encoding: {x, y: {field: 'y', type: 'quantitative' as const, title: yTitle, scale: {zero: true, nice: true}}, color}},
        {mark: {type: 'point' as const, filled: true, size: 50, opacity: 1}, encoding: {x, y: {field: 'y', type: 'quantitative' as const}, color, description: {field: 'label'}}},
      ],
    })),
  }
}
