/**
 * WGSL sources of the hand-written decode step (issue 23): a ParScale Qwen2 layer in five
 * dispatches instead of ONNX Runtime's ~15, because on NVIDIA through Vulkan a step costs about
 * what its dependent dispatches cost (docs/benchmarks.md, "Fourth GPU session").
 *
 * Every kernel is generated for one model shape (sizes are WGSL constants, so loops over streams
 * and rows unroll). Activations are float32; matrices are row-major [out, in] as in the
 * checkpoint, stored in any `WeightFormat` and read into float32 by one `weight(j)`.
 *
 * The matrix-vector kernel is the decode step's workhorse: a tile of R output rows for all P
 * streams, whose invocations split the input dimension, so each weight element is read once for
 * all streams (P = 8 costs P = 1's bytes) and the whole input row passes through every tile,
 * which makes the RMS norm of the input free (sum of squares in the same loop). Prompt calls use
 * the matrix-matrix kernel (`gemmKernel`), whose tiles reuse each weight for 64 rows.
 */
import {UserError} from '../errors.js'

export const WORKGROUP = 256

/**
 * The call's place, written by the host before each call (one uniform for every kernel): the first
 * new token's position, its cache slot (prefix + position), the cache length its attention sees
 * (slot + 1), the first row of the last token (its P streams go to the head), and how many tokens
 * the call holds (rows past them are left alone).
 */
const STEP_STRUCT = `struct Step { pos: u32, slot: u32, length: u32, last: u32, tokens: u32, pad0: u32, pad1: u32, pad2: u32 }`
export const STEP_WORDS = 8

export interface MatvecSpec {
  /** Input width (a multiple of 4). */
  k: number
  /** Output rows of the matrix. */
  n: number
  /** Input rows that share the weights (the streams); the output has as many. */
  streams: number
  /** Output rows per workgroup. */
  rows: number
  /** RMS-normalize each input row with a weight vector (binding 4) and this epsilon. */
  normEps?: number
  /** Add a bias (binding 5). */
  bias?: boolean
  /**
   * WGSL expression of the matrix row for local row `r` of workgroup tile `t` (both u32); the
   * default is `t * R + r`.
   */
  rowOf?: string
  /**
   * WGSL statements run by invocation `li` < R·streams after the reduction, with `r`, `s`
   * (stream), `row`, `v` (the dot product, normalized and biased) in scope; default writes
   * `Y[s * N + row] = v`.
   */
  epilogue?: string
  /** Statements that need all R·streams results at once (`fin(r, s)`); replaces `epilogue`. */
  tileEpilogue?: string
  /** Extra bindings (declarations from binding 6 on). */
  extra?: string
  /** Invocations a tile of R rows gets (`matvecTeam`); the default, the whole workgroup. */
  team?: number
  /** How the matrix is stored (default float32). */
  weights?: WeightFormat
  /** The adapter's subgroup width where it has only one (the row tiles' butterfly sums, `subgroupReduction`). */
  subgroup?: number
  /**
   * Rows owned by invocations, the input split into this many slices (`matvecColumnsKernel`;
   * the matrix interleaved over its rows); absent, tiles of rows shared by a team.
   */
  slices?: number
  /**
   * The input rows copied into workgroup memory a workgroup at a time before its tiles read them
   * (`stagedChunk`); absent, every tile reads them from the buffer.
   */
  stage?: InputStage
}

/** How a row kernel's input is staged: float32 or half pairs, `groups` groups of four inputs of every stream a chunk (K/4: all at once). */
export interface InputStage {
  kind: 'f32' | 'f16'
  groups: number
}

/**
 * How a matrix lies on the GPU: float32; half pairs packed in u32 words; or the packages' block
 * quantization (symmetric codes of 4 or 8 bits, zero point 2^(bits−1), one float32 scale per
 * `block` inputs of a row; 4-bit codes two a byte, the lower input in the low nibble: the bytes of
 * MatMulNBits and GatherBlockQuantized, blockwise.ts).
 */
export type WeightFormat = ({kind: 'f32'} | {kind: 'f16'} | {kind: 'q4' | 'q8'; block: number}) & {
  /**
   * Rows of a matrix stored column-interleaved (`interleaveRows`): group i of every row, then
   * group i + 1, … (a q4 word, two groups, is the unit), so invocations that own consecutive rows
   * read consecutive words. Absent: row-major, as in the checkpoint.
   */
  columns?: number
}

/**
 * The weight matrix's binding (0; the scales of a quantized one at 9) and its reader `weight(j)`:
 * the j-th group of four elements of the row-major matrix as float32. Half pairs are read with
 * `unpack2x16float` (core WGSL, no shader-f16 feature); codes are shifted out of u32 words and
 * scaled by their block's scale (rows are whole blocks, so group j's block is 4j / block).
 * Products and sums stay float32 in every format.
 */
function weightBinding(format: WeightFormat = {kind: 'f32'}, k?: number): string {
  return `${weightReader(format)}\n${k === undefined ? '' : weightAtReader(format, k)}`
}

/**
 * A product's bindings: its matrix (0, scales 9; `weightAt` where `k` is given), the input rows X
 * (1), the output Y (2), the step (3), the norm's weights G (4) and the bias B (5) where asked for.
 */
function productBindings(spec: {weights?: WeightFormat; normEps?: number; bias?: boolean}, k?: number): string {
  return `${weightBinding(spec.weights, k)}
@group(0) @binding(1) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> step: Step;
${spec.normEps !== undefined ? '@group(0) @binding(4) var<storage, read> G: array<vec4<f32>>;' : ''}
${spec.bias ? '@group(0) @binding(5) var<storage, read> B: array<f32>;' : ''}`
}

/**
 * `weightAt(row, i)`: group i of a row of a matrix `k` inputs wide, in either layout. Row-major
 * reads through `weight(j)`; the interleaved layout finds the group's unit by column first.
 */
function weightAtReader(format: WeightFormat, k: number): string {
  const n = format.columns
  if (n === undefined) return `fn weightAt(row: u32, i: u32) -> vec4<f32> { return weight(row * ${k / 4}u + i); }`
  switch (format.kind) {
    case 'f32':
    case 'f16':
      return `fn weightAt(row: u32, i: u32) -> vec4<f32> { return weight(i * ${n}u + row); }`
    case 'q8':
      return `fn weightAt(row: u32, i: u32) -> vec4<f32> { return codes(W[i * ${n}u + row], SC[row * ${k / format.block}u + (i * 4u) / ${format.block}u]); }`
    case 'q4':
      return `fn weightAt(row: u32, i: u32) -> vec4<f32> { return codes(W[(i >> 1u) * ${n}u + row] >> ((i & 1u) * 16u), SC[row * ${k / format.block}u + (i * 4u) / ${format.block}u]); }`
  }
}

/**
 * A row-major matrix's words ([rows][units], `unitWords` u32 words a unit: a group of four
 * inputs, or a q4 word of two) reordered column-interleaved ([units][rows]), as `weightAt` reads
 * `WeightFormat.columns` matrices.
 */
export function interleaveRows(data: Float32Array | Uint16Array | Uint8Array, rows: number, unitWords: number): Uint32Array {
  const aligned = data.byteOffset % 4 === 0 ? data : data.slice()
  const words = new Uint32Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 4)
  const rowWords = words.length / rows
  if (!Number.isInteger(rowWords) || rowWords % unitWords !== 0) throw new Error(`a matrix of ${words.length} words does not split into ${rows} rows of ${unitWords}-word units`)
  const units = rowWords / unitWords
  const out = new Uint32Array(words.length)
  for (let r = 0; r < rows; r++) {
    for (let u = 0; u < units; u++) {
      const from = (r * units + u) * unitWords
      const to = (u * rows + r) * unitWords
      for (let w = 0; w < unitWords; w++) out[to + w] = words[from + w]!
    }
  }
  return out
}

/** u32 words in a unit of the interleaved layout: a group of four inputs, or a q4 word (two groups). */
export function interleaveUnitWords(kind: WeightFormat['kind']): number {
  return kind === 'f32' ? 4 : kind === 'f16' ? 2 : 1
}

