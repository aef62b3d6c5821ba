/**
 * Knob variants for the hand-written kernels' GPU benches (wgsl-sweep.ts, wgsl-step-nll.ts):
 * BENCH_VARIANTS is "name:KEY=V+KEY=V;name2:…", KEY a `TUNING_KNOBS` name without the
 * PARSCALE_WGSL_ prefix ("base:" sets none). `useVariant` clears every knob, then sets the variant's.
 */
import {TUNING_KNOBS} from '../src/core/wgsl/kernels.js'

export interface KnobVariant {
  name: string
  env: Record<string, string>
}

const KNOBS: readonly string[] = TUNING_KNOBS

export function knobVariants(spec = process.env.BENCH_VARIANTS ?? 'base:'): KnobVariant[] {
  return spec
    .split(';')
    .filter(Boolean)
    .map((entry) => {
      const [name, settings = ''] = entry.split(':')
      const env: Record<string, string> = {}
      for (const pair of settings.split('+').filter(Boolean)) {
        const [key, value] = pair.split('=')
        if (!key || value === undefined || !KNOBS.includes(key)) throw new Error(`BENCH_VARIANTS: "${pair}" is not KEY=VALUE with KEY one of ${KNOBS.join(', ')}`)
        env[`PARSCALE_WGSL_${key}`] = value
      }
      return {name: name!, env}
    })
}

export function useVariant(variant: KnobVariant): void {
  for (const key of KNOBS) delete process.env[`PARSCALE_WGSL_${key}`]
  Object.assign(process.env, variant.env)
}
