// Orchestrates a benchmark: roofline probes, then one child process per configuration.
import os from 'node:os'

import type {SyntheticShape} from '../checkpoint/synthetic.js'
import type {Device} from '../engine/device.js'
import {runWorker} from './child.js'
import {machineInfo} from './machine.js'
import {equivalentParameters, SCALING_FITS, scaledShape, shapeParameters} from './scaling-law.js'
import {ensureSyntheticPackage} from './synthetic-package.js'
import type {MachineInfo, ProbeResult, RunResult} from './types.js'
import type {PackageQuant} from '../package/manifest.js'

export interface BenchOptions {
  parallel: number[]
  batch: number[]
  /** Prompt lengths to measure each P × batch at (the context decode runs over). */
  promptLengths: number[]
  newTokens: number
  threads: number
  /** Default cpu. */
  device?: Device
  repeat: number
  /** Skip the roofline probes (tests). */
  roofline?: boolean
  profilePrefix?: string
  onStatus?: (text: string) => void
}

export interface VsParamsRow {
  dataset: string
  parallel: number
  /** N′: the P = 1 parameter count the law equates with P streams on N. */
  equivalent_parameters: number
  /** What was built and measured (smaller than N′ when scaled to fit memory). */
  measured_parameters: number
  measured_shape: SyntheticShape
  scaled_to_fit: boolean
  result: RunResult
}

export interface BenchReport {
  machine: MachineInfo
  model: string
  /** How the measured package stores its weights (null: unquantized). */
  quant?: PackageQuant | null
  roofline?: ProbeResult
  results: RunResult[]
  vs_params?: {base_parameters: number; rows: VsParamsRow[]; memory_cap_bytes: number}
}

export async function probeRoofline(threads: number, hidden = 896, intermediate = 4864, onStatus?: (t: string) => void, device: Device = 'cpu'): Promise<ProbeResult> {
  onStatus?.('measuring bandwidth and matmul rate')
  // ~420 MB of weights: far past any cache, small next to the model.
  const layers = Math.max(1, Math.round((420e6 / (8 * hidden * intermediate))))
  return runWorker({kind: 'probe', threads, device, hidden, intermediate, layers, rows: 512, repeat: 5})
}

/** Measures every P × batch × prompt length of one package, each in its own process. */
export async function benchPackage(packageDir: string, options: BenchOptions): Promise<RunResult[]> {
  const results: RunResult[] = []
  for (const parallel of options.parallel) {
    for (const batch of options.batch) {
      for (const promptLength of options.promptLengths) {
        options.onStatus?.(`running P=${parallel}, batch ${batch}, prompt ${promptLength}`)
        results.push(await runWorker({
          kind: 'run', packageDir, parallel, batch,
          promptLength, newTokens: options.newTokens, threads: options.threads, device: options.device ?? 'cpu', repeat: options.repeat,
          ...(options.profilePrefix ? {profilePrefix: `${options.profilePrefix}-p${parallel}-b${batch}-s${promptLength}`} : {}),
        }))
      }
    }
  }
  return results
}

/**
 * For each P > 1 and each dataset fit, builds a synthetic P = 1 model of the equivalent size
 * (capped so its fp32 weights take at most half the machine's memory) and measures it at
 * the smallest batch.
 */
export async function benchVsParams(base: SyntheticShape, options: BenchOptions, cacheDir?: string): Promise<NonNullable<BenchReport['vs_params']>> {
  const n = shapeParameters(base)
  const cap = os.totalmem() * 0.5
  const rows: VsParamsRow[] = []
  const measured = new Map<string, RunResult>()
  for (const fit of SCALING_FITS) {
    for (const parallel of options.parallel.filter((p) => p > 1)) {
      const target = equivalentParameters(n, parallel, fit)
      const fitting = Math.min(target, cap / 4)
      const shape = scaledShape(base, fitting)
      const key = JSON.stringify(shape)
      let result = measured.get(key)
      if (!result) {
        options.onStatus?.(`preparing a ${(shapeParameters(shape) / 1e9).toFixed(2)}B P=1 model (${fit.dataset}, P=${parallel})`)
        const dir = ensureSyntheticPackage(shape, {parallel: [1], cacheDir, onProgress: (t) => options.onStatus?.(t)})
        ;[result] = await benchPackage(dir, {...options, parallel: [1], batch: [Math.min(...options.batch)], promptLengths: [Math.min(...options.promptLengths)]})
        measured.set(key, result!)
      }
      rows.push({
        dataset: fit.dataset, parallel, equivalent_parameters: target, measured_parameters: shapeParameters(shape),
        measured_shape: shape, scaled_to_fit: fitting < target, result: result!,
      })
    }
  }
  return {base_parameters: n, rows, memory_cap_bytes: cap}
}

export function benchMachine(threads: number, device: Device = 'cpu', adapter?: string): MachineInfo {
  return machineInfo(threads, device, adapter)
}
