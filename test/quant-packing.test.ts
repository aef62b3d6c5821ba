// Block quantization: the bytes written are what ONNX Runtime's MatMulNBits and
// GatherBlockQuantized read, checked against a dequantized float reference with real sessions.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, test} from 'node:test'

import ort from 'onnxruntime-node'

import {GraphBuilder} from '../src/core/onnx/builder.js'
import {ExternalDataFile} from '../src/core/onnx/external-data.js'
import {blobBytes, blocksPerRow, dequantizeRows, quantizeRows, type BlockLayout} from '../src/core/quant/blockwise.js'
import {blockSizeFor} from '../src/core/quant/scheme.js'
import {dequantizePerColumn, PER_COLUMN_MAX_CODE} from '../src/core/quant/per-column.js'
import {widenMatrix} from '../src/core/quant/widen.js'
import {makeTempDir} from './helpers/safetensors-writer.js'

const work = makeTempDir()
after(() => fs.rmSync(work, {recursive: true, force: true}))

function randomValues(length: number, seed: number, scale = 0.1): Float32Array {
  const out = new Float32Array(length)
  let s = seed
  for (let i = 0; i < length; i++) {
    s ^= s << 13
    s ^= s >>> 17
    s ^= s << 5
    out[i] = ((s >>> 0) / 4294967296 - 0.5) * scale
  }
  return out
}

const bytes = (a: Float32Array | Uint8Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength)

/** Runs one contrib node over quantized initializers written to a real external-data file. */
async function runNode(
  name: string,
  build: (g: GraphBuilder, data: ExternalDataFile) => {output: string; shape: number[]},
  feeds: Record<string, ort.Tensor>,
): Promise<Float32Array> {
  const dir = path.join(work, name)
  fs.mkdirSync(dir)
  const g = new GraphBuilder(name)
  const data = new ExternalDataFile(path.join(dir, 'weights'))
  const {output, shape} = build(g, data)
  data.close()
  g.output(output, 'y', 'float32', shape)
  fs.writeFileSync(path.join(dir, 'model.onnx'), g.toModelBytes('test'))
  const session = await ort.InferenceSession.create(path.join(dir, 'model.onnx'))
  try {
    return (await session.run(feeds)).y!.data as Float32Array
  } finally {
    await session.release()
  }
}

