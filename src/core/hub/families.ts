import {existsSync} from 'node:fs'

import {levenshtein} from '../format.js'
import {UserError} from '../errors.js'
import {isRepoIdShape} from './cache.js'

/** The organisation that publishes the ParScale checkpoints on the Hugging Face Hub. */
export const PARSCALE_ORG = 'ParScale'

/** A published family: the same backbone and data at several P. `template` holds `{P}`. */
export interface ModelFamily {
  template: string
  parallel: number[]
}

const P_ALL = [1, 2, 4, 8]

/** Every published ParScale family (names as on the Hub, without the org). */
export const FAMILIES: readonly ModelFamily[] = [
  ...['0.7B', '0.9B', '1.3B', '1.8B', '3B', '4.7B'].flatMap((size) =>
    ['Python', 'Pile'].map((data) => ({template: `ParScale-${size}-P{P}-${data}`, parallel: P_ALL})),
  ),
  {template: 'ParScale-1.8B-P{P}', parallel: P_ALL},
  {template: 'ParScale-1.8B-P{P}-Inst', parallel: P_ALL},
  {template: 'ParScale-Qwen-3B-P{P}-Python', parallel: [2, 4, 8]},
  ...['Python', 'Pile'].map((data) => ({template: `ParScale-QwenInit-3B-P{P}-${data}`, parallel: P_ALL})),
]

const P_SEGMENT = /-P(\d+)(?=-|$)/i

/** Every published model name, e.g. `ParScale-1.8B-P4-Inst`. */
export function knownModelNames(): string[] {
  return FAMILIES.flatMap((f) => f.parallel.map((p) => f.template.replace('{P}', String(p))))
}

function familyOf(name: string): {family: ModelFamily; p?: number} | undefined {
  const lower = name.toLowerCase()
  const m = P_SEGMENT.exec(lower)
  const asTemplate = m ? lower.replace(P_SEGMENT, '-p{p}') : undefined
  for (const family of FAMILIES) {
    const template = family.template.toLowerCase()
    if (asTemplate === template) return {family, p: Number(m![1])}
    // The family name without its P segment, e.g. ParScale-1.8B-Python.
    if (template.replace('-p{p}', '') === lower) return {family}
  }
  return undefined
}

/** Up to `max` published repo ids closest to `repoIdOrName` (typo help), best first. */
export function suggestModelNames(repoIdOrName: string, max = 3): string[] {
  const name = (repoIdOrName.includes('/') ? repoIdOrName.slice(repoIdOrName.indexOf('/') + 1) : repoIdOrName).toLowerCase()
  const limit = Math.max(2, Math.ceil(name.length * 0.25))
  return knownModelNames()
    .map((known) => ({known, d: levenshtein(name, known.toLowerCase())}))
    .filter((x) => x.d <= limit)
    .sort((a, b) => a.d - b.d || a.known.localeCompare(b.known))
    .slice(0, max)
    .map((x) => `${PARSCALE_ORG}/${x.known}`)
}

function didYouMean(repoId: string): string {
  const s = suggestModelNames(repoId)
  return s.length > 0 ? `; did you mean ${s.join(', ')}?` : ''
}

/**
 * Maps a published family name to its `-P{N}` sibling (`parallel`), and canonicalises the case
 * of published names (`parscale/parscale-1.8b-p4` → `ParScale/ParScale-1.8B-P4`). A bare
 * published name gets the `ParScale/` org. Other repo ids pass through unchanged when `parallel`
 * is not given. A trailing `@revision` is kept.
 *
 * Throws a UserError that lists the published P when the family has no such P, or the closest
 * published names when the name looks like a typo of one.
 */
export function resolveFamilyName(repoId: string, parallel?: number): string {
  const at = repoId.indexOf('@')
  const rev = at >= 0 ? repoId.slice(at) : ''
  const id = at >= 0 ? repoId.slice(0, at) : repoId
  if (parallel !== undefined && (!Number.isInteger(parallel) || parallel < 1)) {
    throw new UserError(`--parallel must be a positive integer, got ${parallel}`)
  }
  const slash = id.indexOf('/')
  const org = slash >= 0 ? id.slice(0, slash) : undefined
  const name = slash >= 0 ? id.slice(slash + 1) : id
  const published = org === undefined || org.toLowerCase() === PARSCALE_ORG.toLowerCase()
  const found = published ? familyOf(name) : undefined

  if (!found) {
    if (org === undefined) {
      throw new UserError(`"${id}" is not a Hugging Face repo id (org/name) nor a published ParScale model${didYouMean(id)}`)
    }
    if (!isRepoIdShape(id)) {
      throw new UserError(`"${id}" is not a Hugging Face repo id (expected org/name, for example ${PARSCALE_ORG}/ParScale-1.8B-P4)`)
    }
    if (parallel !== undefined) {
      throw new UserError(`--parallel maps a published ParScale family name to its P sibling; "${id}" is not one${didYouMean(id)}`)
    }
    if (published && suggestModelNames(id).length > 0) {
      throw new UserError(`${id} is not a published ParScale model${didYouMean(id)}`)
    }
    return repoId
  }

  const {family, p} = found
  const base = family.template.replace('-P{P}', '')
  const want = parallel ?? p
  if (want === undefined) {
    throw new UserError(`${PARSCALE_ORG}/${base} is a family, not a model: pick one with --parallel (P = ${family.parallel.join(', ')})`)
  }
  if (!family.parallel.includes(want)) {
    throw new UserError(`${PARSCALE_ORG}/${base} is published for P = ${family.parallel.join(', ')}, not P = ${want}`)
  }
  return `${PARSCALE_ORG}/${family.template.replace('{P}', String(want))}${rev}`
}

/**
 * True for something shaped like a Hub repo id (`org/name`, optionally `@revision`) that is not
 * an existing local path — so `./models/x` or an existing `org/name` folder stays a path.
 */
export function isRepoId(s: string): boolean {
  const at = s.indexOf('@')
  const id = at >= 0 ? s.slice(0, at) : s
  if (at >= 0 && at === s.length - 1) return false
  return isRepoIdShape(id) && !existsSync(s)
}
