import {createHash} from 'node:crypto'
import {copyFileSync, existsSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync, mkdirSync} from 'node:fs'
import {basename, dirname, join, resolve} from 'node:path'

import {Checkpoint} from '../checkpoint/checkpoint.js'
import {backboneShape} from '../checkpoint/config.js'
import {UserError} from '../errors.js'
import {
  BACKBONE_WEIGHTS_FILE,
  COPIED_FILES,
  MANIFEST_FILE,
  PACKAGE_FORMAT,
  PACKAGE_FORMAT_VERSION,
  UNQUANTIZED_FORMAT_VERSION,
  type PackageManifest,
  type PackageQuant,
  type PackageVariant,
  GRAPH_FILE,
  variantWeightsFile,
  WEBGPU_GRAPH_FILE,
} from './manifest.js'
import {ExternalDataFile} from '../onnx/external-data.js'
import {buildDecoderGraph, GRAPH_VERSION} from '../onnx/parscale-graph.js'
import {buildWebGpuDecoderGraph} from '../onnx/webgpu-graph.js'
import {isProcessAlive} from '../processes.js'
import {CheckpointWeights, WeightStore, writeStreamTensors, type EmbeddingTable, type WeightDtype} from '../onnx/weights.js'
import {MATMUL_ACCURACY_LEVEL, QuantizedCheckpointWeights} from '../onnx/quantized-weights.js'
import type {QuantScheme} from '../quant/scheme.js'
import {TOOL_VERSION} from '../version.js'

export interface ConvertProgress {
  phase: string
  doneBytes: number
  totalBytes: number
}

export interface ConvertOptions {
  /** Checkpoint folders; several must share one backbone and differ in P. */
  sources: string[]
  outDir: string
  dtype: WeightDtype
  /** Quantize the backbone's matrices (dtype is then fp32: what the vectors keep). */
  quant?: QuantScheme
  /** Replace an existing package at outDir. */
  force?: boolean
  /** How the source is named in the manifest (a hub repo id, say); default: its path. */
  sourceLabel?: string
  onProgress?: (progress: ConvertProgress) => void
}

/**
 * Converts Hugging Face checkpoints into one model package. Everything is written into a
 * temporary sibling folder that is renamed into place only when complete, so a failed or
 * interrupted conversion leaves nothing a later command would load. Conversion runs
 * synchronously, so Ctrl-C ends the process at once (no handler could run before the end);
 * the folder it leaves is removed by the next conversion to the same place.
 */
export function convertCheckpoints(options: ConvertOptions): PackageManifest {
  const checkpoints = options.sources.map((source) => Checkpoint.open(source))
  checkSameFamily(checkpoints)
  const outDir = resolve(options.outDir)
  if (existsSync(outDir) && !options.force) {
    throw new UserError(`${outDir} already exists; choose another --out or pass --force to replace it`)
  }
  mkdirSync(dirname(outDir), {recursive: true})
  removeAbandonedWork(outDir)
  const tempDir = `${outDir}${PARTIAL}${process.pid}-${Date.now()}`
  mkdirSync(tempDir)
  try {
    const manifest = writePackage(tempDir, checkpoints, options)
    replaceDir(tempDir, outDir)
    return manifest
  } catch (error) {
    rmSync(tempDir, {recursive: true, force: true})
    if ((error as NodeJS.ErrnoException).code === 'ENOSPC') throw new UserError(`${outDir}: no space left on device while converting; nothing was written`)
    throw error
  }
}

const PARTIAL = '.partial-'
const REPLACED = '.old-'

/** Removes the work folders of conversions into `outDir` whose process has died. */
function removeAbandonedWork(outDir: string): void {
  const base = basename(outDir)
  for (const name of readdirSync(dirname(outDir))) {
    const match = /^\.(?:partial|old)-(\d+)-\d+$/.exec(name.slice(base.length))
    if (name.startsWith(base) && match && !isProcessAlive(Number(match[1]))) rmSync(join(dirname(outDir), name), {recursive: true, force: true})
  }
}

