// `node dist/bench/profile-summary.js PROFILE.json [...]`: where a step's time goes, from an
// ONNX Runtime profile written by `parscale bench --profile PREFIX`. Runs are told apart by
// the tokens they feed (decode: one per row; prefill: many), and kernel time is summed per
// operator for the median decode step and the median prefill.
import fs from 'node:fs'

interface ProfileEvent {
  cat: string
  name: string
  ts: number
  dur: number
  args?: {op_name?: string; input_type_shape?: Record<string, number[]>[]}
}

interface Run {
  dur: number
  tokens: number
  ops: Map<string, {us: number; kernels: number}>
}

function runsOf(events: ProfileEvent[]): Run[] {
  const sessionRuns = events.filter((e) => e.cat === 'Session' && e.name === 'model_run').sort((a, b) => a.ts - b.ts)
  const nodes = events.filter((e) => e.cat === 'Node' && e.name.endsWith('_kernel_time')).sort((a, b) => a.ts - b.ts)
  const runs: Run[] = []
  let i = 0
  for (const run of sessionRuns) {
    const ops = new Map<string, {us: number; kernels: number}>()
    let tokens = 0
    for (; i < nodes.length && nodes[i]!.ts <= run.ts + run.dur; i++) {
      const node = nodes[i]!
      if (node.ts < run.ts) continue
      const op = node.args?.op_name ?? '?'
      const entry = ops.get(op) ?? {us: 0, kernels: 0}
      entry.us += node.dur
      entry.kernels++
      ops.set(op, entry)
      // tokens of the run: the embedding's indices [batch, seq] (graphs before v8, the WebGPU
      // form), or the fed rows [batch, seq, hidden] the CPU graph's embed block starts from
      if (!tokens && node.name.startsWith('embed/')) {
        const gather = op === 'Gather' || op === 'GatherBlockQuantized'
        const shape = Object.values(node.args?.input_type_shape?.[gather ? 1 : 0] ?? {})[0]
        if (shape && (gather || shape.length === 3)) tokens = shape.slice(0, 2).reduce((a, b) => a * b, 1)
      }
    }
    runs.push({dur: run.dur, tokens, ops})
  }
  return runs
}

function median<T>(items: T[], key: (t: T) => number): T | undefined {
  const sorted = [...items].sort((a, b) => key(a) - key(b))
  return sorted[sorted.length >> 1]
}

function report(label: string, runs: Run[]): void {
  const run = median(runs, (r) => r.dur)
  if (!run) return
  const total = [...run.ops.values()].reduce((sum, o) => sum + o.us, 0)
  const kernels = [...run.ops.values()].reduce((sum, o) => sum + o.kernels, 0)
  console.log(`${label}: median of ${runs.length} runs, ${(run.dur / 1000).toFixed(1)} ms per run, ${(total / 1000).toFixed(1)} ms in ${kernels} kernels (${((run.dur - total) / 1000).toFixed(1)} ms between kernels)`)
  console.log('| operator | ms | kernels | share |')
  console.log('|---|---|---|---|')
  for (const [op, o] of [...run.ops].sort((a, b) => b[1].us - a[1].us)) {
    if (o.us / total < 0.005) continue
    console.log(`| ${op} | ${(o.us / 1000).toFixed(2)} | ${o.kernels} | ${((o.us / total) * 100).toFixed(0)} % |`)
  }
}

for (const file of process.argv.slice(2)) {
  const runs = runsOf(JSON.parse(fs.readFileSync(file, 'utf8')) as ProfileEvent[])
  console.log(`\n${file}`)
  const steps = new Map<number, Run[]>()
  for (const run of runs) steps.set(run.tokens, [...(steps.get(run.tokens) ?? []), run])
  for (const [tokens, group] of [...steps].sort((a, b) => a[0] - b[0])) report(`${tokens} token${tokens === 1 ? '' : 's'} per run`, group)
}
