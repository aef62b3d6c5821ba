import {existsSync} from 'node:fs'
import {createInterface} from 'node:readline'

import {Args, Flags, type Interfaces} from '@oclif/core'

import {BaseCommand} from '../base-command.js'
import {type BatchInput, type BatchItem, readBatchFile} from '../core/batch-file.js'
import {UserError} from '../core/errors.js'
import {isRepoId} from '../core/families.js'
import {
  ChatSession,
  fitToContext,
  generateAll,
  type GenerationOptions,
  type GenerationRequest,
  type GenerationResult,
  rawChatFormat,
} from '../core/generation.js'
import {resolveModel} from '../core/resolve.js'
import {randomSeed, type SamplingOptions} from '../core/sampling.js'
import {DecoderSession, type KvCache} from '../core/session.js'
import {type ChatMessage, type GenerationDefaults, readGenerationDefaults, TextTokenizer} from '../core/tokenizer.js'
import {formatBytes, percent, Progress} from '../ui/progress.js'

/** A number flag; parsed in `numberFlags` so a bad value is one line, like every user error. */
function numberFlag(description: string, helpValue = 'N', char?: 'n' | 'p') {
  return Flags.string({description, helpValue, ...(char ? {char} : {})})
}

/** Numeric flags, checked. */
interface Numbers {
  batchSize: number
  maxNewTokens?: number
  temperature?: number
  topK?: number
  topP?: number
  repetitionPenalty?: number
  seed?: number
  parallel?: number
  threads?: number
}

function parseNumber(name: string, input: string | undefined, integer: boolean, check: (v: number) => boolean, rule: string): number | undefined {
  if (input === undefined) return undefined
  const v = Number(input)
  if (input.trim() === '' || !Number.isFinite(v) || (integer && !Number.isInteger(v)) || !check(v)) {
    throw new UserError(`--${name} must be ${rule} (got "${input}")`)
  }
  return v
}

function numberFlags(flags: RunFlags): Numbers {
  const whole = (name: 'batch-size' | 'max-new-tokens' | 'top-k' | 'parallel' | 'threads', min: number) =>
    parseNumber(name, flags[name], true, (v) => v >= min, `a whole number >= ${min}`)
  return {
    batchSize: whole('batch-size', 1) ?? 8,
    maxNewTokens: whole('max-new-tokens', 1),
    temperature: parseNumber('temperature', flags.temperature, false, (v) => v >= 0, 'a number >= 0'),
    topK: whole('top-k', 0),
    topP: parseNumber('top-p', flags['top-p'], false, (v) => v > 0 && v <= 1, 'in (0, 1]'),
    repetitionPenalty: parseNumber('repetition-penalty', flags['repetition-penalty'], false, (v) => v > 0, 'a number > 0'),
    seed: parseNumber('seed', flags.seed, true, (v) => v >= 0 && v <= 0xffffffff, 'a whole number from 0 to 4294967295'),
    parallel: whole('parallel', 1),
    threads: whole('threads', 1),
  }
}

const runFlags = {
  prompt: Flags.string({description: 'prompt text (instead of the PROMPT argument)', helpValue: 'TEXT'}),
  system: Flags.string({description: 'system message for the chat template', helpValue: 'TEXT'}),
  raw: Flags.boolean({description: 'send the prompt as is: no chat template, no special tokens'}),
  chat: Flags.boolean({description: 'interactive multi-turn chat (the default in a terminal without a prompt)'}),
  batch: Flags.string({description: 'JSONL file of prompts to run in batches', helpValue: 'FILE'}),
  'batch-size': numberFlag('prompts per batch with --batch (default 8)'),
  'max-new-tokens': numberFlag('most tokens to generate (default: generation_config max_new_tokens, else 256)', 'N', 'n'),
  temperature: numberFlag('sampling temperature; 0 = greedy (default: from generation_config, else greedy)', 'T'),
  'top-k': numberFlag('sample from the k most likely tokens (0 = all)', 'K'),
  'top-p': numberFlag('nucleus sampling: the smallest set of tokens whose probability reaches p, in (0, 1]', 'P'),
  'repetition-penalty': numberFlag('penalty (> 1) for tokens already in the sequence', 'X'),
  seed: numberFlag('random seed: the same seed gives the same output'),
  stop: Flags.string({description: 'stop when this text is generated (repeatable); it is not printed', multiple: true, helpValue: 'TEXT'}),
  json: Flags.boolean({description: 'print one JSON object per prompt per line (text, token_ids, finish_reason, timing)'}),
  quiet: Flags.boolean({char: 'q', description: 'no progress or timing on stderr'}),
  parallel: numberFlag('number of parallel streams P (the model must provide it; default: the model\'s own)', 'N', 'p'),
  truncate: Flags.boolean({description: 'keep the tail of a prompt that is too long for the context, instead of failing'}),
  threads: numberFlag('ONNX Runtime intra-op threads'),
}