function weightReader(format: WeightFormat): string {
  switch (format.kind) {
    case 'f32':
      return `@group(0) @binding(0) var<storage, read> W: array<vec4<f32>>;
fn weight(j: u32) -> vec4<f32> { return W[j]; }`
    case 'f16':
      return `@group(0) @binding(0) var<storage, read> W: array<vec2<u32>>;
fn weight(j: u32) -> vec4<f32> { let h = W[j]; return vec4<f32>(unpack2x16float(h.x), unpack2x16float(h.y)); }`
    case 'q4':
      return `@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(9) var<storage, read> SC: array<f32>;
// four codes from the low 16 bits of w, times their block's scale
fn codes(w: u32, scale: f32) -> vec4<f32> {
  let q = vec4<u32>(w, w >> 4u, w >> 8u, w >> 12u) & vec4<u32>(15u);
  return (vec4<f32>(q) - 8.0) * scale;
}
fn weight(j: u32) -> vec4<f32> { return codes(W[j >> 1u] >> ((j & 1u) * 16u), SC[(j * 4u) / ${format.block}u]); }`
    case 'q8':
      return `@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(9) var<storage, read> SC: array<f32>;
// the four codes of w, times their block's scale
fn codes(w: u32, scale: f32) -> vec4<f32> {
  let q = vec4<u32>(w, w >> 8u, w >> 16u, w >> 24u) & vec4<u32>(255u);
  return (vec4<f32>(q) - 128.0) * scale;
}
fn weight(j: u32) -> vec4<f32> { return codes(W[j], SC[(j * 4u) / ${format.block}u]); }`
  }
}

/**
 * The matrix-vector kernel's inner loop, tunable for GPU sweeps (bench/gpu-machine/device.sh
 * `wgslsweep`): `PARSCALE_WGSL_LOOP` `streams` (every stream row of the input held while the
 * tile's weights pass, R + S vectors live) or `weights` (the tile's weights held and the stream
 * rows taken one at a time, R + 1 vectors live: fewer registers where S is large; the default,
 * q·k·v at P = 8 0.63 ms a step against 0.73 on an H100, equal at P = 1), and
 * `PARSCALE_WGSL_UNROLL` U (`weights` only): the weights of U steps along the input loaded
 * before any is used, so U loads are in flight where one was (a step's latency is paid K / (team·U)
 * times, not K / team).
 */
export function matvecLoop(env: NodeJS.ProcessEnv = process.env): {order: 'streams' | 'weights'; unroll: number} {
  const order = env.PARSCALE_WGSL_LOOP ?? 'weights'
  if (order !== 'streams' && order !== 'weights') throw new UserError(`PARSCALE_WGSL_LOOP must be streams or weights, not "${order}"`)
  const unroll = tuningKnob('PARSCALE_WGSL_UNROLL', [1, 2, 4, 8], 1, env)
  if (unroll > 1 && order !== 'weights') throw new UserError('PARSCALE_WGSL_UNROLL needs PARSCALE_WGSL_LOOP=weights')
  return {order, unroll}
}

/** Every `PARSCALE_WGSL_*` tuning variable of the hand-written kernels, less the prefix (bench/wgsl-sweep.ts sets them per variant). */
export const TUNING_KNOBS = ['LOOP', 'UNROLL', 'TEAM_MIN', 'TEAM_RULE', 'MLP_ROWS', 'OUT_ROWS', 'MATVEC', 'COLUMN_THREADS', 'COLUMN_UNROLL', 'COLUMN_SPAN', 'COLUMN_ROWS', 'REDUCE', 'QKV_PAIRS', 'ATTENTION_UNROLL', 'STAGE', 'STAGE_KB'] as const

/**
 * A numeric tuning variable (`PARSCALE_WGSL_*`, for GPU sweeps): its value if it is one of
 * `allowed`, `fallback` where unset; anything else is one line naming the variable.
 */
export function tuningKnob(name: string, allowed: readonly number[], fallback: number, env: NodeJS.ProcessEnv = process.env): number {
  const raw = env[name]
  if (raw === undefined) return fallback
  const value = Number(raw)
  if (!allowed.includes(value)) throw new UserError(`${name} must be ${allowed.slice(0, -1).join(', ')} or ${allowed.at(-1)}, not "${raw}"`)
  return value
}

/**
 * Gate (and as many up) rows a gate·up row tile takes (`PARSCALE_WGSL_MLP_ROWS`, 1, 2 or 4).
 * A tile reads every stream's input row once for all its rows, so more rows a tile divide the
 * input bytes read per weight byte; the default is 2 where there are several streams, 1 for one.
 * Measured on an H100 (docs/benchmarks.md, session 44): gate·up at P = 8 0.564 ms a step with 2
 * against 0.598 with 1 (f16), 0.584 against 0.598 (q4); at P = 1 2 loses (q4 0.428 against 0.370).
 * The tiles must cover the intermediate rows exactly, so an odd size keeps 1.
 */
export function mlpTileRows(streams: number, intermediate: number, env: NodeJS.ProcessEnv = process.env): number {
  const rows = tuningKnob('PARSCALE_WGSL_MLP_ROWS', [1, 2, 4], streams > 1 && intermediate % 2 === 0 ? 2 : 1, env)
  if (intermediate % rows !== 0) throw new UserError(`PARSCALE_WGSL_MLP_ROWS must divide the intermediate size ${intermediate}, not "${rows}"`)
  return rows
}

/**
 * Rows a residual product's tile takes (o_proj, down; `PARSCALE_WGSL_OUT_ROWS`, 1, 2, 4 or 8; a
 * last tile past the hidden size writes only its rows). Default 4: on an H100 (session 44) down at
 * P = 8 took 0.366 ms a step against 0.425 with 2 (f16) and 0.367 against 0.517 (q4), equal at P = 1.
 */
export function residualTileRows(env: NodeJS.ProcessEnv = process.env): number {
  return tuningKnob('PARSCALE_WGSL_OUT_ROWS', [1, 2, 4, 8], 4, env)
}

/** A layer's products, as the columns layout can be chosen for each. */
export const LAYER_PRODUCTS = ['qkv', 'o_proj', 'gate_up', 'down'] as const
export type LayerProduct = (typeof LAYER_PRODUCTS)[number]

/**
 * The layer products whose decode step runs the columns kernel (`PARSCALE_WGSL_MATVEC`): `rows`
 * (none: tiles of rows shared by a team of invocations, `matvecKernel`, row-major matrices; the
 * default at every P), `columns` (all: rows owned by invocations over slices of the input,
 * `matvecColumnsKernel`, the matrices interleaved), or a comma list of products (`gate_up,o_proj`).
 * Why rows: once a row tile's sums went through the butterfly (`subgroupReduction`), the row tiles
 * beat the columns kernel at P = 8 too (H100, f16, docs/benchmarks.md, session 42: o_proj 0.27
 * against 0.37 ms a step, gate·up 0.60 against 0.66); at P = 1 they were already faster in every
 * product (session 41).
 */
export function matvecColumns(env: NodeJS.ProcessEnv = process.env): Set<LayerProduct> {
  const chosen = env.PARSCALE_WGSL_MATVEC ?? 'rows'
  if (chosen === 'rows') return new Set()
  if (chosen === 'columns') return new Set(LAYER_PRODUCTS)
  const products = chosen.split(',')
  const unknown = products.find((p) => !(LAYER_PRODUCTS as readonly string[]).includes(p))
  if (unknown !== undefined) throw new UserError(`PARSCALE_WGSL_MATVEC must be rows, columns or a comma list of ${LAYER_PRODUCTS.join(', ')}, not "${chosen}"`)
  return new Set(products as LayerProduct[])
}

/** The smallest team a matrix-vector tile gets (`PARSCALE_WGSL_TEAM_MIN`, 32–256; default: a subgroup). */
function teamFloor(subgroupMax: number, env: NodeJS.ProcessEnv = process.env): number {
  const team = tuningKnob('PARSCALE_WGSL_TEAM_MIN', [32, 64, 128, 256], Math.min(WORKGROUP, Math.max(32, subgroupMax)), env)
  if (team < Math.min(WORKGROUP, subgroupMax)) throw new UserError(`PARSCALE_WGSL_TEAM_MIN must be at least the adapter's subgroup (${subgroupMax}), not "${team}"`)
  return team
}

/**
 * The input loop of a tile over groups `from` … `to` (WGSL expressions; a staged chunk, or the whole
 * row): every invocation `tl` of the team takes groups i = from + tl, from + tl + TEAM, …,
 * accumulating the R·S dot products and the streams' sums of squares in `acc`. A chunk short of the
 * row's end is a whole number of the loop's steps, so only the row's last chunk is ragged.
 */
