import {existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync} from 'node:fs'
import {basename, isAbsolute, join, resolve} from 'node:path'
import {createHash} from 'node:crypto'
import {fileURLToPath} from 'node:url'

import {checkpointFingerprint, convertCheckpoints, type ConvertProgress} from './convert.js'
import {UserError} from '../errors.js'
import {findCachedSnapshot} from '../hub/cache.js'
import {isRepoId, resolveFamilyName} from '../hub/families.js'
import {DamagedPackageError, isCurrentGraph, isModelPackage, MANIFEST_FILE, readManifest, sameQuant, type PackageManifest} from './manifest.js'
import {describeQuant, quantKey, quantScheme, type QuantScheme} from '../quant/scheme.js'
import {convertedCacheDir, parscaleCacheDir, removalAdvice} from './paths.js'

/** The model shipped inside parscale: a tiny ParScale family trained on Python code. */
export const DEFAULT_MODEL_DIR = fileURLToPath(new URL('../../../../fixtures/default-model', import.meta.url))

export interface ResolvedModel {
  packageDir: string
  /** The P to run: the one asked for, else the package's largest. */
  parallel: number
  /** What the user named, for messages. */
  label: string
}

export interface ResolveOptions {
  parallel?: number
  /** Quantized weights: checkpoints are converted (once, cached apart) with this scheme. */
  quant?: QuantScheme
  onProgress?: (progress: ConvertProgress) => void
  /** One line for the user about what resolving did on its own (a damaged package converted again). */
  onNotice?: (line: string) => void
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
    return fromCheckpoints([pulledSnapshot(repoId)], repoId, options, repoId.replace('/', '--'))
  }
  throw new UserError(`unknown model "${model}": not a folder, and not a hub repo id (org/name)`)
}

/** A checkpoint folder for `convert`: a local path, or a pulled hub repo's snapshot. */
export function resolveCheckpointSource(source: string): string {
  if (existsSync(source)) return source
  if (isRepoId(source)) return pulledSnapshot(source)
  throw new UserError(`${source}: no such checkpoint folder`)
}

/** The cached snapshot of a hub repo, or an error that says how to get it. */
function pulledSnapshot(repoId: string): string {
  const snapshot = findCachedSnapshot(repoId)
  if (!snapshot) throw new UserError(`${repoId} is not in the Hugging Face cache; fetch it first with \`parscale pull ${repoId}\``)
  return snapshot
}

function fromLocalFolder(dir: string, label: string, options: ResolveOptions): ResolvedModel {
  if (!statSync(dir).isDirectory()) throw new UserError(`${dir}: a model is a folder (a checkpoint or a converted package), not a file`)
  if (isModelPackage(dir)) {
    checkPackageQuant(readOrRepair(dir, options), dir, options.quant)
    return withParallel(dir, label, options.parallel)
  }
  if (existsSync(join(dir, 'config.json'))) return fromCheckpoints([dir], label, options)
  const variants = readdirSync(dir)
    .map((name) => join(dir, name))
    .filter((sub) => existsSync(join(sub, 'config.json')))
    .sort()
  if (variants.length > 0) return fromCheckpoints(variants.map((v) => withSharedFiles(v, dir)), label, options, basename(resolve(dir)))
  throw new UserError(`${dir}: no config.json and no parscale.json; not a checkpoint or a converted model`)
}

/**
 * A family folder keeps the files every P shares (backbone shard, tokenizer) once, at its
 * root; its variant folders link to them. Where those links are missing (npm drops symlinks
 * when it packs), the variant is assembled in the cache from links to both places.
 */
function withSharedFiles(variantDir: string, familyDir: string): string {
  const shared = readdirSync(familyDir).filter((name) => statSync(join(familyDir, name)).isFile())
  const missing = shared.filter((name) => isSharedFile(name) && !existsSync(join(variantDir, name)))
  if (missing.length === 0) return variantDir
  const key = createHash('sha256').update(resolve(variantDir)).digest('hex').slice(0, 12)
  const staged = join(parscaleCacheDir(), 'staged', `${basename(variantDir)}-${key}`)
  rmSync(staged, {recursive: true, force: true})
  mkdirSync(staged, {recursive: true})
  for (const name of readdirSync(variantDir)) symlinkSync(resolve(variantDir, name), join(staged, name))
  for (const name of missing) symlinkSync(resolve(familyDir, name), join(staged, name))
  return staged
}

function isSharedFile(name: string): boolean {
  return name.endsWith('.safetensors') || name.startsWith('tokenizer') || name === 'special_tokens_map.json'
}