const CHAT_HELP = `commands:
  /reset       forget the conversation
  /parallel N  switch to N parallel streams (the conversation is kept)
  /help        this text
  /exit        leave (or Ctrl-D); Ctrl-C stops the current answer`

type RunFlags = Interfaces.InferredFlags<typeof runFlags>

/** Everything a mode needs: model session, tokenizer, defaults and the flags. */
interface RunContext {
  session: DecoderSession
  tokenizer: TextTokenizer
  defaults: GenerationDefaults
  flags: RunFlags
  n: Numbers
  label: string
  useTemplate: boolean
  context: number
}

export default class Run extends BaseCommand {
  static override summary = 'Generate text with a ParScale model: one prompt, a chat, or a JSONL batch'
  static override description = `One-shot: give a PROMPT (or --prompt, or pipe it on stdin); the answer streams to stdout and a timing line (time to first token, tokens/s, P) goes to stderr.
Chat: run with no prompt in a terminal (or pass --chat). The conversation's KV cache is kept between turns, so each turn only processes its own new tokens. Type /help for commands; Ctrl-C stops the current answer.
Batch: --batch FILE.jsonl with one {"prompt": …} or {"messages": [{"role": …, "content": …}]} per line (optional "max_new_tokens", "temperature"); prompts run --batch-size at a time and results come out in input order. The whole file is checked first.

When the tokenizer has a chat template a prompt is sent as a user message (--system adds a system message); --raw sends the text as is, without the template or special tokens.
Sampling defaults come from the model's generation_config.json; --temperature 0 is greedy. --parallel N picks how many parallel streams (P) to run; the model must provide it.

MODEL is a converted package, a checkpoint folder (converted on first use and cached), or a pulled hub repo id; without it, the embedded default model.`

  static override examples = [
    {description: 'Ask the default model, streaming the answer', command: '<%= config.bin %> run "def fibonacci(n):"'},
    {description: 'Greedy continuation of raw text with a local checkpoint, as JSON', command: '<%= config.bin %> run ./my-model --raw --prompt "The quick brown fox" --temperature 0 --json'},
    {description: 'Chat with a pulled hub model at P = 8', command: '<%= config.bin %> run ParScale/ParScale-1.8B-P8-Inst --chat --system "You are concise."'},
    {description: 'Pipe a prompt in, sample with a fixed seed', command: 'cat prompt.txt | <%= config.bin %> run ./my-model --temperature 0.7 --top-p 0.9 --seed 42'},
    {description: 'Run a JSONL file 16 prompts at a time, one JSON result per line', command: '<%= config.bin %> run ./my-model --batch prompts.jsonl --batch-size 16 --json > results.jsonl'},
    {description: 'Stop at a blank line, at most 64 tokens, with 2 streams', command: '<%= config.bin %> run ./my-model "Once upon a time" --stop $\'\\n\\n\' --max-new-tokens 64 --parallel 2'},
  ]

  static override args = {
    // ignoreStdin: oclif would otherwise read piped stdin into a missing argument
    model: Args.string({description: 'model package, checkpoint folder or hub repo id (default: the embedded model)', ignoreStdin: true}),
    prompt: Args.string({description: 'prompt text (else --prompt, or stdin when it is not a terminal)', ignoreStdin: true}),
  }

  static override flags = runFlags


