// The README's way of running parscale, through npx itself: its stderr carries only parscale's
// lines (no npm warning about the repository's settings), and `npx parscale serve` / `worker`
// stop and drain when the npx process gets SIGTERM (npm passes it to its shell only, which
// leaves the node process behind). A server started without npm keeps running when its shell
// exits, as before.
import assert from 'node:assert/strict'
import {spawn} from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import {after, describe, test} from 'node:test'

import type OpenAI from 'openai'

import {REPO_ROOT, runCli, runNpx, spawnNpx, type NpxProcess} from './helpers/cli.js'
import {status, waitForStatus} from './helpers/queue.js'
import {redisForSuite} from './helpers/redis-server.js'
import {makeTempDir} from './helpers/safetensors-writer.js'
import {eventually} from './helpers/serve.js'

const tmp = makeTempDir('parscale-npx-')
const env = {PARSCALE_CACHE: path.join(tmp, 'cache'), HF_HUB_OFFLINE: '1'}

after(() => fs.rmSync(tmp, {recursive: true, force: true}))

/** Resolves with the first match of `pattern` in what `read` returns as it grows. */
async function waitForOutput(what: string, read: () => string, pattern: RegExp, ms = 240_000): Promise<RegExpExecArray> {
  let match: RegExpExecArray | null = null
  await eventually(what, () => (match = pattern.exec(read())) !== null, ms)
  return match!
}

