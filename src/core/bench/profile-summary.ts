/**
 * Where a step's time goes, from an ONNX Runtime profile (`bench --profile PREFIX`, the session
 * option `enableProfiling`). Runs are told apart by the tokens they feed (decode: one per row;
 * prefill: many), and time is summed per operator for the median run of each group.
 *
 * On the CPU provider the times are its kernels' (`Node` events named `…_kernel_time`). The
 * WebGPU provider writes those too, but there they time the CPU side of a node (preparing and
 * recording its dispatches), not the GPU; with profiling on it also reads GPU timestamps around
 * each dispatch and writes one `Api` event per kernel (`node&op&program`, its shapes in args),
 * which is what the GPU spent. So on WebGPU the operator table is GPU time per operator, with the
 * CPU time of the same nodes beside it; a profile without `Api` events says so instead of
 * showing an empty table.
 */
import fs from 'node:fs'
import path from 'node:path'

export interface ProfileEvent {
  cat: string
  name: string
  ts: number
  dur: number
  args?: {op_name?: string; provider?: string; input_type_shape?: Record<string, number[]>[]}
}

export interface OperatorTime {
  op: string
  /** Summed time of the operator's kernels in the run, ms (GPU time on WebGPU). */
  ms: number
  kernels: number
  /** Of the run's kernel time. */
  share: number
  /** WebGPU: the CPU time of the operator's nodes in the run (recording their dispatches), ms. */
  cpu_ms?: number
}

/** The median run of the runs that fed one number of tokens. */
export interface ProfileRunGroup {
  /** Tokens the run fed (batch × sequence). */
  tokens: number
  runs: number
  /** The median run's wall time (ONNX Runtime's model_run), ms. */
  run_ms: number
  /** Its kernels' summed time, ms (GPU time on WebGPU). */
  kernel_ms: number
  kernels: number
  /** Operators by time, most first (those under 0.5 % left out). */
  ops: OperatorTime[]
}

export interface ProfileSummary {
  file: string
  /** Which clock the operator times are: the CPU provider's kernels, or the WebGPU provider's GPU timestamps. */
  clock: 'cpu kernels' | 'gpu kernels' | 'cpu side of gpu nodes' | 'hand-written kernels'
  /** Events in the file by category (Session, Node, Api, …). */
  event_categories: Record<string, number>
  groups: ProfileRunGroup[]
  /** Set when the profile lacks the per-kernel events its provider should write: what it has instead. */
  note?: string
}

/** The profiles a session with `profileFilePrefix: prefix` wrote (ONNX Runtime appends `_<date>_<time>.json`; a widened decode session writes `<prefix>-decode_…`). */
export function profileFiles(prefix: string): string[] {
  const dir = path.dirname(prefix)
  const base = path.basename(prefix)
  const escaped = base.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
  const pattern = new RegExp(`^${escaped}(-decode)?_\\d{4}-\\d\\d-\\d\\d_[\\d-]+(_\\d+)?\\.json$`)
  if (!fs.existsSync(dir)) return []
  return fs.readdirSync(dir).filter((f) => pattern.test(f)).sort().map((f) => path.join(dir, f))
}

/** A profile's events, as ONNX Runtime wrote them. */
export function readProfileEvents(file: string): ProfileEvent[] {
  return JSON.parse(fs.readFileSync(file, 'utf8')) as ProfileEvent[]
}

/** A node's kernel event (`…_kernel_time`): on the CPU its kernel, on WebGPU the CPU side of its dispatches. */
const isNodeKernel = (e: ProfileEvent) => e.cat === 'Node' && e.name.endsWith('_kernel_time')

/** Each model run, in time order, with the node kernel events (in time order) that ran inside it. */
export function nodesByRun(events: readonly ProfileEvent[]): {run: ProfileEvent; nodes: ProfileEvent[]}[] {
  const byTime = (a: ProfileEvent, b: ProfileEvent) => a.ts - b.ts
  const nodes = events.filter(isNodeKernel).sort(byTime)
  return events
    .filter((e) => e.cat === 'Session' && e.name === 'model_run')
    .sort(byTime)
    .map((run) => ({run, nodes: nodes.filter((n) => n.ts >= run.ts && n.ts <= run.ts + run.dur)}))
}

