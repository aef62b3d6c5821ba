import {statSync} from 'node:fs'
import {homedir} from 'node:os'
import {basename, dirname, join, resolve} from 'node:path'

import {UserError} from '../errors.js'

/** parscale's own cache: `$PARSCALE_CACHE`, else `$XDG_CACHE_HOME/parscale`, else `~/.cache/parscale`. */
export function parscaleCacheDir(): string {
  if (process.env.PARSCALE_CACHE) return checkedFolder(process.env.PARSCALE_CACHE, 'PARSCALE_CACHE')
  const xdg = process.env.XDG_CACHE_HOME ? checkedFolder(process.env.XDG_CACHE_HOME, 'XDG_CACHE_HOME') : join(homedir(), '.cache')
  return join(xdg, 'parscale')
}

/** A folder named by an environment variable: it may not exist yet, but must not be a file. */
function checkedFolder(dir: string, variable: string): string {
  const stat = statSync(dir, {throwIfNoEntry: false})
  if (stat && !stat.isDirectory()) throw new UserError(`${variable}=${dir} is a file, not a folder; point ${variable} at a folder (it is created when missing)`)
  return dir
}

/** Converted model packages made on first use of a checkpoint, one folder each. */
export function convertedCacheDir(): string {
  return join(parscaleCacheDir(), 'converted')
}

/** How to remove a damaged package: `parscale rm NAME --converted` in the converted cache, else deleting its folder. */
export function removalAdvice(packageDir: string): string {
  const folder = resolve(packageDir)
  if (dirname(folder) === resolve(convertedCacheDir())) return `remove it with \`parscale rm ${basename(folder)} --converted\``
  return `delete ${folder}`
}
