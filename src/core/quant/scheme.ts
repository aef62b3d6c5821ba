/**
 * The weight formats a package can be converted to (`--quant int8|int4 [--block-size N]`) and
 * how a scheme is named in cache keys, the manifest and reports.
 */
import {UsageError, UserError} from '../errors.js'
import type {QuantBits} from './blockwise.js'

export const QUANT_NAMES = ['int8', 'int4'] as const
export type QuantName = (typeof QUANT_NAMES)[number]

/** Block sizes a user may ask for (inputs per scale). */
export const BLOCK_SIZES = [32, 64, 128, 256] as const
/**
 * The block size a scheme gets when none is asked for. int4: 256, measured fastest at equal
 * quality (`npm run bench:quant-blocks`, docs/benchmarks.md "CPU hot path"); MLAS's 4-bit
 * kernels read fewer scales per row. int8 keeps 32 (not re-measured).
 */
export const DEFAULT_BLOCK_SIZES: Record<QuantName, number> = {int8: 32, int4: 256}
/** The default of the scheme `--quant` names most often (int4), for messages. */
export const DEFAULT_BLOCK_SIZE = DEFAULT_BLOCK_SIZES.int4

/**
 * What a conversion quantizes and how: every projection, MLP matrix and the LM head as
 * block-quantized codes (one float32 scale per `blockSize` inputs), the embedding table in
 * the same code format. Norms, biases, stream prefixes and the aggregation head stay float32.
 */
export interface QuantScheme {
  name: QuantName
  bits: QuantBits
  blockSize: number
}

export function quantScheme(name: QuantName, blockSize: number = DEFAULT_BLOCK_SIZES[name]): QuantScheme {
  if (!(BLOCK_SIZES as readonly number[]).includes(blockSize)) throw new UsageError(`--block-size must be one of ${BLOCK_SIZES.join(', ')} (got ${blockSize})`)
  return {name, bits: name === 'int4' ? 4 : 8, blockSize}
}

/** "int4-b32": in cache folder names. */
export function quantKey(scheme: QuantScheme | undefined): string {
  return scheme ? `${scheme.name}-b${scheme.blockSize}` : 'fp32'
}

/** "int4 (block 32)": in messages, `list` and bench headers. */
export function describeQuant(scheme: Pick<QuantScheme, 'name' | 'blockSize'> | undefined | null): string {
  return scheme ? `${scheme.name} (block ${scheme.blockSize})` : 'unquantized'
}

/** Block sizes MatMulNBits takes (powers of two from 16), largest first. */
const FALLBACK_BLOCK_SIZES = [256, 128, 64, 32, 16]

/**
 * The block size used for a matrix of `k` inputs: the one asked for when it divides k, else
 * the largest smaller power of two that does (so no block is padded). A matrix no such block
 * divides is refused by name.
 */
export function blockSizeFor(k: number, requested: number, tensor: string): number {
  if (k % requested === 0) return requested
  const fallback = FALLBACK_BLOCK_SIZES.find((b) => b < requested && k % b === 0)
  if (fallback === undefined) throw new UserError(`${tensor}: its input size ${k} is not a multiple of 16, so no quantization block fits it; convert without --quant`)
  return fallback
}
