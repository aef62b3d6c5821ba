import {UserError} from '../errors.js'
import {isSafeRelativePath} from './cache.js'

/**
 * Which repo files a pull takes. Running a model needs its config, tokenizer and safetensors
 * weights; pickled weights (`*.bin`, `*.pt`, …) and Python code are never downloaded, whatever
 * `--include` says.
 */
export const DEFAULT_PATTERNS: readonly string[] = [
  'config.json',
  'generation_config.json',
  'tokenizer*.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'vocab.json',
  'merges.txt',
  '*.safetensors',
  'model.safetensors.index.json',
]

/** Never downloaded: pickles can run code when loaded, and `*.py` is the repo's own code. */
export const FORBIDDEN_PATTERNS: readonly string[] = ['*.bin', '*.pt', '*.pth', '*.pkl', '*.pickle', '*.ckpt', '*.py', '*.pyc']

/**
 * A glob as a RegExp over a `/`-separated repo path: `*` and `?` do not cross `/`, `**` does,
 * `[abc]`/`[!abc]` are character classes; everything else is literal.
 */
export function globToRegExp(glob: string): RegExp {
  let re = ''
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i]
    if (c === '*') {
      if (glob[i + 1] === '*') {
        i++
        if (glob[i + 1] === '/') {
          i++
          re += '(?:.*/)?'
        } else re += '.*'
      } else re += '[^/]*'
    } else if (c === '?') re += '[^/]'
    else if (c === '[') {
      const end = glob.indexOf(']', i + 2)
      if (end < 0) re += '\\['
      else {
        let body = glob.slice(i + 1, end)
        const negate = body.startsWith('!') || body.startsWith('^')
        if (negate) body = body.slice(1)
        re += `[${negate ? '^' : ''}${body.replace(/[\\\]]/g, '\\$&')}]`
        i = end
      }
    } else re += c.replace(/[.+^${}()|\\/]/g, '\\$&')
  }
  return new RegExp(`^${re}$`)
}

function matcher(patterns: readonly string[]): (path: string) => boolean {
  const res = patterns.map(globToRegExp)
  return (path) => res.some((r) => r.test(path))
}

const forbidden = matcher(FORBIDDEN_PATTERNS)

/** True for a file that a pull never downloads (pickle weights, Python code), at any depth. */
export function isForbiddenFile(path: string): boolean {
  return forbidden(path.slice(path.lastIndexOf('/') + 1))
}

export interface ListedFile {
  /** `file` unless told otherwise; directories are checked for safe names but never selected. */
  type?: string
  path: string
  size: number
  oid?: string
  lfs?: {oid: string; size: number}
}

/**
 * The files a pull takes from a repo listing: the default set plus `include` globs, minus the
 * forbidden ones. Any unsafe name in the listing (`..`, absolute, backslashes) refuses the whole
 * listing: a repository that serves such names is not trusted.
 */
export function selectFiles<T extends ListedFile>(repoId: string, listing: T[], include: readonly string[] = []): T[] {
  for (const entry of listing) {
    if (typeof entry.path !== 'string' || !isSafeRelativePath(entry.path)) {
      throw new UserError(
        `${repoId}: the hub listing has an unsafe file name ${JSON.stringify(String(entry.path))} (it would land outside the cache); refusing to download`,
      )
    }
  }
  const wanted = matcher([...DEFAULT_PATTERNS, ...include])
  return listing.filter((e) => (e.type ?? 'file') === 'file' && wanted(e.path) && !isForbiddenFile(e.path)).sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0))
}
