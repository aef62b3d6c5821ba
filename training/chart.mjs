// Render a Vega-Lite spec (JSON file) to SVG with the repo's vega / vega-lite, as
// src/ui/charts/render-svg.ts does: node training/chart.mjs spec.vl.json out.svg
import {readFileSync, writeFileSync} from 'node:fs'
import {Error as ErrorsOnly, logger, parse, View} from 'vega'
import {compile} from 'vega-lite'

const [specPath, outPath] = process.argv.slice(2)
if (!specPath || !outPath) {
  console.error('usage: node training/chart.mjs SPEC.vl.json OUT.svg')
  process.exit(2)
}
const {spec} = compile(JSON.parse(readFileSync(specPath, 'utf8')), {logger: logger(ErrorsOnly)})
const view = new View(parse(spec), {renderer: 'none', logLevel: ErrorsOnly})
writeFileSync(outPath, await view.toSVG())
view.finalize()
