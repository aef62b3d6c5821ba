// An independent float64 reference of the ParScale forward pass in plain JavaScript, written
// from the golden README's arithmetic (as training/np_parscale.py is): no ONNX, no graph
// builder. Tests check its logits against the PyTorch golden values, then use its aggregation
// weights (computed from its own final hidden states) as the expected `stream_weights`.
import {Checkpoint} from '../../src/core/checkpoint/checkpoint.js'
import {readTensorFloat32} from '../../src/core/checkpoint/dtype.js'

export interface ReferenceOutput {
  /** [positions][vocab] */
  logits: number[][]
  /** [positions][P]: softmax of the aggregation head, smoothed: w·(1 − s) + s/P. */
  streamWeights: number[][]
}

type Matrix = {data: Float32Array; rows: number; cols: number}

/** x [n][cols] · Wᵀ (W [rows, cols], as Linear stores it) + bias. */
function linear(x: number[][], w: Matrix, bias?: Float32Array): number[][] {
  return x.map((row) => {
    const out = new Array<number>(w.rows)
    for (let r = 0; r < w.rows; r++) {
      let sum = bias ? bias[r]! : 0
      const base = r * w.cols
      for (let c = 0; c < w.cols; c++) sum += row[c]! * w.data[base + c]!
      out[r] = sum
    }
    return out
  })
}

const silu = (v: number) => v / (1 + Math.exp(-v))

function rmsNorm(x: number[][], weight: Float32Array, eps: number): number[][] {
  return x.map((row) => {
    const mean = row.reduce((s, v) => s + v * v, 0) / row.length
    const scale = 1 / Math.sqrt(mean + eps)
    return row.map((v, i) => v * scale * weight[i]!)
  })
}

function softmax(values: number[]): number[] {
  const max = Math.max(...values)
  const e = values.map((v) => Math.exp(v - max))
  const sum = e.reduce((a, b) => a + b, 0)
  return e.map((v) => v / sum)
}

/** Full forward of one sequence (no cache) at the checkpoint's own P. */
export function referenceForward(dir: string, ids: number[]): ReferenceOutput {
  const checkpoint = Checkpoint.open(dir)
  const c = checkpoint.config
  const tensor = (name: string) => readTensorFloat32(checkpoint.get(name))
  const matrix = (name: string): Matrix => {
    const info = checkpoint.get(name)
    return {data: readTensorFloat32(info), rows: info.shape[0]!, cols: info.shape[1]!}
  }
  const P = c.modelType === 'qwen2_parscale' ? c.parallel : 1
  const prefix = P > 1 ? c.prefixTokens : 0
  const {hiddenSize: H, numHeads: nh, numKvHeads: nkv, headDim: hd, rmsNormEps: eps} = c
  const S = ids.length
  const half = hd / 2
  const rope = (vec: number[], position: number): number[] => {
    const out = new Array<number>(hd)
    for (let i = 0; i < half; i++) {
      const angle = position / c.ropeTheta ** ((2 * i) / hd)
      const [cos, sin] = [Math.cos(angle), Math.sin(angle)]
      out[i] = vec[i]! * cos - vec[i + half]! * sin
      out[i + half] = vec[i + half]! * cos + vec[i]! * sin
    }
    return out
  }

  const embed = matrix('model.embed_tokens.weight')
  const embedded = ids.map((id) => Array.from(embed.data.subarray(id * H, (id + 1) * H)))
  // streams[p] is [S][H]: every stream starts from the same embeddings.
  let streams = Array.from({length: P}, () => embedded.map((row) => [...row]))
  for (let layer = 0; layer < c.numLayers; layer++) {
    const name = (n: string) => `model.layers.${layer}.${n}`
    const [wq, wk, wv, wo] = ['q_proj', 'k_proj', 'v_proj', 'o_proj'].map((n) => matrix(name(`self_attn.${n}.weight`)))
    const [bq, bk, bv] = ['q_proj', 'k_proj', 'v_proj'].map((n) => tensor(name(`self_attn.${n}.bias`)))
    const prefixK = prefix ? tensor(name('self_attn.prefix_k')) : undefined // [P, kv, prefix, hd]
    const prefixV = prefix ? tensor(name('self_attn.prefix_v')) : undefined
    streams = streams.map((x, p) => {
      const h = rmsNorm(x, tensor(name('input_layernorm.weight')), eps)
      const q = linear(h, wq!, bq)
      const k = linear(h, wk!, bk)
      const v = linear(h, wv!, bv)
      const attended = q.map((qRow, t) => {
        const out: number[] = []
        for (let head = 0; head < nh; head++) {
          const g = Math.floor(head / (nh / nkv))
          const query = rope(qRow.slice(head * hd, (head + 1) * hd), t)
          const keys: number[][] = []
          const values: number[][] = []
          for (let j = 0; j < prefix; j++) {
            const at = ((p * nkv + g) * prefix + j) * hd
            keys.push(Array.from(prefixK!.subarray(at, at + hd)))
            values.push(Array.from(prefixV!.subarray(at, at + hd)))
          }
          for (let j = 0; j <= t; j++) {
            keys.push(rope(k[j]!.slice(g * hd, (g + 1) * hd), j))
            values.push(v[j]!.slice(g * hd, (g + 1) * hd))
          }
          const weights = softmax(keys.map((key) => key.reduce((s, kv, i) => s + kv * query[i]!, 0) / Math.sqrt(hd)))
          for (let i = 0; i < hd; i++) out.push(values.reduce((s, value, j) => s + weights[j]! * value[i]!, 0))
        }
        return out
      })
      const y = linear(attended, wo!).map((row, t) => row.map((v2, i) => v2 + x[t]![i]!))
      const h2 = rmsNorm(y, tensor(name('post_attention_layernorm.weight')), eps)
      const gate = linear(h2, matrix(name('mlp.gate_proj.weight')))
      const up = linear(h2, matrix(name('mlp.up_proj.weight')))
      const down = linear(gate.map((row, t) => row.map((g2, i) => silu(g2) * up[t]![i]!)), matrix(name('mlp.down_proj.weight')))
      return down.map((row, t) => row.map((v2, i) => v2 + y[t]![i]!))
    })
  }
  const normed = streams.map((x) => rmsNorm(x, tensor('model.norm.weight'), eps))

  // The aggregation weights, straight from the final hidden states: features h·P + p.
  let streamWeights: number[][]
  if (P > 1) {
    const features = Array.from({length: S}, (_, t) => Array.from({length: H * P}, (_, f) => normed[f % P]![t]![Math.floor(f / P)]!))
    const hiddenLayer = linear(features, matrix('model.aggregate_layer.0.weight'), tensor('model.aggregate_layer.0.bias')).map((row) => row.map(silu))
    const scores = linear(hiddenLayer, matrix('model.aggregate_layer.2.weight'), tensor('model.aggregate_layer.2.bias'))
    const s = c.attnSmooth
    streamWeights = scores.map((row) => softmax(row).map((w) => w * (1 - s) + s / P))
  } else {
    streamWeights = ids.map(() => [1])
  }
  const mixed = Array.from({length: S}, (_, t) => Array.from({length: H}, (_, i) => normed.reduce((sum, x, p) => sum + streamWeights[t]![p]! * x[t]![i]!, 0)))
  const head = matrix(c.tieWordEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight')
  return {logits: linear(mixed, head), streamWeights}
}
