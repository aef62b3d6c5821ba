// bench --plot: charts through Vega-Lite from a fixed report (no benchmark run), the offline
// HTML page, refusing bad targets before anything runs, and one real run on the default model.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, test} from 'node:test'

import {XMLValidator} from 'fast-xml-parser'

import type {BenchReport} from '../src/core/bench/run-bench.js'
import {UserError} from '../src/core/errors.js'
import {resultsTable} from '../src/ui/bench-report.js'
import {plotTarget, writePlots} from '../src/ui/bench-plot.js'
import {benchChartSpec} from '../src/ui/charts/bench-charts.js'
import {benchHtml} from '../src/ui/charts/bench-html.js'
import {inlineSvg, renderSvg} from '../src/ui/charts/render-svg.js'
import {REPO_ROOT, runCli} from './helpers/cli.js'
import {makeTempDir} from './helpers/safetensors-writer.js'

const temp = makeTempDir()
after(() => fs.rmSync(temp, {recursive: true, force: true}))

/** P 1, 2, 4, 8 × prompt 64, 1024, 2048 (batch 1) and batch 1, 4 (prompt 64), roofline, --vs-params. */
const sweep = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'fixtures', 'bench', 'report-sweep.json'), 'utf8')) as BenchReport

function assertWellFormed(svg: string): void {
  const valid = XMLValidator.validate(svg)
  assert.equal(valid, true, JSON.stringify(valid))
  assert.match(svg, /^<svg [^>]*xmlns="http:\/\/www\.w3\.org\/2000\/svg"/)
}

/** Every aria-label in the SVG: vega writes each mark's description there. */
const ariaLabels = (svg: string) => [...svg.matchAll(/aria-label="([^"]*)"/g)].map((m) => m[1]!)
const count = (labels: string[], match: (label: string) => boolean) => labels.filter(match).length

