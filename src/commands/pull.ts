import {Args, Flags} from '@oclif/core'

import {BaseCommand} from '../base-command.js'
import {EXIT_INTERRUPTED, UsageError, UserError} from '../core/errors.js'
import {resolveFamilyName} from '../core/hub/families.js'
import type {PullProgress} from '../core/hub/pull.js'
import {formatBytes, formatDuration, formatRate, snakeCaseKeys} from '../core/format.js'
import {Progress} from '../ui/progress.js'

/** Bytes per second over the last few seconds. */
class RateMeter {
  private samples: {t: number; bytes: number}[] = []
  add(t: number, bytes: number): number {
    this.samples.push({t, bytes})
    while (this.samples.length > 2 && t - this.samples[0].t > 5) this.samples.shift()
    const first = this.samples[0]
    const dt = t - first.t
    return dt > 0.2 ? (bytes - first.bytes) / dt : 0
  }
}

function progressText(p: PullProgress, rate: number): string {
  if (p.phase === 'resolving') return `${p.repoId}: resolving`
  const parts = [`${p.repoId}: ${p.filesDone}/${p.filesTotal} files`, `${formatBytes(p.bytes)}/${formatBytes(p.totalBytes)}`]
  if (rate > 0) {
    parts.push(formatRate(rate))
    parts.push(`ETA ${formatDuration(Math.max(0, p.totalBytes - p.bytes) / rate)}`)
  }
  if (p.phase === 'waiting' && p.file) parts.push(`waiting for another pull of ${p.file}`)
  const current = p.active.sort((a, b) => b.total - a.total)[0]
  if (current) parts.push(`${current.file} ${formatBytes(current.bytes)}/${formatBytes(current.total)}${p.active.length > 1 ? ` (+${p.active.length - 1})` : ''}`)
  return parts.join(' · ')
}

export default class Pull extends BaseCommand {
  static override summary = 'Download a checkpoint from the Hugging Face Hub into the local Hugging Face cache.'

  static override description = `Downloads what running needs — config.json, generation_config.json, tokenizer files and the *.safetensors weights with their index — never *.bin/*.pt pickles or Python files. Files go to the standard Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), shared with Python's huggingface_hub. Interrupted downloads resume; every file is checked against the size and hash the hub lists.

Environment: HF_ENDPOINT (a mirror), HF_TOKEN (gated or private repos), HF_HUB_OFFLINE=1 (cache only).`

  static override examples = [
    '<%= config.bin %> pull ParScale/ParScale-1.8B-P4-Inst',
    '<%= config.bin %> pull ParScale/ParScale-1.8B-P1-Inst --parallel 8',
    '<%= config.bin %> pull ParScale/ParScale-QwenInit-3B-P2-Python@main --json',
  ]

  static override args = {
    model: Args.string({required: true, description: 'repo id (org/name), optionally @revision; a published ParScale name may omit the org'}),
  }

  static override flags = {
    parallel: Flags.integer({char: 'p', min: 1, description: 'take the -P{N} sibling of a published ParScale family'}),
    token: Flags.string({description: 'Hugging Face access token for gated or private repos (default: $HF_TOKEN)'}),
    include: Flags.string({multiple: true, description: 'also download files matching this glob (repeatable; * stays in a folder, ** crosses)'}),
    json: Flags.boolean({description: 'print a JSON summary on stdout (repo_id, revision, commit, snapshot_dir, files, bytes, downloaded_bytes, seconds, offline)'}),
  }

  async run(): Promise<void> {
    const {args, flags} = await this.parse(Pull)
    // Loaded here, not at the top: oclif imports every command to list them.
    const {pullModel} = await import('../core/hub/pull.js')
    const at = args.model.indexOf('@')
    const revision = at >= 0 ? args.model.slice(at + 1) : undefined
    if (at >= 0 && !revision) throw new UsageError(`${args.model}: empty revision after "@"`)
    const repoId = resolveFamilyName(at >= 0 ? args.model.slice(0, at) : args.model, flags.parallel)

    const interrupt = new AbortController()
    const onSigint = (): void => interrupt.abort(new UserError('pull interrupted; run it again to resume', EXIT_INTERRUPTED))
    process.once('SIGINT', onSigint)

    let spinner: Progress | undefined
    const meter = new RateMeter()
    let lastDraw = 0
    let lastPhase = ''
    // A TTY that reports no width (some pseudo-terminals) would make ora's line count infinite.
    const columns = process.stderr.isTTY ? (process.stderr.columns ?? 0) : 0
    const onProgress = columns > 0
      ? (p: PullProgress): void => {
          const rate = meter.add(p.elapsedSeconds, p.downloadedBytes)
          const now = Date.now()
          if (p.phase === lastPhase && now - lastDraw < 100) return
          lastDraw = now
          lastPhase = p.phase
          const full = progressText(p, rate)
          // One line, never wrapped: the spinner and a space take 2 columns.
          const text = full.length > columns - 3 ? `${full.slice(0, Math.max(0, columns - 4))}…` : full
          if (spinner) spinner.update(text)
          else spinner = new Progress(text)
        }
      : undefined

    try {
      const result = await pullModel({repoId, revision, token: flags.token, include: flags.include, onProgress, signal: interrupt.signal})
      spinner?.stop()
      if (flags.json) {
        this.log(
          JSON.stringify(
            snakeCaseKeys({
              repoId: result.repoId,
              revision: result.revision,
              commit: result.commit,
              snapshotDir: result.snapshotDir,
              files: result.files,
              bytes: result.bytes,
              downloadedBytes: result.downloadedBytes,
              seconds: Number(result.seconds.toFixed(3)),
              offline: result.offline,
            }),
            null,
            2,
          ),
        )
      } else {
        const how = result.offline
          ? 'from the cache (offline)'
          : result.downloadedBytes > 0
            ? `${formatBytes(result.downloadedBytes)} downloaded in ${formatDuration(result.seconds)}`
            : 'already cached'
        this.log(
          `${result.repoId}@${result.revision} (${result.commit.slice(0, 7)}): ${result.files.length} files, ${formatBytes(result.bytes)}, ${how}\n${result.snapshotDir}`,
        )
      }
    } catch (err) {
      spinner?.stop()
      if (interrupt.signal.aborted && interrupt.signal.reason instanceof UserError) throw interrupt.signal.reason
      throw err
    } finally {
      process.removeListener('SIGINT', onSigint)
    }
  }
}
