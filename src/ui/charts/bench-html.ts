// A self-contained HTML report: the charts as inline SVG and the terminal table's numbers.
// No scripts, fonts, stylesheets or images from elsewhere: it opens offline and can be mailed.
import type {BenchReport} from '../../core/bench/run-bench.js'
import {CONTEXT_COST_TITLE, contextCostTable, reportHeader, resultsTable, vsParamsTable, vsParamsTitle, type TextTable} from '../bench-report.js'

const escapeHtml = (text: string) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`)

function htmlTable({head, rows}: TextTable): string {
  const cells = (tag: string, row: string[]) => row.map((c) => `<${tag}>${escapeHtml(c)}</${tag}>`).join('')
  return `<table>\n<thead><tr>${cells('th', head)}</tr></thead>\n<tbody>\n${rows.map((r) => `<tr>${cells('td', r)}</tr>`).join('\n')}\n</tbody>\n</table>`
}

const STYLE = `
body { font: 14px/1.45 Helvetica, Arial, sans-serif; color: #222; margin: 24px; max-width: 1200px; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 15px; margin: 28px 0 8px; }
.meta { color: #555; margin: 0; }
figure { margin: 16px 0; overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; font-weight: 600; }
td:first-child, th:first-child { text-align: left; }
.note { color: #555; max-width: 900px; }
`

/** `svg`: the rendered charts, already stripped for inlining (render-svg.ts `inlineSvg`). */
export function benchHtml(report: BenchReport, svg: string): string {
  // The heading names the model; the header's other lines (machine, roofline) follow.
  const meta = reportHeader(report).slice(1)
  const vs = vsParamsTable(report)
  const context = contextCostTable(report)
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>parscale bench · ${escapeHtml(report.model)}</title>
<style>${STYLE}</style>
</head>
<body>
<h1>parscale bench · ${escapeHtml(report.model)}</h1>
${meta.map((line) => `<p class="meta">${escapeHtml(line)}</p>`).join('\n')}
<figure>
${svg}
</figure>
<h2>Measured</h2>
${htmlTable(resultsTable(report))}
${context ? `<h2>Decode against context length</h2>\n<p class="note">${escapeHtml(CONTEXT_COST_TITLE)}</p>\n${htmlTable(context)}` : ''}
${vs ? `<h2>Parallel vs parameter scaling</h2>\n<p class="note">${escapeHtml(vsParamsTitle(report))}</p>\n${htmlTable(vs)}` : ''}
<p class="note">Decode is the median over all measured steps (p90 in brackets), each configuration in its own process, so peak RSS is its own.
The roofline floor is weight bytes ÷ the read bandwidth ONNX Runtime reached in the same run; “decode vs floor” is floor ÷ measured.</p>
</body>
</html>
`
}
