// The parscale CLI as one bundle for a machine without npm packages (the GPU machine has no
// Node: pack.sh carries node, onnxruntime-node and this bundle). oclif finds the commands
// through its "explicit" strategy (package.json written next to the bundle by pack.sh).
import {pathToFileURL} from 'node:url'

import {execute} from '@oclif/core'

import Bench from '../../src/commands/bench.js'
import Convert from '../../src/commands/convert.js'
import Eval from '../../src/commands/eval.js'
import List from '../../src/commands/list.js'
import Pull from '../../src/commands/pull.js'
import Rm from '../../src/commands/rm.js'
import Run from '../../src/commands/run.js'

export const COMMANDS = {bench: Bench, convert: Convert, eval: Eval, list: List, pull: Pull, rm: Rm, run: Run}

// No top-level await: oclif imports this module for COMMANDS while it runs.
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) void execute({dir: import.meta.url})
