// `node dist/bench/quant-operators.js [VARIANT…]`: the operator A/B behind the quantized
// packages. Every matmul of the 0.5b shape (24 layers of q, k, v, o, gate, up, down, plus
// the LM head) as one ONNX Runtime graph per weight format, timed at 1, 8 and 64 rows
// (decode at P = 1, decode at P = 8, a 64-token prefill), each variant in its own process so
// its peak RSS is its own. Weights are random bytes: only speed and memory are measured.
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import {fileURLToPath} from 'node:url'

import ort from 'onnxruntime-node'

import {GraphBuilder} from '../src/core/onnx/builder.js'
import {ExternalDataFile} from '../src/core/onnx/external-data.js'
import {SYNTHETIC_PRESETS} from '../src/core/checkpoint/synthetic.js'

interface Matrix {
  name: string
  /** output features */
  n: number
  /** input features */
  k: number
}

const shape = SYNTHETIC_PRESETS['0.5b']!
const H = shape.hiddenSize
const I = shape.intermediateSize
const KV = (H / shape.numHeads) * shape.numKvHeads

/** Every matmul of a decode step; `fused`: q/k/v as one matrix and gate/up as one (fewer, larger kernels). */
function matrices(fused: boolean): Matrix[] {
  const out: Matrix[] = []
  for (let l = 0; l < shape.numLayers; l++) {
    if (fused) out.push({name: `l${l}.qkv`, n: H + 2 * KV, k: H}, {name: `l${l}.o`, n: H, k: H}, {name: `l${l}.gateup`, n: 2 * I, k: H})
    else {
      out.push({name: `l${l}.q`, n: H, k: H}, {name: `l${l}.k`, n: KV, k: H}, {name: `l${l}.v`, n: KV, k: H}, {name: `l${l}.o`, n: H, k: H})
      out.push({name: `l${l}.gate`, n: I, k: H}, {name: `l${l}.up`, n: I, k: H})
    }
    out.push({name: `l${l}.down`, n: H, k: I})
  }
  out.push({name: 'head', n: shape.vocabSize, k: H})
  return out
}

let seed = 12345
function randomBytes(length: number): Uint8Array {
  const words = new Uint32Array(Math.ceil(length / 4))
  for (let i = 0; i < words.length; i++) {
    seed ^= seed << 13
    seed ^= seed >>> 17
    seed ^= seed << 5
    words[i] = seed >>> 0
  }
  return new Uint8Array(words.buffer, 0, length)
}

function smallFloats(length: number, magnitude: number): Uint8Array {
  const values = new Float32Array(length)
  const bytes = randomBytes(length)
  for (let i = 0; i < length; i++) values[i] = (bytes[i]! / 255 - 0.5) * magnitude
  return new Uint8Array(values.buffer)
}

/** Writes `length` bytes in pieces of at most 64 MB (no one buffer of a whole head). */
function* pieces(length: number, make: (n: number) => Uint8Array): Generator<Uint8Array> {
  for (let done = 0; done < length; done += 64 << 20) yield make(Math.min(64 << 20, length - done))
}

type Variant = (g: GraphBuilder, data: ExternalDataFile, x: string, m: Matrix) => {output: string; bytes: number}

function nbits(bits: 4 | 8, block: number, accuracy: number, zeroPoints = false): Variant {
  return (g, data, x, m) => {
    const blocks = Math.ceil(m.k / block)
    const blob = (block * bits) / 8
    const b = g.externalInitializer(`${m.name}.q`, 'uint8', [m.n, blocks, blob], data.append(pieces(m.n * blocks * blob, randomBytes)))
    const scales = g.externalInitializer(`${m.name}.scales`, 'float32', [m.n * blocks], data.append([smallFloats(m.n * blocks, 0.02)]))
    const inputs = [x, b, scales]
    let bytes = m.n * blocks * (blob + 4)
    if (zeroPoints) {
      const zpBytes = m.n * Math.ceil((blocks * bits) / 8)
      inputs.push(g.externalInitializer(`${m.name}.zp`, 'uint8', [zpBytes], data.append([randomBytes(zpBytes)])))
      bytes += zpBytes
    }
    const output = g.node('MatMulNBits', inputs, {K: m.k, N: m.n, bits, block_size: block, accuracy_level: accuracy}, 'com.microsoft')
    return {output, bytes}
  }
}

