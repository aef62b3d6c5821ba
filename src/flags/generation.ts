/**
 * The flags that shape generation, shared by `run` and `batch submit` (which records them on
 * each job). Numbers are taken as text and checked by `planRun`, so a bad value is one line.
 */
import {Flags, type Interfaces} from '@oclif/core'

import type {RunOptions} from '../core/run/plan.js'

/** A number flag; checked in `planRun` so a bad value is one line, like every user error. */
export function numberFlag(description: string, helpValue = 'N', char?: 'n' | 'p') {
  return Flags.string({description, helpValue, ...(char ? {char} : {})})
}

export const generationFlags = {
  system: Flags.string({description: 'system message for the chat template', helpValue: 'TEXT'}),
  raw: Flags.boolean({description: 'send the prompt as is: no chat template, no special tokens'}),
  'max-new-tokens': numberFlag('most tokens to generate (default: generation_config max_new_tokens, else 256)', 'N', 'n'),
  temperature: numberFlag('sampling temperature; 0 = greedy (default: from generation_config, else greedy)', 'T'),
  'top-k': numberFlag('sample from the k most likely tokens (0 = all)', 'K'),
  'top-p': numberFlag('nucleus sampling: the smallest set of tokens whose probability reaches p, in (0, 1]', 'P'),
  'repetition-penalty': numberFlag('penalty (> 1) for tokens already in the sequence', 'X'),
  seed: numberFlag('random seed: the same seed gives the same output'),
  stop: Flags.string({description: 'stop when this text is generated (repeatable); it is not printed', multiple: true, helpValue: 'TEXT'}),
  parallel: numberFlag('number of parallel streams P (the model must provide it; default: the model\'s own); auto: the largest P whose decode step fits --auto-budget, lower for a batch under load (docs/auto-parallel.md)', 'N|auto', 'p'),
  'auto-budget': numberFlag('with --parallel auto: a lone request gets the largest P whose decode step is at most this many times P = 1\'s (default 1.25)', 'X'),
  truncate: Flags.boolean({description: 'keep the tail of a prompt that is too long for the context, instead of failing'}),
}

export type GenerationFlags = Interfaces.InferredFlags<typeof generationFlags>

/** The generation part of `RunOptions`, from the flags above. */
export function generationFlagOptions(flags: GenerationFlags): Pick<RunOptions, 'system' | 'raw' | 'stop' | 'truncate'> & {numbers: RunOptions['numbers']} {
  return {
    system: flags.system,
    raw: flags.raw,
    stop: flags.stop,
    truncate: flags.truncate,
    numbers: {
      'max-new-tokens': flags['max-new-tokens'],
      temperature: flags.temperature,
      'top-k': flags['top-k'],
      'top-p': flags['top-p'],
      'repetition-penalty': flags['repetition-penalty'],
      seed: flags.seed,
      parallel: flags.parallel,
      'auto-budget': flags['auto-budget'],
    },
  }
}
