/**
 * What `parscale run` will do, decided before any model is loaded: numeric options checked
 * (one clear line per bad value), the prompt taken from one place, and the mode picked.
 * Pure: the command maps its flags to `RunOptions`; how a request is built is in requests.ts.
 */
import {UsageError, UserError} from '../errors.js'
import type {Device} from '../engine/device.js'
import type {QuantScheme} from '../quant/scheme.js'
import {parseAutoBudget, parseParallel} from '../parallel/policy.js'

/** Options given as text and checked here, so a bad value is one line like every user error. */
export type NumberOption = 'batch-size' | 'max-new-tokens' | 'temperature' | 'top-k' | 'top-p' | 'repetition-penalty' | 'seed' | 'parallel' | 'threads' | 'auto-budget'

/** What the user asked `parscale run` for (numbers still as typed). */
export interface RunOptions {
  /** The PROMPT argument. */
  promptArgument?: string
  /** `--prompt`. */
  prompt?: string
  system?: string
  raw: boolean
  chat: boolean
  /** JSONL file of prompts. */
  batch?: string
  stop?: string[]
  json: boolean
  quiet: boolean
  truncate: boolean
  /** Where the model runs (default cpu). */
  device?: Device
  /** Keep each generated token's stream weights and show them (`--streams`). */
  streams?: boolean
  /** Say on stderr which P `--parallel auto` chose and why. */
  verbose?: boolean
  /** Quantized weights (`--quant`): a checkpoint is converted with this scheme. */
  quant?: QuantScheme
  numbers: Partial<Record<NumberOption, string>>
}

/** The numeric options, checked. */
export interface RunNumbers {
  batchSize: number
  maxNewTokens?: number
  temperature?: number
  topK?: number
  topP?: number
  repetitionPenalty?: number
  seed?: number
  parallel?: number
  /** `--parallel auto`: P chosen from the measured cost profile (and, with --batch, the lines in flight). */
  autoParallel?: boolean
  /** --auto-budget (with --parallel auto). */
  autoBudget?: number
  threads?: number
}

export type RunMode = 'one-shot' | 'chat' | 'batch'

interface PlanBase {
  options: RunOptions
  numbers: RunNumbers
}

/** A checked run. A one-shot without `prompt` reads it from stdin (see `promptFromStdin`). */
export type RunPlan = PlanBase & ({mode: 'one-shot'; prompt?: string} | {mode: 'chat'} | {mode: 'batch'; file: string})

/** `run "some prompt"`: one argument that does not name a model is the prompt. */
export function splitModelArgument(
  args: {model?: string; prompt?: string},
  namesModel: (ref: string) => boolean,
): {model?: string; prompt?: string} {
  if (args.model !== undefined && args.prompt === undefined && !namesModel(args.model)) return {model: undefined, prompt: args.model}
  return args
}

function parseNumber(name: NumberOption, input: string | undefined, integer: boolean, check: (v: number) => boolean, rule: string): number | undefined {
  if (input === undefined) return undefined
  const v = Number(input)
  if (input.trim() === '' || !Number.isFinite(v) || (integer && !Number.isInteger(v)) || !check(v)) {
    throw new UsageError(`--${name} must be ${rule} (got "${input}")`)
  }
  return v
}

export function parseRunNumbers(input: RunOptions['numbers']): RunNumbers {
  const whole = (name: 'batch-size' | 'max-new-tokens' | 'top-k' | 'threads', min: number) =>
    parseNumber(name, input[name], true, (v) => v >= min, `a whole number >= ${min}`)
  const parallel = parseParallel(input.parallel)
  const autoBudget = parseAutoBudget(input['auto-budget'])
  if (autoBudget !== undefined && parallel !== 'auto') throw new UsageError('--auto-budget needs --parallel auto')
  return {
    batchSize: whole('batch-size', 1) ?? 8,
    maxNewTokens: whole('max-new-tokens', 1),
    temperature: parseNumber('temperature', input.temperature, false, (v) => v >= 0, 'a number >= 0'),
    topK: whole('top-k', 0),
    topP: parseNumber('top-p', input['top-p'], false, (v) => v > 0 && v <= 1, 'in (0, 1]'),
    repetitionPenalty: parseNumber('repetition-penalty', input['repetition-penalty'], false, (v) => v > 0, 'a number > 0'),
    seed: parseNumber('seed', input.seed, true, (v) => v >= 0 && v <= 0xffffffff, 'a whole number from 0 to 4294967295'),
    parallel: parallel === 'auto' ? undefined : parallel,
    ...(parallel === 'auto' ? {autoParallel: true} : {}),
    ...(autoBudget !== undefined ? {autoBudget} : {}),
    threads: whole('threads', 1),
  }
}

/** `stdinIsTerminal` is asked only when nothing else decides (touching stdin creates it). */
export function pickMode(prompt: string | undefined, options: Pick<RunOptions, 'batch' | 'chat'>, stdinIsTerminal: () => boolean): RunMode {
  if (options.batch !== undefined) {
    if (prompt !== undefined) throw new UsageError('--batch reads prompts from the file; give no prompt')
    if (options.chat) throw new UsageError('--batch and --chat cannot be combined')
    return 'batch'
  }
  if (options.chat) {
    if (prompt !== undefined) throw new UsageError('--chat takes no prompt; type it in the chat')
    return 'chat'
  }
  if (prompt !== undefined) return 'one-shot'
  return stdinIsTerminal() ? 'chat' : 'one-shot'
}

/** Checks the options in the order a user fixes them: prompt, numbers, sampling, mode. */
export function planRun(options: RunOptions, stdinIsTerminal: () => boolean): RunPlan {
  if (options.promptArgument !== undefined && options.prompt !== undefined) throw new UsageError('give the prompt once: as an argument or with --prompt')
  const prompt = options.promptArgument ?? options.prompt
  const numbers = parseRunNumbers(options.numbers)
  if (numbers.temperature === 0 && (numbers.topK !== undefined || numbers.topP !== undefined)) {
    throw new UsageError('--top-k and --top-p need sampling; drop them or --temperature 0')
  }
  if (options.raw && options.system !== undefined) throw new UsageError('--system needs the chat template; drop --raw')
  const mode = pickMode(prompt, options, stdinIsTerminal)
  if (prompt === '') throw new UsageError('the prompt is empty')
  if (options.batch !== undefined) return {mode: 'batch', file: options.batch, options, numbers}
  return mode === 'chat' ? {mode, options, numbers} : {mode: 'one-shot', prompt, options, numbers}
}

/** The one-shot prompt piped on stdin. */
export function promptFromStdin(text: string): string {
  if (text === '') throw new UserError('no prompt: give PROMPT or --prompt, pipe text on stdin, or use --chat')
  return text
}