function matvecInputLoop(S: number, R: number, team: number, k4: number, norm: boolean, from = '0u', to = 'K4'): string {
  const {order, unroll: U} = matvecLoop()
  if (order === 'streams') {
    return `for (var i = ${from} + tl; i < ${to}; i += TEAM) {
    ${norm ? 'let g = G[i];' : ''}
    var xs: array<vec4<f32>, ${S}>;
    for (var s = 0u; s < S; s++) {
      let x = xin(s, i);
      ${norm ? 'acc[R * S + s] += dot(x, x);' : ''}
      xs[s] = x${norm ? ' * g' : ''};
    }
    for (var r = 0u; r < R; r++) {
      let w = weight(base[r] + i);
      for (var s = 0u; s < S; s++) { acc[r * S + s] += dot(w, xs[s]); }
    }
  }`
  }
  // a step past the input's end (when U·TEAM does not divide it) reads its last group and counts nothing
  const ragged = k4 % (team * U) !== 0
  const at = (u: number) => (ragged ? `min(i0 + ${u}u * TEAM, K4 - 1u)` : `i0 + ${u}u * TEAM`)
  const steps = Array.from({length: U}, (_, u) => u)
  return `for (var i0 = ${from} + tl; i0 < ${to}; i0 += TEAM * ${U}u) {
    ${steps.map((u) => `let i${u} = ${at(u)};${ragged ? ` let ok${u} = i0 + ${u}u * TEAM < K4;` : ''}${norm ? ` let g${u} = G[i${u}];` : ''}`).join('\n    ')}
    var w: array<vec4<f32>, ${R * U}>;
    ${steps.map((u) => `for (var r = 0u; r < R; r++) { w[${u * R}u + r] = weight(base[r] + i${u}); }`).join('\n    ')}
    for (var s = 0u; s < S; s++) {
      ${steps
        .map(
          (u) => `{
        let x = ${ragged ? `select(vec4<f32>(0.0), xin(s, i${u}), ok${u})` : `xin(s, i${u})`};
        ${norm ? 'acc[R * S + s] += dot(x, x);' : ''}
        let xg = x${norm ? ` * g${u}` : ''};
        for (var r = 0u; r < R; r++) { acc[r * S + s] += dot(w[${u * R}u + r], xg); }
      }`,
        )
        .join('\n      ')}
    }
  }`
}

/**
 * Invocations that share one tile of rows, between a subgroup (`subgroupMax`, so a subgroup never
 * straddles two tiles and the tile's sums are subgroup sums) and the workgroup. The default rule
 * (`PARSCALE_WGSL_TEAM_RULE=tiles`) sizes the team by the product's tiles, about 2^16 invocations
 * in all: a product of few tiles (q·k·v: 288 at 0.5b, o_proj and down: 448) gets 128 invocations a
 * tile to keep the GPU busy, one of many (gate·up: 4864, the head: 37984) a subgroup, whose tiles
 * then cost the fewest sums. Measured on an H100 (docs/benchmarks.md, the sweep of session 40):
 * q·k·v at P = 8 0.51 ms a step with 128 against 0.73 with 32, gate·up 0.98 with 32 against 1.60
 * with 128. The older rule (`width`): enough that each invocation runs at least four groups of
 * the input.
 */
export function matvecTeam(k: number, tiles: number, subgroupMax: number, env: NodeJS.ProcessEnv = process.env): number {
  const rule = env.PARSCALE_WGSL_TEAM_RULE ?? 'tiles'
  if (rule !== 'tiles' && rule !== 'width') throw new UserError(`PARSCALE_WGSL_TEAM_RULE must be tiles or width, not "${rule}"`)
  let team = teamFloor(subgroupMax, env)
  if (rule === 'width') {
    while (team * 2 <= WORKGROUP && k / 4 / (team * 2) >= 4) team *= 2
  } else {
    while (team * 2 <= WORKGROUP && tiles * team * 2 <= 1 << 16) team *= 2
  }
  return team
}

/** Workgroups a kernel of `spec` dispatches: N / R tiles, WORKGROUP / team of them a workgroup. */
export function matvecTiles(spec: Pick<MatvecSpec, 'n' | 'rows' | 'team' | 'slices'>): number {
  if (spec.slices !== undefined) return Math.ceil(Math.ceil(spec.n / spec.rows) / (WORKGROUP / spec.slices))
  return Math.ceil(Math.ceil(spec.n / spec.rows) / (WORKGROUP / (spec.team ?? WORKGROUP)))
}

export function matvecKernel(spec: MatvecSpec): string {
  const {k, n, streams: S, rows: R} = spec
  const team = spec.team ?? WORKGROUP
  if (k % 4 !== 0) throw new Error(`matvec input width ${k} is not a multiple of 4`)
  if (WORKGROUP % team !== 0) throw new Error(`a tile of ${team} invocations does not divide the workgroup`)
  if (spec.slices !== undefined) return matvecColumnsKernel(spec, spec.slices)
  const values = R * S + (spec.normEps !== undefined ? S : 0) // dot products, then the streams' sums of squares where the input is normalized
  const butterfly = subgroupReduction(values, spec.subgroup)
  const row = spec.rowOf ?? 't * R + r'
  const epilogue = tileEpilogue(spec)
  return `enable subgroups;
${STEP_STRUCT}
const K4 = ${k / 4}u;
const N = ${n}u;
const S = ${S}u;
const R = ${R}u;
const WG = ${WORKGROUP}u;
const TEAM = ${team}u;
const TEAMS = ${WORKGROUP / team}u;
const VALUES = ${values}u;
const TILES = ${Math.ceil(n / R)}u;
${productBindings(spec)}
${spec.extra ?? ''}
var<workgroup> partial: array<f32, ${(WORKGROUP / 4) * values}>;
var<workgroup> sums: array<f32, ${(WORKGROUP / team) * values}>;
${stagedDeclarations(spec.stage, S)}

${tileResults(spec, row, 'sums[team_ * VALUES + r * S + s]', 'sums[team_ * VALUES + R * S + s]')}

@compute @workgroup_size(${WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) width: u32) {
  let team = lid / TEAM;
  let tl = lid % TEAM;
  let t = (wid.x + wid.y * 65535u) * TEAMS + team;
  t_ = t;
  team_ = team;
  _ = step.pos; // every matvec binds the same step uniform, used or not
  _ = &Y;
  var acc: array<f32, ${butterfly?.padded ?? values}>;
  var base: array<u32, ${R}>;
  // a tile past the last still runs (its rows clamped) so the workgroup's barriers stay uniform; it writes nothing
  for (var r = 0u; r < R; r++) { base[r] = min(rowOf(min(t, TILES - 1u), r), N - 1u) * K4; }
  ${stagedLoop(spec.stage, k / 4, (from, to) => matvecInputLoop(S, R, team, k / 4, spec.normEps !== undefined, from, to))}
  let group = lid / width;
  ${
    butterfly
      ? butterflySums(butterfly, values)
      : `for (var v = 0u; v < VALUES; v++) {
    let total = subgroupAdd(acc[v]);
    if (lane == 0u) { partial[group * VALUES + v] = total; }
  }`
  }
  workgroupBarrier();
  let groups = max(1u, TEAM / width); // subgroups of one tile
  for (var v = tl; v < VALUES; v += TEAM) {
    var total = 0.0;
    for (var g2 = 0u; g2 < groups; g2++) { total += partial[(team * groups + g2) * VALUES + v]; }
    sums[team * VALUES + v] = total;
  }
  workgroupBarrier();
  if (t >= TILES) { return; }
  for (var li = tl; li < ${values}u; li += TEAM) {
    ${epilogue}
  }
}
`
}

/**
 * Where a row kernel's tiles read their input rows (`xin(s, i)`: group i of stream s): from the
 * storage buffer, or from a copy in workgroup memory (float32, or half pairs packed in u32 words as
 * the f16 matrices are) of `groups` groups of every stream, made by the whole workgroup a chunk at a
 * time. A workgroup's tiles all read every stream's whole input, so at P = 8 the buffer route
 * passes 8 input bytes per weight byte (f16) through the caches for every tile; the copy passes
 * them once a workgroup.
 */
function stagedDeclarations(stage: InputStage | undefined, S: number): string {
  if (stage === undefined) return 'fn xin(s: u32, i: u32) -> vec4<f32> { return X[s * K4 + i]; }'
  const read = stage.kind === 'f32' ? 'return XS[s * CH + i - chunk0];' : 'let h = XS[s * CH + i - chunk0]; return vec4<f32>(unpack2x16float(h.x), unpack2x16float(h.y));'
  return `const CH = ${stage.groups}u;
var<workgroup> XS: array<${stage.kind === 'f32' ? 'vec4<f32>' : 'vec2<u32>'}, ${S * stage.groups}>;
var<private> chunk0: u32; // the first group of the chunk in XS
fn xin(s: u32, i: u32) -> vec4<f32> { ${read} }`
}

