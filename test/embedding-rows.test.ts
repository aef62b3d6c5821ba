// The engine reads the embedding rows of the tokens it runs from the package (CPU form): the
// graph has no table to gather from, and the rows read equal the table's, in every format.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, test} from 'node:test'

import {Checkpoint} from '../src/core/checkpoint/checkpoint.js'
import {decodeToFloat32, encodeFloat16, readTensorFloat32} from '../src/core/checkpoint/dtype.js'
import {EmbeddingRows} from '../src/core/engine/embedding-rows.js'
import {convertCheckpoints} from '../src/core/package/convert.js'
import {blocksPerRow, dequantizeRows, quantizeRows} from '../src/core/quant/blockwise.js'
import {quantScheme} from '../src/core/quant/scheme.js'
import {goldenDir, makeTempDir} from './helpers/safetensors-writer.js'

const work = makeTempDir()
after(() => fs.rmSync(work, {recursive: true, force: true}))

for (const name of ['tiny-p1', 'tiny-p2-tied']) {
  const checkpoint = Checkpoint.open(goldenDir(name))
  const info = checkpoint.get('model.embed_tokens.weight')
  const [vocab, hidden] = info.shape as [number, number]
  const table = readTensorFloat32(info)
  const ids = [0, 1, 57, vocab - 1, 57]
  const expected = (rowsOf: Float32Array) => Float32Array.from(ids.flatMap((id) => [...rowsOf.subarray(id * hidden, (id + 1) * hidden)]))

  for (const format of ['fp32', 'fp16', 'int8', 'int4'] as const) {
    test(`${name} ${format}: the CPU graph takes inputs_embeds, and the rows read from the package are the table's`, () => {
      const out = path.join(work, `${name}-${format}`)
      const quant = format === 'int8' || format === 'int4' ? quantScheme(format) : undefined
      const manifest = convertCheckpoints({sources: [goldenDir(name)], outDir: out, dtype: format === 'fp16' ? 'fp16' : 'fp32', ...(quant ? {quant} : {})})
      const graph = fs.readFileSync(path.join(out, manifest.graph)).toString('latin1')
      assert.ok(graph.includes('inputs_embeds'))
      assert.ok(!graph.includes('GatherBlockQuantized'), 'no table gathered in the CPU graph')
      assert.ok(!graph.replaceAll('lm_head.weight (tied to model.embed_tokens.weight)', '').includes('model.embed_tokens.weight'), 'the table is no initializer of the CPU graph')
      const rows = new EmbeddingRows(out, manifest.embedding)
      try {
        const got = rows.rows(ids)
        let want: Float32Array
        if (format === 'fp32') want = expected(table)
        else if (format === 'fp16') {
          const half = encodeFloat16(table)
          want = expected(decodeToFloat32('F16', new Uint8Array(half.buffer, half.byteOffset, half.byteLength)))
        }
        else {
          const layout = {bits: quant!.bits, blockSize: manifest.embedding.blockSize!, k: hidden}
          assert.equal(blocksPerRow(layout) * layout.blockSize, hidden)
          want = expected(dequantizeRows(quantizeRows(table, vocab, layout), vocab, layout))
        }
        assert.deepEqual(got, want)
        assert.throws(() => rows.rows([vocab]), /outside the model's vocabulary/)
      } finally {
        rows.close()
      }
    })
  }
}