describe('bench charts', () => {
  test('the SVG is well-formed and shows each measured P once per chart', async () => {
    const svg = await renderSvg(benchChartSpec(sweep))
    assertWellFormed(svg)
    const labels = ariaLabels(svg)
    for (const parallel of [1, 2, 4, 8]) {
      // Against P: one point per P on ParScale's decode, prefill and memory curves.
      assert.equal(count(labels, (l) => l.startsWith(`P=${parallel}: decode `)), 1, `P=${parallel} decode`)
      assert.equal(count(labels, (l) => l.startsWith(`P=${parallel}: prefill `)), 1, `P=${parallel} prefill`)
      assert.equal(count(labels, (l) => l.startsWith(`P=${parallel}: peak RSS `)), 1, `P=${parallel} RSS`)
      // Against batch (3 charts) and context (3 charts): one line per P in each.
      assert.equal(count(labels, (l) => l === `P=${parallel}`), 6, `P=${parallel} lines`)
      for (const prompt of [64, 1024, 2048]) assert.equal(count(labels, (l) => l.startsWith(`P=${parallel}, prompt ${prompt}: decode `)), 1)
    }
    assert.equal(count(labels, (l) => l.startsWith('Symbol legend') && l.includes(': P=1, P=2, P=4, P=8')), 6)
    // The roofline floors and the parameter-scaling curves are drawn.
    assert.ok(labels.includes('roofline floor (weights ÷ 16.8 GB/s)'))
    assert.ok(labels.includes('FLOP floor (140 GFLOP/s)'))
    for (const dataset of ['Stack-V2-Python', 'Pile']) {
      assert.equal(count(labels, (l) => l === `parameter scaling (${dataset})`), 3, dataset)
      assert.equal(count(labels, (l) => l.startsWith(`parameter scaling (${dataset}) at P=8: `) && l.includes('decode')), 1)
    }
  })

  test('the decode floor is weights ÷ the read bandwidth the table uses, below every measured decode', () => {
    const spec = JSON.stringify(benchChartSpec(sweep))
    const points = [...spec.matchAll(/\{"x":[^{}]*\}/g)].map((m) => JSON.parse(m[0]) as {x: number; y: number; series: string})
    const floors = points.filter((p) => p.series === 'roofline floor (weights ÷ 16.8 GB/s)')
    assert.equal(floors.length, 4)
    for (const floor of floors) {
      const run = sweep.results.find((r) => r.parallel === floor.x && r.prompt_length === 64 && r.batch === 1)!
      assert.ok(Math.abs(floor.y - (run.weight_bytes / 16.8e9) * 1000) < 1e-9)
      assert.ok(floor.y < run.decode_ms_per_token.median)
    }
  })

  test('one P, one setting, no roofline: still a chart, without floors or other rows', async () => {
    const one: BenchReport = {machine: sweep.machine, model: 'one', results: [sweep.results[0]!]}
    const svg = await renderSvg(benchChartSpec(one))
    assertWellFormed(svg)
    const labels = ariaLabels(svg)
    assert.equal(count(labels, (l) => l.startsWith('P=1: decode ')), 1)
    assert.ok(!labels.some((l) => l.includes('floor') || l.includes('parameter scaling') || l.includes('against batch') || l.includes('against context')))
  })

  test('the HTML page is self-contained: inline SVG and the terminal table, nothing fetched', async () => {
    const html = benchHtml(sweep, inlineSvg(await renderSvg(benchChartSpec(sweep, {titled: false}))))
    assert.doesNotMatch(html, /https?:\/\//)
    assert.doesNotMatch(html, /<script|<link|<img|<iframe|@import|url\(/i)
    assert.match(html, /^<!doctype html>/)
    assert.equal(html.match(/<svg[ >]/g)?.length, 1)
    assert.equal(html.match(/<table>/g)?.length, 3, 'measurements, decode against context, parallel vs parameter scaling')
    // The same cells as the terminal table, row by row.
    const {head, rows} = resultsTable(sweep)
    for (const h of head) assert.ok(html.includes(`<th>${h.replace(/&/g, '&#38;')}</th>`), h)
    for (const row of rows) assert.ok(html.includes(`<tr>${row.map((c) => `<td>${c}</td>`).join('')}</tr>`), row.join(' '))
  })

  test('writePlots writes an SVG file and an HTML file from one report', async () => {
    const svgFile = path.join(temp, 'fixture.svg')
    const htmlFile = path.join(temp, 'fixture.HTML')
    await writePlots(sweep, [plotTarget(svgFile), plotTarget(htmlFile)])
    assertWellFormed(fs.readFileSync(svgFile, 'utf8').trimEnd())
    assert.match(fs.readFileSync(htmlFile, 'utf8'), /<table>/)
  })

  test('bad targets are refused with the reason', () => {
    assert.throws(() => plotTarget(path.join(temp, 'chart.png')), (e: Error) => e instanceof UserError && /unknown extension "\.png"; use \.svg .* or \.html/.test(e.message))
    assert.throws(() => plotTarget(path.join(temp, 'chart')), (e: Error) => e instanceof UserError && /no extension/.test(e.message))
    assert.throws(() => plotTarget(path.join(temp, 'missing', 'chart.svg')), (e: Error) => e instanceof UserError && /folder .*missing does not exist/.test(e.message))
    assert.deepEqual(plotTarget(path.join(temp, 'ok.htm')), {file: path.join(temp, 'ok.htm'), format: 'html'})
  })
})

describe('bench --plot (CLI)', () => {
  const env = {PARSCALE_CACHE: path.join(temp, 'cache'), HF_HUB_OFFLINE: '1'}

  // A folder that is not there is the machine's state (1); an extension no format has is usage (2).
  for (const [target, reason, code] of [['missing/out.svg', /folder .* does not exist/, 1], ['out.png', /unknown extension "\.png"/, 2]] as const) {
    test(`--plot ${target} fails in one line before anything runs`, async () => {
      const r = await runCli(['bench', '--parallel', '1', '-n', '2', '--repeat', '1', '--no-roofline', '--plot', path.join(temp, target)], {env})
      assert.equal(r.code, code)
      assert.equal(r.stdout, '')
      assert.match(r.stderr, /^parscale: --plot /)
      assert.match(r.stderr, reason)
      assert.equal(r.stderr.trimEnd().split('\n').length, 1)
      assert.ok(!fs.existsSync(env.PARSCALE_CACHE), 'nothing was converted or measured')
    })
  }

  test('a prompt longer than the model takes is refused before any run', async () => {
    const r = await runCli(['bench', '--parallel', '1', '--prompt-len', '64,1024', '-n', '2', '--repeat', '1', '--no-roofline'], {env})
    assert.equal(r.code, 1)
    assert.match(r.stderr, /^parscale: --prompt-len 1024 \+ --max-new-tokens 2 = 1026 positions; the default model takes 512\n$/)
    assert.equal(r.stdout, '')
  })

  test('bench on the default model writes the SVG and the HTML report', async () => {
    const svgFile = path.join(temp, 'out.svg')
    const htmlFile = path.join(temp, 'out.html')
    const r = await runCli(['bench', '--parallel', '1,2', '-n', '4', '--repeat', '1', '--no-roofline', '--prompt-len', '8', '--threads', '1',
      '--plot', svgFile, '--plot', htmlFile], {env})
    assert.equal(r.code, 0, r.stderr)
    assert.match(r.stdout, /decode ms\/tok/)
    assert.equal(r.stderr, `wrote the charts to ${svgFile}\nwrote the charts and the table to ${htmlFile}\n`, 'it says where the files went')
    const svg = fs.readFileSync(svgFile, 'utf8').trimEnd()
    assertWellFormed(svg)
    const labels = ariaLabels(svg)
    for (const parallel of [1, 2]) assert.equal(count(labels, (l) => l.startsWith(`P=${parallel}: decode `)), 1)
    const html = fs.readFileSync(htmlFile, 'utf8')
    assert.doesNotMatch(html, /https?:\/\//)
    assert.match(html, /<svg[^>]*>[\s\S]*<\/svg>/)
    // The terminal table's decode cells are in the page.
    const decodeCells = [...r.stdout.matchAll(/│\s*(\d+(?:\.\d+)? \(\d+(?:\.\d+)?\))\s*│/g)].map((m) => m[1]!)
    assert.equal(decodeCells.length, 2)
    for (const cell of decodeCells) assert.ok(html.includes(`<td>${cell}</td>`), cell)
  })
})
