// The previous parscale, measured in the same run: targets such as "no worse than before" are
// ratios against it. PARSCALE_BASELINE names a built checkout of the earlier commit (its own
// cache: PARSCALE_BASELINE_CACHE, default <checkout>/.bench-cache).
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

export interface BaselineRun {
  parallel: number
  prompt_length: number
  decode_ms_per_token: number
  prefill_ms: number
  peak_rss_bytes: number
}

export function baselineCheckout(): string | undefined {
  return process.env.PARSCALE_BASELINE || undefined
}

export const BASELINE_HOWTO =
  'not compared: set PARSCALE_BASELINE to a built checkout of the previous commit ' +
  '(git worktree add --detach /tmp/parscale-prev <commit> && cd /tmp/parscale-prev && npm ci && npm run build)'

/**
 * Runs the baseline's own `bench --synthetic` and returns its rows (medians). `args` and the
 * report file are in the spelling every version takes (`--new-tokens N`, `--json FILE`; newer ones
 * accept them with a warning), since the baseline is an earlier checkout.
 */
export function runBaseline(args: string[], log: (line: string) => void): BaselineRun[] {
  const checkout = baselineCheckout()
  if (!checkout) return []
  const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-baseline-')), 'bench.json')
  const cache = process.env.PARSCALE_BASELINE_CACHE ?? path.join(checkout, '.bench-cache')
  log(`baseline: ${checkout} bench ${args.join(' ')}`)
  const r = spawnSync(process.execPath, [path.join(checkout, 'bin', 'run.js'), 'bench', ...args, '--json', out], {
    env: {...process.env, PARSCALE_CACHE: cache},
    stdio: ['ignore', 'ignore', 'inherit'],
  })
  if (r.status !== 0) throw new Error(`the baseline bench failed (exit ${r.status})`)
  const report = JSON.parse(fs.readFileSync(out, 'utf8')) as {results: BaselineRun[]}
  fs.rmSync(path.dirname(out), {recursive: true, force: true})
  return report.results
}
