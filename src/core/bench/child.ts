// Runs one bench worker in its own Node process and returns its JSON answer.
import {spawn} from 'node:child_process'
import {fileURLToPath} from 'node:url'

import {UserError} from '../errors.js'
import type {MixedResult, MixedSpec, ProbeResult, ProbeSpec, RunResult, RunSpec} from './types.js'

const WORKER = fileURLToPath(new URL('./worker.js', import.meta.url))

export function runWorker(spec: RunSpec): Promise<RunResult>
export function runWorker(spec: ProbeSpec): Promise<ProbeResult>
export function runWorker(spec: MixedSpec): Promise<MixedResult>
export function runWorker(spec: RunSpec | ProbeSpec | MixedSpec): Promise<RunResult | ProbeResult | MixedResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [WORKER], {stdio: ['pipe', 'pipe', 'pipe'], env: {...process.env, NODE_NO_WARNINGS: '1'}})
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    child.on('error', reject)
    child.on('close', (code, signal) => {
      const line = stdout.trim().split('\n').at(-1) ?? ''
      let answer: {ok: boolean; result?: RunResult | ProbeResult | MixedResult; error?: string} | undefined
      try {
        answer = JSON.parse(line) as typeof answer
      } catch {
        answer = undefined
      }
      if (answer?.ok && answer.result) return resolve(answer.result)
      const what = spec.kind === 'probe' ? 'roofline probe' : spec.kind === 'mixed' ? `mixed P=${[...new Set(spec.parallel)].join(',')}` : `P=${spec.parallel} batch ${spec.batch}`
      const why = answer?.error ?? (signal ? `killed by ${signal} (out of memory?)` : `exit code ${code}: ${stderr.trim().split('\n').slice(-3).join(' ')}`)
      reject(new UserError(`bench ${what} failed: ${why}`))
    })
    child.stdin.end(JSON.stringify(spec))
  })
}
