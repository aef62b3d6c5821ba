import {Flags} from '@oclif/core'

import {BaseCommand} from '../base-command.js'
import {hubCacheDir} from '../core/hub/cache.js'
import {formatBytes, snakeCaseKeys} from '../core/format.js'
import {listCheckpoints, listConvertedPackages} from '../core/hub/inventory.js'
import {convertedCacheDir} from '../core/package/paths.js'
import {columns} from '../ui/table.js'

export default class List extends BaseCommand {
  static override summary = 'List cached checkpoints and converted packages.'

  static override description = `Checkpoints are the snapshots in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), including those Python's huggingface_hub downloaded. Converted packages are parscale's ONNX packages (PARSCALE_CACHE, else XDG_CACHE_HOME/parscale, else ~/.cache/parscale).`

  static override examples = ['<%= config.bin %> list', '<%= config.bin %> list --json']

  static override flags = {
    json: Flags.boolean({description: 'print JSON on stdout (hub_cache, checkpoints, converted_cache, packages)'}),
  }

  async run(): Promise<void> {
    const {flags} = await this.parse(List)
    const checkpoints = listCheckpoints()
    const packages = listConvertedPackages()
    if (flags.json) {
      this.log(
        JSON.stringify(
          snakeCaseKeys({
            hubCache: hubCacheDir(),
            checkpoints: checkpoints.map((c) => ({
              repoId: c.repoId,
              revision: c.revision,
              commit: c.commit,
              sizeBytes: c.sizeBytes,
              parallel: c.parallel ?? null,
              dtype: c.dtype ?? null,
              complete: c.complete,
              path: c.snapshotDir,
            })),
            convertedCache: convertedCacheDir(),
            packages: packages.map((p) => ({
              name: p.name,
              source: p.source ?? null,
              parallel: p.parallel,
              dtype: p.dtype ?? null,
              quant: p.quant ?? null,
              sizeBytes: p.sizeBytes,
              path: p.path,
            })),
          }),
          null,
          2,
        ),
      )
      return
    }

    const out: string[] = []
    out.push(`Checkpoints (${hubCacheDir()}):`)
    if (checkpoints.length === 0) out.push('  none — get one with: parscale pull <org/name>')
    else {
      out.push(
        columns(
          ['REPO', 'REVISION', 'SIZE', 'P', 'DTYPE', 'PATH'],
          checkpoints.map((c) => [
            c.repoId,
            c.revision === c.commit ? c.commit.slice(0, 7) : `${c.revision} (${c.commit.slice(0, 7)})`,
            formatBytes(c.sizeBytes),
            c.parallel === undefined ? '?' : String(c.parallel),
            c.dtype ?? '?',
            c.complete ? c.snapshotDir : `${c.snapshotDir} (incomplete)`,
          ]),
        ),
      )
    }
    out.push('', `Converted packages (${convertedCacheDir()}):`)
    if (packages.length === 0) out.push('  none')
    else {
      out.push(
        columns(
          ['NAME', 'SOURCE', 'P', 'WEIGHTS', 'SIZE', 'PATH'],
          packages.map((p) => [p.name, p.source ?? '?', p.parallel.join(',') || '?', p.quant ? `${p.quant.scheme} b${p.quant.blockSize}` : (p.dtype ?? '?'), formatBytes(p.sizeBytes), p.path]),
        ),
      )
    }
    this.log(out.join('\n'))
  }
}