const dynamicQuantizeMatMul: Variant = (g, data, x, m) => {
  const b = g.externalInitializer(`${m.name}.q`, 'int8', [m.k, m.n], data.append(pieces(m.k * m.n, randomBytes)))
  const scale = g.externalInitializer(`${m.name}.scale`, 'float32', [m.n], data.append([smallFloats(m.n, 0.02)]))
  return {output: g.node('DynamicQuantizeMatMul', [x, b, scale], {}, 'com.microsoft'), bytes: m.k * m.n + 4 * m.n}
}

const matMulInteger: Variant = (g, data, x, m) => {
  const b = g.externalInitializer(`${m.name}.q`, 'int8', [m.k, m.n], data.append(pieces(m.k * m.n, randomBytes)))
  const scale = g.externalInitializer(`${m.name}.scale`, 'float32', [m.n], data.append([smallFloats(m.n, 0.02)]))
  const [xq, xScale, xZero] = g.nodeN('DynamicQuantizeLinear', [x], 3)
  const product = g.node('Cast', [g.node('MatMulInteger', [xq!, b, xZero!])], {to: 1})
  return {output: g.node('Mul', [g.node('Mul', [product, xScale!]), scale]), bytes: m.k * m.n + 4 * m.n}
}

const fp32: Variant = (g, data, x, m) => {
  const w = g.externalInitializer(`${m.name}.w`, 'float32', [m.n, m.k], data.append(pieces(m.n * m.k * 4, (n) => smallFloats(n / 4, 0.05))))
  return {output: g.node('Gemm', [x, w], {transB: 1}), bytes: 4 * m.n * m.k}
}

const VARIANTS: Record<string, Variant> = {
  'fp32-gemm': fp32,
  'nbits4-b32-acc4': nbits(4, 32, 4),
  'nbits4-b32-acc4-zp': nbits(4, 32, 4, true),
  'nbits4-b64-acc4': nbits(4, 64, 4),
  'nbits4-b128-acc4': nbits(4, 128, 4),
  'nbits4-b32-acc1': nbits(4, 32, 1),
  'nbits4-b128-acc1': nbits(4, 128, 1),
  'nbits4-b32-acc0': nbits(4, 32, 0),
  'nbits8-b32-acc4': nbits(8, 32, 4),
  'nbits8-b128-acc4': nbits(8, 128, 4),
  'nbits8-b32-acc1': nbits(8, 32, 1),
  'nbits4-b32-acc4-fused': nbits(4, 32, 4),
  'nbits4-b128-acc4-fused': nbits(4, 128, 4),
  'nbits8-b32-acc4-fused': nbits(8, 32, 4),
  'dqmatmul-int8-col': dynamicQuantizeMatMul,
  'dqmatmul-int8-col-fused': dynamicQuantizeMatMul,
  'matmulinteger-int8-col': matMulInteger,
}

const ROWS = [1, 8, 64]

interface Loaded {
  name: string
  session: ort.InferenceSession
  bytes: number
  loadMs: number
  rssAfterLoad: number
}

async function load(variantName: string, threads: number, dir: string): Promise<Loaded> {
  const variant = VARIANTS[variantName]
  if (!variant) throw new Error(`unknown variant ${variantName}; known: ${Object.keys(VARIANTS).join(', ')}`)
  const g = new GraphBuilder('ab')
  const data = new ExternalDataFile(path.join(dir, `${variantName}.weights`))
  const inputs = {[H]: g.input('x_hidden', 'float32', ['rows', H]), [I]: g.input('x_mlp', 'float32', ['rows', I])}
  let bytes = 0
  for (const m of matrices(variantName.endsWith('-fused'))) {
    const {output, bytes: b} = variant(g, data, inputs[m.k]!, m)
    bytes += b
    g.output(output, `y.${m.name}`, 'float32', ['rows', m.n])
  }
  data.close()
  const file = path.join(dir, `${variantName}.onnx`)
  fs.writeFileSync(file, g.toModelBytes('ab'))
  const t0 = performance.now()
  const session = await ort.InferenceSession.create(file, {graphOptimizationLevel: 'all', executionMode: 'sequential', intraOpNumThreads: threads, interOpNumThreads: 1})
  return {name: variantName, session, bytes, loadMs: performance.now() - t0, rssAfterLoad: process.memoryUsage().rss}
}

