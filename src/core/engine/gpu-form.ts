/**
 * The GPU form of a package (onnx/gpu-form-graph.ts, issue 23): one session per P over a graph
 * built at open from the weights the package already has (nothing converted again), a
 * fixed-capacity cache per layer whose first slots hold the P streams' prefixes, and one
 * sequence (batch 1). Runs on the CPU provider too, where its exactness is checked.
 */
import {closeSync, openSync, readFileSync, renameSync, statSync, writeFileSync} from 'node:fs'
import {join} from 'node:path'

import onnxProto from 'onnx-proto'
import ort from 'onnxruntime-node'

import type {BackboneShape} from '../checkpoint/config.js'
import {encodeFloat16} from '../checkpoint/dtype.js'
import {UserError} from '../errors.js'
import {GraphBuilder} from '../onnx/builder.js'
import type {ExternalLocation} from '../onnx/external-data.js'
import type {ElementType} from '../onnx/builder.js'
import {buildGpuFormGraph, floatGpuWeights, gpuFormIo, type GpuWeights, gpuRotaryTables, rotatePrefixKeys, type AggregationHeadFiles, type LaidOutFloatWeights} from '../onnx/gpu-form-graph.js'
import {floatWeights, placedInitializers, type FloatWeightProvider} from '../onnx/weights.js'
import {MANIFEST_FILE, readManifest, selectVariant, type PackageManifest, type PackageVariant} from '../package/manifest.js'
import {checkWebGpu, webgpuSessionOptions, type Device} from './device.js'
import {gpuFormMatrices, readFully, writeTransposed, type LayoutRequest} from './gpu-form-weights.js'
import {loadStreamWeights} from './stream-weights.js'

const {onnx} = onnxProto

export interface StoredInitializer {
  half: boolean
  type: ElementType
  shape: number[]
  location: ExternalLocation
}

const ELEMENT_TYPE_OF: Partial<Record<number, ElementType>> = {
  [onnx.TensorProto.DataType.FLOAT]: 'float32',
  [onnx.TensorProto.DataType.FLOAT16]: 'float16',
  [onnx.TensorProto.DataType.UINT8]: 'uint8',
  [onnx.TensorProto.DataType.INT8]: 'int8',
  [onnx.TensorProto.DataType.INT64]: 'int64',
}

/** The external initializers of a stored graph of the package, by name. */
export function storedInitializers(graphPath: string, model = onnx.ModelProto.decode(readFileSync(graphPath))): Map<string, StoredInitializer> {
  const out = new Map<string, StoredInitializer>()
  for (const tensor of model.graph?.initializer ?? []) {
    if (!tensor.externalData?.length || !tensor.name) continue
    const entry = (key: string) => tensor.externalData!.find((e) => e.key === key)?.value ?? ''
    out.set(tensor.name, {
      half: tensor.dataType === onnx.TensorProto.DataType.FLOAT16,
      type: ELEMENT_TYPE_OF[tensor.dataType ?? 0] ?? 'float32',
      shape: (tensor.dims ?? []).map(Number),
      location: {file: entry('location'), offset: Number(entry('offset')), length: Number(entry('length'))},
    })
  }
  return out
}

/**
 * Float weights of an unquantized package as its WebGPU graph placed them: the same initializer
 * names and bytes, so another graph over the same files reads nothing new.
 */
export function packageFloatWeights(packageDir: string, manifest: PackageManifest): (g: GraphBuilder) => FloatWeightProvider {
  if (!manifest.webgpuGraph) throw new UserError(`${packageDir}: the package has no float weights for the GPU form (a quantized package); convert without --quant`)
  const stored = storedInitializers(join(packageDir, manifest.webgpuGraph))
  return (g) => {
    const initializer = placedInitializers(g, (name) => {
      const entry = stored.get(name)
      if (!entry) throw new Error(`${packageDir}: weight "${name}" is not in ${manifest.webgpuGraph}`)
      return entry
    })
    return floatWeights(g, {
      get: (name, shape) => initializer(shape ? `${name}#${shape.join('x')}` : name),
      rowBlocks: (_name, storedAs) => {
        const blocks = rowBlockNames(stored.keys(), storedAs)
        if (blocks.length === 0) throw new Error(`${packageDir}: weight "${storedAs}" is not in ${manifest.webgpuGraph}`)
        return blocks.map(initializer)
      },
      computed: (name) => initializer(name),
      concatenated: (parts, storedAs) => {
        const weight = initializer(`${storedAs}.weight`)
        return parts.some((p) => p.bias) ? {weight, bias: initializer(`${storedAs}.bias`)} : {weight}
      },
    })
  }
}

/** The matrices a package's GPU form lays out, by package (packageLaidOutWeights' first build, once per process). */
const layoutRequests = new Map<string, LayoutRequest[]>()

