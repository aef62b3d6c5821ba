import {readFileSync} from 'node:fs'

import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../base-command.js'
import {UserError} from '../core/errors.js'
import {decodeUtf8} from '../core/utf8.js'
import {scoreTokens} from '../core/run/evaluate.js'
import {resolveModel} from '../core/package/resolve.js'
import {checkWebGpu, DEVICES, type Device} from '../core/engine/device.js'
import {ParScaleModel} from '../core/engine/model.js'
import {TextTokenizer} from '../core/generation/tokenizer.js'
import {formatBytes, percent} from '../core/format.js'
import {Progress} from '../ui/progress.js'
import {renderStreamSummary} from '../ui/stream-view.js'
import {createTable} from '../ui/table.js'
import {quantFlags, quantFromFlags} from '../flags/quant.js'

export default class Eval extends BaseCommand {
  static override summary = 'Score a text with a model: mean negative log-likelihood and perplexity'
  static override description = `Tokenizes the text with the model's tokenizer (no special tokens added), predicts every next token from its prefix and reports the mean negative log-likelihood (natural log) and the perplexity. Texts longer than the model's context are scored in overlapping windows, each token once; the output says how many.

--streams also shows what the aggregation head does with the P streams over the scored tokens (each token's weights are the ones that mixed the streams for its prediction): each stream's mean weight, how often it has the largest weight, and the mean entropy of the weights against ln P (an even split; 100 % = the head averages, lower = it picks streams). Run once per P to compare.

--json --per-token adds token_nll, the NLL of every scored token in text order (its mean is mean_nll): two runs at different P, or of two models, can then be compared token by token, e.g. to tell whether a difference of a few thousandths of a nat on a short text is more than noise.

MODEL is a converted package, a checkpoint folder (converted on first use and cached), or a pulled hub repo id; without it, the embedded default model.`
  static override examples = [
    {description: 'Held-out loss of the default model at P = 8', command: '<%= config.bin %> eval --text-file held_out.py --parallel 8'},
    {description: 'Held-out loss with 4-bit weights', command: '<%= config.bin %> eval --text-file held_out.py --parallel 8 --quant int4'},
    {description: 'Compare P values of one family package, as JSON', command: 'for p in 1 2 4 8; do <%= config.bin %> eval ./family-onnx --text-file text.txt --parallel $p --json; done'},
    {description: 'How the default model weighs its 4 streams on held-out Python', command: '<%= config.bin %> eval --text-file held_out.py --parallel 4 --streams'},
    {description: 'Every token\'s NLL at P = 8, for a paired comparison with another P', command: '<%= config.bin %> eval --text-file held_out.py --parallel 8 --json --per-token'},
  ]
  static override args = {
    // ignoreStdin: `--text-file -` reads stdin; oclif must not take it as the model name
    model: Args.string({description: 'model package, checkpoint folder or hub repo id (default: the embedded model)', ignoreStdin: true}),
  }
  static override flags = {
    'text-file': Flags.string({char: 'f', description: 'text to score (- for stdin)', required: true}),
    parallel: Flags.integer({char: 'p', description: 'number of parallel streams P (the model must provide it)', min: 1}),
    context: Flags.integer({description: 'window length in tokens (default: the model\'s context)', min: 2}),
    threads: Flags.integer({description: 'ONNX Runtime intra-op threads', min: 1}),
    device: Flags.string({description: 'where the model runs: cpu, or a GPU through ONNX Runtime\'s WebGPU provider', options: [...DEVICES], default: 'cpu'}),
    json: Flags.boolean({description: 'print one JSON object instead of a table'}),
    streams: Flags.boolean({description: 'also summarize the stream weights: mean per stream, how often each is the top one, entropy against ln P'}),
    'per-token': Flags.boolean({description: 'with --json: add token_nll, the NLL of every scored token in text order (to compare two P or two models token by token)', dependsOn: ['json']}),
    ...quantFlags,
  }

  async run(): Promise<void> {
    const {args, flags} = await this.parse(Eval)
    const text = readText(flags['text-file'])
    const device = flags.device as Device
    const quant = quantFromFlags(flags)
    if (device === 'webgpu') await checkWebGpu() // before converting or loading anything
    const progress = new Progress('preparing model')
    let model
    try {
      model = resolveModel(args.model, {
        parallel: flags.parallel,
        quant,
        onProgress: ({phase, doneBytes, totalBytes}) => progress.update(`${phase}: ${percent(doneBytes, totalBytes)} of ${formatBytes(totalBytes)}`),
        onNotice: (line) => progress.log(line),
      })
      progress.update('loading model')
    } finally {
      progress.stop()
    }
    const tokenizer = await TextTokenizer.load(model.packageDir)
    const ids = tokenizer.encode(text)
    if (ids.length < 2) throw new UserError(`${flags['text-file']}: needs at least 2 tokens to score, has ${ids.length}`)
    const session = await ParScaleModel.open(model.packageDir, {threads: flags.threads, device, parallel: [model.parallel]})
    try {
      const result = await scoreTokens(session, model.parallel, ids, flags.context ?? session.maxPositions, {streams: flags.streams, perToken: flags['per-token']})
      if (flags.json) {
        this.log(JSON.stringify({model: model.label, ...result}))
        return
      }
      const table = createTable(['model', 'P', 'tokens', 'predicted', 'mean NLL (nats)', 'perplexity'])
      table.push([model.label, result.parallel, result.tokens, result.predicted, result.mean_nll.toFixed(4), result.perplexity.toFixed(3)])
      this.log(table.toString())
      if (result.windows > 1) this.log(`scored in ${result.windows} overlapping windows of ${result.window_tokens} tokens (the model's context)`)
      if (result.streams) this.log(renderStreamSummary(result.streams))
    } finally {
      await session.release()
    }
  }
}

const READ_ERRORS: Record<string, string> = {ENOENT: 'no such file', EISDIR: 'is a folder, not a text file', EACCES: 'permission denied'}

function readText(file: string): string {
  let bytes: Buffer
  try {
    bytes = readFileSync(file === '-' ? 0 : file)
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? ''
    throw new UserError(`${file}: cannot read the text file (${READ_ERRORS[code] ?? (code || (error as Error).message)})`)
  }
  return decodeUtf8(bytes, () => (file === '-' ? 'stdin' : file))
}