  async run(): Promise<void> {
    const {args, flags} = await this.parse(Run)
    let {model, prompt} = args
    // `run "some prompt"`: one argument that is neither a folder nor a repo id is the prompt.
    if (model !== undefined && prompt === undefined && !existsSync(model) && !isRepoId(model)) {
      prompt = model
      model = undefined
    }
    if (prompt !== undefined && flags.prompt !== undefined) throw new UserError('give the prompt once: as an argument or with --prompt')
    prompt ??= flags.prompt
    const n = numberFlags(flags)
    if (n.temperature === 0 && (n.topK !== undefined || n.topP !== undefined)) throw new UserError('--top-k and --top-p need sampling; drop them or --temperature 0')
    const mode = pickMode(prompt, flags)
    if (mode === 'one-shot' && prompt === undefined) {
      prompt = await readStdin()
      if (prompt === '') throw new UserError('no prompt: give PROMPT or --prompt, pipe text on stdin, or use --chat')
    }
    if (prompt === '') throw new UserError('the prompt is empty')

    // A closed pipe (`| head`) just ends the output.
    process.stdout.on('error', (error: NodeJS.ErrnoException) => {
      if (error.code === 'EPIPE') process.exit(0)
      throw error
    })
    const ctx = await this.load(model, flags, n)
    try {
      if (mode === 'batch') await this.runBatch(ctx, flags.batch!)
      else if (mode === 'chat') await this.runChat(ctx)
      else await this.runOnce(ctx, prompt!)
    } finally {
      await ctx.session.release()
    }
  }

  private async load(model: string | undefined, flags: RunFlags, n: Numbers): Promise<RunContext> {
    const progress = new Progress('preparing model', !flags.quiet && Boolean(process.stderr.isTTY))
    let resolved
    try {
      resolved = resolveModel(model, {
        parallel: n.parallel,
        onProgress: ({phase, doneBytes, totalBytes}) => progress.update(`${phase}: ${percent(doneBytes, totalBytes)} of ${formatBytes(totalBytes)}`),
      })
      progress.update('loading model')
      const [tokenizer, defaults, session] = await Promise.all([
        TextTokenizer.load(resolved.packageDir),
        readGenerationDefaults(resolved.packageDir),
        DecoderSession.open(resolved.packageDir, {parallel: resolved.parallel, threads: n.threads}),
      ])
      const useTemplate = !flags.raw && tokenizer.hasChatTemplate
      if (flags.system !== undefined && !useTemplate) {
        await session.release()
        throw new UserError(flags.raw ? '--system needs the chat template; drop --raw' : 'the model\'s tokenizer has no chat template, so --system cannot be used')
      }
      return {session, tokenizer, defaults, flags, n, label: resolved.label, useTemplate, context: defaults.contextLength ?? session.maxPositions}
    } finally {
      progress.stop()
    }
  }

  /** One prompt: stream the answer (or print one JSON line), timing on stderr. */
  private async runOnce(ctx: RunContext, prompt: string): Promise<void> {
    const {flags} = ctx
    const maxNewTokens = maxNew(ctx)
    const ids = fitToContext(encodeInput(ctx, {kind: 'prompt', text: prompt}), ctx.context, maxNewTokens, flags.truncate)
    const request: GenerationRequest = {promptIds: ids, maxNewTokens, sampling: sampling(ctx), stop: flags.stop}
    const options = generationOptions(ctx)
    if (!flags.json) options.onToken = (e) => e.text && process.stdout.write(e.text)
    const [result] = await generateAll(ctx.session, [request], 1, options)
    if (flags.json) this.log(JSON.stringify(jsonResult(result, ctx.session.parallel)))
    else process.stdout.write('\n')
    if (!flags.quiet && !flags.json) process.stderr.write(timingLine(result, ctx.session.parallel) + '\n')
  }

  /** A JSONL file, checked whole first, run `--batch-size` at a time, printed in order. */
  private async runBatch(ctx: RunContext, file: string): Promise<void> {
    const {flags} = ctx
    const items = await readBatchFile(file)
    const baseSampling = sampling(ctx)
    const requests = items.map((item, i) => batchRequest(ctx, file, item, baseSampling, i))
    const started = performance.now()
    const results = await generateAll(ctx.session, requests, ctx.n.batchSize, generationOptions(ctx), (done, offset) => {
      for (const [j, result] of done.entries()) {
        if (flags.json) this.log(JSON.stringify(jsonResult(result, ctx.session.parallel)))
        else this.log(`[${file}:${items[offset + j].line}]\n${result.text}\n`)
      }
    })
    if (!flags.quiet && !flags.json) {
      const tokens = results.reduce((n, r) => n + r.generatedTokens, 0)
      const seconds = (performance.now() - started) / 1000
      process.stderr.write(`${results.length} prompts · ${tokens} tokens in ${seconds.toFixed(1)} s (${(tokens / seconds).toFixed(1)} tokens/s overall) · P=${ctx.session.parallel}\n`)
    }
  }

