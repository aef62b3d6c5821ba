// Runs the real CLI (bin/run.js over the compiled dist/) as a child process.
import {spawn, type ChildProcessWithoutNullStreams} from 'node:child_process'
import path from 'node:path'
import {fileURLToPath} from 'node:url'

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..')
const BIN = path.join(REPO_ROOT, 'bin', 'run.js')

export interface CliResult {
  code: number | null
  stdout: string
  stderr: string
}

/** `parscale ...args`, with extra environment variables and optional stdin (text or bytes). */
export function runCli(args: string[], options: {env?: Record<string, string | undefined>; input?: string | Uint8Array; cwd?: string} = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], {
      cwd: options.cwd ?? REPO_ROOT,
      env: {...process.env, NODE_NO_WARNINGS: '1', ...options.env},
      stdio: ['pipe', 'pipe', 'pipe'],
    })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    child.on('error', reject)
    child.on('close', (code) => resolve({code, stdout, stderr}))
    child.stdin.end(options.input ?? '')
  })
}

export interface NpxProcess {
  child: ChildProcessWithoutNullStreams
  stdout(): string
  stderr(): string
  /**
   * Resolves once npx and everything it started have exited: npm passes its stdio on, so the
   * pipes close only when the last process holding them (the parscale node process) is gone.
   */
  closed: Promise<void>
  /** SIGKILL to npx's whole process group (cleanup, whatever is left). */
  killAll(): void
}

/**
 * `npx parscale ...args` in the repository, as a user types it: npm exec runs the package's bin
 * through `sh -c`. In a process group of its own, so `killAll` reaches an orphaned child too.
 */
export function spawnNpx(args: string[], env: Record<string, string | undefined> = {}): NpxProcess {
  const child = spawn('npx', ['parscale', ...args], {
    cwd: REPO_ROOT,
    env: {...process.env, NODE_NO_WARNINGS: '1', npm_config_update_notifier: 'false', ...env},
    stdio: ['pipe', 'pipe', 'pipe'],
    detached: true,
  })
  child.stdin.end()
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
  const closed = new Promise<void>((resolve) => child.once('close', () => resolve()))
  const killAll = () => {
    try {
      process.kill(-child.pid!, 'SIGKILL')
    } catch {
      // Nothing left in the group.
    }
  }
  return {child, stdout: () => stdout, stderr: () => stderr, closed, killAll}
}

/** `npx parscale ...args` to the end. */
export async function runNpx(args: string[], env: Record<string, string | undefined> = {}): Promise<CliResult> {
  const npx = spawnNpx(args, env)
  try {
    const code = new Promise<number | null>((resolve) => npx.child.once('exit', (c) => resolve(c)))
    await npx.closed
    return {code: await code, stdout: npx.stdout(), stderr: npx.stderr()}
  } finally {
    npx.killAll()
  }
}
