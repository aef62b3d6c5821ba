/**
 * The decode graph of a quantized package for processes that run many rows per step (P ≥ 4):
 * every layer's `MatMulNBits` replaced by `DynamicQuantizeMatMul` over int8 weights with one
 * scale per output, widened from the package's block codes (a 4-bit LM head, one row a sequence,
 * keeps its codes). On x86 without VNNI ONNX Runtime's block-quantized kernel re-unpacks the
 * 4-bit codes for every row, while the int8 GEMM shares that work between rows: at 8 rows per
 * token the int8 path decodes faster, at one row slower; with VNNI the 4-bit kernel keeps up to
 * 8 rows (`decodeRowsOnCodes`; docs/benchmarks.md has the A/Bs). Activations are quantized per
 * call (one scale for the call's rows), so the graph serves decode steps only, whose rows are
 * the streams of one token each; prompts still run through the package's own graph.
 *
 * Written once into the package folder (weights, graph, then a stamp naming the backbone
 * they were made from) and memory-mapped by later processes.
 */
import {closeSync, existsSync, openSync, readFileSync, renameSync, rmSync, writeFileSync} from 'node:fs'
import {join} from 'node:path'

import onnxProto from 'onnx-proto'

import {ExternalDataFile} from '../onnx/external-data.js'
import type {PackageManifest} from '../package/manifest.js'
import {readAt} from '../read-at.js'
import {dequantizeRows, type BlockLayout, type QuantBits} from './blockwise.js'
import {quantizePerColumn} from './per-column.js'

const {onnx} = onnxProto

export const WIDENED_GRAPH = 'decode-int8.onnx'
export const WIDENED_WEIGHTS = 'decode-int8.weights'
const WIDENED_STAMP = 'decode-int8.json'
/** Bumped when the widened graph changes for the same package (2: a 4-bit head keeps its block codes). */
const WIDEN_VERSION = 2

/**
 * The most rows (sequences × P) a decode call of a 4-bit package runs on its own codes on a CPU
 * with int8 dot products (x86 AVX512-VNNI): there ONNX Runtime's 4-bit kernel beats the widened
 * int8 GEMM at 8 rows (a lone sequence at P = 8: 23.2 against 26.6 ms a step) and loses from 16
 * (gate·up 1.21×, down 1.05× slower; 8 sequences at P = 8: 159 against 101 ms a step), measured
 * in docs/benchmarks.md ("int4 at P ≥ 4 on a CPU with VNNI").
 */
const ROWS_ON_4BIT_CODES = 8

/**
 * The most rows a decode call at P ≥ 4 runs on the package's stored codes before the widened
 * int8 graph takes over: 0 (always widened) for 8-bit codes, which read as many bytes as int8 and
 * lose to its GEMM at any rows, and on CPUs without int8 dot products, where the 4-bit kernel
 * unpacks the codes again for every row.
 */
export function decodeRowsOnCodes(bits: number, int8DotProduct: boolean): number {
  return bits < 8 && int8DotProduct ? ROWS_ON_4BIT_CODES : 0
}

/**
 * Whether this CPU has the int8 dot products ONNX Runtime's 4-bit kernels use at several rows:
 * x86's AVX512-VNNI, read from /proc/cpuinfo's flags (Linux). False where it cannot tell (other
 * systems, other instruction sets): those keep the widened graph that was measured before.
 */
export function cpuHasInt8DotProduct(cpuinfo: string | undefined = readCpuinfo()): boolean {
  const flags = cpuinfo && /^flags\s*:\s*(.*)$/m.exec(cpuinfo)?.[1]
  return flags ? flags.split(/\s+/).includes('avx512_vnni') : false
}

function readCpuinfo(): string | undefined {
  try {
    return readFileSync('/proc/cpuinfo', 'utf8')
  } catch {
    return undefined
  }
}

/** Rows dequantized at a time while widening (float32, a few MB). */
const ROWS_PER_CHUNK = 2048

interface Stamp {
  widenVersion: number
  graphVersion: number
  backboneSha256: string
}

/**
 * The widened decode graph's path, made now if the package has none for its backbone yet.
 * Undefined when the package folder cannot be written (the caller keeps the stored graph).
 */
export function widenedDecodeGraph(packageDir: string, manifest: PackageManifest): string | undefined {
  const stamp: Stamp = {widenVersion: WIDEN_VERSION, graphVersion: manifest.graphVersion, backboneSha256: manifest.backbone.sha256}
  const graphPath = join(packageDir, WIDENED_GRAPH)
  const stampPath = join(packageDir, WIDENED_STAMP)
  if (existsSync(stampPath) && existsSync(graphPath) && readFileSync(stampPath, 'utf8') === JSON.stringify(stamp)) return graphPath
  const suffix = `.tmp-${process.pid}`
  try {
    const model = onnx.ModelProto.decode(readFileSync(join(packageDir, manifest.graph)))
    const weights = new ExternalDataFile(join(packageDir, WIDENED_WEIGHTS + suffix))
    const backbone = openSync(join(packageDir, manifest.backbone.weights), 'r')
    try {
      widenGraph(model.graph!, backbone, weights)
    } finally {
      closeSync(backbone)
      weights.close()
    }
    renameSync(join(packageDir, WIDENED_WEIGHTS + suffix), join(packageDir, WIDENED_WEIGHTS))
    writeFileSync(graphPath + suffix, onnx.ModelProto.encode(model).finish())
    renameSync(graphPath + suffix, graphPath)
    writeFileSync(stampPath, JSON.stringify(stamp))
    return graphPath
  } catch (error) {
    for (const name of [WIDENED_WEIGHTS, WIDENED_GRAPH]) rmSync(join(packageDir, name + suffix), {force: true})
    const code = (error as NodeJS.ErrnoException).code
    if (code === 'EACCES' || code === 'EROFS' || code === 'EPERM' || code === 'ENOSPC') return undefined
    throw error
  }
}

