// Queue tests: parscale workers as child processes (killed at the end whatever happened),
// `batch status` polled until a condition holds.
import assert from 'node:assert/strict'
import {type ChildProcess, spawn} from 'node:child_process'
import path from 'node:path'

import {withRedis} from '../../src/core/queue/connection.js'
import {batchStatus} from '../../src/core/queue/status.js'
import {statusJson} from '../../src/ui/queue-report.js'
import {REPO_ROOT, runCli} from './cli.js'
import {stopProcess} from './redis-server.js'

const BIN = path.join(REPO_ROOT, 'bin', 'run.js')

export interface WorkerProcess {
  child: ChildProcess
  /** Everything it wrote on stderr so far. */
  stderr(): string
  /** Its exit code (null if killed by a signal). */
  exited: Promise<number | null>
}

const workers = new Set<ChildProcess>()
process.on('exit', () => {
  for (const child of workers) child.kill('SIGKILL')
})

export function startWorker(args: string[], env: Record<string, string>): WorkerProcess {
  const child = spawn(process.execPath, [BIN, 'worker', ...args], {
    cwd: REPO_ROOT,
    env: {...process.env, NODE_NO_WARNINGS: '1', ...env},
    stdio: ['ignore', 'ignore', 'pipe'],
  })
  workers.add(child)
  let stderr = ''
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()))
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => {
    workers.delete(child)
    resolve(code)
  }))
  return {child, stderr: () => stderr, exited}
}

/** Stops every worker still running (SIGKILL: for cleanup after a test). */
export async function killWorkers(): Promise<void> {
  await Promise.all([...workers].map((child) => stopProcess(child, 'SIGKILL')))
}

export interface StatusJson {
  name: string
  lines: number
  fingerprint: string
  waiting: number
  active: number
  done: number
  failed: number
  missing: number
  tokens: number
  tokens_per_s: number | null
}

/** `batch status --json` from the CLI. */
export async function status(url: string, name: string, env: Record<string, string>): Promise<StatusJson> {
  const r = await runCli(['batch', 'status', name, '--queue', url, '--json'], {env})
  assert.equal(r.code, 0, r.stderr)
  return JSON.parse(r.stdout) as StatusJson
}

/** `batch status --json`, computed in this process. */
export async function statusNow(url: string, name: string): Promise<StatusJson> {
  return statusJson(await withRedis(url, (redis) => batchStatus(redis, name))) as unknown as StatusJson
}

/**
 * Polls the batch's status until `until` holds (or fails after `timeoutMs`, with the last status).
 * In this process, with the code `batch status` runs: a CLI process per poll would take a core.
 */
export async function waitForStatus(url: string, name: string, until: (s: StatusJson) => boolean, timeoutMs = 60_000, intervalMs = 250): Promise<StatusJson> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const s = await statusNow(url, name)
    if (until(s)) return s
    if (Date.now() > deadline) assert.fail(`batch ${name} did not reach the expected state: ${JSON.stringify(s)}`)
    await new Promise((r) => setTimeout(r, intervalMs))
  }
}

export async function waitFor(what: string, check: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!check()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 100))
  }
}
