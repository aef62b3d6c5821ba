import ora, {type Ora} from 'ora'

/**
 * A spinner for long work, shown only when stderr is a terminal: pipes and CI logs get
 * nothing. `update` repaints at once, so synchronous work still shows its progress.
 */
export class Progress {
  private readonly spinner: Ora | undefined
  private lastPaint = 0

  constructor(text: string, enabled = Boolean(process.stderr.isTTY)) {
    // A terminal of zero columns (a pseudo-terminal nobody sized) made ora erase lines without
    // end, megabytes a second: no spinner there.
    const sized = process.stderr.columns !== 0
    this.spinner = enabled && sized ? ora({text, stream: process.stderr}).start() : undefined
  }

  update(text: string): void {
    if (!this.spinner) return
    // The text always changes (the spinner's own frames show the latest); painting is throttled.
    this.spinner.text = text
    const now = Date.now()
    if (now - this.lastPaint < 80) return
    this.lastPaint = now
    this.spinner.render()
  }

  /** A line on stderr above the spinner. */
  log(line: string): void {
    this.spinner?.clear()
    process.stderr.write(line + '\n')
    this.spinner?.render()
  }

  succeed(text: string): void {
    this.spinner?.succeed(text)
  }

  stop(): void {
    this.spinner?.stop()
  }
}
