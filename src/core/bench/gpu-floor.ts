/**
 * The decode floor on a GPU: a memory-bound step reads every weight once, so weight bytes ÷ the
 * adapter's memory bandwidth is the fastest a step can be. ONNX Runtime does not tell the
 * adapter's bandwidth, so it comes from this table of vendors' figures, matched on the name the
 * system gives the GPU (engine/device.ts adapterName); an unknown adapter has no floor.
 */
export const GPU_BANDWIDTH: readonly {match: RegExp; name: string; bytesPerS: number}[] = [
  {match: /H200/i, name: 'NVIDIA H200 (HBM3e)', bytesPerS: 4.8e12},
  {match: /H100.*(SXM|HBM3)/i, name: 'NVIDIA H100 SXM', bytesPerS: 3.35e12},
  {match: /H100/i, name: 'NVIDIA H100 PCIe', bytesPerS: 2.0e12},
  {match: /A100.*80/i, name: 'NVIDIA A100 80GB', bytesPerS: 2.0e12},
  {match: /A100/i, name: 'NVIDIA A100 40GB', bytesPerS: 1.555e12},
  {match: /L40S/i, name: 'NVIDIA L40S', bytesPerS: 0.864e12},
  {match: /\bL4\b/i, name: 'NVIDIA L4', bytesPerS: 0.3e12},
  {match: /RTX 4090/i, name: 'NVIDIA RTX 4090', bytesPerS: 1.008e12},
  {match: /RTX 3090/i, name: 'NVIDIA RTX 3090', bytesPerS: 0.936e12},
]

export interface GpuFloor {
  adapter: string
  /** The table's entry, or undefined for an adapter it does not know. */
  bandwidth?: {name: string; bytesPerS: number}
  /** Bytes a decode step reads: every matrix once (not the embedding table, read one row a token, unless the head is tied to it). */
  weightBytes: number
  /** weightBytes ÷ bandwidth, ms; undefined without a bandwidth. */
  floorMs?: number
}

export function gpuFloor(adapter: string, weightBytes: number): GpuFloor {
  const entry = GPU_BANDWIDTH.find((e) => e.match.test(adapter))
  return {
    adapter,
    weightBytes,
    ...(entry ? {bandwidth: {name: entry.name, bytesPerS: entry.bytesPerS}, floorMs: (weightBytes / entry.bytesPerS) * 1000} : {}),
  }
}
