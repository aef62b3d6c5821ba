// `parscale …` in a real pseudo-terminal (util-linux `script`), for what only a terminal shows:
// spinners, and Ctrl-C as the terminal delivers it (a byte 0x03 typed, turned into SIGINT by the
// terminal's line discipline unless the program put it in raw mode).
import assert from 'node:assert/strict'
import {spawn} from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {REPO_ROOT} from './cli.js'

export interface TerminalSession {
  /** Everything the terminal showed, escape sequences removed. */
  screen(): string
  /** Waits until the screen matches (fails after `timeoutMs` with the screen). */
  waitFor(pattern: RegExp, timeoutMs?: number): Promise<void>
  /** Types Ctrl-C. */
  ctrlC(): void
  /** The command's exit code (128 + signal when a signal ended it), or null if it is still running after `timeoutMs`. */
  exitWithin(timeoutMs: number): Promise<number | null>
  /** Kills whatever is left (the command runs in the terminal's own session, so `script` going does not take it along). */
  close(): void
}

const ESCAPES = /\x1b\[[0-9;?]*[A-Za-z]/g

/** `parscale ...args` in a 100×30 terminal; `stdoutFile` redirects its stdout (the terminal keeps stderr). */
export function inTerminal(args: string[], env: Record<string, string> = {}, stdoutFile?: string): TerminalSession {
  const pidFile = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-tty-')), 'pid')
  const quoted = args.map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ')
  const redirect = stdoutFile === undefined ? '' : ` > '${stdoutFile}'`
  const command = `stty cols 100 rows 30; echo $$ > '${pidFile}'; exec '${process.execPath}' bin/run.js ${quoted}${redirect}`
  // CI is unset so that ora treats the terminal as interactive.
  const {CI: _ci, ...parentEnv} = process.env
  const tty = spawn('script', ['-qfec', command, '/dev/null'], {cwd: REPO_ROOT, env: {...parentEnv, ...env, TERM: 'xterm', NODE_NO_WARNINGS: '1'}, stdio: ['pipe', 'pipe', 'pipe']})
  let raw = ''
  tty.stdout.on('data', (d: Buffer) => (raw += d.toString()))
  const exited = new Promise<number | null>((resolve) => tty.once('exit', (code) => resolve(code)))
  const screen = () => raw.replace(ESCAPES, '')
  return {
    screen,
    async waitFor(pattern, timeoutMs = 60_000) {
      const deadline = Date.now() + timeoutMs
      while (!pattern.test(screen())) {
        if (Date.now() > deadline) assert.fail(`the terminal never showed ${pattern}: ${JSON.stringify(screen().slice(-400))}`)
        await new Promise((r) => setTimeout(r, 50))
      }
    },
    ctrlC() {
      tty.stdin.write('\x03')
    },
    exitWithin(timeoutMs) {
      return Promise.race([exited, new Promise<null>((resolve) => setTimeout(() => resolve(null), timeoutMs).unref())])
    },
    close() {
      try {
        process.kill(Number(fs.readFileSync(pidFile, 'utf8')), 'SIGKILL')
      } catch {
        // already gone
      }
      tty.kill('SIGKILL')
      fs.rmSync(path.dirname(pidFile), {recursive: true, force: true})
    },
  }
}
