import {existsSync} from 'node:fs'

import {Args, Flags, type Interfaces} from '@oclif/core'

import {BaseCommand} from '../base-command.js'
import {generationFlags, generationFlagOptions, numberFlag} from '../flags/generation.js'
import {isRepoId} from '../core/hub/families.js'
import {openRunContext, type RunContext} from '../core/run/context.js'
import {checkWebGpu, DEVICES, type Device} from '../core/engine/device.js'
import {planRun, promptFromStdin, type RunOptions, type RunPlan, splitModelArgument} from '../core/run/plan.js'
import {runChat} from '../ui/chat-repl.js'
import {formatBytes, percent} from '../core/format.js'
import {Progress} from '../ui/progress.js'
import {runBatch, runOneShot} from '../ui/run-modes.js'
import {endOnClosedPipe} from '../ui/run-output.js'
import {readStdin} from '../ui/stdin.js'
import {quantFlags, quantFromFlags} from '../flags/quant.js'

const runFlags = {
  prompt: Flags.string({description: 'prompt text (instead of the PROMPT argument)', helpValue: 'TEXT'}),
  chat: Flags.boolean({description: 'interactive multi-turn chat (the default in a terminal without a prompt)'}),
  batch: Flags.string({description: 'JSONL file of prompts to run in batches', helpValue: 'FILE'}),
  'batch-size': numberFlag('prompts per batch with --batch (default 8)'),
  ...generationFlags,
  json: Flags.boolean({description: 'print one JSON object per prompt per line (text, token_ids, finish_reason, timing)'}),
  quiet: Flags.boolean({char: 'q', description: 'no progress or timing on stderr'}),
  streams: Flags.boolean({description: 'after each answer, show how the P streams were weighted per generated token (with --json: "stream_weights")'}),
  threads: numberFlag('ONNX Runtime intra-op threads'),
  verbose: Flags.boolean({description: 'say on stderr which P --parallel auto chose and why'}),
  device: Flags.string({description: 'where the model runs: cpu, or a GPU through ONNX Runtime\'s WebGPU provider', options: [...DEVICES], default: 'cpu'}),
  ...quantFlags,
}

type RunFlags = Interfaces.InferredFlags<typeof runFlags>

function runOptions(flags: RunFlags, promptArgument: string | undefined): RunOptions {
  const generation = generationFlagOptions(flags)
  return {
    ...generation,
    promptArgument,
    prompt: flags.prompt,
    chat: flags.chat,
    batch: flags.batch,
    json: flags.json,
    quiet: flags.quiet,
    device: flags.device as Device,
    streams: flags.streams,
    verbose: flags.verbose,
    quant: quantFromFlags(flags),
    numbers: {...generation.numbers, 'batch-size': flags['batch-size'], threads: flags.threads},
  }
}

export default class Run extends BaseCommand {
  static override summary = 'Generate text with a ParScale model: one prompt, a chat, or a JSONL batch'
  static override description = `One-shot: give a PROMPT (or --prompt, or pipe it on stdin); the answer streams to stdout and a timing line (time to first token, tokens/s, P) goes to stderr.
Chat: run with no prompt in a terminal (or pass --chat). The conversation's KV cache is kept between turns, so each turn only processes its own new tokens. Type /help for commands; Ctrl-C stops the current answer.
Batch: --batch FILE.jsonl with one {"prompt": …} or {"messages": [{"role": …, "content": …}]} per line, optionally with "max_new_tokens" (or "max_tokens", as in serve's API), "temperature", "parallel" (the P for that line) and "id" (given back on the line's result). Lines look like:
  {"id": "fib", "prompt": "def fibonacci(n):", "max_new_tokens": 48}
  {"id": 2, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
  {"prompt": "import os", "parallel": 4, "temperature": 0.7}
--batch-size sequences decode together per P, new ones joining as others finish, and results come out in input order (with --json one object per line, its "id" first). The whole file is checked first; progress shows on stderr when it is a terminal.

When the tokenizer has a chat template a prompt is sent as a user message (--system adds a system message); --raw sends the text as is, without the template or special tokens.
Sampling defaults come from the model's generation_config.json; --temperature 0 is greedy. --parallel N picks how many parallel streams (P) to run; the model must provide it. --parallel auto picks it from a cost profile of the model measured once on this machine (cached beside the package): alone, the largest P whose decode step is within --auto-budget (default 1.25) × P = 1's; in --batch, lines that name no "parallel" get smaller P as more lines share the batch, so throughput stays near all-P = 1's. --verbose says which P and why.
--streams shows, after the answer, the weight the aggregation head gave each stream for each generated token (one bar per stream per token; colour on a terminal unless NO_COLOR is set); with --json each result carries "stream_weights", one array of P weights per generated token.

MODEL is a converted package, a checkpoint folder (converted on first use and cached), or a pulled hub repo id; without it, the embedded default model.`