/**
 * Loads every variant of a group in one process, then times them in turns (A B C A B C …) at
 * each row count, so that a shared machine's drift reaches all of them alike.
 */
async function measureGroup(names: string[], threads: number, repeat: number): Promise<Record<string, number | string>[]> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-quant-ab-'))
  try {
    const loaded: Loaded[] = []
    for (const name of names) loaded.push(await load(name, threads, dir))
    const results = loaded.map((l): Record<string, number | string> => ({variant: l.name, weight_mb: l.bytes / 1e6, load_ms: l.loadMs}))
    for (const rows of ROWS) {
      const feeds = {
        x_hidden: new ort.Tensor('float32', new Float32Array(rows * H).map((_, i) => Math.sin(i) * 0.5), [rows, H]),
        x_mlp: new ort.Tensor('float32', new Float32Array(rows * I).map((_, i) => Math.cos(i) * 0.5), [rows, I]),
      }
      const times = loaded.map(() => [] as number[])
      for (const l of loaded) await l.session.run(feeds) // warm-up
      for (let i = 0; i < (rows === 64 ? Math.max(3, repeat >> 1) : repeat); i++) {
        for (const [v, l] of loaded.entries()) {
          const s = performance.now()
          await l.session.run(feeds)
          times[v]!.push(performance.now() - s)
        }
      }
      times.forEach((t, v) => {
        t.sort((a, b) => a - b)
        results[v]![`ms_${rows}`] = t[t.length >> 1]!
      })
    }
    for (const l of loaded) await l.session.release()
    return results
  } finally {
    fs.rmSync(dir, {recursive: true, force: true})
  }
}

/** Peak RSS of one variant loaded and run alone (in a process of its own). */
async function measureMemory(name: string, threads: number): Promise<number> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-quant-ab-'))
  try {
    const l = await load(name, threads, dir)
    for (const rows of ROWS) {
      await l.session.run({x_hidden: new ort.Tensor('float32', new Float32Array(rows * H), [rows, H]), x_mlp: new ort.Tensor('float32', new Float32Array(rows * I), [rows, I])})
    }
    await l.session.release()
    return (process.resourceUsage().maxRSS * 1024) / 1e6
  } finally {
    fs.rmSync(dir, {recursive: true, force: true})
  }
}

const threads = Number(process.env.BENCH_THREADS ?? 2)
const repeat = Number(process.env.BENCH_REPEAT ?? 9)
const args = process.argv.slice(2)
const f = (v: number) => v.toFixed(v >= 100 ? 0 : 1)
if (args[0] === '--memory') {
  console.log(JSON.stringify({variant: args[1], peak_rss_mb: await measureMemory(args[1]!, threads)}))
} else {
  // Groups of variants timed together: "a,b,c d,e" (default: each variant next to int4 block 32).
  const groups = args.length ? args.map((a) => a.split(',')) : Object.keys(VARIANTS).filter((v) => v !== 'nbits4-b32-acc4').map((v) => ['nbits4-b32-acc4', v])
  console.log(`${threads} threads; each group loaded in one process and timed in turns (median of ${repeat}); peak RSS (BENCH_MEMORY=1) from a process per variant`)
  console.log(`| group | variant | weights MB | 1 row ms | 8 rows ms | 64 rows ms | peak RSS MB |`)
  console.log(`|---|---|---|---|---|---|---|`)
  for (const [index, group] of groups.entries()) {
    const rows = await measureGroup(group, threads, repeat)
    for (const r of rows) {
      const memory = process.env.BENCH_MEMORY !== '1' ? {status: 1, stdout: ''} : spawnSync(process.execPath, [fileURLToPath(import.meta.url), '--memory', String(r.variant)], {encoding: 'utf8', env: {...process.env, NODE_NO_WARNINGS: '1'}})
      const rss = memory.status === 0 ? (JSON.parse(memory.stdout.trim().split('\n').at(-1)!) as {peak_rss_mb: number}).peak_rss_mb : NaN
      console.log(`| ${index + 1} | ${r.variant} | ${f(r.weight_mb as number)} | ${f(r.ms_1 as number)} | ${f(r.ms_8 as number)} | ${f(r.ms_64 as number)} | ${f(rss)} |`)
    }
  }
}