/** The tiles' input loop (`loop(from, to)`), over the whole row, or chunk by chunk after the workgroup has staged each. */
function stagedLoop(stage: InputStage | undefined, k4: number, loop: (from: string, to: string) => string): string {
  if (stage === undefined) return loop('0u', 'K4')
  const store = stage.kind === 'f32' ? 'XS[j] = x;' : 'XS[j] = vec2<u32>(pack2x16float(x.xy), pack2x16float(x.zw));'
  const chunks = Math.ceil(k4 / stage.groups)
  return `for (var c0 = 0u; c0 < K4; c0 += CH) {
    ${chunks > 1 ? "workgroupBarrier(); // every tile is done with the last chunk" : ''}
    for (var j = lid; j < S * CH; j += WG) {
      let i = c0 + j % CH;
      if (i < K4) { let x = X[(j / CH) * K4 + i]; ${store} }
    }
    workgroupBarrier();
    chunk0 = c0;
    ${loop('c0', chunks > 1 ? 'min(c0 + CH, K4)' : 'K4')}
  }`
}

/** Bytes of workgroup memory a row kernel of `spec` declares (its sums, and the staged chunk where there is one). */
export function matvecWorkgroupBytes(spec: Pick<MatvecSpec, 'streams' | 'rows' | 'normEps' | 'team' | 'stage'>): number {
  const values = spec.rows * spec.streams + (spec.normEps !== undefined ? spec.streams : 0)
  const sums = 4 * values * (WORKGROUP / 4 + WORKGROUP / (spec.team ?? WORKGROUP))
  return sums + (spec.stage === undefined ? 0 : spec.streams * spec.stage.groups * (spec.stage.kind === 'f32' ? 16 : 8))
}

/**
 * How the layer products' row kernels read their input (`PARSCALE_WGSL_STAGE`): `off` (default,
 * from the storage buffer), `f32` (a float32 copy in workgroup memory a workgroup), or `f16` (a
 * half copy where the weights are half or codes, float32 where they are float32, so float32
 * weights keep float32 arithmetic).
 */
export function inputStaging(weights: WeightFormat['kind'], env: NodeJS.ProcessEnv = process.env): InputStage['kind'] | undefined {
  const chosen = env.PARSCALE_WGSL_STAGE ?? 'off'
  if (chosen !== 'off' && chosen !== 'f32' && chosen !== 'f16') throw new UserError(`PARSCALE_WGSL_STAGE must be off, f32 or f16, not "${chosen}"`)
  if (chosen === 'off') return undefined
  return chosen === 'f16' && weights !== 'f32' ? 'f16' : 'f32'
}

/**
 * The chunk a row kernel of `spec` stages in `kind`: the whole row where it fits the adapter's
 * `workgroupBytes` beside the kernel's sums (and `PARSCALE_WGSL_STAGE_KB`, a cap for sweeps:
 * a smaller copy leaves room for more workgroups an SM), else the most whole steps of the input
 * loop that fit; none where not one step fits.
 */
export function stagedChunk(spec: Pick<MatvecSpec, 'k' | 'streams' | 'rows' | 'normEps' | 'team'>, kind: InputStage['kind'], workgroupBytes: number, env: NodeJS.ProcessEnv = process.env): InputStage | undefined {
  const k4 = spec.k / 4
  const cap = tuningKnob('PARSCALE_WGSL_STAGE_KB', [2, 4, 8, 16, 32, 64], Infinity, env) * 1024
  const room = Math.min(cap, workgroupBytes - matvecWorkgroupBytes(spec))
  const fits = Math.floor(room / (spec.streams * (kind === 'f32' ? 16 : 8)))
  if (fits >= k4) return {kind, groups: k4}
  const step = (spec.team ?? WORKGROUP) * matvecLoop(env).unroll
  const groups = Math.floor(fits / step) * step
  return groups > 0 ? {kind, groups} : undefined
}

/**
 * How a row tile's V values are summed across a subgroup (`PARSCALE_WGSL_REDUCE`): `add`, one
 * `subgroupAdd` a value (V · log2 W shuffles); `butterfly`, a reduce-scatter where each of log2 W
 * exchanges halves the values a lane holds (V padded to a multiple of W, then V − V/W shuffles
 * in all), leaving lane l the sums of values l·V/W … l·V/W + V/W − 1. The butterfly's indices
 * are fixed when the kernel is generated, so it needs an adapter whose subgroups have one size;
 * by default (`auto`) it is taken where it needs fewer shuffles (at P = 8: q·k·v's 40 values,
 * 63 shuffles against 200).
 */
export function subgroupReduction(values: number, width: number | undefined, env: NodeJS.ProcessEnv = process.env): {width: number; padded: number} | undefined {
  const chosen = env.PARSCALE_WGSL_REDUCE ?? 'auto'
  if (chosen !== 'auto' && chosen !== 'add' && chosen !== 'butterfly') throw new UserError(`PARSCALE_WGSL_REDUCE must be auto, add or butterfly, not "${chosen}"`)
  if (chosen === 'add' || width === undefined || width < 2) return undefined
  const padded = Math.ceil(values / width) * width
  const shuffles = padded - padded / width
  if (chosen === 'auto' && shuffles >= values * Math.log2(width)) return undefined
  return {width, padded}
}

/** The butterfly's WGSL (`subgroupReduction`): `acc` reduce-scattered across the subgroup, each lane's sums written to `partial`. */
function butterflySums({width, padded}: {width: number; padded: number}, values: number): string {
  const lines: string[] = []
  for (let offset = width / 2, held = padded; offset >= 1; offset /= 2, held /= 2) {
    const half = held / 2
    lines.push(`{ let up = (lane & ${offset}u) != 0u;`)
    // the lower lane of a pair keeps the first half of what it holds and sends the second; the upper the reverse
    for (let v = 0; v < half; v++) lines.push(`  acc[${v}] = select(acc[${v}], acc[${v + half}], up) + subgroupShuffleXor(select(acc[${v + half}], acc[${v}], up), ${offset}u);`)
    lines.push('}')
  }
  const each = padded / width
  for (let j = 0; j < each; j++) lines.push(`if (lane * ${each}u + ${j}u < ${values}u) { partial[group * VALUES + lane * ${each}u + ${j}u] = acc[${j}]; }`)
  return lines.join('\n  ')
}

/**
 * A tile's rows (`rowOf(t, r)`) and its finished results (`fin(r, s)`: the dot product read from
 * `valueAt`, normalized by the stream's sum of squares at `squaresAt`, biased), for the tile `t_`
 * held at place `team_` of the workgroup.
 */
function tileResults(spec: MatvecSpec, rowOf: string, valueAt: string, squaresAt: string): string {
  return `fn rowOf(t: u32, r: u32) -> u32 { return ${rowOf}; }

fn fin(r: u32, s: u32) -> f32 {
  var v = ${valueAt};
  ${spec.normEps !== undefined ? `v = v * inverseSqrt(${squaresAt} / f32(K4 * 4u) + ${spec.normEps.toExponential()});` : ''}
  ${spec.bias ? 'v = v + B[rowOf(t_, r)];' : ''}
  return v;
}
var<private> t_: u32;
var<private> team_: u32;`
}

/** What a tile does with its R·S results: the spec's own, or each written by `epilogue` (default `Y[s * N + row] = v`). */
function tileEpilogue(spec: MatvecSpec): string {
  return (
    spec.tileEpilogue ??
    `
    if (li < R * S) {
      let r = li / S;
      let s = li % S;
      let row = rowOf(t, r);
      if (row < N) {
        let v = fin(r, s);
        ${spec.epilogue ?? 'Y[s * N + row] = v;'}
      }
    }`
  )
}

/**
 * Slices of the input a columns kernel splits a product into (`PARSCALE_WGSL_COLUMN_THREADS`,
 * default 2^16 invocations a product): a power of two up to the workgroup, with each slice at
 * least `PARSCALE_WGSL_COLUMN_SPAN` (default 4) groups of four inputs long.
 */
export function matvecSlices(k: number, tiles: number, env: NodeJS.ProcessEnv = process.env): number {
  const target = tuningKnob('PARSCALE_WGSL_COLUMN_THREADS', [1 << 14, 1 << 15, 1 << 16, 1 << 17, 1 << 18], 1 << 16, env)
  // 4: o_proj at P = 8 0.37 ms a step against 0.49 with 8, gate·up equal (H100, f16)
  const span = tuningKnob('PARSCALE_WGSL_COLUMN_SPAN', [2, 4, 8, 16, 32], 4, env)
  let slices = 1
  while (slices * 2 <= WORKGROUP && tiles * slices * 2 <= target && k / 4 / (slices * 2) >= span) slices *= 2
  return slices
}