  static override examples = [
    {description: 'Ask the default model, streaming the answer', command: '<%= config.bin %> run "def fibonacci(n):"'},
    {description: 'Greedy continuation of raw text with a local checkpoint, as JSON', command: '<%= config.bin %> run ./my-model --raw --prompt "The quick brown fox" --temperature 0 --json'},
    {description: 'Chat with a pulled hub model at P = 8', command: '<%= config.bin %> run ParScale/ParScale-1.8B-P8-Inst --chat --system "You are concise."'},
    {description: 'Pipe a prompt in, sample with a fixed seed', command: 'cat prompt.txt | <%= config.bin %> run ./my-model --temperature 0.7 --top-p 0.9 --seed 42'},
    {description: 'Run a JSONL file 16 prompts at a time, one JSON result per line', command: '<%= config.bin %> run ./my-model --batch prompts.jsonl --batch-size 16 --json > results.jsonl'},
    {description: 'The default model with 4-bit weights (converted once and cached)', command: '<%= config.bin %> run --quant int4 --prompt "def add(a, b):"'},
    {description: 'Stop at a blank line, at most 64 tokens, with 2 streams', command: '<%= config.bin %> run ./my-model "Once upon a time" --stop $\'\\n\\n\' --max-new-tokens 64 --parallel 2'},
    {description: 'Let parscale choose P from this machine\'s measured costs, and say why', command: '<%= config.bin %> run "def add(a, b):" --parallel auto --verbose'},
    {description: 'Which of the 8 streams the default model trusts, token by token', command: '<%= config.bin %> run "def fibonacci(n):" --parallel 8 --streams'},
  ]

  static override args = {
    // ignoreStdin: oclif would otherwise read piped stdin into a missing argument
    model: Args.string({description: 'model package, checkpoint folder or hub repo id (default: the embedded model)', ignoreStdin: true}),
    prompt: Args.string({description: 'prompt text (else --prompt, or stdin when it is not a terminal)', ignoreStdin: true}),
  }

  static override flags = runFlags

  async run(): Promise<void> {
    const {args, flags} = await this.parse(Run)
    const {model, prompt: promptArgument} = splitModelArgument(args, (ref) => existsSync(ref) || isRepoId(ref))
    const plan = planRun(runOptions(flags, promptArgument), () => Boolean(process.stdin.isTTY))
    // Defined exactly in one-shot mode.
    const prompt = plan.mode === 'one-shot' ? (plan.prompt ?? promptFromStdin(await readStdin())) : undefined
    endOnClosedPipe()
    if (plan.options.device === 'webgpu') await checkWebGpu() // before converting or loading anything
    const ctx = await this.load(model, plan)
    const log = (line: string) => this.log(line)
    try {
      if (plan.mode === 'batch') await runBatch(ctx, plan.file, log)
      else if (prompt === undefined) await runChat(ctx, log)
      else await runOneShot(ctx, prompt, log)
    } finally {
      await ctx.model.release()
    }
  }

  private async load(model: string | undefined, plan: RunPlan): Promise<RunContext> {
    const progress = new Progress('preparing model', !plan.options.quiet && Boolean(process.stderr.isTTY))
    try {
      return await openRunContext(model, plan, {
        onProgress: ({phase, doneBytes, totalBytes}) => progress.update(`${phase}: ${percent(doneBytes, totalBytes)} of ${formatBytes(totalBytes)}`),
        onLoading: () => progress.update('loading model'),
        onMeasuring: () => progress.update('measuring the cost profile for --parallel auto (once per machine, cached beside the package)'),
        onNotice: (line) => progress.log(line),
      })
    } finally {
      progress.stop()
    }
  }
}
