import {homedir} from 'node:os'
import {join} from 'node:path'

/** parscale's own cache: `$PARSCALE_CACHE`, else `$XDG_CACHE_HOME/parscale`, else `~/.cache/parscale`. */
export function parscaleCacheDir(): string {
  if (process.env.PARSCALE_CACHE) return process.env.PARSCALE_CACHE
  const xdg = process.env.XDG_CACHE_HOME || join(homedir(), '.cache')
  return join(xdg, 'parscale')
}

/** Converted model packages made on first use of a checkpoint, one folder each. */
export function convertedCacheDir(): string {
  return join(parscaleCacheDir(), 'converted')
}