  /** Interactive (or piped) multi-turn chat that keeps the KV cache between turns. */
  private async runChat(ctx: RunContext): Promise<void> {
    const {flags, tokenizer} = ctx
    const interactive = Boolean(process.stdin.isTTY)
    const format = ctx.useTemplate ? tokenizer : rawChatFormat(tokenizer)
    const base = generationOptions(ctx)
    const chat = new ChatSession(ctx.session, format, {...base, system: flags.system})
    const rl = createInterface({input: process.stdin, output: process.stdout, terminal: interactive, prompt: '> '})
    let answering: AbortController | undefined
    rl.on('SIGINT', () => {
      if (answering) answering.abort()
      else rl.close()
    })
    if (interactive && !flags.quiet) {
      process.stderr.write(`parscale chat · ${ctx.label} · P=${ctx.session.parallel}${ctx.useTemplate ? '' : ' · raw text (no chat template)'} · /help for commands\n`)
    }
    if (interactive) rl.prompt()
    for await (const line of rl) {
      const text = line.trim()
      if (text === '') {
        if (interactive) rl.prompt()
        continue
      }
      if (text.startsWith('/')) {
        if (await this.chatCommand(text, ctx, chat, rl)) break
      } else {
        answering = new AbortController()
        try {
          const result = await chat.send(line, {maxNewTokens: maxNew(ctx), sampling: sampling(ctx), stop: flags.stop}, {
            signal: answering.signal,
            onToken: flags.json ? undefined : (e) => e.text && process.stdout.write(e.text),
          })
          if (flags.json) {
            this.log(JSON.stringify({...jsonResult(result, chat.parallel), prefill_tokens: result.prefillTokens, reused_tokens: result.reusedTokens}))
          } else {
            process.stdout.write(result.finishReason === 'abort' ? ' [stopped]\n' : '\n')
          }
        } catch (error) {
          if (!(error instanceof UserError)) throw error
          process.stderr.write(`parscale: ${error.message}\n`)
        } finally {
          answering = undefined
        }
      }
      if (interactive) rl.prompt()
    }
    rl.close()
  }

  /** Handles a /command; returns true to leave the chat. */
  private async chatCommand(text: string, ctx: RunContext, chat: ChatSession<KvCache>, rl: {close(): void}): Promise<boolean> {
    const [command, ...rest] = text.split(/\s+/)
    switch (command) {
      case '/exit':
      case '/quit':
        rl.close()
        return true
      case '/reset':
        chat.reset()
        process.stderr.write('conversation cleared\n')
        return false
      case '/help':
        process.stderr.write(CHAT_HELP + '\n')
        return false
      case '/parallel': {
        const p = Number(rest[0])
        const available = ctx.session.availableParallel
        if (!Number.isInteger(p) || !available.includes(p)) {
          process.stderr.write(`parscale: /parallel takes one of ${available.join(', ')}\n`)
          return false
        }
        if (p !== ctx.session.parallel) {
          const next = await DecoderSession.open(ctx.session.packageDir, {parallel: p, threads: ctx.n.threads})
          await ctx.session.release()
          ctx.session = next
          chat.setDecoder(next)
        }
        process.stderr.write(`P=${p}\n`)
        return false
      }
      default:
        process.stderr.write(`parscale: unknown command ${command}; /help lists them\n`)
        return false
    }
  }
}

function pickMode(prompt: string | undefined, flags: RunFlags): 'one-shot' | 'chat' | 'batch' {
  if (flags.batch !== undefined) {
    if (prompt !== undefined) throw new UserError('--batch reads prompts from the file; give no prompt')
    if (flags.chat) throw new UserError('--batch and --chat cannot be combined')
    return 'batch'
  }
  if (flags.chat) {
    if (prompt !== undefined) throw new UserError('--chat takes no prompt; type it in the chat')
    return 'chat'
  }
  if (prompt !== undefined) return 'one-shot'
  return process.stdin.isTTY ? 'chat' : 'one-shot'
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = []
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer)
  // `echo prompt |` adds one newline that is not part of the prompt
  return Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '')
}

