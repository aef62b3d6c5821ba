import {statSync, writeFileSync} from 'node:fs'

import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../base-command.js'
import {benchMachine, benchPackage, benchVsParams, probeRoofline, type BenchReport} from '../core/bench/run-bench.js'
import {prepareBenchModel} from '../core/bench/bench-model.js'
import {SCALING_FITS} from '../core/bench/scaling-law.js'
import {UsageError, UserError} from '../core/errors.js'
import {readManifest} from '../core/package/manifest.js'
import {checkWebGpu, DEVICES, type Device} from '../core/engine/device.js'
import {gpuDispatches, gpuStepCosts, weightBytesPerParameter} from '../core/bench/gpu-dispatches.js'
import {openWgslDevice} from '../core/wgsl/dawn.js'
import {wgslDispatchesPerStep} from '../core/wgsl/decoder.js'
import {SYNTHETIC_PRESETS} from '../core/checkpoint/synthetic.js'
import {renderCsv, renderTable, toJson} from '../ui/bench-report.js'
import {plotTarget, writePlots} from '../ui/bench-plot.js'
import {Progress} from '../ui/progress.js'
import {quantFlags, quantFromFlags} from '../flags/quant.js'
import {intList} from '../flags/int-list.js'
import {loadCurves, loadModes} from '../core/bench/auto-load.js'
import {ParScaleModel} from '../core/engine/model.js'
import {measureProfile, saveProfile, type CostProfile} from '../core/parallel/cost-profile.js'
import {parseAutoBudget} from '../core/parallel/policy.js'
import {renderLoadTable, writeLoadPlot} from '../ui/load-report.js'

/** The cost profile as `bench --save-profile` prints it. */
function renderProfile(profile: CostProfile, label: string): string {
  const p1 = profile.decode[0].ms
  const lines = profile.decode.map((d) => `${String(d.rows).padStart(5)}  ${d.ms.toFixed(1).padStart(8)}  ${(d.ms / p1).toFixed(2).padStart(6)}×  (P=${d.parallel} × ${d.batch})`)
  const prefill = profile.prefill.map((p) => `P=${p.parallel} ${(p.ms / p.tokens).toFixed(1)} ms/token`).join(', ')
  return `cost profile of ${label} · ${profile.key} · measured in ${(profile.measureMs / 1000).toFixed(1)} s\n rows  step ms  vs 1 row\n${lines.join('\n')}\nprefill (${profile.prefill[0]?.tokens ?? 0} tokens): ${prefill}`
}

/**
 * `--json FILE`, the spelling before `--json` became a switch (JSON on stdout) and `--json-file
 * FILE` the file form: `--json=FILE`, or `--json` before a word ending in .json that is no folder
 * (a model is a folder), still writes FILE, with a warning.
 */
export function legacyJsonFile(argv: string[], warn: (message: string) => void): string[] {
  const out: string[] = []
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!
    if (arg === '--') return [...out, ...argv.slice(i)]
    const next = argv[i + 1]
    const file = arg.startsWith('--json=') ? arg.slice('--json='.length) : arg === '--json' && next !== undefined && next.endsWith('.json') && !statSync(next, {throwIfNoEntry: false})?.isDirectory() ? next : undefined
    if (file === undefined) {
      out.push(arg)
      continue
    }
    warn(`--json FILE is now --json-file FILE (--json alone prints the report on stdout); writing ${file}`)
    out.push('--json-file', file)
    if (arg === '--json') i++
  }
  return out
}

const presetHelp = Object.entries(SYNTHETIC_PRESETS)
  .map(([name, s]) => `${name}: hidden ${s.hiddenSize}, ${s.numLayers} layers, ${s.numHeads} heads / ${s.numKvHeads} KV, intermediate ${s.intermediateSize}, vocab ${s.vocabSize}${s.tieWordEmbeddings ? ', tied' : ''}`)
  .join('\n  ')

