// Roofline probes measured with ONNX Runtime itself: a chain of fp32 matmuls with the
// model's kind of shapes (weights as external-data initializers, as in a package), run at
// one row (weight streaming: bandwidth) and at many rows (compute: FLOP rate), plus a
// ReduceSum over one large buffer (plain read bandwidth).
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import ort from 'onnxruntime-node'

import {GraphBuilder} from '../onnx/builder.js'
import {ExternalDataFile} from '../onnx/external-data.js'
import {Ops} from '../onnx/ops.js'
import {webgpuSessionOptions} from '../engine/device.js'
import type {ProbeResult, ProbeSpec} from './types.js'

function randomChunk(elements: number, seed: number): Uint8Array {
  const out = new Float32Array(elements)
  let s = seed >>> 0 || 1
  for (let i = 0; i < elements; i++) {
    s ^= s << 13
    s ^= s >>> 17
    s ^= s << 5
    out[i] = ((s >>> 0) / 4294967296 - 0.5) * 0.07
  }
  return new Uint8Array(out.buffer)
}

function writeChainModel(dir: string, spec: ProbeSpec): {file: string; bytes: number} {
  const g = new GraphBuilder('roofline')
  const ops = new Ops(g)
  const data = new ExternalDataFile(path.join(dir, 'probe.weights'))
  let x = g.input('x', 'float32', ['rows', spec.hidden])
  let bytes = 0
  const matrix = (name: string, rows: number, cols: number, seed: number) => {
    bytes += rows * cols * 4
    return g.externalInitializer(name, 'float32', [rows, cols], data.append([randomChunk(rows * cols, seed)]))
  }
  // On a GPU, the decoder's form: MatMul on weights transposed at load (Gemm(transB) is slower there).
  const linear = (v: string, w: string) => (spec.device === 'webgpu' ? ops.matmul(v, ops.transpose(w, [1, 0])) : ops.linear(v, w))
  for (let l = 0; l < spec.layers; l++) {
    const up = linear(x, matrix(`up${l}`, spec.intermediate, spec.hidden, 2 * l + 1))
    x = linear(up, matrix(`down${l}`, spec.hidden, spec.intermediate, 2 * l + 2))
  }
  g.output(x, 'y', 'float32', ['rows', spec.hidden])
  data.close()
  const file = path.join(dir, 'probe.onnx')
  fs.writeFileSync(file, g.toModelBytes('probe'))
  return {file, bytes}
}

function writeReduceModel(dir: string): string {
  const g = new GraphBuilder('reduce')
  const x = g.input('x', 'float32', ['n'])
  g.output(g.node('ReduceSum', [x], {keepdims: 0}), 'y', 'float32', [])
  const file = path.join(dir, 'reduce.onnx')
  fs.writeFileSync(file, g.toModelBytes('probe'))
  return file
}

async function bestSeconds(session: ort.InferenceSession, feeds: Record<string, ort.Tensor>, repeat: number): Promise<number> {
  await session.run(feeds) // warm-up: prepacking, allocations, page faults
  let best = Infinity
  for (let i = 0; i < repeat; i++) {
    const t0 = performance.now()
    await session.run(feeds)
    best = Math.min(best, (performance.now() - t0) / 1000)
  }
  return best
}

export async function runProbes(spec: ProbeSpec): Promise<ProbeResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-roofline-'))
  try {
    const options: ort.InferenceSession.SessionOptions = {
      graphOptimizationLevel: 'all',
      executionMode: 'sequential',
      intraOpNumThreads: spec.threads,
      interOpNumThreads: 1,
      ...(spec.device === 'webgpu' ? webgpuSessionOptions() : {}),
    }
    const chain = writeChainModel(dir, spec)
    const session = await ort.InferenceSession.create(chain.file, options)
    const input = (rows: number) => ({x: new ort.Tensor('float32', new Float32Array(rows * spec.hidden).fill(0.01), [rows, spec.hidden])})
    const gemv = await bestSeconds(session, input(1), spec.repeat)
    const gemm = await bestSeconds(session, input(spec.rows), Math.max(2, Math.ceil(spec.repeat / 2)))
    await session.release()
    const flops = 2 * spec.rows * spec.hidden * spec.intermediate * 2 * spec.layers

    if (spec.device === 'webgpu') {
      // A read probe fed from the host would time the upload: the matmul chain is the GPU's read figure.
      return {bytes: chain.bytes, gemv_bytes_per_s: chain.bytes / gemv, matmul_flops_per_s: flops / gemm, reduce_bytes_per_s: 0}
    }
    const reduce = await ort.InferenceSession.create(writeReduceModel(dir), options)
    const n = chain.bytes / 4
    const big = new Float32Array(n).fill(1)
    const reduceSeconds = await bestSeconds(reduce, {x: new ort.Tensor('float32', big, [n])}, spec.repeat)
    await reduce.release()
    return {
      bytes: chain.bytes,
      gemv_bytes_per_s: chain.bytes / gemv,
      matmul_flops_per_s: flops / gemm,
      reduce_bytes_per_s: chain.bytes / reduceSeconds,
    }
  } finally {
    fs.rmSync(dir, {recursive: true, force: true})
  }
}
