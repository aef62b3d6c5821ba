import onnxProto from 'onnx-proto'

import type {ExternalLocation} from './external-data.js'

const {onnx} = onnxProto

export type ElementType = 'float32' | 'float16' | 'int64' | 'int32' | 'bool' | 'uint8' | 'int8'
/** A tensor dimension: a fixed size or a symbolic name such as "batch". */
export type Dim = number | string
export type AttributeValue = number | number[] | string | {float: number} | {floats: number[]} | {graph: onnxProto.onnx.IGraphProto}

const ELEMENT_TYPES: Record<ElementType, number> = {
  float32: onnx.TensorProto.DataType.FLOAT,
  float16: onnx.TensorProto.DataType.FLOAT16,
  int64: onnx.TensorProto.DataType.INT64,
  int32: onnx.TensorProto.DataType.INT32,
  bool: onnx.TensorProto.DataType.BOOL,
  uint8: onnx.TensorProto.DataType.UINT8,
  int8: onnx.TensorProto.DataType.INT8,
}

const OPSET = 17
const MICROSOFT_OPSET = 1

/**
 * Builds one ONNX graph node by node. Large weights are initializers whose bytes live in
 * external data files (written elsewhere, as they stream); small constants are inline.
 * Node outputs get unique names from the node's name, so a reader of the graph can tell
 * which block produced a value.
 */
export class GraphBuilder {
  private nodes: onnxProto.onnx.INodeProto[] = []
  private readonly initializers: onnxProto.onnx.ITensorProto[] = []
  private readonly inputs: onnxProto.onnx.IValueInfoProto[] = []
  private readonly outputs: onnxProto.onnx.IValueInfoProto[] = []
  private readonly constantCache = new Map<string, string>()
  private readonly usedNames = new Set<string>()
  private scope = ''

  constructor(readonly graphName: string) {}

  /** Runs `body` with node names prefixed by `scope` (e.g. "layers.3/attn"). */
  within<T>(scope: string, body: () => T): T {
    const outer = this.scope
    this.scope = outer ? `${outer}/${scope}` : scope
    try {
      return body()
    } finally {
      this.scope = outer
    }
  }

  /**
   * A subgraph (an `If` branch): the nodes `body` emits go into it, and it returns the values
   * that are its outputs (float32, each made by a node of the body). Its nodes read outer
   * values and constants by name.
   */
  subgraph(name: string, body: () => string[]): onnxProto.onnx.IGraphProto {
    const outer = this.nodes
    const inner: onnxProto.onnx.INodeProto[] = []
    this.nodes = inner
    try {
      const outputs = body()
      return {name: this.uniqueName(name), node: inner, output: outputs.map((o) => valueInfo(o, 'float32', null))}
    } finally {
      this.nodes = outer
    }
  }

  input(name: string, type: ElementType, shape: Dim[]): string {
    this.inputs.push(valueInfo(name, type, shape))
    return name
  }

  /**
   * Declares `value` as a graph output named `name`. A node's output is renamed in place
   * rather than copied through an Identity: outputs such as the KV cache are large and are
   * produced at every step. Call it once every consumer of `value` exists.
   */
  output(value: string, name: string, type: ElementType, shape: Dim[] | null): void {
    const producer = this.nodes.find((n) => n.output?.includes(value))
    const isOutputAlready = this.outputs.some((o) => o.name === value)
    if (producer && !isOutputAlready) {
      producer.output = producer.output!.map((o) => (o === value ? name : o))
      renameInputs(this.nodes, value, name)
    } else {
      this.nodes.push({opType: 'Identity', input: [value], output: [name], name: `output/${name}`})
    }
    this.outputs.push(valueInfo(name, type, shape))
  }

  /** Emits one node and returns the names of its outputs. */
  nodeN(opType: string, inputs: string[], outputCount: number, attributes: Record<string, AttributeValue> = {}, domain = ''): string[] {
    const name = this.uniqueName(`${this.scope ? this.scope + '/' : ''}${opType}`)
    const outputs = Array.from({length: outputCount}, (_, i) => (outputCount === 1 ? name : `${name}:${i}`))
    this.nodes.push({
      opType,
      domain,
      name,
      input: inputs,
      output: outputs,
      attribute: Object.entries(attributes).map(([key, value]) => attribute(key, value)),
    })
    return outputs
  }

  node(opType: string, inputs: string[], attributes: Record<string, AttributeValue> = {}, domain = ''): string {
    return this.nodeN(opType, inputs, 1, attributes, domain)[0]
  }

  /**
   * One node whose optional outputs may be left out: `wanted[i]` false gives output i an empty
   * name (not computed). Returns the names, '' where left out.
   */
  nodeSome(opType: string, inputs: string[], wanted: boolean[], attributes: Record<string, AttributeValue> = {}, domain = ''): string[] {
    const names = this.nodeN(opType, inputs, wanted.length, attributes, domain)
    const node = this.nodes[this.nodes.length - 1]
    node.output = names.map((name, i) => (wanted[i] ? name : ''))
    return node.output
  }

