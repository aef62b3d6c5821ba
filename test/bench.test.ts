import assert from 'node:assert/strict'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import {test} from 'node:test'

import {equivalentParameters, SCALING_FITS, scaledShape, shapeParameters} from '../src/core/bench/scaling-law.js'
import {percentile, summarize} from '../src/core/bench/stats.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'
import {legacyJsonFile} from '../src/commands/bench.js'
import {runCli} from './helpers/cli.js'

test('percentiles are nearest-rank', () => {
  assert.equal(percentile([5, 1, 4, 2, 3, 6, 7, 8, 9, 10], 0.9), 9)
  assert.deepEqual(summarize([3, 1, 2]), {median: 2, p90: 3, samples: 3})
})

test('equivalent size depends on k only, and the scaled shape lands near it', () => {
  const base = SYNTHETIC_PRESETS['0.5b']!
  const n = shapeParameters(base)
  const fit = SCALING_FITS[0]!
  assert.equal(equivalentParameters(n, 1, fit), n)
  const target = equivalentParameters(n, 8, fit)
  const shape = scaledShape(base, target)
  assert.ok(Math.abs(shapeParameters(shape) - target) / target < 0.1, `${shapeParameters(shape)} vs ${target}`)
  assert.equal(shape.hiddenSize % shape.numHeads, 0)
  assert.equal(shape.numHeads % shape.numKvHeads, 0)
})

test('bench on a tiny synthetic shape: table, csv, json, real child processes', async () => {
  const cache = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-bench-'))
  const json = path.join(cache, 'out.json')
  try {
    const tinyArgs = ['--hidden', '64', '--layers', '2', '--heads', '4', '--kv-heads', '2', '--intermediate', '128', '--vocab', '300',
      '--prompt-len', '8', '--max-new-tokens', '4', '--repeat', '1', '--threads', '1']
    const table = await runCli(['bench', ...tinyArgs, '-p', '1,2', '--batch-size', '1,2', '--no-roofline', '--json-file', json], {env: {PARSCALE_CACHE: cache}})
    assert.equal(table.code, 0, table.stderr)
    assert.match(table.stdout, /decode ms\/tok/)
    assert.equal(table.stderr, `wrote the report as JSON to ${json}\n`, 'no spinner when stderr is not a TTY; where the file went')
    const report = JSON.parse(fs.readFileSync(json, 'utf8')) as {machine: {cores: number; onnxruntime_version: string}; results: Record<string, number>[]}
    assert.ok(report.machine.cores >= 1 && report.machine.onnxruntime_version)
    assert.equal(report.results.length, 4)
    for (const r of report.results) {
      for (const key of ['parallel', 'batch', 'prefill_ms', 'decode_ms_per_token', 'peak_rss_bytes', 'weight_bytes', 'kv_cache_bytes']) {
        assert.equal(typeof r[key], 'number', key)
      }
      assert.ok(r.peak_rss_bytes! > 20e6 && r.decode_ms_per_token! > 0)
    }
    const p2b2 = report.results.find((r) => r.parallel === 2 && r.batch === 2)!
    assert.equal(p2b2.kv_cache_bytes, 2 * 2 * 2 * 2 * 2 * 12 * 16 * 4) // K+V · layers · batch · P · kv · tokens · d · 4
    const csv = await runCli(['bench', ...tinyArgs, '--parallel', '2', '--batch-size', '1', '--csv', '--no-roofline'], {env: {PARSCALE_CACHE: cache}})
    assert.equal(csv.code, 0, csv.stderr)
    const lines = csv.stdout.trim().split('\n')
    assert.match(lines[0]!, /^parallel,batch,/)
    assert.equal(lines.length, 2)
  } finally {
    fs.rmSync(cache, {recursive: true, force: true})
  }
})

test('bench --json prints the report on stdout; the old spellings (--batch, --new-tokens, --json FILE) still work, with a warning each', async () => {
  const cache = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-bench-'))
  try {
    const tiny = ['--hidden', '32', '--layers', '1', '--heads', '2', '--kv-heads', '1', '--intermediate', '64', '--vocab', '300', '--prompt-len', '4', '--repeat', '1', '--threads', '1', '--no-roofline', '-p', '2']
    const stdout = await runCli(['bench', ...tiny, '--batch-size', '1', '-n', '3', '--json'], {env: {PARSCALE_CACHE: cache}})
    assert.equal(stdout.code, 0, stdout.stderr)
    assert.equal(stdout.stderr, '')
    const report = JSON.parse(stdout.stdout) as {results: {parallel: number; batch: number; new_tokens: number}[]}
    assert.deepEqual(report.results.map((r) => [r.parallel, r.batch, r.new_tokens]), [[2, 1, 3]])

    const file = path.join(cache, 'old.json')
    const old = await runCli(['bench', ...tiny, '--batch', '2', '--new-tokens', '3', '--json', file], {env: {PARSCALE_CACHE: cache}})
    assert.equal(old.code, 0, old.stderr)
    assert.match(old.stdout, /decode ms\/tok/)
    const written = JSON.parse(fs.readFileSync(file, 'utf8')) as {results: {batch: number; new_tokens: number}[]}
    assert.deepEqual(written.results.map((r) => [r.batch, r.new_tokens]), [[2, 3]])
    const warnings = old.stderr.trim().split('\n')
    assert.equal(warnings.length, 4, old.stderr)
    assert.ok(warnings.slice(0, 3).every((l) => l.startsWith('parscale: warning: ')), old.stderr)
    for (const word of ['--json-file', '--batch-size', '--max-new-tokens']) assert.ok(old.stderr.includes(word), `${word}: ${old.stderr}`)
    assert.equal(warnings[3], `wrote the report as JSON to ${file}`)
    assert.equal((await runCli(['bench', ...tiny, '--json', '--csv'], {env: {PARSCALE_CACHE: cache}})).code, 2, '--json and --csv exclude each other')
  } finally {
    fs.rmSync(cache, {recursive: true, force: true})
  }
})

test('legacyJsonFile: --json FILE and --json=FILE become --json-file; --json before a model stays a switch', () => {
  const warned: string[] = []
  const warn = (m: string) => warned.push(m)
  assert.deepEqual(legacyJsonFile(['--json', 'out.json', '-p', '1'], warn), ['--json-file', 'out.json', '-p', '1'])
  assert.deepEqual(legacyJsonFile(['--json=r.json'], warn), ['--json-file', 'r.json'])
  assert.deepEqual(legacyJsonFile(['--json', './my-package'], warn), ['--json', './my-package'])
  assert.deepEqual(legacyJsonFile(['--json', '-p', '1'], warn), ['--json', '-p', '1'])
  assert.deepEqual(legacyJsonFile(['--', '--json', 'x.json'], warn), ['--', '--json', 'x.json'])
  assert.equal(warned.length, 2)
})

test('bench refuses a bad --parallel in one line, exit 2 (usage)', async () => {
  const r = await runCli(['bench', '--synthetic', '0.5b', '--parallel', '0,x'])
  assert.equal(r.code, 2)
  assert.match(r.stderr, /^parscale: --parallel must be/)
})
