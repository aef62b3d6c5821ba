// `bench --plot FILE.svg|FILE.html`: where the charts go, checked before anything is measured.
import {accessSync, constants, statSync, writeFileSync} from 'node:fs'
import path from 'node:path'

import type {BenchReport} from '../core/bench/run-bench.js'
import {UsageError, UserError} from '../core/errors.js'

export type PlotFormat = 'svg' | 'html'

export interface PlotTarget {
  file: string
  format: PlotFormat
}

const FORMATS: Record<string, PlotFormat> = {'.svg': 'svg', '.html': 'html', '.htm': 'html'}

/** The format from the extension, and a folder that exists and can be written: else one line, before the run. */
export function plotTarget(file: string): PlotTarget {
  const extension = path.extname(file).toLowerCase()
  const format = FORMATS[extension]
  if (!format) throw new UsageError(`--plot ${file}: ${extension ? `unknown extension "${extension}"` : 'no extension'}; use .svg (the charts) or .html (charts and table)`)
  const folder = path.dirname(path.resolve(file))
  const stat = statSync(folder, {throwIfNoEntry: false})
  if (!stat?.isDirectory()) throw new UserError(`--plot ${file}: folder ${folder} does not exist`)
  if (statSync(file, {throwIfNoEntry: false})?.isDirectory()) throw new UserError(`--plot ${file} is a folder; name a .${format} file`)
  try {
    accessSync(folder, constants.W_OK)
  } catch {
    throw new UserError(`--plot ${file}: folder ${folder} is not writable`)
  }
  return {file, format}
}

/** Renders the charts once per format and writes each target, saying where on stderr. Vega loads only here, when a plot is asked for. */
export async function writePlots(report: BenchReport, targets: PlotTarget[]): Promise<void> {
  if (targets.length === 0) return
  const {benchChartSpec} = await import('./charts/bench-charts.js')
  const {inlineSvg, renderSvg} = await import('./charts/render-svg.js')
  const rendered = new Map<PlotFormat, string>()
  for (const {file, format} of targets) {
    let text = rendered.get(format)
    if (text === undefined) {
      if (format === 'svg') {
        text = (await renderSvg(benchChartSpec(report))) + '\n'
      } else {
        // The page's heading names the model and machine: the charts go in without their title.
        const {benchHtml} = await import('./charts/bench-html.js')
        text = benchHtml(report, inlineSvg(await renderSvg(benchChartSpec(report, {titled: false}))))
      }
      rendered.set(format, text)
    }
    try {
      writeFileSync(file, text)
    } catch (err) {
      throw new UserError(`--plot ${file}: cannot write (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`)
    }
    process.stderr.write(`wrote ${format === 'svg' ? 'the charts' : 'the charts and the table'} to ${file}\n`)
  }
}
