/**
 * `parscale run --chat`: a readline loop (interactive, or lines piped in: the output is then a
 * transcript, each line sent shown after "> ") over a ChatSession that keeps the KV cache
 * between turns. /commands manage the chat; Ctrl-C stops the current answer, or leaves when
 * there is none.
 */
import {autoLine} from './run-modes.js'
import {createInterface} from 'node:readline'

import {UserError} from '../core/errors.js'
import {ChatSession, rawChatFormat} from '../core/run/chat.js'
import type {RunContext} from '../core/run/context.js'
import {chatTurnRequest, generationOptions} from '../core/run/requests.js'
import type {ModelCache} from '../core/engine/model.js'
import {chatJsonResult, type LineWriter, writeTokenText} from './run-output.js'
import {strictUtf8Text} from './stdin.js'
import {answerStreamView} from './stream-view.js'

const CHAT_HELP = `commands:
  /reset       forget the conversation
  /parallel N  switch to N parallel streams (the conversation is kept)
  /help        this text
  /exit        leave (or Ctrl-D); Ctrl-C stops the current answer`

/** Runs the chat until /exit, Ctrl-D or the end of piped input. */
export async function runChat(ctx: RunContext, log: LineWriter): Promise<void> {
  const {options, tokenizer} = ctx
  const interactive = Boolean(process.stdin.isTTY)
  const format = ctx.useTemplate ? tokenizer : rawChatFormat(tokenizer)
  const chat = new ChatSession(ctx.model, ctx.parallel, format, {...generationOptions(ctx), system: options.system})
  // Piped input is decoded strictly: bytes that are not UTF-8 end the chat with one line.
  const input = interactive ? process.stdin : strictUtf8Text(process.stdin)
  let inputError: unknown
  const rl = createInterface({input, output: process.stdout, terminal: interactive, prompt: '> '})
  input.on('error', (error) => {
    inputError = error
    rl.close()
  })
  let answering: AbortController | undefined
  rl.on('SIGINT', () => {
    if (answering) answering.abort()
    else rl.close()
  })
  if (interactive && !options.quiet) {
    process.stderr.write(`parscale chat · ${ctx.label} · P=${chat.parallel}${ctx.useTemplate ? '' : ' · raw text (no chat template)'} · /help for commands\n`)
  }
  if (ctx.auto && options.verbose) process.stderr.write(autoLine(ctx) + '\n')
  // Piped text output is a transcript that reads as the terminal session would: each line sent
  // after the prompt "> ", each answer after it, a blank line between turns. --json stays one
  // object per turn for scripts.
  const transcript = !interactive && !options.json
  if (interactive) rl.prompt()
  for await (const line of rl) {
    const text = line.trim()
    if (text === '') {
      if (interactive) rl.prompt()
      continue
    }
    if (transcript) process.stdout.write(`> ${line}\n`)
    if (text.startsWith('/')) {
      if (await chatCommand(text, ctx, chat, rl)) break
    } else {
      answering = new AbortController()
      try {
        const result = await chat.send(line, chatTurnRequest(ctx), {
          signal: answering.signal,
          onToken: options.json ? undefined : writeTokenText,
        })
        if (options.json) log(JSON.stringify(chatJsonResult(result)))
        else process.stdout.write(result.finishReason === 'abort' ? ' [stopped]\n' : '\n')
        const streams = options.json ? undefined : answerStreamView(result, (ids) => tokenizer.decode(ids))
        if (streams) log(streams)
        if (transcript) process.stdout.write('\n')
      } catch (error) {
        // A turn that does not fit is reported; the chat goes on.
        if (!(error instanceof UserError)) throw error
        process.stderr.write(`parscale: ${error.message}\n`)
      } finally {
        answering = undefined
      }
    }
    if (interactive) rl.prompt()
  }
  rl.close()
  if (inputError !== undefined) throw inputError
}

/** Handles a /command; returns true to leave the chat. */
async function chatCommand(text: string, ctx: RunContext, chat: ChatSession<ModelCache>, rl: {close(): void}): Promise<boolean> {
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
      const available = ctx.model.parallelValues
      if (!Number.isInteger(p) || !available.includes(p)) {
        process.stderr.write(`parscale: /parallel takes one of ${available.join(', ')}\n`)
        return false
      }
      if (p === chat.parallel) {
        process.stderr.write(`P=${p}\n`)
        return false
      }
      const {switchMs, reencodeMs} = await chat.setParallel(p)
      const reencoded = reencodeMs > 0 ? `; conversation re-encoded in ${reencodeMs.toFixed(0)} ms` : ''
      process.stderr.write(`P=${p} (switched in ${switchMs.toFixed(0)} ms${reencoded})\n`)
      return false
    }
    default:
      process.stderr.write(`parscale: unknown command ${command}; /help lists them\n`)
      return false
  }
}
