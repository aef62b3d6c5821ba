/** The few parts of the WebGPU API the hand-written decode step uses (the specification's names). */

export interface GpuBuffer {
  readonly size: number
  destroy(): void
  mapAsync(mode: number): Promise<void>
  getMappedRange(offset?: number, size?: number): ArrayBuffer
  unmap(): void
}
export interface GpuBindGroup {
  readonly label?: string
}
export interface GpuBindGroupLayout {
  readonly label?: string
}
export interface GpuComputePipeline {
  getBindGroupLayout(index: number): GpuBindGroupLayout
}
export interface GpuComputePass {
  setPipeline(pipeline: GpuComputePipeline): void
  setBindGroup(index: number, group: GpuBindGroup): void
  dispatchWorkgroups(x: number, y?: number, z?: number): void
  end(): void
}
export interface GpuQuerySet {
  destroy(): void
}
export interface GpuCommandEncoder {
  beginComputePass(descriptor?: {timestampWrites?: {querySet: GpuQuerySet; beginningOfPassWriteIndex?: number; endOfPassWriteIndex?: number}}): GpuComputePass
  copyBufferToBuffer(source: GpuBuffer, sourceOffset: number, destination: GpuBuffer, destinationOffset: number, size: number): void
  resolveQuerySet(querySet: GpuQuerySet, firstQuery: number, queryCount: number, destination: GpuBuffer, destinationOffset: number): void
  finish(): unknown
}
export interface GpuQueue {
  writeBuffer(buffer: GpuBuffer, offset: number, data: ArrayBufferView, dataOffset?: number, size?: number): void
  submit(commands: unknown[]): void
  onSubmittedWorkDone(): Promise<void>
}
export interface GpuShaderModule {
  getCompilationInfo(): Promise<{messages: readonly {type: string; message: string; lineNum: number}[]}>
}
export interface GpuDevice {
  readonly queue: GpuQueue
  readonly limits: Readonly<Record<string, number>>
  createBuffer(descriptor: {size: number; usage: number; label?: string}): GpuBuffer
  createShaderModule(descriptor: {code: string; label?: string}): GpuShaderModule
  createComputePipeline(descriptor: {layout: 'auto'; compute: {module: GpuShaderModule; entryPoint: string}; label?: string}): GpuComputePipeline
  createComputePipelineAsync(descriptor: {layout: 'auto'; compute: {module: GpuShaderModule; entryPoint: string}; label?: string}): Promise<GpuComputePipeline>
  createBindGroup(descriptor: {layout: GpuBindGroupLayout; entries: {binding: number; resource: {buffer: GpuBuffer; offset?: number; size?: number}}[]}): GpuBindGroup
  createCommandEncoder(): GpuCommandEncoder
  createQuerySet(descriptor: {type: 'timestamp'; count: number}): GpuQuerySet
  readonly features: ReadonlySet<string>
  pushErrorScope(filter: 'validation' | 'out-of-memory' | 'internal'): void
  popErrorScope(): Promise<{message: string} | null>
  destroy(): void
  onuncapturederror: ((event: {error: {message: string}}) => void) | null
}
export interface GpuAdapter {
  readonly info?: {vendor?: string; architecture?: string; device?: string; description?: string; subgroupMinSize?: number; subgroupMaxSize?: number}
  readonly features: ReadonlySet<string>
  readonly limits: Readonly<Record<string, number>>
  requestDevice(descriptor?: {requiredFeatures?: string[]; requiredLimits?: Record<string, number>}): Promise<GpuDevice>
}
export interface Gpu {
  requestAdapter(options?: {powerPreference?: string}): Promise<GpuAdapter | null>
}

// GPUBufferUsage and GPUMapMode bits (the specification's values)
export const MAP_READ = 0x1
export const COPY_SRC = 0x4
export const COPY_DST = 0x8
export const UNIFORM = 0x40
export const QUERY_RESOLVE = 0x200
export const STORAGE = 0x80
export const MAP_MODE_READ = 0x1
