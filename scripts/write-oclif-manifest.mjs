// Writes oclif.manifest.json from the compiled commands, so that a CLI call imports only the
// command it runs instead of every command (and ONNX Runtime with them).
import {rmSync, writeFileSync} from 'node:fs'
import {fileURLToPath} from 'node:url'

import {Config} from '@oclif/core'

const root = fileURLToPath(new URL('..', import.meta.url))
// oclif loads an existing manifest instead of the commands: drop it, or new flags never reach --help.
rmSync(new URL('../oclif.manifest.json', import.meta.url), {force: true})
const config = await Config.load({root, devPlugins: false, userPlugins: false})
const plugin = config.plugins.get(config.pjson.name)
writeFileSync(new URL('../oclif.manifest.json', import.meta.url), JSON.stringify(plugin.manifest, null, 2) + '\n')
