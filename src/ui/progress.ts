import ora, {type Ora} from 'ora'

/**
 * A spinner for long work, shown only when stderr is a terminal: pipes and CI logs get
 * nothing. `update` repaints at once, so synchronous work still shows its progress.
 */
export class Progress {
  private readonly spinner: Ora | undefined
  private lastPaint = 0

  constructor(text: string, enabled = Boolean(process.stderr.isTTY)) {
    this.spinner = enabled ? ora({text, stream: process.stderr}).start() : undefined
  }

  update(text: string): void {
    if (!this.spinner) return
    const now = Date.now()
    if (now - this.lastPaint < 80) return
    this.lastPaint = now
    this.spinner.text = text
    this.spinner.render()
  }

  succeed(text: string): void {
    this.spinner?.succeed(text)
  }

  stop(): void {
    this.spinner?.stop()
  }
}