const firstRow = (blockName: string) => Number(/\[(\d+):/.exec(blockName)?.[1] ?? 0)

/** The names of a matrix's row blocks (`<storedAs>[first:end]`, as the converter stores a big matrix) among `names`, in row order. */
export function rowBlockNames(names: Iterable<string>, storedAs: string): string[] {
  return [...names].filter((n) => n.startsWith(`${storedAs}[`)).sort((a, b) => firstRow(a) - firstRow(b))
}

/**
 * `PARSCALE_GPU_MATMUL_ACCURACY` (for measuring): the GPU form's MatMulNBits accuracy_level in
 * place of the package's 4 (int8 activations: on adapters with subgroups the WebGPU provider then
 * takes its DP4A kernels, which quantize the activations in a dispatch of their own, and runs the
 * fused MLP unfused); 0 keeps float activations.
 */
function gpuMatMulAccuracy(): {accuracy_level?: number} {
  const level = process.env.PARSCALE_GPU_MATMUL_ACCURACY
  if (level === undefined || level === '') return {}
  if (!['0', '1', '2', '3', '4'].includes(level)) throw new UserError(`PARSCALE_GPU_MATMUL_ACCURACY must be 0-4, not "${level}"`)
  return {accuracy_level: Number(level)}
}

/**
 * A quantized package's matrices as its CPU graph reads them: every MatMulNBits (by its codes'
 * name, `<storedAs>.codes`) is emitted again with the same initializers and attributes; the
 * embedding is a GatherBlockQuantized over the table the manifest locates; vectors come from the same graph.
 */
export function packageQuantizedWeights(packageDir: string, manifest: PackageManifest): (g: GraphBuilder) => GpuWeights {
  const graphPath = join(packageDir, manifest.graph)
  const model = onnx.ModelProto.decode(readFileSync(graphPath))
  const stored = storedInitializers(graphPath, model)
  const nodes = model.graph?.node ?? []
  const ints = (node: onnxProto.onnx.INodeProto) => Object.fromEntries((node.attribute ?? []).filter((a) => a.i !== undefined && a.i !== null).map((a) => [a.name!, Number(a.i)]))
  const matMuls = new Map(nodes.filter((n) => n.opType === 'MatMulNBits').map((n) => [n.input![1]!, n]))
  // Graph v8's CPU graph takes inputs_embeds (the engine reads rows): the GPU form gathers on
  // the device, over the table's codes and scales where the manifest says they are (one copy).
  const table = manifest.embedding
  if (!table || (table.dtype !== 'int4' && table.dtype !== 'int8') || table.scalesOffset === undefined || !table.blockSize) {
    throw new UserError(`${join(packageDir, MANIFEST_FILE)}: "embedding" does not describe a quantized table; convert again`)
  }
  const bits = table.dtype === 'int4' ? 4 : 8
  const blocks = table.hidden / table.blockSize
  return (g) => {
    const made = new Set<string>()
    const initializer = (name: string): string => {
      if (made.has(name)) return name
      const entry = stored.get(name)
      if (!entry) throw new Error(`${graphPath}: no stored tensor "${name}"`)
      made.add(g.externalInitializer(name, entry.type, entry.shape, entry.location))
      return name
    }
    /** The package's MatMulNBits over `codes`, or over output rows [first, first + count) of it. */
    const matMulNBits = (x: string, codes: string, rows?: {first: number; count: number}): string => {
      const node = matMuls.get(codes)
      if (!node) throw new Error(`${graphPath}: no MatMulNBits reads "${codes}"`)
      const attributes: Record<string, number> = {...ints(node), ...gpuMatMulAccuracy()}
      const tensor = (name: string) => (rows ? rowsOf(name, attributes.N!, rows.first, rows.count) : initializer(name))
      const inputs = [x, tensor(node.input![1]!), tensor(node.input![2]!)]
      const bias = node.input![5]
      if (bias) inputs.push('', '', tensor(bias))
      return g.node('MatMulNBits', inputs, rows ? {...attributes, N: rows.count} : attributes, 'com.microsoft')
    }
    // Output rows [first, first + count) of a stored tensor laid out output-row-major (codes
    // [N, blocks, blob], scales [N·blocks] or [N, blocks], bias [N]): the same file, a later offset.
    const rowsOf = (name: string, N: number, first: number, count: number): string => {
      const entry = stored.get(name)
      if (!entry) throw new Error(`${graphPath}: no stored tensor "${name}"`)
      const rowBytes = entry.location.length / N
      if (first + count > N || !Number.isInteger(rowBytes)) throw new Error(`${graphPath}: "${name}" has no output rows ${first}…${first + count}`)
      const part = `${name}[${first}:${first + count}]`
      if (made.has(part)) return part
      const shape = entry.shape.length === 1 ? [(entry.shape[0]! / N) * count] : [count, ...entry.shape.slice(1)]
      made.add(g.externalInitializer(part, entry.type, shape, {file: entry.location.file, offset: entry.location.offset + first * rowBytes, length: count * rowBytes}))
      return part
    }
    const blocksOf = (storedAs: string) => rowBlockNames(matMuls.keys(), storedAs)
    return {
      get: initializer,
      project: (x, _parts, storedAs) => matMulNBits(x, `${storedAs}.codes`),
      projectRows: (x, storedAs, first, count) => matMulNBits(x, `${storedAs}.codes`, {first, count}),
      embed: (ids) => {
        const codes = g.externalInitializer('model.embed_tokens.weight.codes', 'uint8', [table.rows, (table.hidden * bits) / 8], {file: table.file, offset: table.offset, length: (table.rows * table.hidden * bits) / 8})
        const scales = g.externalInitializer('model.embed_tokens.weight.scales', 'float32', [table.rows, blocks], {file: table.file, offset: table.scalesOffset!, length: table.rows * blocks * 4})
        return g.node('GatherBlockQuantized', [codes, ids, scales], {bits, block_size: table.blockSize!, gather_axis: 0, quantize_axis: 1}, 'com.microsoft')
      },
      lmHead: (x) => {
        const tied = blocksOf('lm_head.weight (tied to model.embed_tokens.weight)')
        const blocks = manifest.model.tieWordEmbeddings ? tied : blocksOf('lm_head.weight')
        const outputs = blocks.map((codes) => matMulNBits(x, codes))
        return outputs.length === 1 ? outputs[0]! : g.node('Concat', outputs, {axis: 1})
      },
    }
  }
}

/**
 * Why the GPU form cannot run a package, or undefined when it can: float packages give it their
 * WebGPU graph's weights, quantized ones their CPU graph's MatMulNBits codes and the embedding
 * table the manifest locates (graph v8).
 */
export function gpuFormSupport(manifest: PackageManifest): string | undefined {
  if (manifest.quant) {
    const table = manifest.embedding
    if (!table || (table.dtype !== 'int4' && table.dtype !== 'int8') || table.scalesOffset === undefined || !table.blockSize) return 'its quantized embedding table is not in the manifest'
    return undefined
  }
  return manifest.webgpuGraph ? undefined : 'it has no float weights placed for the GPU (no WebGPU graph)'
}

/**
 * A float package's tensors for the GPU form: vectors and the untied embedding table as its
 * WebGPU graph placed them (same names, same bytes), matrices from `gpu-form.weights`
 * (gpu-form-weights.ts), written at the first use of the GPU form on this package. `half` (the
 * half form of an fp16 package): matrices written as float16, and the vectors (stored float32,
 * a few KB) rounded to half and held in the graph.
 */
export function packageLaidOutWeights(packageDir: string, manifest: PackageManifest, half = false): (g: GraphBuilder) => LaidOutFloatWeights {
  if (!manifest.webgpuGraph) throw new UserError(`${packageDir}: the package has no float weights for the GPU form (a quantized package); convert without --quant`)
  const stored = storedInitializers(join(packageDir, manifest.webgpuGraph))
  const entry = (name: string) => {
    const found = stored.get(name)
    if (!found) throw new Error(`${packageDir}: weight "${name}" is not in ${manifest.webgpuGraph}`)
    return found
  }
  const matrixName = (sources: string[]) => `${sources[0]!.replace(/\[\d+:\d+\]$/, '')}^T` // the head's blocks: one matrix
  const provider = (matrix: (g: GraphBuilder, name: string, sources: string[]) => string, halfVectors = false) => (g: GraphBuilder): LaidOutFloatWeights => {
    const vectors = halfVectors ? halfInitializers(g, packageDir, entry) : placedInitializers(g, entry)
    const made = new Map<string, string>()
    return {
      get: vectors,
      transposed: (sources) => {
        const name = matrixName(sources)
        let tensor = made.get(name)
        if (!tensor) made.set(name, (tensor = matrix(g, name, sources)))
        return tensor
      },
      rowBlocks: (storedAs) => {
        const blocks = rowBlockNames(stored.keys(), storedAs)
        if (blocks.length === 0) throw new Error(`${packageDir}: weight "${storedAs}" is not in ${manifest.webgpuGraph}`)
        return blocks
      },
      table: (name) => {
        const t = entry(name)
        return {tensor: g.externalInitializer(name, t.half ? 'float16' : 'float32', t.shape, t.location), half: t.half}
      },
    }
  }
  // The matrices the graph multiplies by depend on the model's structure only: a first build
  // names them (once per package and process: each open builds one graph more), the file is
  // made (or found), and the graph is built over it.
  const memo = `${packageDir}\n${manifest.backbone.sha256}\n${manifest.graphVersion}\n${manifest.webgpuGraph}`
  let requests = layoutRequests.get(memo)
  if (!requests) {
    const named = new Map<string, LayoutRequest>()
    buildGpuFormGraph(manifest.model, (g) => floatGpuWeights(g, provider((_g, name, sources) => {
      named.set(name, {name, sources: sources.map((source) => ({name: source, ...entry(source)}))})
      return name
    })(g), manifest.model), {parallel: 1, prefixTokens: 0})
    layoutRequests.set(memo, (requests = [...named.values()]))
  }
  const dtype = half ? 'float16' : 'float32'
  const laidOut = gpuFormMatrices(packageDir, manifest, requests, dtype)
  return provider((g, name) => {
    const m = laidOut.get(name)!
    return g.externalInitializer(name, dtype, m.shape, m.location)
  }, half)
}

/** Vectors as float16 initializers: stored half ones as they are, float32 ones rounded and held inline. */
function halfInitializers(g: GraphBuilder, packageDir: string, entryOf: (name: string) => StoredInitializer): (name: string) => string {
  const made = new Set<string>()
  return (name) => {
    if (made.has(name)) return name
    made.add(name)
    const entry = entryOf(name)
    if (entry.half) return g.externalInitializer(name, 'float16', entry.shape, entry.location)
    const bytes = new Uint8Array(entry.location.length)
    const fd = openSync(join(packageDir, entry.location.file), 'r')
    try {
      readFully(fd, bytes, entry.location.offset, `${join(packageDir, entry.location.file)}: "${name}"`)
    } finally {
      closeSync(fd)
    }
    return g.inlineHalf(name, encodeFloat16(new Float32Array(bytes.buffer, 0, bytes.length / 4)), entry.shape)
  }
}

/** The package's weights for the GPU form: float (laid out for it, from its WebGPU graph's tensors; float16 in the half form) or quantized (from its CPU graph). */
export function packageGpuWeights(packageDir: string, manifest: PackageManifest, half = false): (g: GraphBuilder) => GpuWeights {
  if (manifest.quant) return packageQuantizedWeights(packageDir, manifest)
  const float = packageLaidOutWeights(packageDir, manifest, half)
  return (g) => floatGpuWeights(g, float(g), manifest.model, half)
}

/**
 * Whether a package's GPU form can be the half one (onnx/gpu-form-graph.ts): fp16 packages only
 * (quantized ones keep MatMulNBits' float32 activations; fp32 ones keep their precision).
 */
export function gpuFormHalfCandidate(manifest: PackageManifest): boolean {
  return !manifest.quant && manifest.dtype === 'fp16'
}

/** The one line said when an fp16 package's GPU form runs widened to float32 on WebGPU for want of half-precision kernels. */
export const webgpuHalfMissing = (detail: string) => `this WebGPU adapter runs no float16 kernels (no shader-f16: ${detail}); fp16 weights run widened to float32`

let halfProbe: Promise<string | undefined> | undefined

/** A provider's refusal as a short reason for a one-line notice: its first line, at most 200 characters. */
const providerReason = (error: unknown) => (error as Error).message.split('\n')[0]!.slice(0, 200)

/**
 * Why the WebGPU provider cannot run the half form here (webgpuHalfMissing), or undefined when it
 * can: a small float16 graph (MatMul, the norm GroupQueryAttention's neighbours use) with the CPU
 * fallback disabled, so a provider without shader-f16, which assigns no float16 node to itself,
 * refuses the session instead of running it on the CPU. Checked once per process.
 */
export function webgpuHalfSupport(): Promise<string | undefined> {
  halfProbe ??= (async () => {
    const g = new GraphBuilder('f16-check')
    const x = g.input('x', 'float16', [2, 4])
    const weight = g.inlineHalf('w', encodeFloat16(Float32Array.of(1, 1, 1, 1)), [4])
    const normed = g.node('SimplifiedLayerNormalization', [g.node('MatMul', [x, g.inlineHalf('m', encodeFloat16(new Float32Array(16).fill(0.5)), [4, 4])]), weight], {axis: -1, epsilon: {float: 1e-6}})
    g.output(normed, 'y', 'float16', [2, 4])
    const options = webgpuSessionOptions()
    const extra = (options.extra ?? {}) as {session?: Record<string, string>}
    try {
      const session = await ort.InferenceSession.create(g.toModelBytes('check'), {...options, logSeverityLevel: 3, extra: {...extra, session: {...extra.session, disable_cpu_ep_fallback: '1'}}})
      try {
        await session.run({x: new ort.Tensor('float16', encodeFloat16(Float32Array.of(1, 2, 3, 4, -1, -2, -3, -4)), [2, 4])})
      } finally {
        await session.release()
      }
      return undefined
    } catch (error) {
      return webgpuHalfMissing(providerReason(error))
    }
  })()
  return halfProbe
}

/**
 * Whether to build the half form for this package on `device`, and why not where an fp16 package
 * does not get it: `PARSCALE_GPU_FORM_HALF=0` (measuring the widened form), or an adapter
 * without float16 kernels. `half` (an explicit choice, tests and benchmarks) overrides the env.
 */
export async function chooseGpuFormHalf(manifest: PackageManifest, device: Device, half?: boolean): Promise<{half: boolean; fallback?: string}> {
  if (!gpuFormHalfCandidate(manifest) || half === false) return {half: false}
  if (half === undefined && process.env.PARSCALE_GPU_FORM_HALF === '0') return {half: false, fallback: 'PARSCALE_GPU_FORM_HALF=0: fp16 weights run widened to float32'}
  const missing = device === 'webgpu' ? await webgpuHalfSupport() : undefined
  return missing ? {half: false, fallback: missing} : {half: true}
}

/**
 * One P's aggregation head, its matrices laid out (transposed) into `model.gpu-p{P}.weights`
 * beside the graph: written at the first open, then reused while its index
 * (`model.gpu-p{P}.weights.json`) names the same source tensors, the same source file (size and
 * modification time) and the file is whole.
 */
function headFiles(packageDir: string, variant: PackageVariant): AggregationHeadFiles | undefined {
  if (variant.parallel === 1 || !variant.weights) return undefined
  const at = (name: string) => {
    const t = variant.tensors[name]
    if (!t) throw new UserError(`${variant.weights}: no tensor "${name}" in the manifest; convert again`)
    return {location: {file: variant.weights!, offset: t.offset, length: t.length}, shape: t.shape}
  }
  const file = gpuFormHeadFile(variant.parallel)
  const path = join(packageDir, file)
  const indexPath = `${path}.json`
  const matrices = ['model.aggregate_layer.0.weight', 'model.aggregate_layer.2.weight']
  const source = statSync(join(packageDir, variant.weights))
  const key = JSON.stringify({version: 1, weights: variant.weights, size: source.size, mtimeMs: source.mtimeMs, sources: matrices.map((name) => ({name, ...at(name)}))})
  let placed: Map<string, {offset: number; length: number; shape: [number, number]}> | undefined
  try {
    const index = JSON.parse(readFileSync(indexPath, 'utf8')) as {key: string; placed: [string, {offset: number; length: number; shape: [number, number]}][]}
    const end = Math.max(...index.placed.map(([, p]) => p.offset + p.length))
    if (index.key === key && statSync(path).size >= end) placed = new Map(index.placed)
  } catch {
    placed = undefined // absent, unreadable or stale: written again
  }
  if (!placed) {
    const temporary = `${path}.${process.pid}.tmp`
    placed = writeTransposed(packageDir, temporary, matrices.map((name) => ({name, sources: [{name, half: false, ...at(name)}]})))
    renameSync(temporary, path)
    writeFileSync(`${indexPath}.${process.pid}.tmp`, JSON.stringify({key, placed: [...placed]}))
    renameSync(`${indexPath}.${process.pid}.tmp`, indexPath)
  }
  const laidOut = (name: string) => {
    const {offset, length, shape} = placed!.get(name)!
    return {location: {file, offset, length}, shape}
  }
  return {
    weight0: laidOut(matrices[0]!),
    bias0: at('model.aggregate_layer.0.bias'),
    weight2: laidOut(matrices[1]!),
    bias2: at('model.aggregate_layer.2.bias'),
    smooth: variant.attnSmooth,
  }
}

/**
 * The GPU form's graph for one P of a package, as ONNX bytes (external data in the package; its
 * matrices laid out on first use). `half`: the half form (fp16 packages, gpuFormHalfCandidate).
 */
export function gpuFormGraphBytes(packageDir: string, parallel: number, decodeOnly = false, half = false): Uint8Array {
  const manifest = readManifest(packageDir)
  const variant = selectVariant(manifest, parallel, packageDir)
  if (half && !gpuFormHalfCandidate(manifest)) throw new Error(`${packageDir}: the half GPU form is for fp16 packages`)
  const graph = buildGpuFormGraph(manifest.model, packageGpuWeights(packageDir, manifest, half), {
    parallel,
    prefixTokens: variant.parallel === 1 ? 0 : variant.prefixTokens,
    head: headFiles(packageDir, variant),
    decodeOnly,
    half,
  })
  return graph.toModelBytes(manifest.toolVersion)
}

/** Writes the GPU form's graph for `parallel` into the package (next to the files it reads) and returns its path. */
export function writeGpuFormGraph(packageDir: string, parallel: number, decodeOnly = false, half = false): string {
  const path = join(packageDir, decodeOnly ? gpuFormDecodeGraphFile(parallel) : gpuFormGraphFile(parallel))
  const temporary = `${path}.${process.pid}.tmp`
  writeFileSync(temporary, gpuFormGraphBytes(packageDir, parallel, decodeOnly, half))
  renameSync(temporary, path)
  return path
}

/**
 * Most tokens per GPU-form call where the adapter's long-continuation attention is wrong (and on
 * the capture route, whose graph-capture variant of that kernel is not checked): see
 * gpuFormCallTokens.
 */
export const GPU_FORM_CALL_TOKENS = 16

const callTokensChecked = new Map<number, Promise<number>>()

/**
 * Most tokens per GPU-form call on `device` for heads of `headDim` (Infinity: no limit).
 * ONNX Runtime 1.30's WebGPU GroupQueryAttention (ApplyFlashAttention in
 * contrib_ops/webgpu/bert/flash_attention.cc) sends a call of fewer than 32 new tokens to its
 * split-reduce kernels and one of 32 or more to its one-kernel FlashAttention prefill, which has
 * two variants by adapter: shared-memory tiles (NVIDIA, Apple, adapters without subgroups) and
 * subgroup shuffles (the others). On lavapipe the subgroup variant is wrong for every query row
 * after the first subgroup-sized step of keys (max |Δ| 1e-2 to 1e-1), the shared-memory one
 * exact (lavapipe without subgroups: 1e-7). Which variant runs is the provider's choice, so it
 * is checked here once per process and head size: one 32-token call of a one-head
 * GroupQueryAttention against the CPU provider; exact gives no limit, otherwise calls are cut
 * to GPU_FORM_CALL_TOKENS (split-reduce, exact everywhere measured).
 */
export function gpuFormCallTokens(device: Device, headDim: number): Promise<number> {
  if (device === 'cpu') return Promise.resolve(Number.POSITIVE_INFINITY)
  let checked = callTokensChecked.get(headDim)
  if (!checked) {
    checked = longCallExact(headDim).then((exact) => (exact ? Number.POSITIVE_INFINITY : GPU_FORM_CALL_TOKENS))
    callTokensChecked.set(headDim, checked)
  }
  return checked
}

/** Whether WebGPU's GroupQueryAttention gives the CPU provider's output for 32 new tokens after 8 cached. */
async function longCallExact(d: number): Promise<boolean> {
  const S = 32
  const past = 8
  const capacity = past + S
  const g = new GraphBuilder('gqa-check')
  const inputs = [
    g.input('q', 'float32', [1, S, d]),
    g.input('k', 'float32', [1, S, d]),
    g.input('v', 'float32', [1, S, d]),
    g.input('past_k', 'float32', [1, 1, capacity, d]),
    g.input('past_v', 'float32', [1, 1, capacity, d]),
    g.input('seqlens_k', 'int32', [1]),
    g.input('total', 'int32', []),
  ]
  const [out] = g.nodeN('GroupQueryAttention', inputs, 3, {num_heads: 1, kv_num_heads: 1, scale: {float: 1 / Math.sqrt(d)}, local_window_size: -1}, 'com.microsoft')
  g.output(out!, 'out', 'float32', [1, S, d])
  const model = g.toModelBytes('check')
  // fixed pseudo-random values (a linear congruential sequence), the same on every machine
  let state = 12345
  const values = (n: number) => Float32Array.from({length: n}, () => ((state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31) * 2 - 1)
  const q = values(S * d)
  const k = values(S * d)
  const v = values(S * d)
  const pastK = values(capacity * d)
  const pastV = values(capacity * d)
  const feeds = () => ({
    q: new ort.Tensor('float32', q, [1, S, d]),
    k: new ort.Tensor('float32', k, [1, S, d]),
    v: new ort.Tensor('float32', v, [1, S, d]),
    past_k: new ort.Tensor('float32', pastK.slice(), [1, 1, capacity, d]),
    past_v: new ort.Tensor('float32', pastV.slice(), [1, 1, capacity, d]),
    seqlens_k: new ort.Tensor('int32', Int32Array.of(past + S - 1), [1]),
    total: new ort.Tensor('int32', Int32Array.of(past + S), []),
  })
  const run = async (options: ort.InferenceSession.SessionOptions): Promise<Float32Array> => {
    const session = await ort.InferenceSession.create(model, options)
    try {
      return (await session.run(feeds(), ['out'])).out!.data as Float32Array
    } finally {
      await session.release()
    }
  }
  const expected = await run({executionProviders: ['cpu']})
  const got = await run(webgpuSessionOptions())
  let worst = 0
  for (let i = 0; i < expected.length; i++) worst = Math.max(worst, Math.abs(expected[i]! - got[i]!))
  return worst <= 1e-4
}

export const gpuFormGraphFile = (parallel: number) => `model.gpu-p${parallel}.onnx`
/** The decode-only variant (one token a call, static shapes: what graph capture needs). */
export const gpuFormDecodeGraphFile = (parallel: number) => `model.gpu-p${parallel}.decode.onnx`
export const gpuFormHeadFile = (parallel: number) => `model.gpu-p${parallel}.weights`

export interface GpuFormOptions {
  parallel: number
  /** Cache slots (prefix + prompt + answer); every step has this shape. */
  capacity: number
  /** Where to run (default cpu: the CPU provider, for checking the form). */
  device?: Device
  /** Write an ONNX Runtime profile (JSON) with this file prefix. */
  profilePrefix?: string
  sessionOptions?: ort.InferenceSession.SessionOptions
  /** The half form (fp16 packages): true or false to choose; absent, where it runs (chooseGpuFormHalf). */
  half?: boolean
}

/** One sequence on the GPU form: feed tokens, get the last position's logits. */
export class GpuFormModel {
  private keys: ort.Tensor[] = []
  private values: ort.Tensor[] = []
  /** Filled cache slots (prefix + tokens). */
  private filled = 0

  /**
   * Whether present.* is bound to the past tensors (written in place: GroupQueryAttention's
   * shared past/present buffer). On the CPU provider it is. On a GPU, onnxruntime-node 1.30
   * does not honor a device tensor given as an output: it returns a new one each call, and the
   * bound one stays allocated (measured on lavapipe: +50 MB a step at P = 8 on the default
   * model), so there each call returns a new cache (the provider copies past into present, on
   * the device) and the previous one is released.
   */
  private bindPresent: boolean

  private constructor(
    private readonly session: ort.InferenceSession,
    readonly device: Device,
    readonly shape: BackboneShape,
    readonly parallel: number,
    readonly prefixTokens: number,
    readonly capacity: number,
    private readonly initial: {keys: Float32Array[]; values: Float32Array[]},
    /** Whether the half form runs (its cache float16), and why an fp16 package's does not. */
    readonly half: boolean,
    readonly halfFallback: string | undefined,
  ) {
    this.bindPresent = device === 'cpu'
    this.reset()
  }

  static async open(packageDir: string, options: GpuFormOptions): Promise<GpuFormModel> {
    const manifest = readManifest(packageDir)
    const variant = selectVariant(manifest, options.parallel, packageDir)
    const P = options.parallel
    const prefixTokens = P === 1 ? 0 : variant.prefixTokens
    if (options.capacity <= prefixTokens) throw new UserError(`capacity ${options.capacity} leaves no room after the ${prefixTokens}-token prefix`)
    if (options.capacity - prefixTokens > manifest.model.maxPositionEmbeddings) {
      throw new UserError(`capacity ${options.capacity} holds more tokens than the model's ${manifest.model.maxPositionEmbeddings} positions`)
    }
    const device = options.device ?? 'cpu'
    if (device === 'webgpu') await checkWebGpu() // before any loading: fail at once
    const {session, half, fallback} = await openGpuFormSession(packageDir, P, device, options)
    const prefix = prefixCache(packageDir, variant, manifest.model)
    return new GpuFormModel(session, device, manifest.model, P, prefixTokens, options.capacity, {
      keys: prefix.keys.map((k) => placePrefix(k, P * manifest.model.numKvHeads, prefix.tokens, options.capacity, manifest.model.headDim)),
      values: prefix.values.map((v) => placePrefix(v, P * manifest.model.numKvHeads, prefix.tokens, options.capacity, manifest.model.headDim)),
    }, half, fallback)
  }

  /** Back to the prefixes only. */
  reset(): void {
    for (const t of [...this.keys, ...this.values]) if (t.location === 'gpu-buffer') t.dispose()
    const {numLayers, numKvHeads: kv, headDim: d} = this.shape
    const dims = [1, this.parallel * kv, this.capacity, d]
    this.keys = Array.from({length: numLayers}, (_, l) => cacheTensor(this.initial.keys[l]!.slice(), dims, this.half))
    this.values = Array.from({length: numLayers}, (_, l) => cacheTensor(this.initial.values[l]!.slice(), dims, this.half))
    this.filled = this.prefixTokens
  }

  /** Tokens fed so far. */
  get length(): number {
    return this.filled - this.prefixTokens
  }

  /**
   * Appends `ids` and returns the logits [vocab] and stream weights [P] of the last of them: one
   * call, or pieces where the adapter needs them (gpuFormCallTokens).
   */
  async step(ids: number[]): Promise<{logits: Float32Array; streamWeights: Float32Array}> {
    if (this.filled + ids.length > this.capacity) throw new UserError(`the cache holds ${this.capacity - this.prefixTokens} tokens; ${this.length + ids.length} do not fit`)
    const pieceTokens = ids.length > 1 ? await gpuFormCallTokens(this.device, this.shape.headDim) : 1
    let out: {logits: Float32Array; streamWeights: Float32Array} | undefined
    for (let begin = 0; begin < ids.length || begin === 0; begin += pieceTokens) {
      const piece = ids.slice(begin, begin + pieceTokens)
      const next = await gpuFormStep(this.session, this.shape.numLayers, {keys: this.keys, values: this.values, filled: this.filled}, piece, this.bindPresent)
      this.keys = next.keys
      this.values = next.values
      this.filled += piece.length
      out = next
    }
    return {logits: out!.logits, streamWeights: out!.streamWeights}
  }

  /** Which provider runs it: the CPU provider (checking) or onnxruntime-node's WebGPU provider (no graph capture). */
  get route(): 'cpu' | 'node' {
    return this.device === 'cpu' ? 'cpu' : 'node'
  }

  /** Whether the last steps wrote the cache in place (past and present one buffer). */
  get inPlace(): boolean {
    return this.bindPresent
  }

  release(): Promise<void> {
    for (const t of [...this.keys, ...this.values]) if (t.location === 'gpu-buffer') t.dispose()
    return this.session.release()
  }
}

/** A cache tensor from float32 values: as they are, or rounded to half for the half form. */
export function cacheTensor(values: Float32Array, dims: number[], half: boolean): ort.Tensor {
  return half ? new ort.Tensor('float16', encodeFloat16(values), dims) : new ort.Tensor('float32', values, dims)
}

/** The GPU form's session for one P, whether it is the half form, and why an fp16 package's is not. */
export interface GpuFormSession {
  session: ort.InferenceSession
  half: boolean
  /** One line: why an fp16 package runs the widened float32 form (absent where it runs half, or is not fp16). */
  fallback?: string
}

const halfFallbacksSaid = new Set<string>()

/**
 * Says a half-form fallback on stderr, once per process and reason (`parscale: ...`), so `run`,
 * `serve`, `bench` and `eval` each print at most one line for it.
 */
export function sayHalfFallback(fallback: string | undefined): void {
  if (!fallback || halfFallbacksSaid.has(fallback)) return
  halfFallbacksSaid.add(fallback)
  process.stderr.write(`parscale: the GPU form: ${fallback}\n`)
}

/**
 * The GPU form's session for one P (its graph written into the package at first use). The half
 * form where it runs (chooseGpuFormHalf); a half session the provider refuses (a kernel it lacks
 * for float16) opens the widened form instead, with the provider's reason as the fallback.
 */
export async function openGpuFormSession(
  packageDir: string,
  parallel: number,
  device: Device,
  options: {profilePrefix?: string; sessionOptions?: ort.InferenceSession.SessionOptions; threads?: number; half?: boolean} = {},
): Promise<GpuFormSession> {
  const manifest = readManifest(packageDir)
  const presents = Array.from({length: manifest.model.numLayers}, (_, l) => [gpuFormIo.presentKey(l), gpuFormIo.presentValue(l)]).flat()
  const create = (half: boolean) => ort.InferenceSession.create(writeGpuFormGraph(packageDir, parallel, false, half), {
    graphOptimizationLevel: 'all',
    logSeverityLevel: 3, // not the provider's notes on shape ops kept on the CPU
    ...(device === 'cpu' && options.threads ? {intraOpNumThreads: options.threads, interOpNumThreads: 1} : {}),
    ...(device === 'webgpu' ? {...webgpuSessionOptions(), preferredOutputLocation: Object.fromEntries(presents.map((name) => [name, 'gpu-buffer' as const]))} : {}),
    ...(options.profilePrefix ? {enableProfiling: true, profileFilePrefix: options.profilePrefix} : {}),
    ...options.sessionOptions,
  })
  const choice = await chooseGpuFormHalf(manifest, device, options.half)
  if (!choice.half) return {session: await create(false), half: false, ...(choice.fallback ? {fallback: choice.fallback} : {})}
  try {
    return {session: await create(true), half: true}
  } catch (error) {
    if (error instanceof UserError || options.half === true) throw error
    const fallback = device === 'webgpu' ? webgpuHalfMissing(`the half session was refused: ${providerReason(error)}`) : `the half session was refused (${providerReason(error)}); fp16 weights run widened to float32`
    return {session: await create(false), half: false, fallback}
  }
}

/** One sequence's cache in the GPU form: per layer [1, P·kv, capacity, d], `filled` slots used (prefix included). */
export interface GpuFormState {
  keys: ort.Tensor[]
  values: ort.Tensor[]
  filled: number
}

/**
 * Appends `ids` to one sequence's cache and returns the new cache tensors and the last `keep`
 * positions' logits [keep, vocab] and stream weights [keep, P] ([1, 1] at P = 1). `inPlace` binds present.* to the past tensors (CPU
 * provider); otherwise the previous device tensors are released once the new ones exist.
 */
export async function gpuFormStep(
  session: ort.InferenceSession,
  numLayers: number,
  state: GpuFormState,
  ids: readonly number[],
  inPlace: boolean,
  /** Logits of the last this many of `ids` (default 1). */
  keep = 1,
): Promise<{keys: ort.Tensor[]; values: ort.Tensor[]; logits: Float32Array; streamWeights: Float32Array}> {
  if (!Number.isInteger(keep) || keep < 1 || keep > ids.length) throw new RangeError(`keep ${keep} of ${ids.length} tokens`)
  const capacity = state.keys[0]!.dims[2]!
  if (state.filled + ids.length > capacity) throw new RangeError(`the GPU form's cache holds ${capacity} slots; ${state.filled + ids.length} do not fit`)
  const total = state.filled + ids.length
  const feeds: Record<string, ort.Tensor> = {
    [gpuFormIo.inputIds]: new ort.Tensor('int64', BigInt64Array.from(ids, BigInt), [1, ids.length]),
    [gpuFormIo.seqlensK]: new ort.Tensor('int32', Int32Array.of(total - 1), [1]),
    [gpuFormIo.totalSequenceLength]: new ort.Tensor('int32', Int32Array.of(total), []),
  }
  // the decode-only graph has no such input: one token, its logits
  if (session.inputNames.includes(gpuFormIo.numLogitsToKeep)) feeds[gpuFormIo.numLogitsToKeep] = new ort.Tensor('int64', BigInt64Array.of(BigInt(keep)), [])
  else if (ids.length !== 1) throw new RangeError(`the decode-only GPU form takes one token a call, not ${ids.length}`)
  for (let layer = 0; layer < numLayers; layer++) {
    feeds[gpuFormIo.pastKey(layer)] = state.keys[layer]!
    feeds[gpuFormIo.pastValue(layer)] = state.values[layer]!
  }
  // present.* bound to the past tensors: one buffer per layer and kind, written in place
  // (GroupQueryAttention's shared past/present buffer, what graph capture needs)
  let out: ort.InferenceSession.ReturnType
  if (inPlace) {
    const fetches: Record<string, ort.Tensor | null> = {[gpuFormIo.logits]: null, [gpuFormIo.streamWeights]: null}
    for (let layer = 0; layer < numLayers; layer++) {
      fetches[gpuFormIo.presentKey(layer)] = state.keys[layer]!
      fetches[gpuFormIo.presentValue(layer)] = state.values[layer]!
    }
    out = await session.run(feeds, fetches)
  } else {
    out = await session.run(feeds)
    for (const t of [...state.keys, ...state.values]) if (t.location === 'gpu-buffer') t.dispose()
  }
  const layers = Array.from({length: numLayers}, (_, layer) => layer)
  return {
    keys: layers.map((l) => out[gpuFormIo.presentKey(l)]!),
    values: layers.map((l) => out[gpuFormIo.presentValue(l)]!),
    logits: out[gpuFormIo.logits]!.data as Float32Array,
    streamWeights: out[gpuFormIo.streamWeights]!.data as Float32Array,
  }
}

/**
 * Per layer, the prefixes' keys and values as the GPU form's cache starts with them: [P·kv, n, d]
 * (keys rotated, see the graph); n = 0 at P = 1.
 */
export function prefixCache(packageDir: string, variant: PackageVariant, shape: BackboneShape): {tokens: number; keys: Float32Array[]; values: Float32Array[]} {
  const {numLayers, numKvHeads: kv, headDim: d} = shape
  const P = variant.parallel
  const streams = loadStreamWeights(packageDir, variant, shape)
  const n = streams.prefixTokens
  const {cos, sin} = gpuRotaryTables(shape, n)
  const keys: Float32Array[] = []
  const values: Float32Array[] = []
  for (let layer = 0; layer < numLayers; layer++) {
    if (n === 0) {
      keys.push(new Float32Array(0))
      values.push(new Float32Array(0))
      continue
    }
    // stream-weights keeps keys [P·kv, d, n]: back to [P·kv, n, d], then rotated by n
    const stored = streams.prefixKeys[layer]!
    const rows = new Float32Array(stored.length)
    for (let h = 0; h < P * kv; h++) for (let i = 0; i < d; i++) for (let t = 0; t < n; t++) rows[(h * n + t) * d + i] = stored[(h * d + i) * n + t]!
    keys.push(rotatePrefixKeys(rows, P * kv, n, d, cos, sin))
    values.push(streams.prefixValues[layer]!.slice())
  }
  return {tokens: n, keys, values}
}

/** Prefix rows [heads, n, d] laid into the first slots of a cache [heads, capacity, d]. */
export function placePrefix(prefix: Float32Array, heads: number, n: number, capacity: number, d: number): Float32Array {
  const out = new Float32Array(heads * capacity * d)
  if (n > 0) for (let h = 0; h < heads; h++) out.set(prefix.subarray(h * n * d, (h + 1) * n * d), h * capacity * d)
  return out
}