/** Steps along the input a columns kernel loads ahead (`PARSCALE_WGSL_COLUMN_UNROLL`: 1, 2, 4 or 8; default 4). */
export function columnUnroll(env: NodeJS.ProcessEnv = process.env): number {
  return tuningKnob('PARSCALE_WGSL_COLUMN_UNROLL', [1, 2, 4, 8], 4, env)
}

/** Rows an invocation owns in the columns kernel's residual products, o_proj and down (`PARSCALE_WGSL_COLUMN_ROWS`: 1 or 2; default 1). */
export function columnRows(env: NodeJS.ProcessEnv = process.env): number {
  return tuningKnob('PARSCALE_WGSL_COLUMN_ROWS', [1, 2], 1, env)
}

/** Workgroup memory (bytes) a columns kernel of `spec` declares. */
export function matvecColumnsBytes(spec: Pick<MatvecSpec, 'streams' | 'rows'>): number {
  return 4 * (WORKGROUP * spec.rows * spec.streams + (WORKGROUP / 4) * spec.streams + spec.streams)
}

/**
 * The matrix-vector product with rows owned by invocations (`MatvecSpec.slices`): a tile is R
 * rows of one invocation, a workgroup holds 256 / slices tiles side by side times `slices`
 * slices of the input. Invocations that own consecutive rows read consecutive words of a
 * column-interleaved matrix, and every one of a slice reads the same input group, which the
 * cache serves once to the whole subgroup: at P = 8 the row-tiled kernel reads each input group
 * once per tile (8× the weights' bytes through the cache) and sums R·S + S values across its team,
 * where this one sums R·S across slices once, through workgroup memory. An RMS norm's sums of
 * squares are the workgroup's own pass over the input rows.
 */
function matvecColumnsKernel(spec: MatvecSpec, slices: number): string {
  const {k, n, streams: S, rows: R} = spec
  if (spec.weights?.columns !== n) throw new Error(`a columns matrix-vector kernel reads a matrix interleaved over its ${n} rows`)
  const norm = spec.normEps !== undefined
  const WR = WORKGROUP / slices
  const k4 = k / 4
  const U = columnUnroll()
  const chunk = Math.ceil(k4 / slices / U) * U
  // a slice's end short of a whole step (the last slice, or K4 not a multiple of U): steps past it read K4's last group and count nothing
  const ragged = chunk * slices !== k4
  const steps = Array.from({length: U}, (_, u) => u)
  return `enable subgroups;
${STEP_STRUCT}
const K4 = ${k4}u;
const N = ${n}u;
const S = ${S}u;
const R = ${R}u;
const RS = ${R * S}u;
const WG = ${WORKGROUP}u;
const SL = ${slices}u;
const WR = ${WR}u;
const CHUNK = ${chunk}u;
const TILES = ${Math.ceil(n / R)}u;
${productBindings(spec, k)}
${spec.extra ?? ''}
// [slice][value][tile]: consecutive invocations write consecutive words; the slices' totals go to slice 0's place
var<workgroup> partial: array<f32, ${WORKGROUP * R * S}>;
${norm ? `var<workgroup> sqpart: array<f32, ${(WORKGROUP / 4) * S}>;
var<workgroup> ssq: array<f32, ${S}>;` : ''}

// by default a tile's rows lie TILES apart, so neighbouring invocations own neighbouring rows
${tileResults(spec, spec.rowOf ?? 't + r * TILES', 'partial[(r * S + s) * WR + team_]', 'ssq[s]')}

@compute @workgroup_size(${WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) width: u32) {
  _ = step.pos; // every matvec binds the same step uniform, used or not
  _ = &Y;
  let t0 = (wid.x + wid.y * 65535u) * WR;
  let q = lid / WR;
  let mine = t0 + lid % WR;
  var rows: array<u32, ${R}>;
  // a tile past the last still runs (its rows clamped) so the workgroup's barriers stay uniform; it writes nothing
  for (var r = 0u; r < R; r++) { rows[r] = min(rowOf(min(mine, TILES - 1u), r), N - 1u); }
  ${
    norm
      ? `var sq: array<f32, ${S}>;
  for (var s = 0u; s < S; s++) {
    for (var i = lid; i < K4; i += WG) { let x = X[s * K4 + i]; sq[s] += dot(x, x); }
  }
  for (var s = 0u; s < S; s++) {
    let total = subgroupAdd(sq[s]);
    if (lane == 0u) { sqpart[(lid / width) * S + s] = total; }
  }`
      : ''
  }
  var acc: array<f32, ${R * S}>;
  let end = min(q * CHUNK + CHUNK, K4);
  for (var i0 = q * CHUNK; i0 < end; i0 += ${U}u) {
    // U steps' weights loaded before any is used, so U loads are in flight where one was
    ${steps.map((u) => `let i${u} = ${ragged ? `min(i0 + ${u}u, K4 - 1u)` : `i0 + ${u}u`};`).join(' ')}
    var w: array<vec4<f32>, ${R * U}>;
    ${steps.map((u) => `for (var r = 0u; r < R; r++) { w[${u * R}u + r] = weightAt(rows[r], i${u}); }`).join('\n    ')}
    ${norm ? steps.map((u) => `let g${u} = G[i${u}];`).join(' ') : ''}
    for (var s = 0u; s < S; s++) {
      ${steps
        .map(
          (u) => `{
        let x = ${ragged ? `select(vec4<f32>(0.0), X[s * K4 + i${u}], i0 + ${u}u < end)` : `X[s * K4 + i${u}]`}${norm ? ` * g${u}` : ''};
        for (var r = 0u; r < R; r++) { acc[r * S + s] += dot(w[${u * R}u + r], x); }
      }`,
        )
        .join('\n      ')}
    }
  }
  for (var v = 0u; v < RS; v++) { partial[(q * RS + v) * WR + lid % WR] = acc[v]; }
  workgroupBarrier();
  ${
    norm
      ? `if (lid < S) {
    var total = 0.0;
    for (var g = 0u; g < (WG + width - 1u) / width; g++) { total += sqpart[g * S + lid]; }
    ssq[lid] = total;
  }`
      : ''
  }
  for (var e = lid; e < WR * RS; e += WG) {
    let v = e / WR;
    let tile = e % WR;
    var total = 0.0;
    for (var q2 = 0u; q2 < SL; q2++) { total += partial[(q2 * RS + v) * WR + tile]; }
    partial[v * WR + tile] = total; // only this invocation reads or writes (v, tile)
  }
  workgroupBarrier();
  // the epilogue: SL invocations a tile
  let team = lid / SL;
  let t = t0 + team;
  t_ = t;
  team_ = team;
  if (t >= TILES) { return; }
  for (var li = lid % SL; li < RS; li += SL) {
    ${tileEpilogue(spec)}
  }
}
`
}

export interface LayerShape {
  hidden: number
  intermediate: number
  heads: number
  kvHeads: number
  headDim: number
  streams: number
  /** Tokens a call (1 for a decode step; rows are token-major: row = token · P + stream). */
  tokens: number
  prefix: number
  /** Cache slots per (stream, kv head): prefix + positions. */
  capacity: number
  eps: number
  /** Multiplies q·k (1/√d, or 1 where q's weights carry it). */
  scoreScale: number
  /** How the q·k·v matrix is stored. */
  weights?: WeightFormat
  /** Invocations a q·k·v tile gets (`matvecTeam`). */
  team?: number
  /** q·k·v by the columns kernel in this many input slices (`MatvecSpec.slices`; one rotary pair a tile). */
  slices?: number
  /** `MatvecSpec.subgroup`. */
  subgroup?: number
  /** `MatvecSpec.stage` (decode steps). */
  stage?: InputStage
}

/**
 * Norm, q·k·v with biases, rotary on q and k, and the new key and value written into the cache
 * at the step's slot. A tile holds rotary pairs (rows i and i + d/2 of one head), so the rotation
 * happens in the workgroup; q goes to Y [streams, heads·d].
 */
