// Child-process entry of `parscale bench`: measures one configuration (or the roofline
// probes) and prints one JSON line, so each measurement's peak RSS is its own.
import {readSync, writeFileSync} from 'node:fs'

import {variantConfig, selectVariant} from '../package/manifest.js'
import {generateAll} from '../generation/batcher.js'
import {prefill} from '../generation/generation.js'
import {ParScaleModel} from '../engine/model.js'
import {kvCacheBytes, prefillFlops, weightBytes} from './model-cost.js'
import {profileFiles, summarizeKernelCalls, summarizeProfile} from './profile-summary.js'
import {runProbes} from './roofline.js'
import {summarize} from './stats.js'
import type {MixedResult, MixedSpec, RunResult, RunSpec, WorkerSpec} from './types.js'

/** Peak resident set of this process (getrusage maxrss, the kernel's high-water mark). */
export function peakRssBytes(): number {
  return process.resourceUsage().maxRSS * 1024
}

function argmaxRows(logits: Float32Array, rows: number, vocab: number): number[] {
  const out: number[] = []
  for (let r = 0; r < rows; r++) {
    let best = 0
    let bestValue = -Infinity
    const base = (r + 1) * vocab - vocab
    for (let i = 0; i < vocab; i++) {
      const v = logits[base + i]!
      if (v > bestValue) {
        bestValue = v
        best = i
      }
    }
    out.push(best)
  }
  return out
}

async function measureRun(spec: RunSpec): Promise<RunResult> {
  const loadStart = performance.now()
  const model = await ParScaleModel.open(spec.packageDir, {
    threads: spec.threads,
    device: spec.device,
    // the A/Bs in docs/benchmarks.md: PARSCALE_WIDEN=0 keeps a quantized package on its stored graph at
    // every P, PARSCALE_WIDEN=1 widens every step at P ≥ 4 whatever this CPU would choose (decodeRowsOnCodes)
    ...(process.env.PARSCALE_WIDEN === '0' ? {widenDecode: false} : {parallel: [spec.parallel], sequences: spec.batch}),
    ...(process.env.PARSCALE_WIDEN === '1' ? {decodeRowsOnCodes: 0} : {}),
    ...(spec.profilePrefix ? {profilePrefix: spec.profilePrefix} : {}),
  })
  const loadMs = performance.now() - loadStart
  const {batch, promptLength, newTokens, parallel} = spec
  const vocab = model.vocabSize
  // Deterministic prompt ids; random-weight models make the content irrelevant.
  const prompt = Array.from({length: batch}, (_, b) => Array.from({length: promptLength}, (_, i) => (i * 7919 + b * 104729 + 13) % Math.min(vocab, 150000)))

  const prefillTimes: number[] = []
  const ttft: number[] = []
  const decode: number[] = []
  let cacheBytes = 0
  for (let rep = 0; rep <= spec.repeat; rep++) {
    const warm = rep === 0
    const cache = model.newCache(parallel)
    cache.reserve(batch, promptLength + newTokens)
    const t0 = performance.now()
    let next: number[] = []
    for (let b = 0; b < batch; b++) {
      cache.reset(b)
      const out = await prefill(model, cache, b, prompt[b])
      next.push(...argmaxRows(out.logits, 1, vocab))
    }
    const t1 = performance.now()
    if (!warm) {
      prefillTimes.push(t1 - t0)
      ttft.push(t1 - t0)
    }
    // The warm-up only needs a few steps to settle allocations.
    const steps = warm ? Math.min(3, newTokens - 1) : newTokens - 1
    for (let step = 0; step < steps; step++) {
      const s0 = performance.now()
      const out = await model.forward(cache, 0, next.map((id) => [id]), 1)
      next = argmaxRows(out.logits, batch, vocab)
      const s1 = performance.now()
      if (!warm) decode.push(s1 - s0)
    }
    cacheBytes = cache.bytes
    cache.dispose()
  }
  // the hand-written kernels profile themselves (timestamps per dispatch); their calls go to PREFIX-wgsl-p{P}.json
  const kernelCalls = spec.profilePrefix ? await model.kernelProfile(parallel, prompt[0]!, 8) : undefined
  await model.release() // ONNX Runtime writes the profiles now
  let profile = spec.profilePrefix ? profileFiles(spec.profilePrefix).map(summarizeProfile) : undefined
  if (spec.profilePrefix && kernelCalls) {
    const file = `${spec.profilePrefix}-wgsl-p${parallel}.json`
    const plain = kernelCalls.map((c) => ({tokens: c.tokens, wall_ms: c.wallMs, gpu_ms: Object.fromEntries(c.ms), dispatches: Object.fromEntries(c.dispatches)}))
    writeFileSync(file, JSON.stringify(plain, null, 1))
    profile = [summarizeKernelCalls(file, kernelCalls)]
  }
  const config = variantConfig(model.manifest, selectVariant(model.manifest, parallel, spec.packageDir))
  const decodeSummary = summarize(decode)
  return {
    parallel,
    batch,
    prompt_length: promptLength,
    new_tokens: newTokens,
    threads: spec.threads,
    device: spec.device ?? 'cpu',
    load_ms: loadMs,
    prefill_ms: summarize(prefillTimes),
    ttft_ms: summarize(ttft),
    decode_ms_per_token: decodeSummary,
    tokens_per_s: (batch * 1000) / decodeSummary.median,
    peak_rss_bytes: peakRssBytes(),
    weight_bytes: weightBytes(config, model.manifest.quant?.weightBytes),
    kv_cache_bytes: kvCacheBytes(config, batch, promptLength + newTokens),
    kv_cache_allocated_bytes: cacheBytes,
    prefill_flops: prefillFlops(config, batch, promptLength),
    kernels: model.kernels(parallel),
    ...(profile ? {profile} : {}),
  }
}

