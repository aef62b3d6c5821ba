// `npm run bench:gpu-memory`: peak host RSS of the same run on WebGPU and on the CPU (issue 23's
// target: WebGPU ≤ 1.3 × CPU), one child process per device, with a breakdown from
// /proc/self/status (anonymous, file-mapped, shared: on lavapipe the "device" buffers are shared
// memory, so RssShmem there is the device bytes) and process.memoryUsage() before the session,
// after it opened, after the prompt and after decoding.
// Env: BENCH_SHAPE (0.5b), BENCH_DIMS (JSON overrides), BENCH_PARALLEL (8), BENCH_PROMPT (64), BENCH_NEW (4), BENCH_THREADS (CPU run, 2).
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import {fileURLToPath} from 'node:url'

import {ensureSyntheticPackage} from '../src/core/bench/synthetic-package.js'
import {syntheticShape} from '../src/core/checkpoint/synthetic.js'
import type {Device} from '../src/core/engine/device.js'
import {ParScaleModel} from '../src/core/engine/model.js'

const P = Number(process.env.BENCH_PARALLEL ?? 8)
const promptLength = Number(process.env.BENCH_PROMPT ?? 64)
const newTokens = Number(process.env.BENCH_NEW ?? 4)
const threads = Number(process.env.BENCH_THREADS ?? 2)
const mb = (bytes: number) => Math.round(bytes / 1048576)

/** MB figures of this process now. */
function memory(): Record<string, number> {
  const status = Object.fromEntries(fs.readFileSync('/proc/self/status', 'utf8').split('\n').filter((l) => /^(VmRSS|VmHWM|RssAnon|RssFile|RssShmem):/.test(l)).map((l) => {
    const [key, value] = l.split(':')
    return [key!, Math.round(Number.parseInt(value!, 10) / 1024)]
  }))
  const {heapUsed, external, arrayBuffers} = process.memoryUsage()
  return {...status, heapUsed: mb(heapUsed), external: mb(external), arrayBuffers: mb(arrayBuffers)}
}

async function measure(packageDir: string, device: Device): Promise<Record<string, Record<string, number>>> {
  const stages: Record<string, Record<string, number>> = {start: memory()}
  const model = await ParScaleModel.open(packageDir, {device, parallel: [P], threads})
  stages.opened = memory()
  const cache = model.newCache(P)
  cache.reserve(1, promptLength + newTokens)
  cache.reset(0)
  const prompt = Array.from({length: promptLength}, (_, i) => (i * 7919 + 13) % model.shape.vocabSize)
  await model.forward(cache, 0, [prompt], 1)
  stages.prefilled = memory()
  for (let i = 0; i < newTokens; i++) await model.forward(cache, 0, [[(i * 31 + 7) % model.shape.vocabSize]], 1)
  stages.decoded = memory()
  cache.dispose?.()
  await model.release()
  return stages
}

if (process.env.BENCH_CHILD) {
  const [packageDir, device] = process.env.BENCH_CHILD.split('|')
  process.stdout.write(JSON.stringify(await measure(packageDir!, device as Device)) + '\n')
} else {
  const preset = process.env.BENCH_SHAPE ?? '0.5b'
  const shape = syntheticShape(preset, JSON.parse(process.env.BENCH_DIMS ?? '{}') as Record<string, number>)
  const packageDir = ensureSyntheticPackage(shape, {parallel: [P], onProgress: (t) => process.stderr.write(`${t}\n`)})
  console.log(`peak host RSS, synthetic ${preset}${process.env.BENCH_DIMS ? ` with ${process.env.BENCH_DIMS}` : ''} fp32, P=${P}, prompt ${promptLength}, ${newTokens} new tokens (MB)`)
  const peak: Record<string, number> = {}
  for (const device of ['cpu', 'webgpu'] as const) {
    const child = spawnSync(process.execPath, [fileURLToPath(import.meta.url)], {env: {...process.env, BENCH_CHILD: `${packageDir}|${device}`}, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit']})
    const line = child.stdout.trim().split('\n').at(-1)
    if (child.status !== 0 || !line) { console.log(`${device}: the measuring process failed (${child.status})`); continue }
    const stages = JSON.parse(line) as Record<string, Record<string, number>>
    for (const [stage, m] of Object.entries(stages)) console.log(`${device.padEnd(6)} ${stage.padEnd(9)} ${JSON.stringify(m)}`)
    peak[device] = stages.decoded!.VmHWM!
  }
  if (peak.cpu && peak.webgpu) console.log(`peak RSS: webgpu ${peak.webgpu} MB / cpu ${peak.cpu} MB = ${(peak.webgpu / peak.cpu).toFixed(2)} (target ≤ 1.3)`)
}
