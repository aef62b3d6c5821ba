// Run as a script (node dist/test/helpers/gpu-long-call.js PACKAGE_DIR P N): N tokens of the
// held-out text through ParScaleModel.forward on WebGPU (the GPU form) and on the CPU graph,
// counting the GPU form's session runs; prints one JSON line {limit, runs, worst}. A child
// process, so a test can give it an environment of its own (a driver setting).
import fs from 'node:fs'
import path from 'node:path'

import ort from 'onnxruntime-node'

import {gpuFormCallTokens} from '../../src/core/engine/gpu-form.js'
import {readManifest} from '../../src/core/package/manifest.js'
import {TextTokenizer} from '../../src/core/generation/tokenizer.js'

import {forwardLogits} from './forward-logits.js'

const [dir, parallel, count] = [process.argv[2]!, Number(process.argv[3]), Number(process.argv[4])]
const tokenizer = await TextTokenizer.load(path.join('fixtures', 'default-model'))
const ids = tokenizer.encode(fs.readFileSync(path.join('fixtures', 'default-model', 'heldout.py'), 'utf8')).slice(0, count)
const expected = (await forwardLogits(dir, parallel, ids, 'cpu')).values
const runs: number[] = [] // tokens of each GPU-form call
// the sessions' class (the factory's type does not show its prototype)
const sessions = (ort.InferenceSession as unknown as {prototype: ort.InferenceSession}).prototype
const run = sessions.run
sessions.run = function (this: ort.InferenceSession, ...args: Parameters<typeof run>) {
  const feeds = args[0] as Record<string, ort.Tensor>
  if (this.inputNames.includes('seqlens_k') && feeds.input_ids) runs.push(feeds.input_ids.dims[1]!) // the GPU form's graph
  return run.apply(this, args)
} as typeof run
const got = (await forwardLogits(dir, parallel, ids, 'webgpu')).values
sessions.run = run
let worst = 0
for (let i = 0; i < expected.length; i++) worst = Math.max(worst, Math.abs(expected[i]! - got[i]!))
const limit = await gpuFormCallTokens('webgpu', readManifest(dir).model.headDim)
process.stdout.write(`${JSON.stringify({limit: Number.isFinite(limit) ? limit : null, runs, worst})}\n`)
