// `--quant` and `--block-size`, shared by convert, run, eval and bench.
import {Flags} from '@oclif/core'

import {BLOCK_SIZES, DEFAULT_BLOCK_SIZES, QUANT_NAMES, quantScheme, type QuantName, type QuantScheme} from '../core/quant/scheme.js'

export const quantFlags = {
  quant: Flags.string({description: 'quantized weights: int8 or int4 (converted once per scheme, cached apart from fp32)', options: [...QUANT_NAMES]}),
  'block-size': Flags.string({description: `inputs per quantization scale (default ${Object.entries(DEFAULT_BLOCK_SIZES).map(([name, size]) => `${size} for ${name}`).join(', ')})`, options: BLOCK_SIZES.map(String), dependsOn: ['quant']}),
}

/**
 * The scheme the flags ask for; undefined without --quant. With `--device webgpu` a quantized
 * package runs in the GPU form (engine/gpu-form.ts: MatMulNBits and GatherBlockQuantized have
 * WebGPU kernels).
 */
export function quantFromFlags(flags: {quant?: string; 'block-size'?: string}): QuantScheme | undefined {
  if (flags.quant === undefined) return undefined
  return quantScheme(flags.quant as QuantName, flags['block-size'] === undefined ? DEFAULT_BLOCK_SIZES[flags.quant as QuantName] : Number(flags['block-size']))
}
