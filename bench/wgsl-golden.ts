/**
 * The hand-written WebGPU decode step against the golden checkpoints' reference logits: every
 * prompt position fed one token a step, the worst |logit difference| printed per case.
 * `PARSCALE_DAWN=<node_modules with webgpu@0.6.2> node dist/bench/wgsl-golden.js [golden folder]`
 */
import {readFileSync, readdirSync} from 'node:fs'
import {join} from 'node:path'

import {checkpointSource} from '../src/core/wgsl/checkpoint-source.js'
import {WgslDecoder} from '../src/core/wgsl/decoder.js'

const root = process.argv[2] ?? 'fixtures/golden'
let worst = 0
for (const name of readdirSync(root).filter((n) => n.startsWith('tiny')).sort()) {
  const dir = join(root, name)
  const golden = JSON.parse(readFileSync(join(dir, 'golden.json'), 'utf8')) as {logits: {prompt_ids: number[]; values: number[][]}}
  const decoder = await WgslDecoder.open(checkpointSource(dir), {positions: golden.logits.prompt_ids.length + 8})
  let caseWorst = 0
  for (const [i, id] of golden.logits.prompt_ids.entries()) {
    const {logits} = (await decoder.step(id))!
    const want = golden.logits.values[i]!
    for (let v = 0; v < want.length; v++) caseWorst = Math.max(caseWorst, Math.abs(logits[v]! - want[v]!))
  }
  console.log(`${name}: P=${decoder.config.parallel}, ${golden.logits.prompt_ids.length} positions, ${decoder.dispatchCount} dispatches a step, worst |logit diff| ${caseWorst.toExponential(2)} (${decoder.adapterName})`)
  worst = Math.max(worst, caseWorst)
  decoder.release()
}
console.log(`worst ${worst.toExponential(2)}`)
process.exit(worst < 1e-3 ? 0 : 1)