export function qkvKernel(l: LayerShape): string {
  const d = l.headDim
  const half = d / 2
  const pairs = qkvPairs(l)
  const rows = 2 * pairs
  const tilesPerHead = half / pairs
  const qRows = l.heads * d
  const kvRows = l.kvHeads * d
  return matvecKernel({
    k: l.hidden,
    n: qRows + 2 * kvRows,
    streams: l.streams * l.tokens,
    rows,
    normEps: l.eps,
    bias: true,
    weights: l.weights,
    team: l.team,
    slices: l.slices,
    subgroup: l.subgroup,
    stage: l.stage,
    rowOf: `(t / ${tilesPerHead}u) * ${d}u + (t % ${tilesPerHead}u) * ${pairs}u + (r % ${pairs}u) + (r / ${pairs}u) * ${half}u`,
    extra: `@group(0) @binding(6) var<storage, read_write> KC: array<f32>;
@group(0) @binding(7) var<storage, read_write> VC: array<f32>;
@group(0) @binding(8) var<storage, read> ROPE: array<f32>;`,
    tileEpilogue: `
    if (li < ${pairs}u * S && (li % S) / ${l.streams}u < step.tokens) {
      let j = li / S;
      let s = li % S;
      let token = s / ${l.streams}u;
      let p = s % ${l.streams}u;
      let pos = step.pos + token;
      let slot = step.slot + token;
      let row0 = rowOf(t, j);
      let head = row0 / ${d}u;
      let i = row0 % ${d}u;
      let a = fin(j, s);
      let b = fin(j + ${pairs}u, s);
      if (row0 < ${qRows + kvRows}u) {
        let c = ROPE[(pos * ${half}u + i) * 2u];
        let sn = ROPE[(pos * ${half}u + i) * 2u + 1u];
        let ra = a * c - b * sn;
        let rb = b * c + a * sn;
        if (row0 < ${qRows}u) {
          Y[s * ${qRows}u + row0] = ra;
          Y[s * ${qRows}u + row0 + ${half}u] = rb;
        } else {
          let at = ((p * ${l.kvHeads}u + head - ${l.heads}u) * ${l.capacity}u + slot) * ${d}u + i;
          KC[at] = ra;
          KC[at + ${half}u] = rb;
        }
      } else {
        let at = ((p * ${l.kvHeads}u + head - ${l.heads + l.kvHeads}u) * ${l.capacity}u + slot) * ${d}u + i;
        VC[at] = a;
        VC[at + ${half}u] = b;
      }
    }`,
  })
}

/**
 * Rotary pairs per qkv tile: 2 (4 rows) for a decode step, 1 when a call holds many rows (a
 * prompt's tokens), so the accumulators (rows × stream rows) stay in registers.
 */
export function qkvPairs(l: LayerShape, env: NodeJS.ProcessEnv = process.env): number {
  const half = l.headDim / 2
  // the columns kernel: a tile is one invocation's rows, so one pair keeps its accumulators few
  const fallback = l.slices === undefined && half % 2 === 0 && l.streams * l.tokens <= 8 ? 2 : 1
  // PARSCALE_WGSL_QKV_PAIRS (row tiles, for GPU sweeps): twice the tiles with half the sums each
  const pairs = l.slices === undefined ? tuningKnob('PARSCALE_WGSL_QKV_PAIRS', [1, 2], fallback, env) : fallback
  if (half % pairs !== 0) throw new UserError(`PARSCALE_WGSL_QKV_PAIRS must divide half the head size ${half}, not "${pairs}"`)
  return pairs
}

/** Tiles (rotary pairs of rows) of a step's q·k·v product. */
export function qkvTileCount(l: LayerShape): number {
  return Math.ceil(((l.heads + 2 * l.kvHeads) * l.headDim) / (2 * qkvPairs(l)))
}

export function qkvTiles(l: LayerShape): number {
  return matvecTiles({n: qkvTileCount(l), rows: 1, team: l.team, slices: l.slices})
}

/**
 * Positions of the attention's value sum an invocation takes at once (`PARSCALE_WGSL_ATTENTION_UNROLL`,
 * for GPU sweeps; default 1): the sum over positions j, j + GROUPS, … is a chain of dependent adds,
 * each waiting on its cache load, so a short context pays one load's latency a position
 * (WORKGROUP / head size groups share the positions: 4 at head size 64). U accumulators put U
 * loads in flight.
 */
function attentionUnroll(env: NodeJS.ProcessEnv = process.env): number {
  return tuningKnob('PARSCALE_WGSL_ATTENTION_UNROLL', [1, 2, 4, 8], 1, env)
}

/** The value sum of the attention kernel: o = Σ scores[j] · V[j] over this invocation's positions, in `unroll` chains. */
function attentionValueSum(unroll: number): string {
  const term = (offset: string) => `scores[j${offset}] * VC[(base + j${offset}) * D + e]`
  if (unroll === 1) return `var o = 0.0;
  for (var j = g; j < n; j += GROUPS) { o += ${term('')}; }`
  const chains = Array.from({length: unroll}, (_, u) => u)
  return `${chains.map((u) => `var o${u} = 0.0;`).join(' ')}
  var j = g;
  for (; j + ${unroll - 1}u * GROUPS < n; j += ${unroll}u * GROUPS) {
    ${chains.map((u) => `o${u} += ${term(u === 0 ? '' : ` + ${u}u * GROUPS`)};`).join('\n    ')}
  }
  for (; j < n; j += GROUPS) { o0 += ${term('')}; }
  let o = ${chains.map((u) => `o${u}`).join(' + ')};`
}

/**
 * Attention of one step: a workgroup per (stream, query head) over the prefix and the cache
 * [0, length), scores held in workgroup memory, softmax in float32, grouped query heads reading
 * their kv head. Out: [streams, heads·d].
 */
export function attentionKernel(l: LayerShape, env: NodeJS.ProcessEnv = process.env): string {
  const d = l.headDim
  const groups = WORKGROUP / d
  if (!Number.isInteger(groups)) throw new Error(`head size ${d} does not divide ${WORKGROUP}`)
  const unroll = attentionUnroll(env)
  return `enable subgroups;
${STEP_STRUCT}
const D = ${d}u;
const D4 = ${d / 4}u;
const HQ = ${l.heads}u;
const HKV = ${l.kvHeads}u;
const C = ${l.capacity}u;
const WG = ${WORKGROUP}u;
const GROUPS = ${groups}u;
const P = ${l.streams}u;
@group(0) @binding(0) var<storage, read> Q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> KC: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> VC: array<f32>;
@group(0) @binding(3) var<uniform> step: Step;
@group(0) @binding(4) var<storage, read_write> O: array<f32>;
var<workgroup> q: array<vec4<f32>, ${d / 4}>;
var<workgroup> scores: array<f32, ${l.capacity}>;
var<workgroup> part: array<f32, ${WORKGROUP}>;
var<workgroup> outs: array<f32, ${WORKGROUP}>;

fn reduceMax(v: f32, li: u32, lane: u32, width: u32) -> f32 {
  let m = subgroupMax(v);
  if (lane == 0u) { part[li / width] = m; }
  workgroupBarrier();
  var r = part[0];
  for (var g = 1u; g < (WG + width - 1u) / width; g++) { r = max(r, part[g]); }
  workgroupBarrier();
  return r;
}
fn reduceSum(v: f32, li: u32, lane: u32, width: u32) -> f32 {
  let m = subgroupAdd(v);
  if (lane == 0u) { part[li / width] = m; }
  workgroupBarrier();
  var r = 0.0;
  for (var g = 0u; g < (WG + width - 1u) / width; g++) { r += part[g]; }
  workgroupBarrier();
  return r;
}

@compute @workgroup_size(${WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) width: u32) {
  let s = wid.x / HQ;
  let h = wid.x % HQ;
  let kv = h / (HQ / HKV);
  let token = s / P;
  if (token >= step.tokens) { return; }
  if (li < D4) { q[li] = Q[(s * HQ + h) * D4 + li]; }
  workgroupBarrier();
  let n = step.length + token;
  let base = ((s % P) * HKV + kv) * C;
  let scale = ${l.scoreScale.toExponential(9)};
  var m = -3.0e38;
  for (var j = li; j < n; j += WG) {
    var acc = 0.0;
    for (var i = 0u; i < D4; i++) { acc += dot(q[i], KC[(base + j) * D4 + i]); }
    let sc = acc * scale;
    scores[j] = sc;
    m = max(m, sc);
  }
  m = reduceMax(m, li, lane, width);
  var total = 0.0;
  for (var j = li; j < n; j += WG) {
    let e = exp(scores[j] - m);
    scores[j] = e;
    total += e;
  }
  total = reduceSum(total, li, lane, width);
  let e = li % D;
  let g = li / D;
  ${attentionValueSum(unroll)}
  outs[li] = o;
  workgroupBarrier();
  if (li < D) {
    var r = 0.0;
    for (var g2 = 0u; g2 < GROUPS; g2++) { r += outs[g2 * D + li]; }
    O[(s * HQ + h) * D + li] = r / total;
  }
}
`
}

