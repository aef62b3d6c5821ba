/**
 * Held-out NLL scored through the decode steps of the hand-written kernels, one token a step (the
 * matrix-vector kernels; `parscale eval` scores in prompt calls, which never run them), for each
 * knob variant and P: what a decode-only knob such as PARSCALE_WGSL_STAGE=f16 does to quality.
 * Prints each variant's mean NLL and its largest per-token |ΔNLL| from the first variant's.
 *
 *   PARSCALE_DAWN=<node_modules with webgpu@0.6.2> node dist/bench/wgsl-step-nll.js [PACKAGE_DIR]
 *   (default: the default model's package); env: BENCH_VARIANTS (as wgsl-sweep.js, e.g.
 *   "off:;half:STAGE=f16"), BENCH_PARALLEL (1,8), BENCH_TEXT (fixtures/default-model/heldout.py),
 *   BENCH_WEIGHTS (f32, f16, q8 or q4: quantized at upload from a float package; default the package's own)
 */
import fs from 'node:fs'

import {negativeLogLikelihood} from '../src/core/run/evaluate.js'
import {TextTokenizer} from '../src/core/generation/tokenizer.js'
import {resolveModel} from '../src/core/package/resolve.js'
import {WgslDecoder, type WgslWeights} from '../src/core/wgsl/decoder.js'
import {packageSource} from '../src/core/wgsl/package-source.js'
import {knobVariants, useVariant} from './wgsl-variants.js'

const variants = knobVariants()
const parallels = (process.env.BENCH_PARALLEL ?? '1,8').split(',').map(Number)
const weights = process.env.BENCH_WEIGHTS as WgslWeights | undefined
const textFile = process.env.BENCH_TEXT ?? 'fixtures/default-model/heldout.py'

for (const parallel of parallels) {
  const packageDir = process.argv[2] ?? resolveModel(undefined, {parallel}).packageDir
  const ids = (await TextTokenizer.load(packageDir)).encode(fs.readFileSync(textFile, 'utf8'))
  let first: number[] | undefined
  for (const variant of variants) {
    useVariant(variant)
    const decoder = await WgslDecoder.open(packageSource(packageDir, parallel), {positions: ids.length, weights})
    try {
      const nll: number[] = []
      for (let i = 0; i + 1 < ids.length; i++) {
        const {logits} = (await decoder.step(ids[i]!))!
        nll.push(negativeLogLikelihood(logits, 0, logits.length, ids[i + 1]!))
      }
      first ??= nll
      const mean = nll.reduce((a, b) => a + b, 0) / nll.length
      const drift = Math.max(...nll.map((v, i) => Math.abs(v - first![i]!)))
      console.log(`P=${parallel} ${variant.name} (${JSON.stringify(variant.env)}): ${nll.length} tokens, mean NLL ${mean.toFixed(6)}, largest per-token |ΔNLL| from ${variants[0]!.name} ${drift.toExponential(2)}`)
    } finally {
      decoder.release()
    }
  }
}
process.exit(0)
