/**
 * `--batch FILE.jsonl`: one request per line, `{"prompt": "…"}` or `{"messages": […]}`, with
 * optional `max_new_tokens` (or `max_tokens`, as serve's API names it), `temperature`,
 * `parallel` (P for that line) and `id` (a string or number given back on the line's result).
 * The whole file is validated before anything is generated; the first bad line is reported as
 * `FILE:LINE: problem`.
 */
import {readFile} from 'node:fs/promises'

import {FileFormatError} from '../errors.js'
import {decodeUtf8, lineAt} from '../utf8.js'
import type {ChatMessage} from '../generation/tokenizer.js'

export type BatchInput = {kind: 'prompt'; text: string} | {kind: 'messages'; messages: ChatMessage[]}

export interface BatchItem {
  /** 1-based line number in the file. */
  line: number
  /** The line's own `id`, given back on its result. */
  id?: BatchLineId
  input: BatchInput
  maxNewTokens?: number
  temperature?: number
  /** Streams P for this line (overrides --parallel). */
  parallel?: number
}

export type BatchLineId = string | number

const KEYS = new Set(['id', 'prompt', 'messages', 'max_new_tokens', 'max_tokens', 'temperature', 'parallel'])
const KEY_LIST = 'prompt or messages, max_new_tokens (or max_tokens), temperature, parallel, id'

/** `max_new_tokens`, or serve's name `max_tokens`; both only when they agree. */
function maxNewTokensOf(value: Record<string, unknown>): unknown {
  const {max_new_tokens: ours, max_tokens: theirs} = value
  if (ours !== undefined && theirs !== undefined && ours !== theirs) {
    throw new LineProblem(`"max_new_tokens" (${JSON.stringify(ours)}) and "max_tokens" (${JSON.stringify(theirs)}) differ; give one of them`)
  }
  return ours ?? theirs
}

class LineProblem extends Error {}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

function parseMessages(value: unknown): ChatMessage[] {
  if (!Array.isArray(value) || value.length === 0) throw new LineProblem('"messages" must be a non-empty array')
  return value.map((m, i) => {
    if (!isRecord(m) || typeof m.role !== 'string' || typeof m.content !== 'string') {
      throw new LineProblem(`messages[${i}] must be an object with string "role" and "content"`)
    }
    if (m.role.length === 0) throw new LineProblem(`messages[${i}].role is empty`)
    return {role: m.role, content: m.content}
  })
}

function parseItem(text: string, line: number): BatchItem {
  let value: unknown
  try {
    value = JSON.parse(text)
  } catch (error) {
    throw new LineProblem(`not valid JSON (${(error as Error).message})`)
  }
  if (!isRecord(value)) throw new LineProblem('expected a JSON object')
  const unknown = Object.keys(value).filter((k) => !KEYS.has(k))
  if (unknown.length > 0) throw new LineProblem(`unknown field "${unknown[0]}" (expected ${KEY_LIST})`)
  const hasPrompt = 'prompt' in value
  const hasMessages = 'messages' in value
  if (hasPrompt === hasMessages) throw new LineProblem('needs exactly one of "prompt" or "messages"')
  let input: BatchInput
  if (hasPrompt) {
    if (typeof value.prompt !== 'string' || value.prompt.length === 0) throw new LineProblem('"prompt" must be a non-empty string')
    input = {kind: 'prompt', text: value.prompt}
  } else {
    input = {kind: 'messages', messages: parseMessages(value.messages)}
  }
  const item: BatchItem = {line, input}
  if (value.id !== undefined) {
    const id = value.id
    if (!(typeof id === 'string' || (typeof id === 'number' && Number.isFinite(id)))) throw new LineProblem('"id" must be a string or a number')
    item.id = id
  }
  const maxNew = maxNewTokensOf(value)
  if (maxNew !== undefined) {
    const name = value.max_new_tokens === undefined ? 'max_tokens' : 'max_new_tokens'
    if (typeof maxNew !== 'number' || !Number.isInteger(maxNew) || maxNew < 1) throw new LineProblem(`"${name}" must be a whole number >= 1`)
    item.maxNewTokens = maxNew
  }
  if (value.temperature !== undefined) {
    const t = value.temperature
    if (typeof t !== 'number' || !Number.isFinite(t) || t < 0) throw new LineProblem('"temperature" must be a number >= 0')
    item.temperature = t
  }
  if (value.parallel !== undefined) {
    const p = value.parallel
    if (typeof p !== 'number' || !Number.isInteger(p) || p < 1) throw new LineProblem('"parallel" must be a whole number >= 1')
    item.parallel = p
  }
  return item
}

/** Parses and validates JSONL text; blank lines are skipped. `file` names the source in errors. */
export function parseBatchFile(text: string, file: string): BatchItem[] {
  const items: BatchItem[] = []
  const lines = text.split('\n')
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i].replace(/\r$/, '')
    if (raw.trim() === '') continue
    try {
      items.push(parseItem(raw, i + 1))
    } catch (error) {
      if (error instanceof LineProblem) throw new FileFormatError(`${file}:${i + 1}`, error.message)
      throw error
    }
  }
  if (items.length === 0) throw new FileFormatError(file, 'no prompts (expected one JSON object per line)')
  return items
}

export async function readBatchFile(file: string): Promise<BatchItem[]> {
  let bytes: Buffer
  try {
    bytes = await readFile(file)
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code
    throw new FileFormatError(file, code === 'ENOENT' ? 'no such file' : `cannot read (${code ?? (error as Error).message})`)
  }
  return parseBatchFile(decodeUtf8(bytes, (offset) => `${file}:${lineAt(bytes, offset)}`), file)
}
