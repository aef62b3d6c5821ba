/**
 * WebGPU under Node through Dawn's `webgpu` package (dawn.node), for the hand-written decode step.
 * Not a dependency of parscale (22 MB, one platform's binary, for an experimental route): it is
 * resolved from `PARSCALE_DAWN` (a node_modules folder, or a folder above one) when set, else
 * beside parscale, the working directory and NODE_PATH, and imported at run time only.
 */
import {createRequire} from 'node:module'
import {delimiter, dirname, join} from 'node:path'
import {fileURLToPath, pathToFileURL} from 'node:url'

import type {Gpu, GpuAdapter, GpuDevice} from './webgpu-types.js'

interface DawnModule {
  create(flags: string[]): Gpu
  globals: Record<string, unknown>
}

/**
 * Folders (node_modules or a folder above one) a run-time-only package is resolved from, first
 * match wins: `chosen` alone when set (an environment variable), else parscale's own
 * node_modules, the working directory, and NODE_PATH's entries. The capture route's packages are
 * looked for the same way.
 */
export function runtimeSearchRoots(chosen: string | undefined): string[] {
  if (chosen) return [chosen]
  const roots = [dirname(fileURLToPath(import.meta.url)), process.cwd()]
  for (const entry of (process.env.NODE_PATH ?? '').split(delimiter)) if (entry) roots.push(entry)
  return roots
}

function resolveDawn(): string | undefined {
  for (const root of runtimeSearchRoots(process.env.PARSCALE_DAWN ?? process.env.PARSCALE_ORTWEB)) {
    for (const base of [root, join(root, 'node_modules')]) {
      try {
        return createRequire(join(base, 'x.js')).resolve('webgpu')
      } catch {
        // not here
      }
    }
  }
  return undefined
}

export interface WgslDevice {
  /** Held for the process: when Dawn's instance object is collected, its pending events crash the process. */
  gpu: Gpu
  device: GpuDevice
  adapter: GpuAdapter
  /** Vendor, architecture and description, for reports. */
  name: string
  /** The adapter's largest subgroup (128, the most WebGPU allows, where it does not say). */
  subgroupMax: number
  /** The adapter's subgroup width where all its subgroups have one (NVIDIA 32, lavapipe 8). */
  subgroupWidth: number | undefined
}

let opened: Promise<WgslDevice | string> | undefined

/**
 * Dawn's toggles for this process (`create` flags; names from Dawn's Toggles.cpp). By default the
 * kernels run as a native program would: no validation of each command (ONNX Runtime GenAI turns
 * it off too), no bounds clamps added to every array access (every index the kernels form is
 * bounded by their own shapes and checked on lavapipe), no zeroing of workgroup memory they
 * write before reading, and timestamps at the GPU's resolution (quantized to 65.5 µs otherwise,
 * which made single kernels of the profile read 0 or 0.066 ms). `PARSCALE_DAWN_FLAGS`
 * (space-separated `create` flags; empty for Dawn's defaults) replaces the list.
 */
export function dawnFlags(env: NodeJS.ProcessEnv = process.env): string[] {
  const chosen = env.PARSCALE_DAWN_FLAGS
  if (chosen !== undefined) return chosen.split(/\s+/).filter(Boolean)
  return ['enable-dawn-features=skip_validation,disable_robustness,disable_workgroup_init', 'disable-dawn-features=timestamp_quantization']
}

/** One device per process with subgroups and the adapter's largest limits, or one line saying why not. */
export function openWgslDevice(): Promise<WgslDevice | string> {
  opened ??= open().catch((error: unknown) => `Dawn's WebGPU did not start (${String((error as Error)?.message ?? error).split('\n')[0]})`)
  return opened
}

async function open(): Promise<WgslDevice | string> {
  const entry = resolveDawn()
  if (!entry) return `Dawn's webgpu package is not installed (npm i webgpu@0.6.2 in a folder and set PARSCALE_DAWN to its node_modules)`
  const loaded = (await import(pathToFileURL(entry).href)) as DawnModule | {default: DawnModule}
  const dawn = 'create' in loaded ? loaded : loaded.default
  const gpu = dawn.create(dawnFlags())
  const adapter = await gpu.requestAdapter({powerPreference: 'high-performance'})
  if (!adapter) return 'Dawn found no WebGPU adapter'
  if (!adapter.features.has('subgroups')) return 'the WebGPU adapter has no subgroups feature, which the hand-written kernels need'
  const l = adapter.limits
  const device = await adapter.requestDevice({
    // timestamps where the adapter has them: the per-kernel profile (WgslModel.profile) needs them, nothing else
    requiredFeatures: adapter.features.has('timestamp-query') ? ['subgroups', 'timestamp-query'] : ['subgroups'],
    requiredLimits: {
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxBufferSize: l.maxBufferSize,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
    },
  })
  const info = adapter.info ?? {}
  const name = [info.vendor, info.architecture, info.description || info.device].filter(Boolean).join(' ') || 'unknown adapter'
  const subgroupWidth = info.subgroupMinSize !== undefined && info.subgroupMinSize === info.subgroupMaxSize ? info.subgroupMinSize : undefined
  return {gpu, device, adapter, name, subgroupMax: info.subgroupMaxSize ?? 128, subgroupWidth}
}
