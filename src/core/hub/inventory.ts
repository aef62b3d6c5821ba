import {existsSync, lstatSync, readdirSync, readFileSync, statSync} from 'node:fs'
import {rm} from 'node:fs/promises'
import {isAbsolute, join, resolve} from 'node:path'

import {hubCacheDir, isInside, listCachedModels, repoCachePaths, repoFolderName, type CachedModel} from './cache.js'
import {convertedCacheDir} from '../package/paths.js'

/**
 * What the caches hold, for `parscale list` and `parscale rm`: checkpoints in the Hugging Face
 * cache (with P and dtype from their config.json) and converted packages (with their
 * `parscale.json` manifest).
 */

export interface CheckpointEntry extends CachedModel {
  /** `parscale_n`, 1 for plain Qwen2; undefined when config.json is missing or unreadable. */
  parallel?: number
  /** `torch_dtype` (or `dtype`) from config.json. */
  dtype?: string
  modelType?: string
}

export interface PackageEntry {
  name: string
  path: string
  source?: string
  /** The manifest's source and its variants' sources (repo ids or checkpoint paths). */
  sources: string[]
  parallel: number[]
  dtype?: string
  /** How a quantized package stores its matrices: scheme and block size. */
  quant?: {scheme: string; blockSize: number}
  sizeBytes: number
}

/** P and dtype of a checkpoint folder, from its config.json. */
export function describeCheckpoint(dir: string): {parallel?: number; dtype?: string; modelType?: string} {
  try {
    const config = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>
    const modelType = typeof config.model_type === 'string' ? config.model_type : undefined
    const n = config.parscale_n
    const parallel = typeof n === 'number' ? n : modelType === 'qwen2' ? 1 : undefined
    const dtypeRaw = config.torch_dtype ?? config.dtype
    return {parallel, dtype: typeof dtypeRaw === 'string' ? dtypeRaw : undefined, modelType}
  } catch {
    return {}
  }
}

export function listCheckpoints(): CheckpointEntry[] {
  return listCachedModels().map((m) => ({...m, ...describeCheckpoint(m.snapshotDir)}))
}

/** Bytes of the regular files below `dir`; symbolic links count as nothing (their targets are counted where they live). */
export function treeSizeSync(dir: string): number {
  let total = 0
  for (const name of readdirSync(dir)) {
    const full = join(dir, name)
    const st = lstatSync(full)
    if (st.isDirectory()) total += treeSizeSync(full)
    else if (st.isFile()) total += st.size
  }
  return total
}

/** Converted packages: folders of `convertedCacheDir()` with a `parscale.json` of format `parscale-onnx`. */
export function listConvertedPackages(): PackageEntry[] {
  const root = convertedCacheDir()
  let names: string[]
  try {
    names = readdirSync(root).sort()
  } catch {
    return []
  }
  const out: PackageEntry[] = []
  for (const name of names) {
    const path = join(root, name)
    try {
      if (!statSync(path).isDirectory()) continue
      const manifest = JSON.parse(readFileSync(join(path, 'parscale.json'), 'utf8')) as Record<string, unknown>
      if (manifest.format !== 'parscale-onnx') continue
      const parallel = Array.isArray(manifest.parallel) ? manifest.parallel.filter((p): p is number => typeof p === 'number') : []
      const source = typeof manifest.source === 'string' ? manifest.source : undefined
      const variants = Array.isArray(manifest.variants) ? (manifest.variants as {source?: unknown}[]) : []
      const sources = [source, ...variants.map((v) => v?.source)].filter((x): x is string => typeof x === 'string')
      out.push({
        name,
        path,
        source,
        sources: [...new Set(sources)],
        parallel,
        dtype: typeof manifest.dtype === 'string' ? manifest.dtype : undefined,
        ...quantOf(manifest.quant),
        sizeBytes: treeSizeSync(path),
      })
    } catch {
      // A manifest that cannot be read is a damaged package, listed so that `rm` can remove it;
      // a folder without one is not a package (yet): skipped.
      if (existsSync(join(path, 'parscale.json'))) out.push({name, path, source: undefined, sources: [], parallel: [], sizeBytes: treeSizeSync(path)})
    }
  }
  return out
}

function quantOf(value: unknown): Pick<PackageEntry, 'quant'> {
  if (typeof value !== 'object' || value === null) return {}
  const {scheme, blockSize} = value as Record<string, unknown>
  return typeof scheme === 'string' && typeof blockSize === 'number' ? {quant: {scheme, blockSize}} : {}
}

/** The repo id as cached (its case may differ from what the user typed), if it is cached. */
export function cachedRepoId(repoId: string): string | undefined {
  const want = repoFolderName(repoId).toLowerCase()
  try {
    const folder = readdirSync(hubCacheDir()).find((f) => f.toLowerCase() === want)
    return folder ? `${folder.slice('models--'.length).replace('--', '/')}` : undefined
  } catch {
    return undefined
  }
}

/** Converted packages made from `repoId` (by manifest source) or named `nameOrRepo`. */
export function packagesOf(nameOrRepo: string): PackageEntry[] {
  const lower = nameOrRepo.toLowerCase()
  const repoDir = existsSync(hubCacheDir()) ? repoCachePaths(cachedRepoId(nameOrRepo) ?? nameOrRepo).repoDir : undefined
  return listConvertedPackages().filter((p) => {
    if (p.name.toLowerCase() === lower) return true
    return p.sources.some((source) => {
      const src = source.toLowerCase()
      if (src === lower || src.startsWith(`${lower}@`)) return true
      return !!repoDir && nameOrRepo.includes('/') && isAbsolute(source) && isInside(repoDir, source)
    })
  })
}

/** Removes a converted package folder (only inside the converted cache). */
export async function removePackage(p: PackageEntry): Promise<void> {
  if (!isInside(convertedCacheDir(), p.path) || resolve(p.path) === resolve(convertedCacheDir())) {
    throw new Error(`refusing to remove ${p.path}: not inside ${convertedCacheDir()}`)
  }
  await rm(p.path, {recursive: true, force: true})
}
