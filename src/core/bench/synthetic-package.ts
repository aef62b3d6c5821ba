// Synthetic model packages in the parscale cache: random checkpoints, converted once, reused.
import {createHash} from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'

import {convertCheckpoints, type ConvertProgress} from '../package/convert.js'
import {isCurrentGraph, MANIFEST_FILE, readManifest, sameQuant} from '../package/manifest.js'
import {parscaleCacheDir} from '../package/paths.js'
import {writeSyntheticCheckpoint, type SyntheticShape} from '../checkpoint/synthetic.js'
import {quantKey, type QuantScheme} from '../quant/scheme.js'
import type {WeightDtype} from '../onnx/weights.js'

export interface SyntheticPackageOptions {
  parallel: number[]
  prefixTokens?: number
  seed?: number
  /** Quantized weights (a package of its own per scheme). */
  quant?: QuantScheme
  /** Float weights' storage (default fp32; fp16 halves the matrices). */
  dtype?: WeightDtype
  /** Where packages live; default `<parscale cache>/synthetic`. */
  cacheDir?: string
  onProgress?: (text: string, progress?: ConvertProgress) => void
}

/** A short stable name for a shape: the cache folder of its package. */
export function syntheticKey(shape: SyntheticShape, prefixTokens: number, seed: number): string {
  const text = JSON.stringify({...shape, prefixTokens, seed})
  const s = shape
  return `h${s.hiddenSize}-l${s.numLayers}-a${s.numHeads}x${s.numKvHeads}-i${s.intermediateSize}-v${s.vocabSize}${s.tieWordEmbeddings ? '-tied' : ''}-${createHash('sha256').update(text).digest('hex').slice(0, 8)}`
}

/**
 * Returns a converted package (fp32, or quantized as `options.quant` asks) holding every requested P of `shape`, building it when
 * the cache lacks one (or lacks a P). Checkpoints are written next to it and deleted once
 * converted, so the cache keeps one copy of the backbone.
 */
export function ensureSyntheticPackage(shape: SyntheticShape, options: SyntheticPackageOptions): string {
  const prefixTokens = options.prefixTokens ?? 48
  const seed = options.seed ?? 0
  const root = options.cacheDir ?? path.join(parscaleCacheDir(), 'synthetic')
  const dtype = options.quant ? 'fp32' : (options.dtype ?? 'fp32')
  const format = options.quant ? `-${quantKey(options.quant)}` : dtype === 'fp16' ? '-fp16' : ''
  const dir = path.join(root, `${syntheticKey(shape, prefixTokens, seed)}${format}`)
  let wanted = [...new Set(options.parallel)].sort((a, b) => a - b)
  const cached = fs.existsSync(path.join(dir, MANIFEST_FILE)) ? readManifest(dir) : undefined
  if (cached && isCurrentGraph(cached) && sameQuant(cached, options.quant) && cached.dtype === dtype) {
    if (wanted.every((p) => cached.parallel.includes(p))) return dir
    wanted = [...new Set([...cached.parallel, ...wanted])].sort((a, b) => a - b) // rebuild with the union
  }
  const work = `${dir}.checkpoints-${process.pid}`
  fs.rmSync(work, {recursive: true, force: true})
  try {
    const sources = wanted.map((p) => {
      options.onProgress?.(`writing synthetic checkpoint P=${p}`)
      const source = path.join(work, `p${p}`)
      writeSyntheticCheckpoint(source, shape, {parallel: p, prefixTokens, seed, dtype: 'f32'})
      return source
    })
    convertCheckpoints({
      sources, outDir: dir, dtype, quant: options.quant, force: true, sourceLabel: `synthetic ${path.basename(dir)}`,
      onProgress: (p) => options.onProgress?.(`converting: ${p.phase}`, p),
    })
  } finally {
    fs.rmSync(work, {recursive: true, force: true})
  }
  return dir
}
