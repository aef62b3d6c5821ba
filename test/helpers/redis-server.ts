// A real redis-server on a free loopback port, data in a temporary folder; stopped (and the
// folder removed) by `stop`, and killed at process exit whatever happened.
import {type ChildProcess, spawn, spawnSync} from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import {after, before} from 'node:test'

export interface RedisServer {
  url: string
  port: number
  /** Stops the server (SIGTERM, then SIGKILL) and waits for it to exit. */
  stop(): Promise<void>
  /** Stops it, then starts a fresh one on the same port (the data is gone). */
  restart(): Promise<void>
}

const live = new Set<ChildProcess>()
process.on('exit', () => {
  for (const child of live) child.kill('SIGKILL')
})

export function redisServerAvailable(): boolean {
  return spawnSync('redis-server', ['--version']).status === 0
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const {port} = server.address() as net.AddressInfo
      server.close(() => resolve(port))
    })
  })
}

/** Waits until `child` exits (SIGKILL after `graceMs`). */
export async function stopProcess(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM', graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  child.kill(signal)
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs)
  await exited
  clearTimeout(timer)
}

async function launch(port: number, dir: string): Promise<ChildProcess> {
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--save', '', '--appendonly', 'no', '--protected-mode', 'yes'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  live.add(child)
  child.once('exit', () => live.delete(child))
  let output = ''
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`redis-server did not start on port ${port}:\n${output}`)), 10_000)
    child.stdout!.on('data', (d: Buffer) => {
      output += d.toString()
      if (output.includes('Ready to accept connections')) {
        clearTimeout(timer)
        resolve()
      }
    })
    child.once('exit', (code) => {
      clearTimeout(timer)
      reject(new Error(`redis-server exited (${code}) on port ${port}:\n${output}`))
    })
    child.once('error', (error) => {
      clearTimeout(timer)
      reject(error)
    })
  })
  child.stdout!.resume()
  child.stderr!.resume()
  return child
}

export async function startRedis(): Promise<RedisServer> {
  if (!redisServerAvailable()) throw new Error('redis-server is not installed; the queue tests need it (Debian: apt-get install redis-server)')
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-redis-'))
  let port = 0
  let child: ChildProcess | undefined
  for (let attempt = 0; child === undefined; attempt++) {
    port = await freePort()
    try {
      child = await launch(port, dir)
    } catch (error) {
      if (attempt >= 4) {
        fs.rmSync(dir, {recursive: true, force: true})
        throw error
      }
    }
  }
  const server: RedisServer = {
    url: `redis://127.0.0.1:${port}`,
    port,
    async stop() {
      if (child) await stopProcess(child)
      fs.rmSync(dir, {recursive: true, force: true})
    },
    async restart() {
      if (child) await stopProcess(child)
      child = await launch(port, dir)
    },
  }
  return server
}

/**
 * A redis-server for the enclosing `describe`: started in its `before`, stopped in its `after`.
 * The returned getter is valid inside that suite's tests.
 */
export function redisForSuite(): () => RedisServer {
  let redis: RedisServer | undefined
  before(async () => {
    redis = await startRedis()
  })
  after(async () => {
    await redis?.stop()
  })
  return () => {
    if (!redis) throw new Error('redisForSuite: used outside its suite')
    return redis
  }
}
