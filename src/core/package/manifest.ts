import {createHash} from 'node:crypto'
import {existsSync, readFileSync, statSync} from 'node:fs'
import {join} from 'node:path'

import type {BackboneShape, ModelConfig} from '../checkpoint/config.js'
import {FileFormatError, UserError} from '../errors.js'
import {GRAPH_VERSION} from '../onnx/parscale-graph.js'
import type {EmbeddingTable, StoredTensor, WeightDtype} from '../onnx/weights.js'
import type {QuantName, QuantScheme} from '../quant/scheme.js'

export type {StoredTensor}

export const MANIFEST_FILE = 'parscale.json'
export const BACKBONE_WEIGHTS_FILE = 'backbone.weights'
export const PACKAGE_FORMAT = 'parscale-onnx'
/** 3 adds `quant` (quantized packages are written as 3, others as 2, which older parscale reads). */
export const PACKAGE_FORMAT_VERSION = 3
export const UNQUANTIZED_FORMAT_VERSION = 2
export const GRAPH_FILE = 'model.onnx'
/** The decoder in the form for a GPU (see webgpu-graph.ts); it reads the same weight files. */
export const WEBGPU_GRAPH_FILE = 'model.webgpu.onnx'

/** Files copied from the checkpoint so a package runs on its own. */
export const COPIED_FILES = ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.json', 'merges.txt']

/**
 * One P of a package: the weights only it has (each layer's stream prefixes and the
 * aggregation head), float32, in `weights`, indexed by `tensors`. P = 1 has none.
 */
export interface PackageVariant {
  parallel: number
  weights: string | null
  tensors: Record<string, StoredTensor>
  prefixTokens: number
  attnSmooth: number
  source: string
}

/**
 * How a quantized package (`convert --quant`) stores its backbone: every projection, MLP
 * matrix and the LM head as `MatMulNBits` codes, the embedding table as
 * `GatherBlockQuantized` codes, symmetric, one float32 scale per block; vectors float32.
 */
export interface PackageQuant {
  scheme: QuantName
  bits: number
  blockSize: number
  /** Matrices whose input size `blockSize` does not divide, with the block size they use instead. */
  blockFallbacks: Record<string, number>
  /** `MatMulNBits` accuracy_level (4: int8 activations, integer dot products). */
  accuracyLevel: number
  /** Stored bytes of the backbone's parameters, each once (a tied head's copy counted once, rotary tables not). */
  weightBytes: number
}

/**
 * `parscale.json`: what run/eval/bench need to know without opening the graph. Several P
 * values can share one backbone (published families freeze it), each a variant.
 */
export interface PackageManifest {
  format: typeof PACKAGE_FORMAT
  formatVersion: number
  toolVersion: string
  /** `GRAPH_VERSION` of the converter that wrote the graph. */
  graphVersion: number
  /** The one decoder graph every P runs (on the CPU). */
  graph: string
  /**
   * The same decoder in the form for `--device webgpu`; absent in a quantized package, whose
   * matrices only the CPU graph's quantized operators read.
   */
  webgpuGraph?: string
  createdAt: string
  source: string
  /** The checkpoint's identity when it was converted (see `checkpointFingerprint`). */
  sourceFingerprint: string
  dtype: WeightDtype
  /** Set when the backbone's matrices are quantized. */
  quant?: PackageQuant
  /** The shared backbone: everything but prefixes and aggregation. */
  model: BackboneShape
  backbone: {weights: string; bytes: number; sha256: string}
  /** Where the embedding table is (graph version 8 on): the CPU graph takes its rows as `inputs_embeds`, read by the engine. */
  embedding: EmbeddingTable
  /** Sorted list of the P values available (same order as variants). */
  parallel: number[]
  variants: PackageVariant[]
  /** The checkpoint folders it was converted from (absolute), so a damaged package can be converted again. */
  sources?: string[]
  /** The graphs and weight files the converter wrote, with their sizes in bytes: a truncated or missing one is damage (copied configs may be edited). */
  files?: Record<string, number>
}

/**
 * A package whose files are not what its manifest says (one missing, one truncated, the
 * manifest unreadable): it cannot run as it is, but its checkpoint, where known, converts it
 * again (resolve.ts).
 */
export class DamagedPackageError extends FileFormatError {
  constructor(file: string, readonly problem: string, readonly packageDir: string) {
    super(file, `${problem}; the package is damaged`)
    this.name = 'DamagedPackageError'
  }
}

export function variantWeightsFile(parallel: number): string {
  return `p${parallel}.weights`
}

export function isModelPackage(dir: string): boolean {
  return existsSync(join(dir, MANIFEST_FILE))
}

