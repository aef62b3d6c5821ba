import {BOOTSTRAP_BLOCK_TOKENS, type PairedStep} from '../core/run/paired-steps.js'
import {createTable} from './table.js'

const signed = (v: number) => `${v >= 0 ? '+' : '−'}${Math.abs(v).toFixed(4)}`

/** `eval --parallel LIST`: each step from one P to the next, its gain and whether the text resolves it. */
export function renderSteps(steps: readonly PairedStep[]): string {
  const table = createTable(['step', 'gain (nats)', '95 % interval', 'verdict'])
  for (const s of steps) table.push([`P${s.from} → P${s.to}`, signed(s.gain), `${signed(s.ci95[0])} … ${signed(s.ci95[1])}`, s.verdict])
  return `${table.toString()}\ngain: mean over the tokens of NLL(smaller P) − NLL(larger P); interval: moving-block bootstrap, blocks of ${BOOTSTRAP_BLOCK_TOKENS} tokens`
}
