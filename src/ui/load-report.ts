// serve under load (`bench --concurrency`, bench:auto): the table, and the chart as SVG or HTML.
import {writeFileSync} from 'node:fs'

import type {LoadCurve} from '../core/bench/auto-load.js'
import {UserError} from '../core/errors.js'
import {plotTarget} from './bench-plot.js'
import {columns} from './table.js'

/** One row per mode and concurrency: tokens/s, latency, and the P the answers got. */
export function renderLoadTable(curves: LoadCurve[]): string {
  const rows = curves.flatMap(({mode, points}) =>
    points.map((p) => [
      mode,
      String(p.concurrency),
      String(p.requests),
      p.tokensPerS.toFixed(1),
      p.meanLatencyMs.toFixed(0),
      p.medianLatencyMs.toFixed(0),
      p.meanParallel.toFixed(2),
      Object.entries(p.parallelCounts).map(([P, n]) => `${P}:${n}`).join(' '),
    ]),
  )
  return columns(['mode', 'clients', 'requests', 'tokens/s', 'latency ms (mean)', '(median)', 'mean P', 'answers by P'], rows)
}

/** The chart to FILE.svg, or FILE.html (the chart and the table). */
export async function writeLoadPlot(curves: LoadCurve[], file: string, title?: string): Promise<void> {
  const target = plotTarget(file)
  const {loadChartSpec} = await import('./charts/load-charts.js')
  const {inlineSvg, renderSvg} = await import('./charts/render-svg.js')
  const svg = await renderSvg(loadChartSpec(curves, title))
  const escape = (text: string) => text.replaceAll('&', '&amp;').replaceAll('<', '&lt;')
  const text = target.format === 'svg'
    ? svg + '\n'
    : `<!doctype html>\n<html lang="en"><meta charset="utf-8"><title>${escape(title ?? 'parscale serve under load')}</title>\n<body>\n${inlineSvg(svg)}\n<pre>${escape(renderLoadTable(curves))}</pre>\n</body></html>\n`
  try {
    writeFileSync(file, text)
  } catch (err) {
    throw new UserError(`--plot ${file}: cannot write (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`)
  }
  process.stderr.write(`wrote the load chart to ${file}\n`)
}
