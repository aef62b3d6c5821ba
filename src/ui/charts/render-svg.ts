// Vega-Lite → Vega → SVG, in Node: vega's SVG renderer needs neither a browser nor a canvas.
import {Error as ErrorsOnly, logger, parse, View} from 'vega'
import {compile, type TopLevelSpec} from 'vega-lite'

export async function renderSvg(spec: TopLevelSpec): Promise<string> {
  // Warnings (a log scale's zero, a dropped point) would interleave with the table: errors only.
  const {spec: vegaSpec} = compile(spec, {logger: logger(ErrorsOnly)})
  const view = new View(parse(vegaSpec), {renderer: 'none', logLevel: ErrorsOnly})
  try {
    return await view.toSVG()
  } finally {
    view.finalize()
  }
}

/**
 * The same SVG to place inside an HTML page: there the HTML parser gives <svg> its namespace,
 * so the namespace declarations (the page's only URLs) go.
 */
export function inlineSvg(svg: string): string {
  return svg.replace(/^<svg([^>]*)>/, (_, attrs: string) => `<svg${attrs.replace(/\s+xmlns(:\w+)?="[^"]*"/g, '')}>`)
}
