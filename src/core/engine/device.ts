/**
 * Where a model runs: `cpu` (ONNX Runtime's CPU provider, the default) or `webgpu` (its WebGPU
 * provider, which onnxruntime-node's Linux x64, Windows and macOS builds carry; on Linux it
 * reaches the GPU through Vulkan). A machine without a GPU adapter (or without a Vulkan
 * driver) is told so at once, before any model is loaded.
 */
import {spawnSync} from 'node:child_process'
import fs from 'node:fs'
import {createRequire} from 'node:module'

import type ort from 'onnxruntime-node'

import {UserError} from '../errors.js'
import {GraphBuilder} from '../onnx/builder.js'

export const DEVICES = ['cpu', 'webgpu'] as const
export type Device = (typeof DEVICES)[number]

export interface AdapterInfo {
  /** What the adapter is, as far as this machine tells (see `adapterName`). */
  name: string
  /** The native graphics API WebGPU runs on here. */
  backend: string
}

/**
 * Session options for ONNX Runtime's WebGPU provider, with the settings parscale measured
 * (docs/benchmarks.md): validation off (a release build validates every dispatch on the CPU),
 * more dispatches recorded per queue submit, and one CPU thread that does not spin (the CPU
 * only launches kernels and runs shape arithmetic; spinning pool threads would compete with the
 * thread that launches). `PARSCALE_WEBGPU_OPTIONS` (JSON: `provider` options, `config` entries,
 * `threads`) overrides them, for measuring.
 */
export function webgpuSessionOptions(): Pick<ort.InferenceSession.SessionOptions, 'executionProviders' | 'extra' | 'intraOpNumThreads' | 'interOpNumThreads'> {
  let override: {provider?: Record<string, string>; config?: Record<string, string>; threads?: number} = {}
  if (process.env.PARSCALE_WEBGPU_OPTIONS) override = JSON.parse(process.env.PARSCALE_WEBGPU_OPTIONS) as typeof override
  const provider = {name: 'webgpu', validationMode: 'disabled', ...override.provider}
  const config = {maxNumPendingDispatches: '64', ...override.config}
  const threads = override.threads ?? 1
  return {
    executionProviders: [provider as unknown as ort.InferenceSession.ExecutionProviderConfig],
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    extra: {ep: {webgpuexecutionprovider: config}, ...(threads === 1 ? {session: {intra_op: {allow_spinning: '0'}}} : {})},
  }
}

let checked: Promise<AdapterInfo> | undefined

/**
 * Resolves when a WebGPU adapter exists (a one-node graph runs on it), else rejects with one
 * line: `no WebGPU adapter found (<reason>)`. The answer is kept for the process.
 */
export function checkWebGpu(): Promise<AdapterInfo> {
  checked ??= probe()
  return checked
}

/**
 * The probe runs in a child process: where no adapter exists, Dawn (WebGPU's implementation
 * inside ONNX Runtime) writes its own warnings to stderr, which would break the one-line error.
 */
async function probe(): Promise<AdapterInfo> {
  const g = new GraphBuilder('probe')
  const x = g.input('x', 'float32', [4])
  g.output(g.node('Add', [x, x]), 'y', 'float32', [4])
  const spec = {
    ort: createRequire(import.meta.url).resolve('onnxruntime-node'),
    model: Buffer.from(g.toModelBytes('probe')).toString('base64'),
    options: webgpuSessionOptions(),
  }
  const child = spawnSync(process.execPath, ['-e', PROBE_SCRIPT], {
    env: {...process.env, PARSCALE_WEBGPU_PROBE: JSON.stringify(spec)},
    encoding: 'utf8',
    timeout: 120_000,
  })
  let answer: {ok: boolean; error?: string} = {ok: false, error: child.error?.message ?? `the probe exited with ${child.status ?? child.signal}`}
  try {
    answer = JSON.parse(child.stdout.trim().split('\n').at(-1) ?? '') as typeof answer
  } catch {
    // keep the exit status
  }
  if (!answer.ok) throw new UserError(`no WebGPU adapter found (${reason(answer.error ?? '', child.stderr ?? '')})`)
  return {name: adapterName(), backend: process.platform === 'linux' ? 'Vulkan' : process.platform === 'darwin' ? 'Metal' : 'Direct3D 12'}
}

const PROBE_SCRIPT = `
const spec = JSON.parse(process.env.PARSCALE_WEBGPU_PROBE)
const ort = require(spec.ort)
const say = (answer) => process.stdout.write(JSON.stringify(answer) + '\\n')
ort.InferenceSession.create(Buffer.from(spec.model, 'base64'), spec.options)
  .then(async (session) => {
    const out = await session.run({x: new ort.Tensor('float32', Float32Array.of(1, 2, 3, 4), [4])})
    await session.release()
    say(out.y.data[3] === 8 ? {ok: true} : {ok: false, error: 'a test graph gave a wrong answer'})
  })
  .catch((error) => say({ok: false, error: String((error && error.message) || error)}))
`

/** ONNX Runtime's message and Dawn's warnings, shortened to what a user can act on. */
function reason(message: string, stderr: string): string {
  const vulkan = /Couldn't load Vulkan: ([^\n]+)/.exec(stderr)?.[1]
  if (vulkan) return `the Vulkan loader is missing: ${vulkan.split(':')[0].trim()}`
  const first = message.split('\n')[0]
  if (/adapter/i.test(first)) return first.replace(/^.*?(Failed to get a WebGPU adapter)/, '$1').trim()
  if (/webgpu/i.test(first) && /unsupported|not (built|enabled|available)/i.test(first)) return `this onnxruntime-node has no WebGPU provider: ${first}`
  return first || 'the WebGPU provider did not start'
}

/**
 * The adapter's name as the system reports the GPU: ONNX Runtime does not expose the name
 * WebGPU gives its adapter, so this reads the driver's description (NVIDIA's
 * /proc/driver/nvidia/gpus/<bus>/information), else the PCI ids of the first DRM card.
 */
export function adapterName(): string {
  try {
    const root = '/proc/driver/nvidia/gpus'
    for (const bus of fs.readdirSync(root)) {
      const model = /^Model:\s*(.+)$/m.exec(fs.readFileSync(`${root}/${bus}/information`, 'utf8'))?.[1]?.trim()
      if (model) return model
    }
  } catch {
    // not an NVIDIA driver
  }
  try {
    for (const card of fs.readdirSync('/sys/class/drm').filter((c) => /^card\d+$/.test(c))) {
      const read = (f: string) => fs.readFileSync(`/sys/class/drm/${card}/device/${f}`, 'utf8').trim()
      return `PCI ${read('vendor')}:${read('device')}`
    }
  } catch {
    // no DRM cards
  }
  return 'unknown adapter'
}
