import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../base-command.js'
import {UserError} from '../core/errors.js'
import {hubCacheDir, isRepoIdShape, removeCachedRepo, removeCachedRevision} from '../core/hub/cache.js'
import {formatBytes} from '../core/format.js'
import {cachedRepoId, packagesOf, removePackage} from '../core/hub/inventory.js'
import {convertedCacheDir} from '../core/package/paths.js'

interface Removed {
  kind: 'checkpoint' | 'converted'
  name: string
  path: string
  bytes: number
}

export default class Rm extends BaseCommand {
  static override summary = 'Remove a cached checkpoint and/or its converted packages.'

  static override description = `<model> is a repo id (org/name; @revision removes only that snapshot and the blobs no other snapshot uses) or a converted package's folder name. Without --checkpoint or --converted both are removed. Asks nothing.`

  static override examples = [
    '<%= config.bin %> rm ParScale/ParScale-1.8B-P4-Inst',
    '<%= config.bin %> rm ParScale/ParScale-1.8B-P4-Inst --converted',
    '<%= config.bin %> rm ParScale/ParScale-1.8B-P4-Inst@main --json',
  ]

  static override args = {
    model: Args.string({required: true, description: 'repo id (org/name[@revision]) or converted package name'}),
  }

  static override flags = {
    checkpoint: Flags.boolean({description: 'remove only the checkpoint in the Hugging Face cache'}),
    converted: Flags.boolean({description: 'remove only converted packages'}),
    json: Flags.boolean({description: 'print what was removed as JSON on stdout'}),
  }

  async run(): Promise<void> {
    const {args, flags} = await this.parse(Rm)
    const both = !flags.checkpoint && !flags.converted
    const at = args.model.indexOf('@')
    const id = at >= 0 ? args.model.slice(0, at) : args.model
    const revision = at >= 0 ? args.model.slice(at + 1) : undefined
    const removed: Removed[] = []

    if ((both || flags.checkpoint) && isRepoIdShape(id)) {
      const repoId = cachedRepoId(id)
      if (repoId) {
        if (revision) {
          const r = await removeCachedRevision(repoId, revision)
          if (r) removed.push({kind: 'checkpoint', name: `${repoId}@${revision}`, path: r.path, bytes: r.bytes})
        } else {
          const r = await removeCachedRepo(repoId)
          if (r) removed.push({kind: 'checkpoint', name: repoId, path: r.path, bytes: r.bytes})
        }
      }
    }
    if (both || flags.converted) {
      for (const p of packagesOf(revision ? args.model : id)) {
        await removePackage(p)
        removed.push({kind: 'converted', name: p.name, path: p.path, bytes: p.sizeBytes})
      }
    }

    if (removed.length === 0) {
      const where = [
        both || flags.checkpoint ? `the Hugging Face cache (${hubCacheDir()})` : undefined,
        both || flags.converted ? `converted packages (${convertedCacheDir()})` : undefined,
      ]
        .filter(Boolean)
        .join(' nor ')
      throw new UserError(`nothing to remove: ${args.model} is not in ${where}`)
    }
    const bytes = removed.reduce((a, r) => a + r.bytes, 0)
    if (flags.json) {
      this.log(JSON.stringify({removed, bytes}, null, 2))
      return
    }
    for (const r of removed) this.log(`removed ${r.kind} ${r.name} (${formatBytes(r.bytes)}): ${r.path}`)
  }
}
