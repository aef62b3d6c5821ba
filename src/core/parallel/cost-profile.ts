/**
 * A package's cost profile on this machine: how long one decode step takes by the rows it runs
 * (rows = Σ P over the sequences in one call), and what a prompt token costs to prefill. The
 * `--parallel auto` policy (policy.ts) predicts from it; it is measured once on first use (a few
 * seconds: a handful of steps per row count) and cached as JSON beside the package, one entry per
 * machine, thread count and device, so a different machine or `--threads` measures its own.
 */
import {createHash} from 'node:crypto'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import type {Decoder, SequenceCache} from '../engine/decoder.js'
import type {Device} from '../engine/device.js'
import {parscaleCacheDir} from '../package/paths.js'

export const PROFILE_FILE = 'cost-profile.json'
/**
 * Bumped when what is measured or how changes: older entries are measured again (2: a 4-bit
 * package's lone sequence at P ≥ 4 decodes on its stored codes where the CPU has VNNI, quant/widen.ts).
 */
export const PROFILE_VERSION = 2

export interface StepCost {
  /** Rows in the call: sequences × P. */
  rows: number
  /** The P and sequences measured for those rows. */
  parallel: number
  batch: number
  /** Median decode step, milliseconds. */
  ms: number
}

export interface PrefillCost {
  parallel: number
  /** Prompt tokens in the measured call. */
  tokens: number
  ms: number
}

export interface CostProfile {
  version: number
  /** machine · threads · device: the entry's identity. */
  key: string
  machine: {cpu: string; cores: number}
  /** Intra-op threads the session ran with (what ONNX Runtime picks when not set: the cores). */
  threads: number
  device: Device
  measuredAt: string
  /** Wall time of the measurement. */
  measureMs: number
  /** Ascending by rows. */
  decode: StepCost[]
  prefill: PrefillCost[]
}

export interface ProfileSetting {
  /** --threads, or undefined for ONNX Runtime's default (one per core). */
  threads?: number
  device: Device
}

function cpuModel(): string {
  return os.cpus()[0]?.model?.trim() || 'unknown cpu'
}

/** The cache key of a profile measured here with `setting`. */
export function profileKey(setting: ProfileSetting): string {
  const threads = setting.threads ?? os.availableParallelism()
  return `${cpuModel()} · ${os.availableParallelism()} cores · ${threads} threads · ${setting.device}`
}

/** Row counts to measure: 1, 2, 4, … up to the most a batch can run (maxBatch × the largest P). */
export function profileRows(parallelValues: number[], maxBatch: number): {rows: number; parallel: number; batch: number}[] {
  const ps = [...parallelValues].sort((a, b) => a - b)
  const most = maxBatch * ps[ps.length - 1]
  const plan: {rows: number; parallel: number; batch: number}[] = []
  for (let rows = 1; rows < most * 2; rows *= 2) {
    const r = Math.min(rows, most)
    // The largest P that divides the rows with a batch the batcher allows: few sequences, the shape of a real step.
    const parallel = [...ps].reverse().find((p) => r % p === 0 && r / p <= maxBatch)
    if (parallel === undefined || plan.some((x) => x.rows === r)) continue
    plan.push({rows: r, parallel, batch: r / parallel})
  }
  return plan
}

/** Milliseconds of one decode step of `rows` rows: linear between measured counts, and beyond the last. */
export function stepMs(profile: Pick<CostProfile, 'decode'>, rows: number): number {
  const points = profile.decode
  if (rows <= 0) return 0
  if (points.length === 1) return points[0].ms * Math.max(1, rows / points[0].rows)
  if (rows <= points[0].rows) return points[0].ms
  for (let i = 1; i < points.length; i++) {
    const a = points[i - 1]
    const b = points[i]
    if (rows <= b.rows) return a.ms + ((b.ms - a.ms) * (rows - a.rows)) / (b.rows - a.rows)
  }
  const a = points[points.length - 2]
  const b = points[points.length - 1]
  return b.ms + (Math.max(0, b.ms - a.ms) * (rows - b.rows)) / (b.rows - a.rows)
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.floor(sorted.length / 2)]
}