/** The final RMS norm of the last token's streams: a workgroup per stream. Y [streams, hidden]. */
export function finalNormKernel(hidden: number, eps: number): string {
  return `enable subgroups;
${STEP_STRUCT}
const H = ${hidden}u;
const WG = ${WORKGROUP}u;
@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(1) var<storage, read> G: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> step: Step;
var<workgroup> part: array<f32, ${WORKGROUP}>;
@compute @workgroup_size(${WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) width: u32) {
  let s = wid.x;
  let first = (step.last + s) * H;
  var ss = 0.0;
  for (var i = li; i < H; i += WG) { let x = X[first + i]; ss += x * x; }
  let t = subgroupAdd(ss);
  if (lane == 0u) { part[li / width] = t; }
  workgroupBarrier();
  var total = 0.0;
  for (var g = 0u; g < (WG + width - 1u) / width; g++) { total += part[g]; }
  let inv = inverseSqrt(total / f32(H) + ${eps.toExponential()});
  for (var i = li; i < H; i += WG) { Y[s * H + i] = X[first + i] * inv * G[i]; }
}
`
}

/**
 * ParScale's mixing (P > 1), one workgroup: stream logits from the aggregation hidden A [hidden]
 * (SiLU already applied), softmax, smoothing, then the weighted sum of the normalized streams
 * Y [P, hidden] into M [hidden]; the stream weights go to WOUT [P].
 */
export function mixKernel(hidden: number, streams: number, smooth: number): string {
  return `enable subgroups;
const H = ${hidden}u;
const P = ${streams}u;
const WG = ${WORKGROUP}u;
@group(0) @binding(0) var<storage, read> A: array<f32>;
@group(0) @binding(1) var<storage, read> W2: array<f32>;
@group(0) @binding(2) var<storage, read> B2: array<f32>;
@group(0) @binding(3) var<storage, read> Y: array<f32>;
@group(0) @binding(4) var<storage, read_write> M: array<f32>;
@group(0) @binding(5) var<storage, read_write> WOUT: array<f32>;
var<workgroup> part: array<f32, ${WORKGROUP}>;
var<workgroup> weights: array<f32, ${streams}>;
@compute @workgroup_size(${WORKGROUP})
fn main(@builtin(local_invocation_index) li: u32, @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) width: u32) {
  for (var p = 0u; p < P; p++) {
    var acc = 0.0;
    for (var i = li; i < H; i += WG) { acc += W2[p * H + i] * A[i]; }
    let t = subgroupAdd(acc);
    if (lane == 0u) { part[li / width] = t; }
    workgroupBarrier();
    if (li == 0u) {
      var total = B2[p];
      for (var g = 0u; g < (WG + width - 1u) / width; g++) { total += part[g]; }
      weights[p] = total;
    }
    workgroupBarrier();
  }
  if (li == 0u) {
    var m = weights[0];
    for (var p = 1u; p < P; p++) { m = max(m, weights[p]); }
    var z = 0.0;
    for (var p = 0u; p < P; p++) { weights[p] = exp(weights[p] - m); z += weights[p]; }
    for (var p = 0u; p < P; p++) {
      let w = (weights[p] / z) * (1.0 - ${smooth.toExponential()}) + ${smooth.toExponential()} / f32(P);
      weights[p] = w;
      WOUT[p] = w;
    }
  }
  workgroupBarrier();
  for (var i = li; i < H; i += WG) {
    var v = 0.0;
    for (var p = 0u; p < P; p++) { v += weights[p] * Y[p * H + i]; }
    M[i] = v;
  }
}
`
}

export interface GemmSpec {
  /** Input width (a multiple of 4). */
  k: number
  /** Output columns (the matrix's rows). */
  n: number
  /** Rows per token (P): the call's rows are step.tokens · streams. */
  streams: number
  /** RMS-normalize each input row with a weight vector (binding 4) and this epsilon. */
  normEps?: number
  /** Add a bias (binding 5). */
  bias?: boolean
  /** `Y[m * N + n] = v` (the default) or `+=` (a residual). */
  accumulate?: boolean
  weights?: WeightFormat
  /**
   * Workgroups along K (grid z), for products with few output tiles (o_proj and down have only
   * `hidden` columns): each writes its partial sums to Y as [split, M, N], and `splitSumKernel`
   * adds them into the residual. Not with a norm or a bias.
   */
  splits?: number
}

/** Output rows × columns a thread of the matrix-matrix kernel holds (16 × 16 threads a workgroup). */
export const GEMM_MICRO = {rows: 4, cols: 4}
export const GEMM_TILE = {rows: 16 * GEMM_MICRO.rows, cols: 16 * GEMM_MICRO.cols}

/**
 * A prompt call's products: Y [M, N] = X [M, K] · Wᵀ for M = tokens · P rows, in tiles of
 * 64 × 64 outputs a workgroup (4 × 4 a thread) over K in slices of 16 staged in workgroup memory,
 * so each weight element is read once per 64 rows instead of once per row. Grid: (N / 64, M / 64).
 * The RMS norm's sum of squares comes from the same loads (each tile sees whole input rows).
 */
export function gemmKernel(spec: GemmSpec): string {
  const {k, n, streams} = spec
  if (k % 4 !== 0) throw new Error(`matrix input width ${k} is not a multiple of 4`)
  const {rows: TM, cols: TN} = GEMM_MICRO
  const BM = GEMM_TILE.rows
  const BN = GEMM_TILE.cols
  const norm = spec.normEps !== undefined
  const splits = spec.splits ?? 1
  if (splits > 1 && (norm || spec.bias)) throw new Error('a product split along K takes no norm or bias')
  const slices = Math.ceil(k / 16)
  const perSplit = Math.ceil(slices / splits) * 4 // vec4 groups of K a split covers
  return `${STEP_STRUCT}
const K4 = ${k / 4}u;
const N = ${n}u;
const P = ${streams}u;
const BM = ${BM}u;
const BN = ${BN}u;
const BK4 = 4u; // a slice of 16 inputs: four vec4 a row
${productBindings(spec, k)}
// the slice transposed, [k][row] as vec4 of consecutive rows, so a thread reads its ${TM} rows (${TN} columns) in one load
var<workgroup> xs: array<vec4<f32>, ${(16 * BM) / 4}>;
var<workgroup> ws: array<vec4<f32>, ${(16 * BN) / 4}>;
${norm ? `var<workgroup> squares: array<f32, ${BM * 4}>;` : ''}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
  let M = step.tokens * P;
  let kFirst = wid.z * ${perSplit}u;
  let kEnd = min(K4, kFirst + ${perSplit}u);
  let m0 = wid.y * BM;
  let n0 = wid.x * BN;
  if (m0 >= M) { return; }
  let tx = li % 16u;
  let ty = li / 16u;
  var acc: array<vec4<f32>, ${TM * (TN / 4)}>;
  ${norm ? `var sq: array<f32, ${(BM * 4) / 256}>;` : ''}
  for (var k0 = kFirst; k0 < kEnd; k0 += BK4) {
    workgroupBarrier(); // the last slice is used up
    for (var e = li; e < BM * BK4; e += 256u) {
      let r = e / BK4;
      let c = e % BK4;
      var x = vec4<f32>(0.0);
      if (m0 + r < M && k0 + c < kEnd) {
        x = X[(m0 + r) * K4 + k0 + c];
        ${norm ? 'sq[e / 256u] += dot(x, x);\n        x = x * G[k0 + c];' : ''}
      }
      for (var q = 0u; q < 4u; q++) { xs[(c * 4u + q) * (BM / 4u) + r / 4u][r % 4u] = x[q]; }
    }
    for (var e = li; e < BN * BK4; e += 256u) {
      ${spec.weights?.columns === undefined ? 'let r = e / BK4; let c = e % BK4;' : 'let r = e % BN; let c = e / BN; // interleaved: neighbours take neighbouring rows of one group'}
      var w = vec4<f32>(0.0);
      if (n0 + r < N && k0 + c < kEnd) { w = weightAt(n0 + r, k0 + c); }
      for (var q = 0u; q < 4u; q++) { ws[(c * 4u + q) * (BN / 4u) + r / 4u][r % 4u] = w[q]; }
    }
    workgroupBarrier();
    for (var kk = 0u; kk < 16u; kk++) {
      var a: array<vec4<f32>, ${TM / 4}>;
      for (var i = 0u; i < ${TM / 4}u; i++) { a[i] = xs[kk * (BM / 4u) + ty * ${TM / 4}u + i]; }
      for (var j = 0u; j < ${TN / 4}u; j++) {
        let b = ws[kk * (BN / 4u) + tx * ${TN / 4}u + j];
        for (var i = 0u; i < ${TM}u; i++) { acc[i * ${TN / 4}u + j] += a[i / 4u][i % 4u] * b; }
      }
    }
  }
  ${
    norm
      ? `for (var e = li; e < BM * BK4; e += 256u) { squares[e] = sq[e / 256u]; }
  workgroupBarrier();`
      : ''
  }
  for (var i = 0u; i < ${TM}u; i++) {
    let rl = ty * ${TM}u + i;
    let m = m0 + rl;
    if (m >= M) { continue; }
    ${norm ? `let inv = inverseSqrt((squares[rl * 4u] + squares[rl * 4u + 1u] + squares[rl * 4u + 2u] + squares[rl * 4u + 3u]) / f32(K4 * 4u) + ${spec.normEps!.toExponential()});` : ''}
    for (var j = 0u; j < ${TN}u; j++) {
      let col = n0 + tx * ${TN}u + j;
      if (col >= N) { continue; }
      var v = acc[i * ${TN / 4}u + j / 4u][j % 4u];
      ${norm ? 'v = v * inv;' : ''}
      ${spec.bias ? 'v = v + B[col];' : ''}
      ${splits > 1 ? 'Y[(wid.z * M + m) * N + col] = v;' : `Y[m * N + col] ${spec.accumulate ? '+=' : '='} v;`}
    }
  }
}
`
}

