/**
 * The decode timing shared by bench/wgsl-decode.ts and bench/wgsl-sweep.ts: one round of decode
 * steps with the logits read back, then as many sent back to back without reading (the GPU's own
 * rate), both in ms/token.
 */
import type {WgslDecoder} from '../src/core/wgsl/decoder.js'

export async function decodeRound(decoder: WgslDecoder, token: (i: number) => number, steps: number, afterRead?: () => void): Promise<{readMs: number; gpuMs: number}> {
  let t0 = performance.now()
  for (let i = 0; i < steps; i++) await decoder.step(token(i))
  const readMs = (performance.now() - t0) / steps
  afterRead?.()
  t0 = performance.now()
  for (let i = 0; i < steps; i++) await decoder.step(token(i), false)
  await decoder.finish()
  return {readMs, gpuMs: (performance.now() - t0) / steps}
}