/** `promise`, or a failure naming `what` after `ms` (so the test's cleanup still runs). */
async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out waiting until ${what}`)), ms)))
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

/** Starts a streamed completion that runs its full length (greedy from "import os" at P = 8) and reads its first chunk. */
async function startLongStream(url: string): Promise<{rest: Promise<string>; first: string}> {
  const response = await fetch(`${url}/v1/completions`, {
    method: 'POST',
    headers: {'content-type': 'application/json'},
    body: JSON.stringify({prompt: 'import os\n', max_tokens: 96, parallel: 8, stream: true}),
  })
  assert.equal(response.status, 200)
  const reader = response.body!.getReader()
  const decoder = new TextDecoder()
  const first = decoder.decode((await reader.read()).value)
  const rest = (async () => {
    let text = first
    for (let part = await reader.read(); !part.done; part = await reader.read()) text += decoder.decode(part.value)
    return text
  })()
  return {first, rest}
}

/** The stream ran to its end: every token, finish reason `length`, then [DONE]. */
function assertWhole(text: string): void {
  const events = text.split('\n\n').filter((e) => e.startsWith('data: ')).map((e) => e.slice(6))
  assert.equal(events.at(-1), '[DONE]')
  const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as OpenAI.Completion)
  assert.equal(chunks.at(-1)?.choices[0].finish_reason, 'length', 'it ran to its end, not cut off')
  assert.ok(chunks.filter((c) => c.choices[0].text !== '').length > 48, 'the whole answer arrived')
}

describe('npx parscale', () => {
  test('prints nothing of npm\'s own: --version has an empty stderr, a bad input exactly one `parscale:` line', async () => {
    const version = await runNpx(['--version'], env)
    assert.equal(version.code, 0, version.stderr)
    assert.match(version.stdout, /^parscale\/\d+\.\d+\.\d+ /)
    assert.equal(version.stderr, '')
    const bad = await runNpx(['rm', 'no-such-model'], env)
    assert.notEqual(bad.code, 0)
    assert.equal(bad.stdout, '')
    assert.match(bad.stderr, /^parscale: [^\n]*no-such-model[^\n]*\n$/)
  })

  test('the install skipped onnxruntime-node\'s download of the CUDA libraries (package.json "allowScripts")', {skip: process.platform !== 'linux' || process.arch !== 'x64'}, () => {
    // onnxruntime-node's postinstall fetches these from NuGet on linux/x64 unless its script is skipped.
    const bin = path.join(REPO_ROOT, 'node_modules', 'onnxruntime-node', 'bin', 'napi-v6', 'linux', 'x64')
    assert.ok(fs.existsSync(path.join(bin, 'onnxruntime_binding.node')), 'the package is installed')
    assert.deepEqual(fs.readdirSync(bin).filter((name) => name.includes('providers')), [])
    const pkg = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as {allowScripts: Record<string, boolean>}
    assert.equal(pkg.allowScripts['onnxruntime-node'], false)
  })

  test('serve: SIGTERM to the npx process drains the running stream, then everything exits and nothing listens', async () => {
    const npx = spawnNpx(['serve', '--port', '0'], env)
    try {
      const url = (await waitForOutput('serve listens', npx.stderr, /serving .* at (http:\/\/\S+)\/v1/))[1]
      const stream = await startLongStream(url)
      assert.match(stream.first, /^data: \{/, 'the stream has begun')
      npx.child.kill('SIGTERM')
      assertWhole(await stream.rest)
      await within(npx.closed, 60_000, 'npx and the server it started have exited')
      assert.match(npx.stderr(), /npm exited: stopping; 1 generation finishing/)
      assert.match(npx.stderr(), /stopped\n$/)
      await assert.rejects(fetch(`${url}/health`), 'nothing listens any more')
    } finally {
      npx.killAll()
    }
  })

  test('serve started without npm (a shell that exits at once, as nohup does) keeps serving', async () => {
    // Everything npm put in this test's environment (npm test) is left out, as in a plain shell.
    const plainEnv = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('npm_')))
    const shell = spawn('sh', ['-c', `'${process.execPath}' bin/run.js serve --port 0 & echo $!`], {
      cwd: REPO_ROOT,
      env: {...plainEnv, ...env, NODE_NO_WARNINGS: '1'},
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    let stdout = ''
    let stderr = ''
    shell.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
    shell.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    const shellExited = new Promise((resolve) => shell.once('exit', resolve))
    let pid = 0
    try {
      pid = Number((await waitForOutput('the shell prints the pid', () => stdout, /^(\d+)\n/))[1])
      await shellExited
      const url = (await waitForOutput('serve listens', () => stderr, /serving .* at (http:\/\/\S+)\/v1/))[1]
      // Well past the launcher check's period: a server that watched its parent would be stopping.
      await new Promise((resolve) => setTimeout(resolve, 1500))
      assert.equal((await fetch(`${url}/health`)).status, 200)
      assert.doesNotMatch(stderr, /stopping/)
      process.kill(pid, 'SIGTERM')
      await waitForOutput('serve stops on its own SIGTERM', () => stderr, /SIGTERM: stopping\nstopped\n$/, 60_000)
    } finally {
      try {
        if (pid > 0) process.kill(pid, 'SIGKILL')
      } catch {
        // Already gone.
      }
    }
  })

  describe('worker', () => {
    const redis = redisForSuite()

    test('SIGTERM to the npx process: the worker finishes the lines in hand, leaves the rest queued, and exits', async () => {
      const lines = Array.from({length: 24}, (_, i) => JSON.stringify({prompt: `def f${i}(x):`}))
      const file = path.join(tmp, 'npx-lines.jsonl')
      fs.writeFileSync(file, lines.join('\n') + '\n')
      const submitted = await runCli(['batch', 'submit', file, '--queue', redis().url, '--max-new-tokens', '48', '--temperature', '0', '--parallel', '8'], {env})
      assert.equal(submitted.code, 0, submitted.stderr)
      let npx: NpxProcess | undefined
      try {
        npx = spawnNpx(['worker', '--queue', redis().url, '--batch-size', '2', '--concurrency', '2'], env)
        await waitForStatus(redis().url, 'npx-lines', (s) => s.done >= 2 && s.active > 0, 240_000)
        npx.child.kill('SIGTERM')
        await within(npx.closed, 120_000, 'npx and the worker it started have exited')
        assert.match(npx.stderr(), /npm exited: finishing the lines in hand/)
        const after = await status(redis().url, 'npx-lines', env)
        // Killed, the worker would leave its lines active until their locks expire.
        assert.equal(after.active, 0, JSON.stringify(after))
        assert.equal(after.failed, 0, JSON.stringify(after))
        assert.ok(after.done >= 3 && after.done < 24, JSON.stringify(after))
        assert.equal(after.done + after.waiting, 24, JSON.stringify(after))
      } finally {
        npx?.killAll()
      }
    })
  })
})
