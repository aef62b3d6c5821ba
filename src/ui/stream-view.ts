/**
 * Stream weights in the terminal: `run --streams` draws one bar per stream per generated token
 * (rows = streams, columns = tokens, 60 tokens a block, so P = 8 fits 80 columns), with each
 * stream's mean weight and top share beside it; `eval --streams` prints the summary table.
 */
import {summarizeStreamWeights, type StreamSummary} from '../core/run/stream-stats.js'
import {columns} from './table.js'

const BARS = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█']
// xterm-256 colours along viridis, low to high: the bar's height and colour say the same thing.
const RAMP = [54, 60, 24, 30, 36, 71, 149, 220]
/** Tokens per block: label (4) + 60 + borders (2) + mean and top (13) < 80 columns. */
export const TOKENS_PER_BLOCK = 60

/** Colour only on a terminal, and never with NO_COLOR set (no-color.org). */
export function colorFor(stream: {isTTY?: boolean}, env: NodeJS.ProcessEnv = process.env): boolean {
  return Boolean(stream.isTTY) && !env.NO_COLOR
}

const percent = (v: number) => `${Math.round(v * 100)}%`

/** What the row under the bars shows (`tokenMark`). */
export const TOKEN_ROW_LEGEND = 'last row: each token\'s first character · = space ↵ = newline → = tab ∗ = other'

/** One visible column per token: the first character of its text, whitespace drawn. */
function tokenMark(text: string): string {
  const c = text.charAt(0)
  if (c === '') return ' '
  if (c === ' ') return '·'
  if (c === '\n') return '↵'
  if (c === '\t') return '→'
  const code = c.charCodeAt(0)
  return code > 32 && code < 127 ? c : '∗'
}

export interface StreamViewOptions {
  color: boolean
  /** Each token's text (decoded alone), for a row of first characters under the bars. */
  tokenTexts?: string[]
}

/** The weights of every generated token (one array of P numbers each) as lines of text. */
export function renderStreamWeights(perToken: number[][], options: StreamViewOptions): string {
  const parallel = perToken[0]?.length ?? 0
  if (perToken.length === 0) return 'stream weights: no tokens generated'
  if (parallel === 1) return `stream weights: P=1, one stream: every token's weight is 1`
  const summary = summarizeStreamWeights(perToken, parallel)
  const largest = summary.max_weight
  const level = (w: number) => Math.min(BARS.length - 1, Math.max(0, Math.ceil((w / largest) * BARS.length) - 1))
  const cell = (w: number) => (options.color ? `\x1b[38;5;${RAMP[level(w)]}m${BARS[level(w)]}\x1b[0m` : BARS[level(w)]!)
  const label = (text: string) => text.padStart(3) + ' '
  const lines = [
    `P=${parallel} · ${perToken.length} tokens · bar height = weight, full bar ${largest.toFixed(2)} · even split ${(1 / parallel).toFixed(3)}`,
  ]
  for (let start = 0; start < perToken.length; start += TOKENS_PER_BLOCK) {
    const block = perToken.slice(start, start + TOKENS_PER_BLOCK)
    const first = start === 0
    // Token numbers every 10 columns, from 1; the last may run past a short block ("61" over one token), never cut.
    let ticks = ''
    for (let i = 0; i < block.length; i += 10) ticks += String(start + i + 1).padEnd(10)
    lines.push(`${label('')} ${ticks.trimEnd().padEnd(block.length)} ${first ? '  mean   top' : ''}`.trimEnd())
    for (let p = 0; p < parallel; p++) {
      const bars = block.map((weights) => cell(weights[p]!)).join('')
      // Each stream's mean weight and top share (over all tokens) stand beside its first block.
      const stats = first ? ` ${summary.mean_weight[p]!.toFixed(3).padStart(5)} ${percent(summary.top_share[p]!).padStart(5)}` : ''
      lines.push(`${label(`s${p + 1}`)}▕${bars}▏${stats}`)
    }
    if (options.tokenTexts) lines.push(`${label('')} ${options.tokenTexts.slice(start, start + block.length).map(tokenMark).join('')}`)
  }
  if (options.tokenTexts) lines.push(TOKEN_ROW_LEGEND)
  lines.push(entropyLine(summary))
  return lines.join('\n')
}

/** Mean entropy against ln P, with what it means. */
export function entropyLine(summary: StreamSummary): string {
  if (summary.parallel === 1) return 'P=1: one stream, nothing to weigh'
  const share = summary.mean_entropy / summary.max_entropy
  const reading = share > 0.95 ? 'close to an even split' : share > 0.75 ? 'leans on some streams' : 'picks a few streams per token'
  return `mean entropy ${summary.mean_entropy.toFixed(3)} nats of ln ${summary.parallel} = ${summary.max_entropy.toFixed(3)} (${percent(share)}: ${reading})\nweights from ${summary.min_weight.toFixed(4)} to ${summary.max_weight.toFixed(3)}`
}

/** `eval --streams`: one row per stream, then the entropy. */
export function renderStreamSummary(summary: StreamSummary): string {
  const rows = summary.mean_weight.map((mean, p) => [`s${p + 1}`, mean.toFixed(4), percent(summary.top_share[p]!), `${(mean * summary.parallel).toFixed(2)}×`])
  return [
    `stream weights over ${summary.tokens} scored tokens, P=${summary.parallel}:`,
    columns(['stream', 'mean weight', 'top stream on', 'vs even split'], rows),
    entropyLine(summary),
  ].join('\n')
}

/** The view under an answer, when its stream weights were kept (`run --streams`). */
export function answerStreamView(result: {streamWeights?: number[][]; tokenIds: number[]}, decode: (ids: number[]) => string, color = colorFor(process.stdout)): string | undefined {
  if (!result.streamWeights) return undefined
  return renderStreamWeights(result.streamWeights, {color, tokenTexts: result.tokenIds.map((id) => decode([id]))})
}
