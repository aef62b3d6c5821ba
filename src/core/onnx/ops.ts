import type {GraphBuilder} from './builder.js'

/**
 * Named ONNX primitives over a GraphBuilder, so the model blocks read like the
 * arithmetic they implement. Shape arguments are int64 tensors (see `DynamicShapes`).
 */
export class Ops {
  private shapes = new Map<string, string>()

  constructor(readonly g: GraphBuilder) {}

  add(a: string, b: string): string {
    return this.g.node('Add', [a, b])
  }

  sub(a: string, b: string): string {
    return this.g.node('Sub', [a, b])
  }

  mul(a: string, b: string): string {
    return this.g.node('Mul', [a, b])
  }

  div(a: string, b: string): string {
    return this.g.node('Div', [a, b])
  }

  neg(x: string): string {
    return this.g.node('Neg', [x])
  }

  sigmoid(x: string): string {
    return this.g.node('Sigmoid', [x])
  }

  /** x · sigmoid(x) */
  silu(x: string): string {
    return this.mul(x, this.sigmoid(x))
  }

  cos(x: string): string {
    return this.g.node('Cos', [x])
  }

  sin(x: string): string {
    return this.g.node('Sin', [x])
  }

  sqrt(x: string): string {
    return this.g.node('Sqrt', [x])
  }

  matmul(a: string, b: string): string {
    return this.g.node('MatMul', [a, b])
  }

  /** y = x · Wᵀ (+ bias) for x [rows, in] and a weight stored as Hugging Face does, [out, in]. */
  linear(x: string, weight: string, bias?: string): string {
    return this.g.node('Gemm', bias ? [x, weight, bias] : [x, weight], {transB: 1})
  }

  reshape(x: string, shape: string): string {
    return this.g.node('Reshape', [x, shape])
  }

  transpose(x: string, perm: number[]): string {
    return this.g.node('Transpose', [x], {perm})
  }

  concat(inputs: string[], axis: number): string {
    return this.g.node('Concat', inputs, {axis})
  }

  /** Elements [start, end) of `axis`; start/end are int64 tensors of one element. */
  slice(x: string, start: string, end: string, axis: number): string {
    return this.g.node('Slice', [x, start, end, this.g.int64([axis])])
  }

  unsqueeze(x: string, axes: number[]): string {
    return this.g.node('Unsqueeze', [x, this.g.int64(axes)])
  }

  expand(x: string, shape: string): string {
    return this.g.node('Expand', [x, shape])
  }

  gather(data: string, indices: string, axis = 0): string {
    return this.g.node('Gather', [data, indices], {axis})
  }

  softmax(x: string, axis = -1): string {
    return this.g.node('Softmax', [x], {axis})
  }

  reduceMean(x: string, axes: number[], keepdims = 1): string {
    return this.g.node('ReduceMean', [x], {axes, keepdims})
  }

  reduceSum(x: string, axes: number[], keepdims = 1): string {
    return this.g.node('ReduceSum', [x, this.g.int64(axes)], {keepdims})
  }

  castTo(x: string, type: 'float32' | 'int64' | 'bool'): string {
    const to = {float32: 1, int64: 7, bool: 9}[type]
    return this.g.node('Cast', [x], {to})
  }

  where(condition: string, ifTrue: string, ifFalse: string): string {
    return this.g.node('Where', [condition, ifTrue, ifFalse])
  }

  less(a: string, b: string): string {
    return this.g.node('Less', [a, b])
  }

  lessOrEqual(a: string, b: string): string {
    return this.g.node('LessOrEqual', [a, b])
  }

  range(start: string, limit: string, delta: string): string {
    return this.g.node('Range', [start, limit, delta])
  }

  shape(x: string, start?: number, end?: number): string {
    const attributes: Record<string, number> = {}
    if (start !== undefined) attributes.start = start
    if (end !== undefined) attributes.end = end
    return this.g.node('Shape', [x], attributes)
  }

  /** `body` building a subgraph: shapes it builds stay inside it (the outer graph cannot read them). */
  inSubgraph<T>(body: () => T): T {
    const outer = this.shapes
    this.shapes = new Map(outer)
    try {
      return body()
    } finally {
      this.shapes = outer
    }
  }

  /** Builds a 1-D int64 shape from fixed sizes and 1-element dynamic dims (tensor names). */
  shapeOf(parts: (number | string)[]): string {
    if (parts.every((p) => typeof p === 'number')) return this.g.int64(parts as number[])
    // Every layer reshapes to the same few shapes: build each one once.
    const key = parts.join(',')
    let shape = this.shapes.get(key)
    if (!shape) {
      shape = this.g.within('shapes', () => this.concat(parts.map((p) => (typeof p === 'number' ? this.g.int64([p]) : p)), 0))
      this.shapes.set(key, shape)
    }
    return shape
  }
}
