import fs from 'node:fs'
import os from 'node:os'
import {createRequire} from 'node:module'

import type {Device} from '../engine/device.js'
import type {MachineInfo} from './types.js'

function ortVersion(): string {
  try {
    const require = createRequire(import.meta.url)
    return (require('onnxruntime-node/package.json') as {version: string}).version
  } catch {
    return 'unknown'
  }
}

/** CPU model, cores and versions, for the report header and --json. */
export function machineInfo(threads: number, device: Device = 'cpu', adapter?: string): MachineInfo {
  let cpu = os.cpus()[0]?.model?.trim() ?? ''
  if (!cpu) {
    try {
      cpu = /model name\s*:\s*(.*)/.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? 'unknown'
    } catch {
      cpu = 'unknown'
    }
  }
  return {
    cpu_model: cpu,
    cores: os.availableParallelism(),
    memory_bytes: os.totalmem(),
    threads,
    device,
    ...(adapter ? {adapter} : {}),
    onnxruntime_version: ortVersion(),
    node_version: process.version,
    platform: `${process.platform}-${process.arch}`,
  }
}
