/**
 * Kernel launches per decode step of a shape's GPU graphs, before (the P-generic WebGPU graph,
 * webgpu-graph.ts) and after (the GPU form, one graph per P, gpu-form-graph.ts), and the decode
 * floor on an adapter. The count depends on the graph's structure only (layers, P, tied head),
 * not on the widths, so it is taken on a package of the shape's depth and heads with narrow
 * widths: seconds on any CPU machine.
 */
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import type {BackboneShape} from '../checkpoint/config.js'
import {writeSyntheticCheckpoint, type SyntheticShape} from '../checkpoint/synthetic.js'
import {writeGpuFormGraph} from '../engine/gpu-form.js'
import {convertCheckpoints} from '../package/convert.js'
import {readManifest, type PackageManifest} from '../package/manifest.js'
import {countDispatches, type DispatchCount} from './dispatches.js'
import {gpuFloor, type GpuFloor} from './gpu-floor.js'
import {shapeParameters} from './scaling-law.js'
import type {GpuStepCost, ProbeResult} from './types.js'

export interface GpuDispatchRow {
  parallel: number
  /** The WebGPU graph every package has (P at run time). */
  before: DispatchCount
  /** The GPU form at this P. */
  after: DispatchCount
}

export interface GpuDispatchReport {
  rows: GpuDispatchRow[]
  floor: GpuFloor
}

/** The shape's structure with narrow widths: same layers, heads, KV heads and tying. */
function narrowed(shape: SyntheticShape | BackboneShape): SyntheticShape {
  const {numLayers, numHeads, numKvHeads, tieWordEmbeddings} = shape
  return {numLayers, numHeads, numKvHeads, tieWordEmbeddings, hiddenSize: numHeads * 8, intermediateSize: 64, vocabSize: 512}
}

/** Bytes per matrix parameter of a package: 4 (fp32), 2 (fp16), or its quantized weights' share. */
export function weightBytesPerParameter(manifest: PackageManifest): number {
  if (manifest.quant) return manifest.quant.weightBytes / Math.max(1, shapeParameters({...manifest.model}))
  return manifest.dtype === 'fp16' ? 2 : 4
}

export async function gpuDispatches(shape: SyntheticShape | BackboneShape, parallel: number[], adapter: string, bytesPerWeight = 4): Promise<GpuDispatchReport> {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-gpu-dispatches-'))
  try {
    const narrow = narrowed(shape)
    const sources = parallel.map((p) => {
      const dir = path.join(work, `p${p}`)
      writeSyntheticCheckpoint(dir, narrow, {parallel: p, prefixTokens: 48, seed: 1})
      return dir
    })
    const pkg = path.join(work, 'package')
    convertCheckpoints({sources, outDir: pkg, dtype: 'fp32'})
    const before = await countDispatches(path.join(pkg, readManifest(pkg).webgpuGraph!))
    const rows: GpuDispatchRow[] = []
    for (const p of parallel) rows.push({parallel: p, before, after: await countDispatches(writeGpuFormGraph(pkg, p))})
    // a step reads every matrix once; an untied embedding table only one row a token
    const params = shapeParameters({...shape}) - (shape.tieWordEmbeddings ? 0 : shape.vocabSize * shape.hiddenSize)
    return {rows, floor: gpuFloor(adapter, params * bytesPerWeight)}
  } finally {
    fs.rmSync(work, {recursive: true, force: true})
  }
}

/** Lines for a report. */
export function describeGpuDispatches(report: GpuDispatchReport): string[] {
  const lines = report.rows.map(({parallel, before, after}) =>
    `dispatches per decode step at P=${parallel}: ${before.dispatches} nodes (~${before.programs} kernels) in the WebGPU graph → ${after.dispatches} nodes (~${after.programs} kernels) in the GPU form`,
  )
  const {floor} = report
  lines.push(floor.floorMs === undefined
    ? `bandwidth floor: unknown for ${floor.adapter} (${(floor.weightBytes / 1e9).toFixed(2)} GB of weights a step)`
    : `bandwidth floor: ${(floor.weightBytes / 1e9).toFixed(2)} GB of weights a step at ${(floor.bandwidth!.bytesPerS / 1e12).toFixed(2)} TB/s (${floor.bandwidth!.name}) = ${floor.floorMs.toFixed(2)} ms/token`)
  return lines
}

/**
 * Each P's step cost for the bench report: the counts of `report`, and the floor from the
 * adapter's bandwidth as the vendors' table knows it, else as the roofline probe measured it
 * on the adapter (`roofline`, a matmul chain at one row: what ONNX Runtime reads at), else none.
 */
export function gpuStepCosts(report: GpuDispatchReport, roofline?: ProbeResult): Map<number, GpuStepCost> {
  const {floor} = report
  let bandwidth: {bytesPerS: number; source: string} | undefined
  if (floor.bandwidth) bandwidth = {bytesPerS: floor.bandwidth.bytesPerS, source: `${floor.bandwidth.name}: the vendor's figure`}
  else if (roofline && roofline.gemv_bytes_per_s > 0) bandwidth = {bytesPerS: roofline.gemv_bytes_per_s, source: `measured on ${floor.adapter}: the roofline probe (ONNX Runtime matmul chain at 1 row)`}
  const none = `none (${floor.adapter} is not in the table of vendors' figures${roofline ? '' : '; the roofline probe did not run: --no-roofline'})`
  const costs = new Map<number, GpuStepCost>()
  for (const {parallel, before, after} of report.rows) {
    costs.set(parallel, {
      dispatches_per_step: after.dispatches,
      kernels_per_step: after.programs,
      dispatches_before_fusion: before.dispatches,
      kernels_before_fusion: before.programs,
      weight_bytes_per_step: floor.weightBytes,
      bandwidth_bytes_per_s: bandwidth?.bytesPerS ?? null,
      bandwidth_source: bandwidth?.source ?? none,
      floor_ms_per_token: bandwidth ? (floor.weightBytes / bandwidth.bytesPerS) * 1000 : null,
    })
  }
  return costs
}
