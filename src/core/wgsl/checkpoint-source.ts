import {Checkpoint} from '../checkpoint/checkpoint.js'
import {readTensorFloat32} from '../checkpoint/dtype.js'
import type {TensorSource} from './decoder.js'

/** A checkpoint folder's tensors, widened to float32 as they are read. */
export function checkpointSource(dir: string): TensorSource {
  const checkpoint = Checkpoint.open(dir)
  return {config: checkpoint.config, read: (name) => readTensorFloat32(checkpoint.get(name))}
}