describe('block quantization', () => {
  test('round trip: values within half a step (a clipped far extreme within one), extremes exact', () => {
    for (const bits of [4, 8] as const) {
      const layout: BlockLayout = {bits, blockSize: 32, k: 96}
      const values = randomValues(5 * 96, 3)
      values[7] = 0.9 // a positive extreme
      values[200] = -0.7 // a negative one
      const q = quantizeRows(values, 5, layout)
      const back = dequantizeRows(q, 5, layout)
      for (let i = 0; i < values.length; i++) {
        const scale = q.scales[Math.floor(i / 32)]!
        const step = Math.abs(scale)
        // codes reach −2^(bits−1) on the extreme's side but only 2^(bits−1) − 1 on the other
        const clipped = values[i]! / scale > (1 << (bits - 1)) - 0.5
        assert.ok(Math.abs(back[i]! - values[i]!) <= (clipped ? step : step / 2) + 1e-7, `bits ${bits} value ${i}`)
      }
      // the block's largest magnitude is stored exactly, as the most negative code
      assert.ok(Math.abs(back[7]! - 0.9) < 1e-6 && Math.abs(back[200]! + 0.7) < 1e-6)
      assert.equal(q.codes.length, 5 * 3 * blobBytes(layout))
    }
  })

  test('an all-zero block has scale 0 and dequantizes to zeros', () => {
    const q = quantizeRows(new Float32Array(64), 1, {bits: 4, blockSize: 32, k: 64})
    assert.deepEqual([...q.scales], [0, 0])
    assert.ok(dequantizeRows(q, 1, {bits: 4, blockSize: 32, k: 64}).every((v) => v === 0))
  })

  for (const [bits, blockSize, k, accuracy] of [[4, 32, 96, 0], [8, 32, 96, 0], [4, 64, 128, 4], [8, 128, 256, 4], [4, 32, 80, 0]] as const) {
    test(`MatMulNBits reads the layout: bits ${bits}, block ${blockSize}, K ${k}, accuracy level ${accuracy}`, async () => {
      const layout: BlockLayout = {bits, blockSize, k}
      const n = 24
      const rows = 3
      const weights = randomValues(n * k, 11)
      const q = quantizeRows(weights, n, layout)
      const reference = dequantizeRows(q, n, layout)
      const bias = randomValues(n, 5)
      const x = randomValues(rows * k, 7, 2)
      const y = await runNode(`matmul-${bits}-${blockSize}-${k}-${accuracy}`, (g, data) => {
        const codes = g.externalInitializer('codes', 'uint8', [n, blocksPerRow(layout), blobBytes(layout)], data.append([q.codes]))
        const scales = g.externalInitializer('scales', 'float32', [n * blocksPerRow(layout)], data.append([bytes(q.scales)]))
        const b = g.externalInitializer('bias', 'float32', [n], data.append([bytes(bias)]))
        const input = g.input('x', 'float32', [rows, k])
        const attributes = {K: k, N: n, bits, block_size: blockSize, accuracy_level: accuracy}
        return {output: g.node('MatMulNBits', [input, codes, scales, '', '', b], attributes, 'com.microsoft'), shape: [rows, n]}
      }, {x: new ort.Tensor('float32', x, [rows, k])})
      for (let r = 0; r < rows; r++) {
        const xMax = Math.max(...x.subarray(r * k, (r + 1) * k).map(Math.abs))
        for (let c = 0; c < n; c++) {
          let expected = bias[c]!
          let weightSum = 0
          for (let i = 0; i < k; i++) {
            expected += x[r * k + i]! * reference[c * k + i]!
            weightSum += Math.abs(reference[c * k + i]!)
          }
          // accuracy level 4 rounds activations to int8 (half a step of max|x| / 127 each)
          const tolerance = accuracy === 4 ? (weightSum * xMax) / 254 + 1e-5 : 1e-5
          assert.ok(Math.abs(expected - y[r * n + c]!) < tolerance, `row ${r} col ${c}: ${y[r * n + c]} vs ${expected}`)
        }
      }
    })
  }

  for (const bits of [4, 8] as const) {
    test(`GatherBlockQuantized reads the same codes as table rows (bits ${bits})`, async () => {
      const layout: BlockLayout = {bits, blockSize: 32, k: 64}
      const vocab = 40
      const q = quantizeRows(randomValues(vocab * 64, 13), vocab, layout)
      const reference = dequantizeRows(q, vocab, layout)
      const ids = [3, 39, 0, 3]
      const y = await runNode(`gather-${bits}`, (g, data) => {
        const codes = g.externalInitializer('codes', 'uint8', [vocab, (64 * bits) / 8], data.append([q.codes]))
        const scales = g.externalInitializer('scales', 'float32', [vocab, 2], data.append([bytes(q.scales)]))
        const input = g.input('ids', 'int64', [ids.length])
        return {output: g.node('GatherBlockQuantized', [codes, input, scales], {bits, block_size: 32, gather_axis: 0, quantize_axis: 1}, 'com.microsoft'), shape: [ids.length, 64]}
      }, {ids: new ort.Tensor('int64', BigInt64Array.from(ids, BigInt), [ids.length])})
      ids.forEach((id, r) => {
        for (let i = 0; i < 64; i++) assert.equal(y[r * 64 + i], reference[id * 64 + i])
      })
    })
  }

  test('widening block codes to int8 per output: 7-bit codes within half a step of the block values; DynamicQuantizeMatMul reads them', async () => {
    const layout: BlockLayout = {bits: 4, blockSize: 32, k: 96}
    const n = 2500 // more rows than one widening chunk
    const q = quantizeRows(randomValues(n * 96, 21), n, layout)
    const blockValues = dequantizeRows(q, n, layout)
    const widened = widenMatrix(q.codes, q.scales, n, layout)
    const back = dequantizePerColumn(widened, n, 96)
    for (let row = 0; row < n; row++) {
      assert.ok(widened.codes.every((c) => Math.abs(c) <= PER_COLUMN_MAX_CODE))
      for (let i = 0; i < 96; i++) assert.ok(Math.abs(back[row * 96 + i]! - blockValues[row * 96 + i]!) <= widened.scales[row]! / 2 + 1e-7)
    }
    const rows = 8
    const x = randomValues(rows * 96, 9, 2)
    const y = await runNode('widened', (g, data) => {
      const codes = g.externalInitializer('w', 'int8', [96, n], data.append([new Uint8Array(widened.codes.buffer)]))
      const scales = g.externalInitializer('s', 'float32', [n], data.append([bytes(widened.scales)]))
      return {output: g.node('DynamicQuantizeMatMul', [g.input('x', 'float32', [rows, 96]), codes, scales], {}, 'com.microsoft'), shape: [rows, n]}
    }, {x: new ort.Tensor('float32', x, [rows, 96])})
    const xMax = Math.max(...x.map(Math.abs))
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < n; c += 97) {
        let expected = 0
        let weightSum = 0
        for (let i = 0; i < 96; i++) {
          expected += x[r * 96 + i]! * back[c * 96 + i]!
          weightSum += Math.abs(back[c * 96 + i]!)
        }
        // activations become uint8 with one scale for the call: half a step of 2·max|x| / 255 each
        assert.ok(Math.abs(expected - y[r * n + c]!) < (weightSum * xMax) / 255 + 1e-5, `row ${r} col ${c}`)
      }
    }
  })

  test('a block size that does not divide the input size falls back to one that does, or names the tensor', () => {
    assert.equal(blockSizeFor(896, 128, 'w'), 128)
    assert.equal(blockSizeFor(704, 128, 'w'), 64)
    assert.equal(blockSizeFor(80, 32, 'w'), 16)
    assert.throws(() => blockSizeFor(100, 32, 'model.layers.0.mlp.down_proj.weight'), /model\.layers\.0\.mlp\.down_proj\.weight: its input size 100 is not a multiple of 16/)
  })
})
