// `--quant` and `--block-size`, shared by convert, run, eval and bench.
import {Flags} from '@oclif/core'

import {UsageError} from '../core/errors.js'
import {BLOCK_SIZES, DEFAULT_BLOCK_SIZES, QUANT_NAMES, quantScheme, type QuantName, type QuantScheme} from '../core/quant/scheme.js'

export const quantFlags = {
  quant: Flags.string({description: 'quantized weights: int8 or int4 (converted once per scheme, cached apart from fp32)', options: [...QUANT_NAMES]}),
  'block-size': Flags.string({description: `inputs per quantization scale (default ${Object.entries(DEFAULT_BLOCK_SIZES).map(([name, size]) => `${size} for ${name}`).join(', ')})`, options: BLOCK_SIZES.map(String), dependsOn: ['quant']}),
}

/**
 * The scheme the flags ask for; undefined without --quant. With `--device webgpu` it is refused
 * before anything is converted: a quantized package runs on the CPU's quantized operators only
 * (the WebGPU form multiplies float matrices).
 */
export function quantFromFlags(flags: {quant?: string; 'block-size'?: string; device?: string}): QuantScheme | undefined {
  if (flags.quant === undefined) return undefined
  if (flags.device === 'webgpu') throw new UsageError(`--quant ${flags.quant} runs on the CPU only (ONNX Runtime's quantized CPU operators); use --device cpu, or drop --quant for webgpu`)
  return quantScheme(flags.quant as QuantName, flags['block-size'] === undefined ? DEFAULT_BLOCK_SIZES[flags.quant as QuantName] : Number(flags['block-size']))
}