export default class Bench extends BaseCommand {
  static override summary = 'Measure prefill, decode latency and peak memory per P (each configuration in its own process)'
  static override description = `For each P × batch: prefill ms, time to first token, decode ms/token (median and p90 after a warm-up), tokens/s, peak RSS, weight and KV-cache bytes, each relative to P = 1. A roofline measured with ONNX Runtime in the same run (read bandwidth, matmul FLOP rate) puts decode against the bandwidth floor (weight bytes ÷ bandwidth) and prefill against the FLOP rate.

--synthetic SHAPE uses random weights in real shapes (generated and converted once into the parscale cache). Presets:
  ${presetHelp}
(0.5b and 3b are Qwen2.5-0.5B/3B; 1.8b is Qwen1.5-1.8B's shape; 4.7b is a Qwen2.5-style widening, not a published model.) Explicit --hidden/--layers/--heads/--kv-heads/--intermediate/--vocab override a preset.

--vs-params: the paper's parallel scaling law L = E + (A·1e9/(N·(k·ln P + 1)))^α says P streams match a P = 1 model of N′ = N·(k·ln P + 1) parameters (only k matters for N′). k = ${SCALING_FITS.map((f) => `${f.k} (${f.dataset})`).join(', ')}: approximate values of the paper's published fits, not re-fitted. A synthetic P = 1 model of about N′ (wider and deeper as Qwen2.5 grows; capped so its fp32 weights take at most half of RAM, stated when capped) is measured the same way, and memory and latency increases of parallel vs parameter scaling are printed side by side.

--save-profile measures the cost profile \`--parallel auto\` predicts from (decode step time by rows = Σ P of the sequences in a step, and prefill per token), saves it beside the package for these --threads and --device, and prints it: the way to refresh it after the machine changed.
--concurrency N[,N…] measures \`parscale serve\` under load instead: one server per mode (fixed smallest P, fixed largest P, --parallel auto with --auto-budget), each loaded at every N by N clients sending --repeat requests of --max-new-tokens back to back (paired rounds); the table gives tokens/s, latency and the P the answers got, and --plot charts them against N (docs/auto-parallel.md).

--plot FILE.svg|FILE.html draws the profile with Vega-Lite (rendered in Node, no browser): decode ms/token, prefill and peak RSS against P with the roofline floors dashed, the parameter-scaling curve beside ParScale's after --vs-params, and one line per P against batch and prompt length when several were measured. The HTML page holds the charts and the table and needs no network. The file's folder must exist; it is checked before anything runs.`
  static override examples = [
    '<%= config.bin %> bench --synthetic 0.5b --parallel 1,2,4,8',
    '<%= config.bin %> bench --synthetic 0.5b --parallel 1,8 --vs-params --json-file bench.json',
    '<%= config.bin %> bench -p 1,8 -n 16 --json | jq .results',
    '<%= config.bin %> bench --synthetic 0.5b --quant int4 --parallel 1,8',
    '<%= config.bin %> bench ./my-package --batch-size 1,4 --csv',
    '<%= config.bin %> bench --synthetic 0.5b --parallel 1,8 --prompt-len 64,1024,2048 --max-new-tokens 33 --repeat 1',
    '<%= config.bin %> bench --synthetic 0.5b --parallel 1,2,4,8 --plot profile.html',
    '<%= config.bin %> bench --synthetic 0.5b --vs-params --plot charts.svg --plot report.html',
    '<%= config.bin %> bench --save-profile --threads 2',
    '<%= config.bin %> bench --synthetic 0.5b --concurrency 1,4,8,24 --auto-budget 2 -n 16 --repeat 2 --plot load.svg',
  ]
  static override args = {
    model: Args.string({description: 'converted package, checkpoint folder or pulled hub repo id (default: the embedded model)', ignoreStdin: true}),
  }
  static override flags = {
    parallel: Flags.string({char: 'p', description: 'P values to measure', default: '1,2,4,8', helpValue: 'LIST'}),
    // The old spellings (--batch, --new-tokens) still work, with a warning: scripts keep running.
    'batch-size': Flags.string({description: 'sequences decoding together (as run --batch-size); a list measures each', default: '1', helpValue: 'LIST', aliases: ['batch'], deprecateAliases: true}),
    'prompt-len': Flags.string({description: 'prompt tokens; a list (64,1024,2048) measures decode against context length', default: '64', helpValue: 'LIST'}),
    'max-new-tokens': Flags.integer({char: 'n', description: 'tokens generated per sequence, exactly (bench ignores end-of-sequence): decode steps + 1', default: 32, min: 2, helpValue: 'N', aliases: ['new-tokens'], deprecateAliases: true}),
    threads: Flags.integer({description: 'intra-op threads (default: all cores)', min: 1}),
    repeat: Flags.integer({description: 'measured repetitions after one warm-up', default: 3, min: 1}),
    synthetic: Flags.string({description: `random weights of a preset shape (${Object.keys(SYNTHETIC_PRESETS).join(', ')})`}),
    hidden: Flags.integer({min: 1, description: 'synthetic: hidden size'}),
    layers: Flags.integer({min: 1, description: 'synthetic: layers'}),
    heads: Flags.integer({min: 1, description: 'synthetic: attention heads'}),
    'kv-heads': Flags.integer({min: 1, description: 'synthetic: KV heads'}),
    intermediate: Flags.integer({min: 1, description: 'synthetic: MLP size'}),
    vocab: Flags.integer({min: 1, description: 'synthetic: vocabulary'}),
    'vs-params': Flags.boolean({description: 'compare with parameter scaling of equal predicted loss (needs P = 1 and a synthetic shape)'}),
    'no-roofline': Flags.boolean({description: 'skip the bandwidth and FLOP-rate probes'}),
    json: Flags.boolean({description: 'print the report as one JSON object on stdout instead of the table', exclusive: ['csv']}),
    'json-file': Flags.string({description: 'also write the report as JSON to FILE (the table still prints)', helpValue: 'FILE'}),
    csv: Flags.boolean({description: 'print CSV instead of the table'}),
    plot: Flags.string({
      multiple: true,
      // One file per --plot: `--plot a.svg MODEL` must not read MODEL as a second file.
      multipleNonGreedy: true,
      description: 'also draw charts to FILE.svg, or FILE.html (charts and table in one offline page); repeat for both',
      helpValue: 'FILE.svg|FILE.html',
    }),
    profile: Flags.string({description: 'write ONNX Runtime profiles with this file prefix (on the hand-written WebGPU kernels, PARSCALE_WEBGPU_ROUTE=wgsl: GPU time per kernel from timestamps, PREFIX-wgsl-p{P}.json) and print where the time went'}),
    'save-profile': Flags.boolean({description: 'measure the cost profile --parallel auto predicts from (decode step by rows, prefill) afresh for these --threads and --device, save it beside the package, print it; nothing else is measured'}),
    concurrency: Flags.string({description: 'serve under load instead: `parscale serve` children at fixed smallest P, fixed largest P and --parallel auto, each loaded by N clients at once (a list: each N), every client sending --repeat requests of --max-new-tokens one after another; tokens/s, latency and the P the answers got (--plot charts them)', helpValue: 'LIST'}),
    'auto-budget': Flags.string({description: 'with --concurrency: the auto server\'s --auto-budget', helpValue: 'X'}),
    device: Flags.string({description: 'where the model runs: cpu, or a GPU through ONNX Runtime\'s WebGPU provider (one CPU thread launches its kernels; --threads is for cpu)', options: [...DEVICES], default: 'cpu'}),
    ...quantFlags,
  }

