import {readFileSync} from 'node:fs'

import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../base-command.js'
import {UsageError, UserError} from '../core/errors.js'
import {decodeUtf8} from '../core/utf8.js'
import {scoreTokens, type EvalResult} from '../core/run/evaluate.js'
import {pairedSteps} from '../core/run/paired-steps.js'
import {resolveModel, type ResolvedModel} from '../core/package/resolve.js'
import {checkWebGpu, DEVICES, type Device} from '../core/engine/device.js'
import {ParScaleModel} from '../core/engine/model.js'
import {TextTokenizer} from '../core/generation/tokenizer.js'
import {formatBytes, percent} from '../core/format.js'
import {Progress} from '../ui/progress.js'
import {renderStreamSummary} from '../ui/stream-view.js'
import {renderSteps} from '../ui/paired-steps.js'
import {createTable} from '../ui/table.js'
import {quantFlags, quantFromFlags} from '../flags/quant.js'
import {intList} from '../flags/int-list.js'

export default class Eval extends BaseCommand {
  static override summary = 'Score a text with a model: mean negative log-likelihood and perplexity'
  static override description = `Tokenizes the text with the model's tokenizer (no special tokens added), predicts every next token from its prefix and reports the mean negative log-likelihood (natural log) and the perplexity. Texts longer than the model's context are scored in overlapping windows, each token once; the output says how many.

--streams also shows what the aggregation head does with the P streams over the scored tokens (each token's weights are the ones that mixed the streams for its prediction): each stream's mean weight, how often it has the largest weight, and the mean entropy of the weights against ln P (an even split; 100 % = the head averages, lower = it picks streams). Run once per P to compare.

--parallel 1,2,4,8 scores the same tokens at each P (one model load for a family package) and adds, for each step from one P to the next larger, the mean paired per-token gain with a 95 % interval from a moving-block bootstrap (blocks of 32 tokens): "in order" when the larger P is better beyond the text's noise, "reversed" when worse beyond it, "within noise" otherwise. With --json the output is {model, results: [one object per P], steps: [...]}.

--json --per-token adds token_nll, the NLL of every scored token in text order (its mean is mean_nll): two runs at different P, or of two models, can then be compared token by token, e.g. to tell whether a difference of a few thousandths of a nat on a short text is more than noise.

MODEL is a converted package, a checkpoint folder (converted on first use and cached), or a pulled hub repo id; without it, the embedded default model.`
  static override examples = [
    {description: 'Held-out loss of the default model at P = 8', command: '<%= config.bin %> eval --text-file held_out.py --parallel 8'},
    {description: 'Held-out loss with 4-bit weights', command: '<%= config.bin %> eval --text-file held_out.py --parallel 8 --quant int4'},
    {description: 'Compare P values on one text: a row per P, and whether each step is more than the text\'s noise', command: '<%= config.bin %> eval --text-file held_out.py --parallel 1,2,4,8'},
    {description: 'The same for a converted family package, as JSON', command: '<%= config.bin %> eval ./family-onnx --text-file text.txt --parallel 1,2,4,8 --json'},
    {description: 'How the default model weighs its 4 streams on held-out Python', command: '<%= config.bin %> eval --text-file held_out.py --parallel 4 --streams'},
    {description: 'Every token\'s NLL at P = 8, for a paired comparison with another P', command: '<%= config.bin %> eval --text-file held_out.py --parallel 8 --json --per-token'},
  ]
  static override args = {
    // ignoreStdin: `--text-file -` reads stdin; oclif must not take it as the model name
    model: Args.string({description: 'model package, checkpoint folder or hub repo id (default: the embedded model)', ignoreStdin: true}),
  }
  static override flags = {
    'text-file': Flags.string({char: 'f', description: 'text to score (- for stdin)', required: true}),
    parallel: Flags.string({char: 'p', description: 'number of parallel streams P (the model must provide it), or a list (1,2,4,8): each P scores the same tokens, and each step from one P to the next gets a 95 % interval', helpValue: 'N|LIST'}),
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
    const asked = flags.parallel === undefined ? [undefined] : intList(flags.parallel, 'parallel')
    if (new Set(asked).size !== asked.length) throw new UsageError(`--parallel lists a P twice ("${flags.parallel}")`)
    if (device === 'webgpu') await checkWebGpu() // before converting or loading anything
    const progress = new Progress('preparing model')
    const models: ResolvedModel[] = []
    try {
      for (const parallel of asked) {
        models.push(resolveModel(args.model, {
          parallel,
          quant,
          onProgress: ({phase, doneBytes, totalBytes}) => progress.update(`${phase}: ${percent(doneBytes, totalBytes)} of ${formatBytes(totalBytes)}`),
          onNotice: (line) => progress.log(line),
        }))
      }
      progress.update('loading model')
    } finally {
      progress.stop()
    }
    const tokenizer = await TextTokenizer.load(models[0].packageDir)
    const ids = tokenizer.encode(text)
    if (ids.length < 2) throw new UserError(`${flags['text-file']}: needs at least 2 tokens to score, has ${ids.length}`)
    const several = models.length > 1
    const results: EvalResult[] = []
    // one session per package (a family package serves every P from one backbone; hub families may be one repo per P)
    for (const packageDir of new Set(models.map((m) => m.packageDir))) {
      const mine = models.filter((m) => m.packageDir === packageDir)
      const session = await ParScaleModel.open(packageDir, {threads: flags.threads, device, parallel: mine.map((m) => m.parallel)})
      try {
        for (const {parallel} of mine) {
          results.push(await scoreTokens(session, parallel, ids, flags.context ?? session.maxPositions, {streams: flags.streams, perToken: flags['per-token'] || several}))
        }
      } finally {
        await session.release()
      }
    }
    results.sort((a, b) => a.parallel - b.parallel) // steps go from each P to the next larger one
    const label = models[0].label
    const steps = several ? pairedSteps(results.map((r) => ({parallel: r.parallel, tokenNll: r.token_nll ?? []}))) : []
    if (!flags['per-token']) for (const r of results) delete r.token_nll
    if (flags.json) {
      this.log(JSON.stringify(several ? {model: label, results, steps} : {model: label, ...results[0]}))
      return
    }
    const table = createTable(['model', 'P', 'tokens', 'predicted', 'mean NLL (nats)', 'perplexity'])
    for (const r of results) table.push([label, r.parallel, r.tokens, r.predicted, r.mean_nll.toFixed(4), r.perplexity.toFixed(3)])
    this.log(table.toString())
    if (results[0].windows > 1) this.log(`scored in ${results[0].windows} overlapping windows of ${results[0].window_tokens} tokens (the model's context)`)
    if (several) this.log(renderSteps(steps))
    for (const r of results) if (r.streams) this.log(renderStreamSummary(r.streams)) // each names its P
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