/**
 * Tokens of the prompt each measured sequence starts with (its cache is not empty, as in a real
 * step): 16 alone (that call is the prefill measurement), 4 in a batch (its prefill is not
 * measured, and on a 0.5b model a batch of 16-token prompts at P = 8 would take seconds).
 */
const PREFILL_TOKENS = 16
const BATCH_PROMPT_TOKENS = 4
/** Timed steps per row count (after one untimed step): at least the first, more while they add up to less than the time. */
const MIN_TIMED_STEPS = 3
const MAX_TIMED_STEPS = 24
const MIN_TIMED_MS = 60

/** One row count: its median decode step, and its prefill when it ran alone (batch 1). */
async function measureRows<C extends SequenceCache>(decoder: Decoder<C>, parallel: number, batch: number): Promise<{stepMs: number; prefill?: PrefillCost}> {
  const cache = decoder.newCache(parallel)
  try {
    const promptTokens = batch === 1 ? PREFILL_TOKENS : BATCH_PROMPT_TOKENS
    cache.reserve(batch, promptTokens + MAX_TIMED_STEPS + 2)
    for (let slot = 0; slot < batch; slot++) cache.reset(slot)
    // Token ids near the start of any vocabulary; the cost does not depend on which.
    const prompt = Array.from({length: promptTokens}, (_, i) => 1 + ((i * 7) % 50))
    const t0 = performance.now()
    await decoder.forward(cache, 0, Array.from({length: batch}, () => prompt), 1)
    const prefillMs = performance.now() - t0
    const times: number[] = []
    // Steps of a small model take a millisecond or two, where one hiccup of a loaded machine would decide: more of them.
    for (let step = 0; step <= MAX_TIMED_STEPS; step++) {
      const t = performance.now()
      await decoder.forward(cache, 0, Array.from({length: batch}, () => [2 + step]), 1)
      if (step > 0) times.push(performance.now() - t)
      if (times.length >= MIN_TIMED_STEPS && times.reduce((a, b) => a + b, 0) >= MIN_TIMED_MS) break
    }
    return {stepMs: median(times), ...(batch === 1 ? {prefill: {parallel, tokens: promptTokens, ms: prefillMs}} : {})}
  } finally {
    cache.dispose?.()
  }
}

/**
 * A point out of line with its neighbours: dearer than the next row count (more rows), or more
 * than 2.5× the previous one (twice the rows cannot cost much more than twice). On a loaded
 * machine a whole measurement can land in another process's burst (seen: 16 rows at 40× one row,
 * its neighbours at 1.4×); such points are measured again and the cheaper kept.
 */
function outOfLine(decode: StepCost[], i: number): boolean {
  return (i + 1 < decode.length && decode[i].ms > 1.15 * decode[i + 1].ms) || (i > 0 && decode[i].ms > 2.5 * decode[i - 1].ms)
}

/**
 * Measures decode steps at each row count (one prefill of every sequence, one warm-up step, then
 * the median of a few timed steps) and prefill cost at each P (that prefill, batch 1).
 */
export async function measureProfile<C extends SequenceCache>(decoder: Decoder<C>, setting: ProfileSetting, maxBatch: number): Promise<CostProfile> {
  const started = performance.now()
  const decode: StepCost[] = []
  const prefill: PrefillCost[] = []
  for (const {rows, parallel, batch} of profileRows(decoder.parallelValues, maxBatch)) {
    const measured = await measureRows(decoder, parallel, batch)
    decode.push({rows, parallel, batch, ms: measured.stepMs})
    if (measured.prefill) prefill.push(measured.prefill)
  }
  for (let round = 0; round < 2; round++) {
    const suspects = decode.filter((_, i) => outOfLine(decode, i))
    if (suspects.length === 0) break
    for (const point of suspects) point.ms = Math.min(point.ms, (await measureRows(decoder, point.parallel, point.batch)).stepMs)
  }
  // More rows never cost less: a dip is the machine's noise, not the model's (the policy would read it as free streams).
  for (let i = 1; i < decode.length; i++) decode[i].ms = Math.max(decode[i].ms, decode[i - 1].ms)
  return {
    version: PROFILE_VERSION,
    key: profileKey(setting),
    machine: {cpu: cpuModel(), cores: os.availableParallelism()},
    threads: setting.threads ?? os.availableParallelism(),
    device: setting.device,
    measuredAt: new Date().toISOString(),
    measureMs: performance.now() - started,
    decode,
    prefill,
  }
}

