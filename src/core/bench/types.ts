// Shapes of what the bench children receive and report (JSON over stdio).
import type {Device} from '../engine/device.js'
import type {ProfileSummary} from './profile-summary.js'

/** One configuration to measure, run in its own child process. */
export interface RunSpec {
  kind: 'run'
  packageDir: string
  parallel: number
  batch: number
  promptLength: number
  newTokens: number
  threads: number
  /** Default cpu. */
  device?: Device
  /** Measured repetitions of prefill + decode after one warm-up. */
  repeat: number
  /** Write an ONNX Runtime profile with this prefix. */
  profilePrefix?: string
}

/** Roofline probes: weights of about `bytes` in `layers` matmul pairs, read at 1 row and at `rows` rows. */
export interface ProbeSpec {
  kind: 'probe'
  threads: number
  device?: Device
  hidden: number
  intermediate: number
  layers: number
  rows: number
  repeat: number
}

/** One process generating a batch of requests at several P through one model (dynamic P). */
export interface MixedSpec {
  kind: 'mixed'
  packageDir: string
  /** P of each request, in submission order. */
  parallel: number[]
  batchSize: number
  promptLength: number
  newTokens: number
  threads: number
  device?: Device
}

export type WorkerSpec = RunSpec | ProbeSpec | MixedSpec

export interface MixedResult {
  peak_rss_bytes: number
  seconds: number
  generated_tokens: number
  /** Per P, the first switch to it: reading its prefixes and aggregation head and making a cache (ms). */
  switch_ms: Record<string, number>
}

export interface Summary {
  median: number
  p90: number
  samples: number
}

export interface RunResult {
  parallel: number
  batch: number
  prompt_length: number
  new_tokens: number
  threads: number
  device: Device
  load_ms: number
  prefill_ms: Summary
  /** Prefill plus picking the first token. */
  ttft_ms: Summary
  decode_ms_per_token: Summary
  /** batch · 1000 / median decode ms. */
  tokens_per_s: number
  peak_rss_bytes: number
  weight_bytes: number
  kv_cache_bytes: number
  /** What the run's cache buffers took (prefix positions and rounding included). */
  kv_cache_allocated_bytes: number
  /** Prefill FLOPs (matmuls only, 2·m·n·k) of one prefill. */
  prefill_flops: number
  /** The operators the matrices ran on, prompts and decode steps (see ParScaleModel.kernels). */
  kernels?: {prefill: string; decode: string}
  /** On webgpu: what a decode step costs by the graph's structure and by the adapter's bandwidth (gpu-dispatches.ts). */
  gpu_step?: GpuStepCost
  /** With a profile prefix: each profile the run's sessions wrote, summarized per operator (profile-summary.ts). */
  profile?: ProfileSummary[]
}

/**
 * A WebGPU decode step's launches (counted from the graphs, core/bench/dispatches.ts) and its
 * bandwidth floor (core/bench/gpu-floor.ts), for one P.
 */
export interface GpuStepCost {
  /** Nodes that launch kernels in the GPU form's graph at this P (after fusion). */
  dispatches_per_step: number
  /** Estimated kernel launches of those nodes (GroupQueryAttention counts its inner passes). */
  kernels_per_step: number
  /** The same counts for the P-generic WebGPU graph (before fusion). */
  dispatches_before_fusion: number
  kernels_before_fusion: number
  /** Bytes a decode step reads: every matrix once. */
  weight_bytes_per_step: number
  /** The bandwidth the floor divides by; null when none is known. */
  bandwidth_bytes_per_s: number | null
  /** Where that bandwidth comes from (a vendor's figure for the adapter, or the roofline probe measured on it), or why there is none. */
  bandwidth_source: string
  /** weight_bytes_per_step ÷ bandwidth, ms/token; null without a bandwidth. */
  floor_ms_per_token: number | null
}

export interface ProbeResult {
  /** Bytes of weights one pass reads. */
  bytes: number
  /** GEMV chain: weight bytes ÷ time at one row. */
  gemv_bytes_per_s: number
  /** GEMM chain at `rows` rows: 2·rows·k·n per matmul ÷ time. */
  matmul_flops_per_s: number
  /** ReduceSum over one large buffer (0 on a GPU: its input would be uploaded first). */
  reduce_bytes_per_s: number
}

export interface MachineInfo {
  cpu_model: string
  cores: number
  memory_bytes: number
  threads: number
  /** Where the model ran, and the GPU adapter for webgpu. */
  device: Device
  adapter?: string
  onnxruntime_version: string
  node_version: string
  platform: string
}