function maxNew(ctx: RunContext): number {
  return ctx.n.maxNewTokens ?? ctx.defaults.maxNewTokens ?? 256
}

/** Flags over generation_config; --top-k / --top-p alone turn sampling on at temperature 1. */
function sampling(ctx: RunContext): SamplingOptions {
  const {n, defaults} = ctx
  const truncation = n.topK !== undefined || n.topP !== undefined
  const fromConfig = defaults.doSample ? (defaults.temperature ?? 1) : 0
  const temperature = n.temperature ?? (truncation && fromConfig === 0 ? 1 : fromConfig)
  const sample = temperature > 0
  return {
    temperature,
    topK: sample ? (n.topK ?? defaults.topK) : undefined,
    topP: sample ? (n.topP ?? defaults.topP) : undefined,
    repetitionPenalty: n.repetitionPenalty ?? defaults.repetitionPenalty,
    seed: n.seed ?? randomSeed(),
  }
}

function generationOptions(ctx: RunContext): GenerationOptions {
  const eos = ctx.defaults.eosTokenIds.length > 0 ? ctx.defaults.eosTokenIds : ctx.tokenizer.eosId !== undefined ? [ctx.tokenizer.eosId] : []
  return {
    eosTokenIds: eos,
    decode: (ids) => ctx.tokenizer.decode(ids),
    padId: ctx.tokenizer.padId,
    contextLength: ctx.context,
  }
}

function withSystem(ctx: RunContext, messages: ChatMessage[]): ChatMessage[] {
  const system = ctx.flags.system
  if (system === undefined || messages[0]?.role === 'system') return messages
  return [{role: 'system', content: system}, ...messages]
}

function encodeInput(ctx: RunContext, input: BatchInput): number[] {
  if (input.kind === 'messages') return ctx.tokenizer.encodeChat(withSystem(ctx, input.messages))
  if (!ctx.useTemplate) return ctx.tokenizer.encode(input.text)
  return ctx.tokenizer.encodeChat(withSystem(ctx, [{role: 'user', content: input.text}]))
}

function batchRequest(ctx: RunContext, file: string, item: BatchItem, base: SamplingOptions, index: number): GenerationRequest {
  const where = `${file}:${item.line}`
  if (item.input.kind === 'messages' && !ctx.tokenizer.hasChatTemplate) {
    throw new UserError(`${where}: "messages" need a chat template and the model's tokenizer has none; use "prompt"`)
  }
  const maxNewTokens = item.maxNewTokens ?? maxNew(ctx)
  let promptIds: number[]
  try {
    promptIds = fitToContext(encodeInput(ctx, item.input), ctx.context, maxNewTokens, ctx.flags.truncate)
  } catch (error) {
    if (error instanceof UserError) throw new UserError(`${where}: ${error.message}`)
    throw error
  }
  if (promptIds.length === 0) throw new UserError(`${where}: the prompt is empty`)
  const temperature = item.temperature ?? base.temperature
  // Each line gets its own seed, so identical lines differ and results do not depend on --batch-size.
  const sampling: SamplingOptions = {...base, temperature, seed: ((base.seed ?? 0) + index) >>> 0}
  if (temperature > 0 && base.temperature === 0) Object.assign(sampling, {topK: ctx.n.topK ?? ctx.defaults.topK, topP: ctx.n.topP ?? ctx.defaults.topP})
  return {promptIds, maxNewTokens, sampling, stop: ctx.flags.stop}
}

function round(value: number, digits: number): number {
  const f = 10 ** digits
  return Math.round(value * f) / f
}

function jsonResult(r: GenerationResult, parallel: number): Record<string, unknown> {
  return {
    text: r.text,
    token_ids: r.tokenIds,
    finish_reason: r.finishReason,
    prompt_tokens: r.promptTokens,
    generated_tokens: r.generatedTokens,
    parallel,
    ttft_ms: round(r.ttftMs, 2),
    decode_tokens_per_s: round(r.decodeTokensPerS, 2),
  }
}

function timingLine(r: GenerationResult, parallel: number): string {
  return `P=${parallel} · ${r.promptTokens} prompt tokens · TTFT ${r.ttftMs.toFixed(0)} ms · ${r.generatedTokens} tokens at ${r.decodeTokensPerS.toFixed(1)} tokens/s · ${r.finishReason}`
}