  /** A small inline int64 tensor (shapes, axes, indices); identical constants are shared. */
  int64(values: number[], shape: number[] = [values.length]): string {
    return this.inlineConstant('int64', values, shape)
  }

  float(values: number[], shape: number[] = [values.length]): string {
    return this.inlineConstant('float32', values, shape)
  }

  /** A float32 initializer held inline (for small tensors computed at conversion time). */
  inlineFloat(name: string, data: Float32Array, shape: number[]): string {
    this.initializers.push({
      name,
      dims: shape,
      dataType: ELEMENT_TYPES.float32,
      rawData: new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
    })
    return name
  }

  /** A float16 initializer held inline (bits as stored): the half GPU form's small vectors and rotary tables. */
  inlineHalf(name: string, bits: Uint16Array, shape: number[]): string {
    this.initializers.push({
      name,
      dims: shape,
      dataType: ELEMENT_TYPES.float16,
      rawData: new Uint8Array(bits.buffer, bits.byteOffset, bits.byteLength),
    })
    return name
  }

  /** An initializer whose bytes are stored in an external data file. */
  externalInitializer(name: string, type: ElementType, shape: number[], location: ExternalLocation): string {
    this.initializers.push({
      name,
      dims: shape,
      dataType: ELEMENT_TYPES[type],
      dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [
        {key: 'location', value: location.file},
        {key: 'offset', value: String(location.offset)},
        {key: 'length', value: String(location.length)},
      ],
    })
    return name
  }

  /** Serializes the graph as an ONNX model. */
  toModelBytes(producerVersion: string, metadata: Record<string, string> = {}): Uint8Array {
    const model = onnx.ModelProto.create({
      irVersion: 8,
      producerName: 'parscale',
      producerVersion,
      opsetImport: [
        {domain: '', version: OPSET},
        {domain: 'com.microsoft', version: MICROSOFT_OPSET},
      ],
      metadataProps: Object.entries(metadata).map(([key, value]) => ({key, value})),
      graph: {
        name: this.graphName,
        node: this.nodes,
        initializer: this.initializers,
        input: this.inputs,
        output: this.outputs,
      },
    })
    return onnx.ModelProto.encode(model).finish()
  }

  private inlineConstant(type: 'int64' | 'float32', values: number[], shape: number[]): string {
    const key = `${type}:${shape.join('x')}:${values.join(',')}`
    const cached = this.constantCache.get(key)
    if (cached) return cached
    const name = this.uniqueName(`const/${type}/${values.length <= 6 ? values.join('_') : 'n' + values.length}`)
    const tensor: onnxProto.onnx.ITensorProto = {name, dims: shape, dataType: ELEMENT_TYPES[type]}
    if (type === 'int64') tensor.int64Data = values
    else tensor.floatData = values
    this.initializers.push(tensor)
    this.constantCache.set(key, name)
    return name
  }

  private uniqueName(base: string): string {
    let name = base
    for (let i = 1; this.usedNames.has(name); i++) name = `${base}_${i}`
    this.usedNames.add(name)
    return name
  }
}

/** `shape` null: any rank (an output whose rank depends on an input's values). */
/** Renames a value wherever `nodes` read it, the subgraphs of their branches included. */
function renameInputs(nodes: onnxProto.onnx.INodeProto[], from: string, to: string): void {
  for (const node of nodes) {
    node.input = node.input?.map((i) => (i === from ? to : i))
    for (const attribute of node.attribute ?? []) if (attribute.g?.node) renameInputs(attribute.g.node, from, to)
  }
}

function valueInfo(name: string, type: ElementType, shape: Dim[] | null): onnxProto.onnx.IValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType: ELEMENT_TYPES[type],
        ...(shape ? {shape: {dim: shape.map((d) => (typeof d === 'number' ? {dimValue: d} : {dimParam: d}))}} : {}),
      },
    },
  }
}

function attribute(name: string, value: AttributeValue): onnxProto.onnx.IAttributeProto {
  const {AttributeType} = onnx.AttributeProto
  if (typeof value === 'number') return {name, type: AttributeType.INT, i: value}
  if (typeof value === 'string') return {name, type: AttributeType.STRING, s: new TextEncoder().encode(value)}
  if (Array.isArray(value)) return {name, type: AttributeType.INTS, ints: value}
  if ('float' in value) return {name, type: AttributeType.FLOAT, f: value.float}
  if ('graph' in value) return {name, type: AttributeType.GRAPH, g: value.graph}
  return {name, type: AttributeType.FLOATS, floats: value.floats}
}
