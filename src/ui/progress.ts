import ora, {type Ora} from 'ora'

/**
 * The spinner of every command (long work), shown only when stderr is a terminal: pipes and
 * CI logs get nothing. `update` repaints at once, so synchronous work still shows its progress.
 *
 * Ctrl-C must keep working while it spins, so ora is told to leave the terminal alone:
 * - `discardStdin: false`: ora would put stdin in raw mode (`stty -isig`), so Ctrl-C reached the
 *   process as a byte its stdin discarder never read (it listens without starting the stream:
 *   measured, a bare ora spinner ignored Ctrl-C), and bench's child processes not at all;
 * - `hideCursor: false`: hiding installs a SIGINT handler (to show the cursor again at exit),
 *   which holds Ctrl-C back until synchronous work (a conversion) is over.
 * The terminal then sends SIGINT to the whole foreground group at once, as without a spinner.
 */
export class Progress {
  private readonly spinner: Ora | undefined
  private lastPaint = 0

  constructor(text: string, enabled = Boolean(process.stderr.isTTY)) {
    // A terminal of zero columns (a pseudo-terminal nobody sized) made ora erase lines without
    // end, megabytes a second: no spinner there.
    const sized = process.stderr.columns !== 0
    this.spinner = enabled && sized ? ora({text, stream: process.stderr, discardStdin: false, hideCursor: false}).start() : undefined
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
