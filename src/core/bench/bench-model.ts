// Which package a benchmark measures: a synthetic shape (built once, cached) or a user's model.
import {UsageError, UserError} from '../errors.js'
import {readManifest} from '../package/manifest.js'
import {resolveModel} from '../package/resolve.js'
import {syntheticShape, type SyntheticShape} from '../checkpoint/synthetic.js'
import {ensureSyntheticPackage} from './synthetic-package.js'
import {describeQuant, type QuantScheme} from '../quant/scheme.js'

export interface BenchModelRequest {
  /** A package, checkpoint folder or repo id; undefined with no synthetic shape: the default model. */
  model?: string
  /** A preset name (0.5b, …); `dims` override its sizes, or describe a shape on their own. */
  synthetic?: string
  dims: Partial<SyntheticShape>
  parallel: number[]
  /** Quantized weights: the package is converted with this scheme. */
  quant?: QuantScheme
}

export interface BenchModel {
  packageDir: string
  label: string
  /** Set for synthetic models (what --vs-params grows). */
  shape?: SyntheticShape
}

export function prepareBenchModel(request: BenchModelRequest, onStatus: (text: string) => void, onNotice?: (line: string) => void): BenchModel {
  const explicit = Object.values(request.dims).some((v) => v !== undefined)
  if (request.synthetic || explicit) {
    if (request.model) throw new UsageError('give a MODEL or --synthetic, not both')
    const shape = syntheticShape(request.synthetic, request.dims)
    const packageDir = ensureSyntheticPackage(shape, {parallel: request.parallel, quant: request.quant, onProgress: onStatus})
    const weights = request.quant ? describeQuant(request.quant) : 'fp32'
    const label = `synthetic ${request.synthetic ?? 'custom'} (hidden ${shape.hiddenSize}, ${shape.numLayers} layers, ${shape.numHeads}/${shape.numKvHeads} heads, intermediate ${shape.intermediateSize}, vocab ${shape.vocabSize}), ${weights}`
    return {packageDir, label, shape}
  }
  const {packageDir, label} = resolveModel(request.model, {quant: request.quant, onProgress: (p) => onStatus(`converting: ${p.phase}`), onNotice})
  const have = readManifest(packageDir).parallel
  const missing = request.parallel.filter((p) => !have.includes(p))
  if (missing.length) throw new UserError(`${label} has no P = ${missing.join(', ')} (it has ${have.join(', ')}); pass --parallel ${have.join(',')}`)
  return {packageDir, label}
}
