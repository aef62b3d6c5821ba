import {existsSync, readdirSync, statSync} from 'node:fs'
import {basename, join, resolve} from 'node:path'
import {createHash} from 'node:crypto'
import {fileURLToPath} from 'node:url'

import {checkpointFingerprint, convertCheckpoints, type ConvertProgress} from './convert.js'
import {UserError} from './errors.js'
import {findCachedSnapshot} from './hf-cache.js'
import {isRepoId, resolveFamilyName} from './families.js'
import {isCurrentGraph, isModelPackage, readManifest} from './model-package.js'
import {convertedCacheDir} from './paths.js'

/** The model shipped inside parscale: a tiny ParScale family trained on Python code. */
export const DEFAULT_MODEL_DIR = fileURLToPath(new URL('../../../fixtures/default-model', import.meta.url))

export interface ResolvedModel {
  packageDir: string
  /** The P to run: the one asked for, else the package's largest. */
  parallel: number
  /** What the user named, for messages. */
  label: string
}

export interface ResolveOptions {
  parallel?: number
  onProgress?: (progress: ConvertProgress) => void
}

/**
 * Turns what a user typed into a converted package: the embedded default model (nothing
 * typed), a package folder, a checkpoint folder or a folder of P-variant checkpoints
 * (converted on first use into the cache and reused), or a hub repo id already pulled.
 */
export function resolveModel(model: string | undefined, options: ResolveOptions = {}): ResolvedModel {
  if (model === undefined) {
    if (!existsSync(DEFAULT_MODEL_DIR)) throw new UserError(`the embedded default model is missing (${DEFAULT_MODEL_DIR}); name a model`)
    return fromLocalFolder(DEFAULT_MODEL_DIR, 'the default model', options)
  }
  if (existsSync(model)) return fromLocalFolder(model, model, options)
  if (isRepoId(model)) {
    const repoId = resolveFamilyName(model, options.parallel)
    const snapshot = findCachedSnapshot(repoId)
    if (!snapshot) throw new UserError(`${repoId} is not in the Hugging Face cache; fetch it first with \`parscale pull ${repoId}\``)
    return fromCheckpoints([snapshot], repoId, options, repoId.replace('/', '--'))
  }
  throw new UserError(`unknown model "${model}": not a folder, and not a hub repo id (org/name)`)
}

/** A checkpoint folder for `convert`: a local path, or a pulled hub repo's snapshot. */
export function resolveCheckpointSource(source: string): string {
  if (existsSync(source)) return source
  if (isRepoId(source)) {
    const snapshot = findCachedSnapshot(source)
    if (!snapshot) throw new UserError(`${source} is not in the Hugging Face cache; fetch it first with \`parscale pull ${source}\``)
    return snapshot
  }
  throw new UserError(`${source}: no such checkpoint folder`)
}

function fromLocalFolder(dir: string, label: string, options: ResolveOptions): ResolvedModel {
  if (!statSync(dir).isDirectory()) throw new UserError(`${dir}: a model is a folder (a checkpoint or a converted package), not a file`)
  if (isModelPackage(dir)) return withParallel(dir, label, options.parallel)
  if (existsSync(join(dir, 'config.json'))) return fromCheckpoints([dir], label, options)
  const variants = readdirSync(dir)
    .map((name) => join(dir, name))
    .filter((sub) => existsSync(join(sub, 'config.json')))
  if (variants.length > 0) return fromCheckpoints(variants.sort(), label, options, basename(resolve(dir)))
  throw new UserError(`${dir}: no config.json and no parscale.json; not a checkpoint or a converted model`)
}

/** Converts on first use; a cached package is reused while its sources are unchanged. */
function fromCheckpoints(sources: string[], label: string, options: ResolveOptions, name = basename(resolve(sources[0]))): ResolvedModel {
  const absolute = sources.map((s) => resolve(s))
  const key = createHash('sha256').update(absolute.join('\n')).digest('hex').slice(0, 12)
  const packageDir = join(convertedCacheDir(), `${name.replace(/[^\w.-]/g, '_')}-${key}`)
  const fingerprint = absolute.map((s) => checkpointFingerprint(s)).join('+')
  const cached = isModelPackage(packageDir) ? readManifest(packageDir) : undefined
  if (!cached || cached.sourceFingerprint !== fingerprint || !isCurrentGraph(cached)) {
    convertCheckpoints({sources: absolute, outDir: packageDir, dtype: 'fp32', force: true, sourceLabel: label, onProgress: options.onProgress})
  }
  return withParallel(packageDir, label, options.parallel)
}

function withParallel(packageDir: string, label: string, parallel: number | undefined): ResolvedModel {
  const manifest = readManifest(packageDir)
  if (parallel !== undefined && !manifest.parallel.includes(parallel)) {
    throw new UserError(`${label} has no --parallel ${parallel}; available: ${manifest.parallel.join(', ')}`)
  }
  // A family package defaults to its largest P: the model the family exists for.
  return {packageDir, parallel: parallel ?? Math.max(...manifest.parallel), label}
}