/** Converts on first use; a cached package is reused while its sources are unchanged. */
function fromCheckpoints(sources: string[], label: string, options: ResolveOptions, name = basename(resolve(sources[0]))): ResolvedModel {
  const absolute = sources.map((s) => resolve(s))
  const key = createHash('sha256').update(absolute.join('\n')).digest('hex').slice(0, 12)
  // Each weight format of a checkpoint is its own package: an fp32 one stays named as before.
  const format = options.quant ? `-${quantKey(options.quant)}` : ''
  const packageDir = join(convertedCacheDir(), `${name.replace(/[^\w.-]/g, '_')}${format}-${key}`)
  const fingerprint = absolute.map((s) => checkpointFingerprint(s)).join('+')
  let cached: PackageManifest | undefined
  try {
    cached = isModelPackage(packageDir) ? readManifest(packageDir) : undefined
  } catch (error) {
    // A damaged cached package (a truncated file, say) of a checkpoint we have: convert it again.
    if (!(error instanceof DamagedPackageError)) throw error
    options.onNotice?.(`parscale: ${error.message}; converting ${label} again`)
  }
  if (!cached || cached.sourceFingerprint !== fingerprint || !isCurrentGraph(cached) || !sameQuant(cached, options.quant)) {
    convertCheckpoints({sources: absolute, outDir: packageDir, dtype: 'fp32', quant: options.quant, force: true, sourceLabel: label, onProgress: options.onProgress})
  }
  return withParallel(packageDir, label, options.parallel)
}

/**
 * A package folder's manifest. A damaged package is converted again in place from the
 * checkpoints it records, when they are still here (the embedded model, a folder, a pulled hub
 * repo); else the error names the command that clears it.
 */
function readOrRepair(dir: string, options: ResolveOptions): PackageManifest {
  try {
    return readManifest(dir)
  } catch (error) {
    if (!(error instanceof DamagedPackageError)) throw error
    const recorded = recordedSources(dir)
    if (!recorded) throw new UserError(`${error.message}, and its checkpoint is not on this machine: ${removalAdvice(dir)}, then convert the checkpoint again`)
    options.onNotice?.(`parscale: ${error.message}; converting it again from ${recorded.label}`)
    return convertCheckpoints({
      sources: recorded.sources, outDir: dir, dtype: recorded.manifest.dtype, force: true, sourceLabel: recorded.manifest.source, onProgress: options.onProgress,
      ...(recorded.manifest.quant ? {quant: quantScheme(recorded.manifest.quant.scheme, recorded.manifest.quant.blockSize)} : {}),
    })
  }
}

/** The checkpoints a package was converted from, if its manifest can be read and they are all here. */
function recordedSources(dir: string): {manifest: PackageManifest; sources: string[]; label: string} | undefined {
  let manifest: PackageManifest
  try {
    manifest = JSON.parse(readFileSync(join(dir, MANIFEST_FILE), 'utf8')) as PackageManifest
  } catch {
    return undefined
  }
  const here = (source: string) => isAbsolute(source) && existsSync(join(source, 'config.json'))
  // `sources` since the manifest records them; before, each variant's source (an absolute folder when several were converted together, else what the user typed).
  const candidates = manifest.sources ?? manifest.variants?.map((v) => v.source) ?? []
  if (candidates.length > 0 && candidates.every(here)) return {manifest, sources: candidates, label: manifest.source ?? candidates.join(', ')}
  if (typeof manifest.source === 'string' && isRepoId(manifest.source)) {
    const snapshot = findCachedSnapshot(manifest.source)
    if (snapshot) return {manifest, sources: [snapshot], label: manifest.source}
  }
  return undefined
}
/** A converted package is used as it is: --quant may only confirm what it holds. */
function checkPackageQuant(manifest: PackageManifest, dir: string, quant: QuantScheme | undefined): void {
  if (!quant || sameQuant(manifest, quant)) return
  const held = manifest.quant ? describeQuant({name: manifest.quant.scheme, blockSize: manifest.quant.blockSize}) : manifest.dtype
  throw new UserError(`${dir} is a converted package with ${held} weights, not ${describeQuant(quant)}; give its checkpoint instead (converted with --quant on first use), or \`parscale convert <checkpoint> --quant ${quant.name}\``)
}

function withParallel(packageDir: string, label: string, parallel: number | undefined): ResolvedModel {
  const manifest = readManifest(packageDir)
  if (parallel !== undefined && !manifest.parallel.includes(parallel)) {
    throw new UserError(`${label} has no --parallel ${parallel}; available: ${manifest.parallel.join(', ')}`)
  }
  // A family package defaults to its largest P: the model the family exists for.
  return {packageDir, parallel: parallel ?? Math.max(...manifest.parallel), label}
}