/** Reads and checks a package's manifest, and that the files it names are there. */
export function readManifest(dir: string): PackageManifest {
  const file = join(dir, MANIFEST_FILE)
  if (!existsSync(file)) throw new UserError(`${dir}: not a parscale model package (no ${MANIFEST_FILE}); convert a checkpoint with \`parscale convert\``)
  let manifest: PackageManifest
  try {
    manifest = JSON.parse(readFileSync(file, 'utf8')) as PackageManifest
  } catch (error) {
    throw new DamagedPackageError(file, `not valid JSON (${(error as Error).message})`, dir)
  }
  if (manifest.format !== PACKAGE_FORMAT) throw new FileFormatError(file, `format is ${JSON.stringify(manifest.format)}, expected "${PACKAGE_FORMAT}"`)
  if (manifest.formatVersion > PACKAGE_FORMAT_VERSION) {
    throw new FileFormatError(file, `format version ${manifest.formatVersion} is newer than this parscale understands (${PACKAGE_FORMAT_VERSION}); upgrade parscale`)
  }
  // A package of an older format is not read further: callers convert it again (isCurrentGraph).
  if (!isCurrentGraph(manifest)) return manifest
  checkPackageFiles(dir, manifest)
  return manifest
}

/** Every file the manifest names is there, at its recorded size (packages before `files`: the backbone's). */
function checkPackageFiles(dir: string, manifest: PackageManifest): void {
  const needed = [manifest.graph, ...(manifest.webgpuGraph ? [manifest.webgpuGraph] : []), manifest.backbone.weights, ...manifest.variants.flatMap((v) => v.weights ?? [])]
  const sizes = manifest.files ?? {[manifest.backbone.weights]: manifest.backbone.bytes}
  for (const name of new Set([...needed, ...Object.keys(sizes)])) {
    const size = statSync(join(dir, name), {throwIfNoEntry: false})?.size
    if (size === undefined) throw new DamagedPackageError(join(dir, name), 'missing from the model package', dir)
    const expected = sizes[name]
    if (expected !== undefined && size !== expected) throw new DamagedPackageError(join(dir, name), `is ${size} bytes, the manifest says ${expected}`, dir)
  }
}

/** Whether a cached package was written by this converter (else convert it again). */
export function isCurrentGraph(manifest: PackageManifest): boolean {
  return manifest.graphVersion === GRAPH_VERSION
}

/** Whether a package stores its weights as `quant` asks (undefined: unquantized). */
export function sameQuant(manifest: PackageManifest, quant: QuantScheme | undefined): boolean {
  if (!quant || !manifest.quant) return !quant && !manifest.quant
  return manifest.quant.scheme === quant.name && manifest.quant.blockSize === quant.blockSize
}

/** The variant for `parallel`, or an error listing the P values the package has. */
export function selectVariant(manifest: PackageManifest, parallel: number | undefined, where: string): PackageVariant {
  if (parallel === undefined) return manifest.variants[0]
  const variant = manifest.variants.find((v) => v.parallel === parallel)
  if (!variant) throw new UserError(`${where} has no --parallel ${parallel}; available: ${manifest.parallel.join(', ')}`)
  return variant
}

/** The full ModelConfig of one variant, rebuilt from the manifest. */
export function variantConfig(manifest: PackageManifest, variant: PackageVariant): ModelConfig {
  return {
    ...manifest.model,
    modelType: variant.parallel > 1 ? 'qwen2_parscale' : 'qwen2',
    parallel: variant.parallel,
    prefixTokens: variant.prefixTokens,
    attnSmooth: variant.attnSmooth,
    raw: {},
  }
}

/**
 * What a package computes, from its content: the graph version, dtype and shapes, the
 * backbone's digest, each P's weights and the copied tokenizer and config files. Two
 * conversions of the same checkpoint on two machines agree, where `sourceFingerprint` (sizes
 * and modification times of the checkpoint's files) does not; a queue worker serves a job
 * only when its own package has the job's fingerprint.
 */
export function packageFingerprint(dir: string, manifest: PackageManifest = readManifest(dir)): string {
  const fileDigest = (name: string) => createHash('sha256').update(readFileSync(join(dir, name))).digest('hex')
  const variants = manifest.variants.map(({source: _source, weights, ...rest}) => ({...rest, weights: weights === null ? null : fileDigest(weights)}))
  const copied = COPIED_FILES.filter((name) => existsSync(join(dir, name))).map((name) => [name, fileDigest(name)])
  const content = {formatVersion: manifest.formatVersion, graphVersion: manifest.graphVersion, dtype: manifest.dtype, model: manifest.model, backbone: manifest.backbone.sha256, variants, copied}
  return createHash('sha256').update(JSON.stringify(content)).digest('hex').slice(0, 16)
}