  async run(): Promise<void> {
    this.argv = legacyJsonFile(this.argv, (message) => this.warn(message))
    const {args, flags} = await this.parse(Bench)
    const parallel = intList(flags.parallel, 'parallel')
    const batch = intList(flags['batch-size'], 'batch-size')
    const promptLengths = intList(flags['prompt-len'], 'prompt-len')
    const threads = flags.threads ?? benchMachine(0).cores
    const device = flags.device as Device
    const quant = quantFromFlags(flags)
    const adapter = device === 'webgpu' ? await checkWebGpu() : undefined // before preparing any model
    const dims = {
      hiddenSize: flags.hidden, numLayers: flags.layers, numHeads: flags.heads, numKvHeads: flags['kv-heads'],
      intermediateSize: flags.intermediate, vocabSize: flags.vocab,
    }
    const synthetic = flags.synthetic !== undefined || Object.values(dims).some((v) => v !== undefined)
    if (flags['vs-params'] && !synthetic) throw new UsageError('--vs-params needs a synthetic shape (--synthetic 0.5b)')
    if (flags['vs-params'] && !parallel.includes(1)) parallel.unshift(1)
    // A bad --plot target fails now, not after minutes of measuring.
    const plots = (flags.plot ?? []).map(plotTarget)
    const autoBudget = parseAutoBudget(flags['auto-budget'])
    if (autoBudget !== undefined && flags.concurrency === undefined) throw new UsageError('--auto-budget goes with --concurrency (the auto server\'s budget)')
    if (flags['save-profile'] && flags.concurrency !== undefined) throw new UsageError('--save-profile and --concurrency are separate runs: drop one')

    const progress = new Progress('preparing')
    const onStatus = (text: string) => progress.update(text)
    try {
      const {packageDir, label, shape} = prepareBenchModel({model: args.model, synthetic: flags.synthetic, dims, parallel, quant}, onStatus, (line) => progress.log(line))
      const manifest = readManifest(packageDir)
      const model = manifest.model
      if (flags['save-profile']) {
        const maxBatch = Math.max(8, ...batch)
        onStatus('measuring the cost profile')
        const session = await ParScaleModel.open(packageDir, {threads: flags.threads, device})
        try {
          const profile = await measureProfile(session, {threads: flags.threads, device}, maxBatch)
          const file = saveProfile(packageDir, profile)
          progress.stop()
          this.log(flags.json ? JSON.stringify(profile) : renderProfile(profile, label))
          process.stderr.write(`saved the cost profile to ${file}\n`)
        } finally {
          await session.release()
        }
        return
      }
      if (flags.concurrency !== undefined) {
        const concurrencies = intList(flags.concurrency, 'concurrency')
        const modes = loadModes(manifest.parallel, autoBudget === undefined ? [] : ['--auto-budget', String(autoBudget)])
        const serveArgs = ['--threads', String(threads), '--max-batch', String(Math.max(...batch, 8)), '--max-queue', String(Math.max(256, 2 * Math.max(...concurrencies)))]
        const prompts = ['def fibonacci(n):', 'import os\n', 'class Parser:', 'for i in range(', 'def read_config(path):', 'import json\n\n', 'class Stack:', 'def main():\n']
        const curves = await loadCurves(packageDir, modes, concurrencies, {requestsPerClient: flags.repeat, maxTokens: flags['max-new-tokens'], prompts}, serveArgs, onStatus)
        progress.stop()
        this.log(flags.json ? JSON.stringify({model: label, threads, curves}) : `${label} · ${threads} threads · ${flags['max-new-tokens']} tokens per request, ${flags.repeat} per client\n${renderLoadTable(curves)}`)
        for (const {file} of plots) await writeLoadPlot(curves, file, `${label}: serve under load`)
        return
      }
      // A prompt past the model's positions would fail inside ONNX Runtime after minutes of other runs.
      const newTokens = flags['max-new-tokens']
      const longest = Math.max(...promptLengths) + newTokens
      if (longest > model.maxPositionEmbeddings) throw new UserError(`--prompt-len ${Math.max(...promptLengths)} + --max-new-tokens ${newTokens} = ${longest} positions; ${label} takes ${model.maxPositionEmbeddings}`)
      const options = {parallel, batch, promptLengths, newTokens, threads, device, repeat: flags.repeat, onStatus, ...(flags.profile ? {profilePrefix: flags.profile} : {})}
      const report: BenchReport = {machine: benchMachine(threads, device, adapter && `${adapter.name} (${adapter.backend})`), model: label, quant: manifest.quant ?? null, results: []}
      if (!flags['no-roofline']) report.roofline = await probeRoofline(threads, model.hiddenSize, model.intermediateSize, onStatus, device)
      report.results = await benchPackage(packageDir, options)
      if (device === 'webgpu') {
        // kernel launches per decode step (counted from the graphs) and the adapter's bandwidth floor, per P
        onStatus('counting dispatches per decode step')
        const costs = gpuStepCosts(await gpuDispatches(model, parallel, adapter?.name ?? 'unknown adapter', weightBytesPerParameter(manifest)), report.roofline)
        // on the hand-written kernels (PARSCALE_WEBGPU_ROUTE=wgsl) a step is their dispatches, not the GPU form's
        const wgsl = report.results.some((r) => r.kernels?.decode.startsWith('hand-written')) ? await openWgslDevice() : undefined
        report.results = report.results.map((r) => {
          const cost = costs.get(r.parallel)
          if (cost && wgsl && typeof wgsl !== 'string' && r.kernels?.decode.startsWith('hand-written')) {
            const count = wgslDispatchesPerStep(model, r.parallel, wgsl.device.limits.maxStorageBufferBindingSize!, manifest.dtype === 'fp16' ? 'f16' : 'f32')
            return {...r, gpu_step: {...cost, dispatches_per_step: count, kernels_per_step: count}}
          }
          return cost ? {...r, gpu_step: cost} : r
        })
      }
      if (flags['vs-params'] && shape) report.vs_params = await benchVsParams(shape, options)
      progress.stop()
      const jsonFile = flags['json-file']
      if (jsonFile) writeFileSync(jsonFile, JSON.stringify(toJson(report), null, 2) + '\n')
      this.log(flags.json ? JSON.stringify(toJson(report)) : flags.csv ? renderCsv(report).trimEnd() : renderTable(report))
      if (jsonFile) process.stderr.write(`wrote the report as JSON to ${jsonFile}\n`)
      await writePlots(report, plots)
    } finally {
      progress.stop()
    }
  }
}
