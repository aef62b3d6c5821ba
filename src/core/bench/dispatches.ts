/**
 * Kernel launches per decode step, counted statically from a graph as ONNX Runtime optimizes it
 * (issue 23): a GPU decode step is launch-bound when it runs hundreds of small kernels, so the
 * count is a figure of its own next to ms/token. No GPU is needed: the graph is optimized on the
 * CPU provider (level `extended`: the fusions and constant folding every provider gets; level
 * `all` adds CPU-only layouts) and its nodes are classed:
 *
 * - views (Reshape, Squeeze, Unsqueeze, Flatten, Identity): the WebGPU provider aliases the
 *   buffer, no kernel;
 * - shape arithmetic (Shape, and any node whose inputs are all shapes, integer graph inputs or
 *   integer constants): runs on the CPU, no kernel;
 * - everything else is one node that launches kernels. Most launch one; GroupQueryAttention
 *   launches several (`programsOf`, from ONNX Runtime's WebGPU sources), so `programs`
 *   estimates launches including those.
 */
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import onnxProto from 'onnx-proto'
import ort from 'onnxruntime-node'

const {onnx} = onnxProto

const VIEW_OPS = new Set(['Reshape', 'Squeeze', 'Unsqueeze', 'Flatten', 'Identity'])
const INTEGER_TYPES = new Set([onnx.TensorProto.DataType.INT64, onnx.TensorProto.DataType.INT32, onnx.TensorProto.DataType.BOOL])

/**
 * Kernels one node launches in a decode step on the WebGPU provider, where more than one
 * (onnxruntime contrib_ops/webgpu/bert/group_query_attention.cc and flash_attention.cc, 1.2x):
 * GroupQueryAttention with rotary runs flash-decoding's three passes (q·kᵀ, split V, reduce)
 * after, with q, k, v packed in one input and a shared past/present buffer, one kernel that
 * splits, rotates and appends to the cache, or, unpacked, a fused q·k rotary and a cache copy.
 */
export function programsOf(op: string, inputs: string[]): number {
  if (op !== 'GroupQueryAttention') return 1
  const packed = (inputs[1] ?? '') === ''
  return packed ? 4 : 5
}

export interface DispatchCount {
  /** Nodes that launch kernels. */
  dispatches: number
  /** Estimated kernel launches (dispatching nodes weighted by programsOf). */
  programs: number
  /** Nodes of the optimized graph, all kinds. */
  nodes: number
  /** Dispatching nodes by operator, most first. */
  byOp: Record<string, number>
}

/**
 * Optimizes the graph file on the CPU provider and counts its kernel launches per call. With
 * `provider` 'webgpu' (an adapter needed) the WebGPU provider optimizes it instead, so its own
 * fusions count (MatMulNBitsMlp: the MLP's norm, gate, up, SiLU and product in one kernel).
 */
export async function countDispatches(graphPath: string, provider: 'cpu' | 'webgpu' = 'cpu'): Promise<DispatchCount> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-dispatches-'))
  const optimized = path.join(dir, 'optimized.onnx')
  try {
    const session = await ort.InferenceSession.create(graphPath, {
      ...(provider === 'webgpu' ? {executionProviders: ['webgpu'], logSeverityLevel: 3 as const} : {}),
      graphOptimizationLevel: provider === 'webgpu' ? 'all' : 'extended',
      optimizedModelFilePath: optimized,
      intraOpNumThreads: 1,
      // weights go to a side file, so a large model's optimized copy stays a valid protobuf
      extra: {session: {optimized_model_external_initializers_file_name: 'weights.bin', optimized_model_external_initializers_min_size_in_bytes: '1024'}},
    })
    await session.release()
    return classify(fs.readFileSync(optimized))
  } finally {
    fs.rmSync(dir, {recursive: true, force: true})
  }
}

/** The count for an (optimized) model's bytes. */
export function classify(modelBytes: Uint8Array): DispatchCount {
  const graph = onnx.ModelProto.decode(modelBytes).graph!
  const onCpu = new Set<string>()
  for (const init of graph.initializer ?? []) if (INTEGER_TYPES.has(init.dataType ?? 0)) onCpu.add(init.name!)
  for (const input of graph.input ?? []) if (INTEGER_TYPES.has(input.type?.tensorType?.elemType ?? 0) && !/input_ids/.test(input.name ?? '')) onCpu.add(input.name!)
  const byOp: Record<string, number> = {}
  let dispatches = 0
  let programs = 0
  for (const node of graph.node ?? []) {
    const op = node.opType ?? ''
    const inputs = (node.input ?? []).filter((i) => i !== '')
    const shapeOnly = op === 'Shape' || (inputs.length > 0 && inputs.every((i) => onCpu.has(i)))
    if (shapeOnly) {
      for (const o of node.output ?? []) onCpu.add(o)
      continue
    }
    if (VIEW_OPS.has(op)) continue
    dispatches++
    programs += programsOf(op, node.input ?? [])
    byOp[op] = (byOp[op] ?? 0) + 1
  }
  const sorted = Object.fromEntries(Object.entries(byOp).sort((a, b) => b[1] - a[1]))
  return {dispatches, programs, nodes: graph.node?.length ?? 0, byOp: sorted}
}