/** Tokens a run fed: the embedding's ids [batch, seq] (GPU forms gather), or the rows [batch, seq, hidden] the CPU graph's embed block starts from. */
function tokensOf(node: ProfileEvent): number {
  const op = node.args?.op_name ?? ''
  const gather = op === 'Gather' || op === 'GatherBlockQuantized'
  const shape = Object.values(node.args?.input_type_shape?.[gather ? 1 : 0] ?? {})[0]
  return shape && (gather || shape.length === 3) ? shape.slice(0, 2).reduce((a, b) => a * b, 1) : 0
}

/** The operator of a WebGPU kernel event, named `node&op&program`. */
const gpuOperator = (name: string) => name.split('&')[1] ?? name

interface Run {
  dur: number
  tokens: number
  ops: Map<string, {us: number; kernels: number; cpuUs: number}>
}

export function summarizeProfile(file: string): ProfileSummary {
  const events = readProfileEvents(file)
  const categories: Record<string, number> = {}
  for (const e of events) categories[e.cat] = (categories[e.cat] ?? 0) + 1
  const sessionRuns = nodesByRun(events)
  const gpuKernels = events.filter((e) => e.cat === 'Api' && e.name.includes('&')).sort((a, b) => a.ts - b.ts)
  const onGpu = events.some((e) => isNodeKernel(e) && (e.args?.provider ?? '').startsWith('WebGpu'))
  const clock: ProfileSummary['clock'] = !onGpu ? 'cpu kernels' : gpuKernels.length > 0 ? 'gpu kernels' : 'cpu side of gpu nodes'

  const runs: Run[] = sessionRuns.map(({run, nodes}) => {
    const end = run.ts + run.dur
    const ops: Run['ops'] = new Map()
    const entry = (op: string) => {
      let e = ops.get(op)
      if (!e) ops.set(op, (e = {us: 0, kernels: 0, cpuUs: 0}))
      return e
    }
    let tokens = 0
    for (const node of nodes) {
      if (!tokens && node.name.startsWith('embed/')) tokens = tokensOf(node)
      const op = node.args?.op_name ?? '?'
      if (clock === 'gpu kernels') {
        // the CPU side of the nodes the GPU ran (shape arithmetic on the CPU provider is not the GPU's)
        if ((node.args?.provider ?? '').startsWith('WebGpu')) entry(op).cpuUs += node.dur
        continue
      }
      const e = entry(op)
      e.us += node.dur
      e.kernels++
    }
    if (clock === 'gpu kernels') {
      for (const kernel of gpuKernels) {
        if (kernel.ts < run.ts || kernel.ts > end) continue
        const e = entry(gpuOperator(kernel.name))
        e.us += kernel.dur
        e.kernels++
      }
      for (const [op, e] of ops) if (e.kernels === 0) ops.delete(op) // launched nothing (views)
    }
    return {dur: run.dur, tokens, ops}
  })

  const groups = new Map<number, Run[]>()
  for (const run of runs) groups.set(run.tokens, [...(groups.get(run.tokens) ?? []), run])
  const summary: ProfileSummary = {
    file,
    clock,
    event_categories: categories,
    groups: [...groups].sort((a, b) => a[0] - b[0]).map(([tokens, group]) => summarizeGroup(tokens, group, clock === 'gpu kernels')),
  }
  if (clock === 'cpu side of gpu nodes') {
    summary.note = `the WebGPU provider wrote no GPU kernel timings (no "Api" events; events by category: ${describeCategories(categories)}): the times are the CPU side of each node (recording its dispatches), not GPU time`
  } else if (!events.some(isNodeKernel)) {
    summary.note = `the profile has no per-kernel events (events by category: ${describeCategories(categories)})`
  }
  return summary
}

const describeCategories = (categories: Record<string, number>) => Object.entries(categories).map(([c, n]) => `${c} ${n}`).join(', ')

function summarizeGroup(tokens: number, runs: Run[], withCpu: boolean): ProfileRunGroup {
  const run = [...runs].sort((a, b) => a.dur - b.dur)[runs.length >> 1]!
  const totalUs = [...run.ops.values()].reduce((sum, o) => sum + o.us, 0)
  const kernels = [...run.ops.values()].reduce((sum, o) => sum + o.kernels, 0)
  const ops = [...run.ops]
    .sort((a, b) => b[1].us - a[1].us)
    .filter(([, o]) => totalUs > 0 && o.us / totalUs >= 0.005)
    .map(([op, o]): OperatorTime => ({op, ms: o.us / 1000, kernels: o.kernels, share: o.us / totalUs, ...(withCpu ? {cpu_ms: o.cpuUs / 1000} : {})}))
  return {tokens, runs: runs.length, run_ms: run.dur / 1000, kernel_ms: totalUs / 1000, kernels, ops}
}