/** The partial sums of a product split along K ([splits, M, N]) added into Y [M, N]: a workgroup per row. */
export function splitSumKernel(n: number, streams: number, splits: number): string {
  return `${STEP_STRUCT}
@group(0) @binding(0) var<storage, read> PART: array<f32>;
@group(0) @binding(1) var<storage, read_write> Y: array<f32>;
@group(0) @binding(2) var<uniform> step: Step;
@compute @workgroup_size(${WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
  let m = wid.x;
  let M = step.tokens * ${streams}u;
  if (m >= M) { return; }
  for (var j = li; j < ${n}u; j += ${WORKGROUP}u) {
    var v = 0.0;
    for (var z = 0u; z < ${splits}u; z++) { v += PART[(z * M + m) * ${n}u + j]; }
    Y[m * ${n}u + j] += v;
  }
}
`
}

/** Splits along K for a prompt product of input width `k` (at most 8, each at least 512 wide). */
export function gemmSplits(k: number): number {
  return Math.max(1, Math.min(8, Math.floor(k / 512)))
}

/**
 * A prompt call's q·k·v output [M, (heads + 2·kv)·d] into attention's inputs: rotary on q and k,
 * q to Q [M, heads·d], k and v into the cache at each token's slot. A workgroup per row.
 */
export function ropeCacheKernel(l: LayerShape): string {
  const d = l.headDim
  const half = d / 2
  const qRows = l.heads * d
  const width = (l.heads + 2 * l.kvHeads) * d
  const rotated = (l.heads + l.kvHeads) * half
  return `${STEP_STRUCT}
@group(0) @binding(0) var<storage, read> QKV: array<f32>;
@group(0) @binding(1) var<storage, read_write> Q: array<f32>;
@group(0) @binding(2) var<storage, read_write> KC: array<f32>;
@group(0) @binding(3) var<storage, read_write> VC: array<f32>;
@group(0) @binding(4) var<storage, read> ROPE: array<f32>;
@group(0) @binding(5) var<uniform> step: Step;
@compute @workgroup_size(${WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
  let m = wid.x;
  let token = m / ${l.streams}u;
  if (token >= step.tokens) { return; }
  let p = m % ${l.streams}u;
  let pos = step.pos + token;
  let slot = step.slot + token;
  let row = m * ${width}u;
  for (var j = li; j < ${rotated + l.kvHeads * d}u; j += ${WORKGROUP}u) {
    if (j < ${rotated}u) {
      let head = j / ${half}u;
      let i = j % ${half}u;
      let a = QKV[row + head * ${d}u + i];
      let b = QKV[row + head * ${d}u + i + ${half}u];
      let c = ROPE[(pos * ${half}u + i) * 2u];
      let sn = ROPE[(pos * ${half}u + i) * 2u + 1u];
      let ra = a * c - b * sn;
      let rb = b * c + a * sn;
      if (head < ${l.heads}u) {
        Q[m * ${qRows}u + head * ${d}u + i] = ra;
        Q[m * ${qRows}u + head * ${d}u + i + ${half}u] = rb;
      } else {
        let at = ((p * ${l.kvHeads}u + head - ${l.heads}u) * ${l.capacity}u + slot) * ${d}u + i;
        KC[at] = ra;
        KC[at + ${half}u] = rb;
      }
    } else {
      let e = j - ${rotated}u;
      VC[((p * ${l.kvHeads}u + e / ${d}u) * ${l.capacity}u + slot) * ${d}u + e % ${d}u] = QKV[row + ${(l.heads + l.kvHeads) * d}u + e];
    }
  }
}
`
}

/** A prompt call's gate·up output [M, 2I] (gate rows first) into SiLU(gate)·up [M, I]: a workgroup per row. */
export function siluKernel(intermediate: number, streams: number): string {
  return `${STEP_STRUCT}
@group(0) @binding(0) var<storage, read> GU: array<f32>;
@group(0) @binding(1) var<storage, read_write> HOUT: array<f32>;
@group(0) @binding(2) var<uniform> step: Step;
@compute @workgroup_size(${WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
  let m = wid.x;
  if (m / ${streams}u >= step.tokens) { return; }
  for (var j = li; j < ${intermediate}u; j += ${WORKGROUP}u) {
    let g = GU[m * ${2 * intermediate}u + j];
    HOUT[m * ${intermediate}u + j] = g / (1.0 + exp(-g)) * GU[m * ${2 * intermediate}u + ${intermediate}u + j];
  }
}
`
}

/**
 * The call's embedding rows: row m (token m / P, every stream the same) from one chunk of the
 * table, rows [first, first + rows), in the table's format (read as the head reads it); tokens
 * outside the chunk are another dispatch's. Token ids in IDS. A workgroup per row.
 */
export function embedKernel(hidden: number, streams: number, chunk: {first: number; rows: number}, weights: WeightFormat): string {
  return `${STEP_STRUCT}
${weightBinding(weights)}
@group(0) @binding(1) var<storage, read> IDS: array<u32>;
@group(0) @binding(2) var<storage, read_write> X: array<vec4<f32>>;
@group(0) @binding(3) var<uniform> step: Step;
@compute @workgroup_size(${WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
  let m = wid.x;
  let token = m / ${streams}u;
  if (token >= step.tokens) { return; }
  let id = IDS[token];
  if (id < ${chunk.first}u || id >= ${chunk.first + chunk.rows}u) { return; }
  let row = (id - ${chunk.first}u) * ${hidden / 4}u;
  for (var i = li; i < ${hidden / 4}u; i += ${WORKGROUP}u) { X[m * ${hidden / 4}u + i] = weight(row + i); }
}
`
}

/**
 * Greedy decoding on the GPU: the index of the largest logit (the first of equals, as the host's
 * argmax picks), written as the next call's token id (IDS[0]) and kept at TOKENS[step.pos], and
 * with P > 1 the step's stream weights kept at WREC[step.pos · P …], so decode steps can follow
 * one another without the logits coming back. One workgroup.
 */
export function argmaxKernel(vocab: number, streams: number): string {
  return `${STEP_STRUCT}
@group(0) @binding(0) var<storage, read> LOGITS: array<f32>;
@group(0) @binding(1) var<storage, read_write> IDS: array<u32>;
@group(0) @binding(2) var<storage, read_write> TOKENS: array<u32>;
@group(0) @binding(3) var<uniform> step: Step;
${streams > 1 ? `@group(0) @binding(4) var<storage, read> SW: array<f32>;
@group(0) @binding(5) var<storage, read_write> WREC: array<f32>;` : ''}
var<workgroup> values: array<f32, ${WORKGROUP}>;
var<workgroup> indices: array<u32, ${WORKGROUP}>;
@compute @workgroup_size(${WORKGROUP})
fn main(@builtin(local_invocation_index) li: u32) {
  var best = -3.4e38;
  var at = 0xffffffffu;
  for (var i = li; i < ${vocab}u; i += ${WORKGROUP}u) {
    let v = LOGITS[i];
    if (v > best) { best = v; at = i; }
  }
  values[li] = best;
  indices[li] = at;
  workgroupBarrier();
  for (var half = ${WORKGROUP / 2}u; half > 0u; half >>= 1u) {
    if (li < half) {
      let v = values[li + half];
      let j = indices[li + half];
      if (v > values[li] || (v == values[li] && j < indices[li])) { values[li] = v; indices[li] = j; }
    }
    workgroupBarrier();
  }
  if (li == 0u) {
    IDS[0] = indices[0];
    TOKENS[step.pos] = indices[0];
  }
  ${streams > 1 ? `if (li < ${streams}u) { WREC[step.pos * ${streams}u + li] = SW[li]; }` : ''}
}
`
}