type Initializer = onnxProto.onnx.ITensorProto

/**
 * Whether a MatMulNBits node keeps its block codes: the LM head's (a vocabulary block of
 * `lm_head.weight`, tied or not) at 4 bits. The head runs after the streams are mixed, one row a
 * sequence at any P, where 4-bit codes read half the bytes of int8 and beat the int8 GEMM until
 * about 8 sequences share a step; 8-bit codes read as many bytes as int8 and lose to it at any
 * rows (docs/benchmarks.md, "the LM head keeps its 4-bit codes").
 */
function keepsCodes(codesName: string, bits: number): boolean {
  return bits < 8 && codesName.startsWith('lm_head.weight')
}

/** Replaces each MatMulNBits node of `graph` (but a 4-bit head's) by DynamicQuantizeMatMul over widened weights. */
function widenGraph(graph: onnxProto.onnx.IGraphProto, backbone: number, out: ExternalDataFile): void {
  const initializers = new Map((graph.initializer ?? []).map((t) => [t.name!, t]))
  const replaced = new Set<string>()
  for (const node of graph.node ?? []) {
    if (node.opType !== 'MatMulNBits') continue
    const attribute = (name: string) => Number(node.attribute!.find((a) => a.name === name)!.i)
    const [x, codesName, scalesName, , , bias] = node.input!
    const bits = attribute('bits') as QuantBits
    if (keepsCodes(codesName!, bits)) continue
    const k = attribute('K')
    const n = attribute('N')
    const layout: BlockLayout = {bits, blockSize: attribute('block_size'), k}
    const codes = readExternal(backbone, initializers.get(codesName!)!)
    const scales = new Float32Array(readExternal(backbone, initializers.get(scalesName!)!).buffer)
    const widened = widenMatrix(codes, scales, n, layout)
    const name = codesName!.replace(/\.codes$/, '')
    const weight = externalTensor(`${name}.int8`, onnx.TensorProto.DataType.INT8, [k, n], out.append([new Uint8Array(widened.codes.buffer)]))
    const scale = externalTensor(`${name}.int8_scales`, onnx.TensorProto.DataType.FLOAT, [n], out.append([new Uint8Array(widened.scales.buffer)]))
    graph.initializer!.push(weight, scale)
    replaced.add(codesName!).add(scalesName!)
    node.opType = 'DynamicQuantizeMatMul'
    node.input = bias ? [x!, weight.name!, scale.name!, '', bias] : [x!, weight.name!, scale.name!]
    node.attribute = []
  }
  // The block codes are not read by this graph: a session over it does not map them.
  graph.initializer = graph.initializer!.filter((t) => !replaced.has(t.name!))
}

/** Block codes [n, blocks, blob] with scales → int8 [k, n] with one scale per output. */
export function widenMatrix(codes: Uint8Array, scales: Float32Array, n: number, layout: BlockLayout): {codes: Int8Array; scales: Float32Array} {
  const blocks = Math.ceil(layout.k / layout.blockSize)
  const rowBytes = (blocks * layout.blockSize * layout.bits) / 8
  const out = {codes: new Int8Array(layout.k * n), scales: new Float32Array(n)}
  for (let first = 0; first < n; first += ROWS_PER_CHUNK) {
    const rows = Math.min(ROWS_PER_CHUNK, n - first)
    const values = dequantizeRows(
      {codes: codes.subarray(first * rowBytes, (first + rows) * rowBytes), scales: scales.subarray(first * blocks, (first + rows) * blocks)},
      rows,
      layout,
    )
    const part = quantizePerColumn(values, rows, layout.k)
    out.scales.set(part.scales, first)
    for (let i = 0; i < layout.k; i++) out.codes.set(part.codes.subarray(i * rows, (i + 1) * rows), i * n + first)
  }
  return out
}

function readExternal(fd: number, tensor: Initializer): Uint8Array {
  const entry = (key: string) => tensor.externalData!.find((e) => e.key === key)!.value!
  const offset = Number(entry('offset'))
  const bytes = new Uint8Array(Number(entry('length')))
  if (readAt(fd, bytes, offset) < bytes.byteLength) throw new Error(`${tensor.name}: the package's weights end early; convert again`)
  return bytes
}

function externalTensor(name: string, dataType: number, dims: number[], location: {offset: number; length: number}): Initializer {
  return {
    name,
    dims,
    dataType,
    dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
    externalData: [
      {key: 'location', value: WIDENED_WEIGHTS},
      {key: 'offset', value: String(location.offset)},
      {key: 'length', value: String(location.length)},
    ],
  }
}
