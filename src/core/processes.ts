/** Whether process `pid` runs on this machine (EPERM: it does, under another user). */
export function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM'
  }
}

/** Why a long-running command was asked to stop. */
export type StopCause = 'SIGTERM' | 'SIGINT' | 'launcher exited'

/** How often a process started by npm checks that its launcher is still there. */
const LAUNCHER_POLL_MS = 200

/**
 * Calls `onStop` when the process is asked to stop: SIGTERM, SIGINT, and, for a process that
 * npm started (`npx`, `npm exec`, `npm run`), its launcher exiting. npm runs a command through
 * `sh -c` and passes SIGTERM to that shell only, which dies and leaves this process running
 * under init: the signal never arrives, so the launcher going away stands for it. A process
 * npm did not start (`node bin/run.js` under nohup, say) keeps running when its shell exits.
 * `again` is true from the second request on. Returns a function that removes the handlers.
 */
export function onStopRequest(onStop: (cause: StopCause, again: boolean) => void, env: NodeJS.ProcessEnv = process.env): () => void {
  let requests = 0
  const request = (cause: StopCause) => onStop(cause, requests++ > 0)
  const onSignal = (signal: NodeJS.Signals) => request(signal as StopCause)
  process.on('SIGTERM', onSignal)
  process.on('SIGINT', onSignal)
  let poll: NodeJS.Timeout | undefined
  // npm sets npm_lifecycle_event ("npx" for npx and npm exec, the script's name for npm run).
  if (env.npm_lifecycle_event !== undefined) {
    const launcher = process.ppid
    poll = setInterval(() => {
      if (process.ppid === launcher) return
      clearInterval(poll)
      // After a signal, the launcher exiting is the same request (a service manager signals both).
      if (requests === 0) request('launcher exited')
    }, LAUNCHER_POLL_MS)
    poll.unref()
  }
  return () => {
    process.off('SIGTERM', onSignal)
    process.off('SIGINT', onSignal)
    clearInterval(poll)
  }
}
