import assert from 'node:assert/strict'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import {before, test} from 'node:test'

import {equivalentParameters, SCALING_FITS, scaledShape, shapeParameters} from '../src/core/bench/scaling-law.js'
import {percentile, summarize} from '../src/core/bench/stats.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'
import {legacyJsonFile} from '../src/commands/bench.js'
import {gpuDispatches, gpuStepCosts} from '../src/core/bench/gpu-dispatches.js'
import type {GpuStepCost} from '../src/core/bench/types.js'
import {describeProfile, summarizeProfile, type ProfileSummary} from '../src/core/bench/profile-summary.js'
import {checkWebGpu} from '../src/core/engine/device.js'
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

let adapter: string | undefined
before(async () => {
  adapter = await checkWebGpu().then((a) => a.name, () => undefined)
})

const TINY_GPU = ['--hidden', '64', '--layers', '2', '--heads', '4', '--kv-heads', '2', '--intermediate', '128', '--vocab', '300',
  '--prompt-len', '8', '--max-new-tokens', '4', '--repeat', '1', '--no-roofline']

interface ReportRow {
  parallel: number
  gpu_step?: GpuStepCost
  profile?: ProfileSummary[]
}

test('bench --device webgpu --json: dispatches per decode step (before and after fusion) and the bandwidth floor per P, in the report and the table', async (t) => {
  if (!adapter) return t.skip('no WebGPU adapter on this machine')
  const cache = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-bench-'))
  try {
    const json = await runCli(['bench', ...TINY_GPU, '-p', '1,2', '--device', 'webgpu', '--json'], {env: {PARSCALE_CACHE: cache}})
    assert.equal(json.code, 0, json.stderr)
    assert.equal(json.stderr, '', 'the counts are in the report, not on stderr')
    const rows = (JSON.parse(json.stdout) as {results: ReportRow[]}).results
    assert.deepEqual(rows.map((r) => r.parallel), [1, 2])
    for (const {gpu_step: step} of rows) {
      assert.ok(step, 'every P has its step cost')
      assert.ok(step.dispatches_per_step > 0 && step.dispatches_per_step < step.dispatches_before_fusion, JSON.stringify(step))
      assert.ok(step.kernels_per_step >= step.dispatches_per_step)
      assert.ok(step.weight_bytes_per_step > 0)
      // lavapipe is in no vendor's table and the roofline was skipped: no floor, and the report says why
      assert.equal(step.floor_ms_per_token, null)
      assert.match(step.bandwidth_source, /not in the table of vendors' figures; the roofline probe did not run/)
    }
    assert.ok(rows[1]!.gpu_step!.dispatches_per_step > rows[0]!.gpu_step!.dispatches_per_step, 'P = 2 adds the aggregation head')
    assert.equal(rows[0]!.gpu_step!.dispatches_before_fusion, rows[1]!.gpu_step!.dispatches_before_fusion, 'one WebGPU graph for every P')

    const table = await runCli(['bench', ...TINY_GPU, '-p', '2', '--device', 'webgpu'], {env: {PARSCALE_CACHE: cache}})
    assert.equal(table.code, 0, table.stderr)
    assert.match(table.stdout, /dispatches\/step \(before fusion\)/)
    assert.ok(table.stdout.includes(`${rows[1]!.gpu_step!.dispatches_per_step} (${rows[1]!.gpu_step!.dispatches_before_fusion})`), table.stdout)
    assert.match(table.stdout, /^GPU: .*no floor: bandwidth none/m)
  } finally {
    fs.rmSync(cache, {recursive: true, force: true})
  }
})

test('the GPU floor names its bandwidth: a vendor\'s figure by adapter name, else the roofline probe measured on the adapter', async () => {
  const shape = {hiddenSize: 64, numLayers: 2, numHeads: 4, numKvHeads: 2, intermediateSize: 128, vocabSize: 300, tieWordEmbeddings: false}
  const h200 = await gpuDispatches(shape, [1, 2], 'NVIDIA H200 NVL')
  const vendor = gpuStepCosts(h200).get(2)!
  assert.equal(vendor.bandwidth_bytes_per_s, 4.8e12)
  assert.match(vendor.bandwidth_source, /^NVIDIA H200 \(HBM3e\): the vendor's figure$/)
  assert.ok(Math.abs(vendor.floor_ms_per_token! - (vendor.weight_bytes_per_step / 4.8e12) * 1000) < 1e-12)
  const probe = {bytes: 1e8, gemv_bytes_per_s: 50e9, matmul_flops_per_s: 1e12, reduce_bytes_per_s: 0}
  const measured = gpuStepCosts(await gpuDispatches(shape, [2], 'PCI 0x1234:0x5678'), probe).get(2)!
  assert.equal(measured.bandwidth_bytes_per_s, 50e9)
  assert.match(measured.bandwidth_source, /^measured on PCI 0x1234:0x5678: the roofline probe/)
  assert.equal(measured.dispatches_per_step, vendor.dispatches_per_step)
})

test('bench --profile: per-operator time of the median decode step and prefill, on the CPU and on WebGPU (the GPU\'s kernel timestamps)', async (t) => {
  const cache = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-bench-'))
  try {
    const profileOf = async (device: string) => {
      const prefix = path.join(cache, `prof-${device}`)
      const result = await runCli(['bench', ...TINY_GPU, '-p', '2', '--device', device, '--profile', prefix, '--json'], {env: {PARSCALE_CACHE: cache}})
      assert.equal(result.code, 0, result.stderr)
      const [row] = (JSON.parse(result.stdout) as {results: ReportRow[]}).results
      assert.equal(row!.profile?.length, 1, 'one session, one profile')
      const summary = row!.profile![0]!
      assert.ok(fs.existsSync(summary.file) && path.basename(summary.file).startsWith(`prof-${device}-p2-b1-s8_`), summary.file)
      const decode = summary.groups.find((g) => g.tokens === 1)
      assert.ok(decode && decode.runs >= 3 && decode.kernels > 0 && decode.ops.length > 0, JSON.stringify(summary.groups))
      assert.ok(summary.groups.some((g) => g.tokens === 8), 'the prompt\'s runs are their own group')
      return {summary, decode, row: row!}
    }
    const cpu = await profileOf('cpu')
    assert.equal(cpu.summary.clock, 'cpu kernels')
    assert.ok(cpu.decode.ops.some((o) => o.op === 'Gemm' || o.op === 'MatMul'))

    if (!adapter) return t.skip('no WebGPU adapter on this machine')
    const gpu = await profileOf('webgpu')
    assert.equal(gpu.summary.clock, 'gpu kernels', JSON.stringify(gpu.summary.event_categories))
    assert.equal(gpu.summary.note, undefined)
    const ops = new Map(gpu.decode.ops.map((o) => [o.op, o]))
    assert.ok(ops.has('GroupQueryAttention') && ops.has('MatMul'), [...ops.keys()].join(', '))
    assert.ok(gpu.decode.kernels >= gpu.row.gpu_step!.dispatches_per_step, `${gpu.decode.kernels} GPU kernels for ${gpu.row.gpu_step!.dispatches_per_step} dispatching nodes`)
    assert.ok([...ops.values()].every((o) => o.cpu_ms !== undefined && o.ms > 0))

    // a provider that writes no GPU timings: the summary says so plainly, and what it shows instead
    const events = JSON.parse(fs.readFileSync(gpu.summary.file, 'utf8')) as {cat: string}[]
    const withoutGpu = path.join(cache, 'without-gpu-events.json')
    fs.writeFileSync(withoutGpu, JSON.stringify(events.filter((e) => e.cat !== 'Api')))
    const plain = summarizeProfile(withoutGpu)
    assert.equal(plain.clock, 'cpu side of gpu nodes')
    assert.match(plain.note ?? '', /^the WebGPU provider wrote no GPU kernel timings \(no "Api" events; events by category: Session \d+, Node \d+\)/)
    assert.match(describeProfile(plain).join('\n'), /note: the WebGPU provider wrote no GPU kernel timings/)
  } finally {
    fs.rmSync(cache, {recursive: true, force: true})
  }
})