function writePackage(dir: string, checkpoints: Checkpoint[], options: ConvertOptions): PackageManifest {
  const totalBytes = checkpoints.reduce((sum, c) => sum + c.totalBytes, 0)
  let doneBytes = 0
  const report = (phase: string) => options.onProgress?.({phase, doneBytes, totalBytes})
  const backboneFile = new ExternalDataFile(join(dir, BACKBONE_WEIGHTS_FILE))
  const store = new WeightStore(backboneFile)
  const variants: PackageVariant[] = []
  let blockFallbacks: Record<string, number> = {}
  let embedding: EmbeddingTable | undefined
  for (const [index, checkpoint] of checkpoints.entries()) {
    const {config} = checkpoint
    const phase = `converting P=${config.parallel}`
    report(phase)
    const onBytesRead = (bytes: number) => {
      doneBytes += bytes
      report(phase)
    }
    // Every P's backbone goes through the graph builder: the first writes it, the others are
    // checked byte for byte against it (one graph serves every P).
    let plain: CheckpointWeights | undefined
    let weights: CheckpointWeights | undefined
    const graph = buildDecoderGraph(config, (g) => {
      if (!options.quant) return (weights = plain = new CheckpointWeights(g, checkpoint, store, options.dtype, onBytesRead))
      const quantized = new QuantizedCheckpointWeights(g, checkpoint, store, options.quant, onBytesRead)
      blockFallbacks = quantized.blockFallbacks
      return (weights = quantized)
    })
    // The CPU graph takes the tokens' rows as input: the table is stored for the engine to read
    // (and for the GPU form, which gathers them itself).
    const table = weights!.embeddingTable('model.embed_tokens.weight')
    embedding ??= table
    if (index === 0) {
      writeFileSync(join(dir, GRAPH_FILE), graph.toModelBytes(TOOL_VERSION))
      // The GPU form reads the weights the CPU graph placed: structure only, nothing written
      // twice. It multiplies by float matrices, so a quantized package has none (CPU only).
      if (plain) {
        const gpu = buildWebGpuDecoderGraph(config, (g) => plain!.placedFor(g))
        writeFileSync(join(dir, WEBGPU_GRAPH_FILE), gpu.toModelBytes(TOOL_VERSION))
      }
    }
    const variantFile = config.parallel > 1 ? variantWeightsFile(config.parallel) : null
    const tensors = variantFile ? writeStreamTensors(join(dir, variantFile), checkpoint, onBytesRead) : {}
    variants.push({
      parallel: config.parallel,
      weights: variantFile,
      tensors,
      prefixTokens: config.prefixTokens,
      attnSmooth: config.attnSmooth,
      source: options.sourceLabel && checkpoints.length === 1 ? options.sourceLabel : resolve(checkpoint.dir),
    })
  }
  backboneFile.close()

  const first = checkpoints[0]
  for (const name of COPIED_FILES) {
    const file = join(first.dir, name)
    if (existsSync(file)) copyFileSync(file, join(dir, name))
  }
  const quant: PackageQuant | undefined = options.quant && {
    scheme: options.quant.name,
    bits: options.quant.bits,
    blockSize: options.quant.blockSize,
    blockFallbacks,
    accuracyLevel: MATMUL_ACCURACY_LEVEL,
    weightBytes: parameterBytes(store, first.config.tieWordEmbeddings),
  }
  const manifest: PackageManifest = {
    format: PACKAGE_FORMAT,
    formatVersion: quant ? PACKAGE_FORMAT_VERSION : UNQUANTIZED_FORMAT_VERSION,
    toolVersion: TOOL_VERSION,
    graphVersion: GRAPH_VERSION,
    graph: GRAPH_FILE,
    ...(quant ? {} : {webgpuGraph: WEBGPU_GRAPH_FILE}),
    createdAt: new Date().toISOString(),
    source: options.sourceLabel ?? resolve(first.dir),
    sourceFingerprint: checkpoints.map((cp) => checkpointFingerprint(cp.dir)).join('+'),
    dtype: options.dtype,
    ...(quant ? {quant} : {}),
    model: backboneShape(first.config),
    backbone: {weights: BACKBONE_WEIGHTS_FILE, bytes: backboneFile.size, sha256: store.backboneDigest()},
    embedding: embedding!,
    parallel: variants.map((v) => v.parallel),
    variants,
    sources: checkpoints.map((cp) => resolve(cp.dir)),
    // The graphs and weights, not the copied configs: a user may edit generation_config.json.
    files: Object.fromEntries(readdirSync(dir).filter((name) => !COPIED_FILES.includes(name)).sort().map((name) => [name, statSync(join(dir, name)).size])),
  }
  // The manifest goes last: a folder without one is never taken for a package.
  writeFileSync(join(dir, MANIFEST_FILE), JSON.stringify(manifest, null, 2) + '\n')
  report('done')
  return manifest
}

/**
 * Stored bytes of the backbone's parameters, each once: what a decode step reads. A tied
 * model's embedding table is the head's second copy (Gather reads a few rows of it), and the
 * rotary tables are computed, not parameters.
 */
function parameterBytes(store: WeightStore, tied: boolean): number {
  let bytes = 0
  for (const [name, placed] of store.placedBackbone) {
    if (name.startsWith('rotary.') || (tied && name.startsWith('model.embed_tokens.weight'))) continue
    bytes += placed.location.length
  }
  return bytes
}

/** Several sources make one package only as P variants of one backbone shape. */
function checkSameFamily(checkpoints: Checkpoint[]): void {
  if (checkpoints.length === 0) throw new UserError('nothing to convert: give at least one checkpoint folder')
  const shape = (cp: Checkpoint) => JSON.stringify(backboneShape(cp.config))
  const seen = new Set<number>()
  for (const cp of checkpoints) {
    if (shape(cp) !== shape(checkpoints[0])) throw new UserError(`${cp.dir}: its backbone shape differs from ${checkpoints[0].dir}; only P variants of one model share a package`)
    if (seen.has(cp.config.parallel)) throw new UserError(`${cp.dir}: P=${cp.config.parallel} is given twice`)
    seen.add(cp.config.parallel)
  }
}

/** Identifies a checkpoint's content cheaply: config text plus each weight file's size and mtime. */
export function checkpointFingerprint(dir: string): string {
  const hash = createHash('sha256')
  hash.update(readFileSync(join(dir, 'config.json')))
  for (const name of readdirSync(dir).sort()) {
    if (!name.endsWith('.safetensors') && !name.endsWith('.json')) continue
    const stat = statSync(join(dir, name))
    hash.update(`${name}:${stat.size}:${stat.mtimeMs}\n`)
  }
  return hash.digest('hex').slice(0, 16)
}

/** Moves a finished folder to its final path, replacing what was there only at the end. */
function replaceDir(from: string, to: string): void {
  if (!existsSync(to)) {
    renameSync(from, to)
    return
  }
  const old = `${to}${REPLACED}${process.pid}-${Date.now()}`
  renameSync(to, old)
  renameSync(from, to)
  rmSync(old, {recursive: true, force: true})
}

export function defaultOutDir(source: string): string {
  return `${resolve(source)}-onnx`.replace(/[\\/]$/, '') || basename(source)
}