/** A batch of greedy requests at the given P values through one model: memory and switch cost. */
async function measureMixed(spec: MixedSpec): Promise<MixedResult> {
  const model = await ParScaleModel.open(spec.packageDir, {threads: spec.threads, device: spec.device})
  const switchMs: Record<string, number> = {}
  for (const parallel of new Set(spec.parallel)) {
    const t0 = performance.now()
    model.newCache(parallel)
    switchMs[parallel] = performance.now() - t0
  }
  const vocab = Math.min(model.vocabSize, 150000)
  const requests = spec.parallel.map((parallel, r) => ({
    promptIds: Array.from({length: spec.promptLength}, (_, i) => (i * 7919 + r * 104729 + 13) % vocab),
    maxNewTokens: spec.newTokens,
    sampling: {temperature: 0},
    parallel,
  }))
  const t0 = performance.now()
  const results = await generateAll(model, requests, spec.batchSize, {eosTokenIds: [], decode: () => ''})
  const seconds = (performance.now() - t0) / 1000
  await model.release()
  return {peak_rss_bytes: peakRssBytes(), seconds, generated_tokens: results.reduce((n, r) => n + r.generatedTokens, 0), switch_ms: switchMs}
}

function readStdin(): string {
  const chunks: Buffer[] = []
  const buf = Buffer.alloc(65536)
  for (;;) {
    let n: number
    try {
      n = readSync(0, buf, 0, buf.length, null)
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'EAGAIN') continue
      if ((error as NodeJS.ErrnoException).code === 'EOF') break
      throw error
    }
    if (n === 0) break
    chunks.push(Buffer.from(buf.subarray(0, n)))
  }
  return Buffer.concat(chunks).toString('utf8')
}

async function main(): Promise<void> {
  const spec = JSON.parse(readStdin()) as WorkerSpec
  const result = spec.kind === 'probe' ? await runProbes(spec) : spec.kind === 'mixed' ? await measureMixed(spec) : await measureRun(spec)
  process.stdout.write(JSON.stringify({ok: true, result}) + '\n')
}

main().catch((error: unknown) => {
  process.stdout.write(JSON.stringify({ok: false, error: error instanceof Error ? error.message : String(error)}) + '\n')
  process.exitCode = 1
})
