import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../base-command.js'
import {UsageError} from '../core/errors.js'
import {convertCheckpoints, defaultOutDir} from '../core/package/convert.js'
import {formatBytes, percent, snakeCaseKeys} from '../core/format.js'
import {Progress} from '../ui/progress.js'
import {resolveCheckpointSource} from '../core/package/resolve.js'
import {quantFlags, quantFromFlags} from '../flags/quant.js'
import {describeQuant} from '../core/quant/scheme.js'

export default class Convert extends BaseCommand {
  static override summary = 'Convert a ParScale (or Qwen2) checkpoint into an ONNX model package'
  static override description = `Reads a checkpoint in the Hugging Face layout (config.json plus model.safetensors, or an index and shards; F32, F16 or BF16) and writes a self-contained package: one ONNX graph per P with the stream prefixes and the aggregation head inside, weights as external data, the tokenizer and configs, and a parscale.json manifest that run, eval and bench read.

Several sources that are P variants of one backbone (e.g. a family's -P2, -P4 and -P8) go into one package that stores the backbone once; \`run --parallel N\` then picks the variant.

--quant int8|int4 stores every projection, MLP matrix and the LM head block-quantized for ONNX Runtime's MatMulNBits (one float32 scale per --block-size inputs: default 32 for int8, 256 for int4; int4 in blocks of 32 is the layout whose MLP the WebGPU provider fuses into one kernel per layer) and the embedding table in the same codes (GatherBlockQuantized); norms, biases, the stream prefixes and the aggregation head stay float32. int4 is about 1/6 of the float32 size, int8 about 1/3.

The package is written to a temporary folder and renamed into place when complete, so an interrupted conversion leaves nothing behind that would be loaded.`
  static override examples = [
    {description: 'Convert a local checkpoint (writes ./my-model-onnx)', command: '<%= config.bin %> convert ./my-model'},
    {description: 'Convert a pulled hub model to half-precision weights', command: '<%= config.bin %> convert ParScale/ParScale-1.8B-P4 --dtype fp16 --out ./p4-onnx'},
    {description: 'One package with three P values sharing one backbone', command: '<%= config.bin %> convert ./ckpt-P2 ./ckpt-P4 ./ckpt-P8 --out ./family-onnx'},
    {description: '4-bit weights, one scale per 64 inputs', command: '<%= config.bin %> convert ./my-model --quant int4 --block-size 64 --out ./my-model-int4'},
  ]
  static override strict = false
  static override args = {
    source: Args.string({description: 'checkpoint folder, or a hub repo id already pulled (several: P variants of one model)', required: true}),
  }
  static override flags = {
    out: Flags.string({char: 'o', description: 'output folder (default: <source>-onnx next to the source)'}),
    dtype: Flags.string({description: 'weight storage: fp32 (exact) or fp16 (half the size; computed in fp32)', options: ['fp32', 'fp16'], default: 'fp32'}),
    ...quantFlags,
    force: Flags.boolean({description: 'replace an existing output folder'}),
    json: Flags.boolean({description: 'print the manifest as one JSON object on stdout (out_dir and the manifest\'s fields, in snake_case)'}),
  }

  async run(): Promise<void> {
    const {argv, flags} = await this.parse(Convert)
    const quant = quantFromFlags(flags)
    if (quant && flags.dtype !== 'fp32') throw new UsageError('--quant and --dtype fp16 cannot be combined: a quantized package keeps its vectors in fp32')
    const sources = (argv as string[]).map((source) => resolveCheckpointSource(source))
    const outDir = flags.out ?? defaultOutDir(sources[0])
    const progress = new Progress('reading checkpoint')
    const started = Date.now()
    try {
      const manifest = convertCheckpoints({
        sources,
        outDir,
        dtype: flags.dtype as 'fp32' | 'fp16',
        quant,
        force: flags.force,
        sourceLabel: sources.length === 1 ? (argv as string[])[0] : undefined,
        onProgress: ({phase, doneBytes, totalBytes}) =>
          progress.update(`${phase}: ${percent(doneBytes, totalBytes)} of ${formatBytes(totalBytes)}`),
      })
      progress.stop()
      if (flags.json) {
        this.log(JSON.stringify(snakeCaseKeys({outDir, ...manifest})))
        return
      }
      const seconds = ((Date.now() - started) / 1000).toFixed(1)
      this.log(`converted ${sources.join(', ')} → ${outDir} (P = ${manifest.parallel.join(', ')}, ${manifest.quant ? describeQuant({name: manifest.quant.scheme, blockSize: manifest.quant.blockSize}) : manifest.dtype}, backbone ${formatBytes(manifest.backbone.bytes)}) in ${seconds} s`)
    } finally {
      progress.stop()
    }
  }
}