/** One call of the hand-written WebGPU kernels as profiled (`WgslModel.profile`): GPU ms and dispatches by kernel, and the call's wall time. */
export interface KernelCallProfile {
  tokens: number
  wallMs: number
  ms: Map<string, number>
  dispatches: Map<string, number>
}

/**
 * The hand-written kernels' profiles (PARSCALE_WEBGPU_ROUTE=wgsl, `bench --profile`) as a summary of
 * the same shape as ONNX Runtime's: calls grouped by the tokens they fed, the median call of each
 * (by its kernels' summed time), its kernels by GPU time.
 */
export function summarizeKernelCalls(file: string, calls: readonly KernelCallProfile[]): ProfileSummary {
  const groups = [...new Set(calls.map((c) => c.tokens))].map((tokens): ProfileRunGroup => {
    const runs = calls.filter((c) => c.tokens === tokens)
    const total = (c: KernelCallProfile) => [...c.ms.values()].reduce((a, b) => a + b, 0)
    const median = [...runs].sort((a, b) => total(a) - total(b))[runs.length >> 1]!
    const kernelMs = total(median)
    const ops = [...median.ms]
      .sort((a, b) => b[1] - a[1])
      .map(([op, ms]): OperatorTime => ({op, ms, kernels: median.dispatches.get(op) ?? 0, share: kernelMs > 0 ? ms / kernelMs : 0}))
    return {tokens, runs: runs.length, run_ms: median.wallMs, kernel_ms: kernelMs, kernels: [...median.dispatches.values()].reduce((a, b) => a + b, 0), ops}
  })
  return {file, clock: 'hand-written kernels', event_categories: {}, groups}
}

/** The summary as lines of text: a heading per group and a Markdown table of its operators. */
export function describeProfile(summary: ProfileSummary): string[] {
  const clocks: Record<ProfileSummary['clock'], string> = {
    'gpu kernels': "GPU time per kernel, the WebGPU provider's timestamps",
    'cpu kernels': 'CPU kernel time',
    'cpu side of gpu nodes': 'CPU time of each node',
    'hand-written kernels': 'GPU time per kernel of the hand-written WGSL kernels, timestamps around each dispatch in a pass of its own',
  }
  const lines = [`profile ${summary.file} (${clocks[summary.clock]})`]
  if (summary.note) lines.push(`note: ${summary.note}`)
  if (summary.clock === 'hand-written kernels') {
    for (const group of summary.groups) {
      lines.push(`${group.tokens} token${group.tokens === 1 ? '' : 's'} per call: median of ${group.runs} calls, ${group.run_ms.toFixed(2)} ms per call (its own passes), ${group.kernel_ms.toFixed(2)} ms in ${group.kernels} dispatches`)
      lines.push('| kernel | GPU ms | dispatches | share |', '|---|---|---|---|')
      for (const o of group.ops) lines.push(`| ${o.op} | ${o.ms.toFixed(3)} | ${o.kernels} | ${(o.share * 100).toFixed(0)} % |`)
    }
    return lines
  }
  const gpu = summary.clock === 'gpu kernels'
  for (const group of summary.groups) {
    if (group.kernels === 0) {
      lines.push(`${group.tokens} token${group.tokens === 1 ? '' : 's'} per run: ${group.runs} runs, no kernel events in them`)
      continue
    }
    const between = group.run_ms - group.kernel_ms
    lines.push(`${group.tokens} token${group.tokens === 1 ? '' : 's'} per run: median of ${group.runs} runs, ${group.run_ms.toFixed(1)} ms per run, ${group.kernel_ms.toFixed(1)} ms in ${group.kernels} ${gpu ? 'GPU kernels' : 'kernels'}${gpu ? '' : ` (${between.toFixed(1)} ms between kernels)`}`)
    lines.push(gpu ? '| operator | GPU ms | kernels | share | CPU ms (recording) |' : '| operator | ms | kernels | share |')
    lines.push(gpu ? '|---|---|---|---|---|' : '|---|---|---|---|')
    for (const o of group.ops) {
      const cells = [o.op, o.ms.toFixed(2), String(o.kernels), `${(o.share * 100).toFixed(0)} %`, ...(gpu ? [(o.cpu_ms ?? 0).toFixed(2)] : [])]
      lines.push(`| ${cells.join(' | ')} |`)
    }
  }
  return lines
}