interface ProfileFile {
  profiles: CostProfile[]
}

/**
 * Where a package's profiles are kept: beside it (`cost-profile.json`), or, when its folder is not
 * writable, in parscale's cache under a name derived from the folder.
 */
export function profilePath(packageDir: string): string {
  const beside = path.join(packageDir, PROFILE_FILE)
  try {
    fs.accessSync(packageDir, fs.constants.W_OK)
    return beside
  } catch {
    const name = createHash('sha256').update(path.resolve(packageDir)).digest('hex').slice(0, 16)
    return path.join(parscaleCacheDir(), 'profiles', `${name}.json`)
  }
}

function readProfiles(file: string): CostProfile[] {
  try {
    const parsed = JSON.parse(fs.readFileSync(file, 'utf8')) as Partial<ProfileFile>
    return Array.isArray(parsed.profiles) ? parsed.profiles.filter(isProfile) : []
  } catch {
    return [] // missing or unreadable: measured again and rewritten
  }
}

function isProfile(value: unknown): value is CostProfile {
  const p = value as Partial<CostProfile> | null
  return (
    typeof p === 'object' && p !== null && p.version === PROFILE_VERSION && typeof p.key === 'string' && Array.isArray(p.decode) &&
    p.decode.length > 0 && p.decode.every((d) => Number.isFinite(d?.rows) && Number.isFinite(d?.ms) && d.ms > 0)
  )
}

/** The cached profile for `setting`, when it covers `rowsNeeded` rows. */
export function cachedProfile(packageDir: string, setting: ProfileSetting, rowsNeeded: number): CostProfile | undefined {
  const key = profileKey(setting)
  const found = readProfiles(profilePath(packageDir)).find((p) => p.key === key)
  if (!found || found.decode[found.decode.length - 1].rows < rowsNeeded) return undefined
  return found
}

/** Stores `profile` beside the package, replacing the entry of the same key (written to a temporary file, then renamed). */
export function saveProfile(packageDir: string, profile: CostProfile): string {
  const file = profilePath(packageDir)
  const profiles = readProfiles(file).filter((p) => p.key !== profile.key)
  profiles.push(profile)
  fs.mkdirSync(path.dirname(file), {recursive: true})
  const temporary = `${file}.${process.pid}.tmp`
  fs.writeFileSync(temporary, JSON.stringify({profiles} satisfies ProfileFile, null, 1) + '\n')
  fs.renameSync(temporary, file)
  return file
}

export interface LoadedProfile {
  profile: CostProfile
  /** false: measured now (and saved). */
  cached: boolean
  file: string
}

/** The cached profile, or one measured now and saved (`refresh` measures even when one is cached). */
export async function loadOrMeasureProfile<C extends SequenceCache>(
  packageDir: string,
  decoder: Decoder<C>,
  setting: ProfileSetting,
  maxBatch: number,
  options: {refresh?: boolean; onMeasuring?: () => void} = {},
): Promise<LoadedProfile> {
  const rowsNeeded = maxBatch * Math.max(...decoder.parallelValues)
  const cached = options.refresh ? undefined : cachedProfile(packageDir, setting, rowsNeeded)
  if (cached) return {profile: cached, cached: true, file: profilePath(packageDir)}
  options.onMeasuring?.()
  const profile = await measureProfile(decoder, setting, maxBatch)
  const file = saveProfile(packageDir, profile)
  return {profile, cached: false, file}
}
