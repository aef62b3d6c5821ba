// The queue's target: the default model, 200 lines, two workers on this machine, one killed
// with SIGKILL after its first batch. Its lines come back through BullMQ's stalled-job check
// and `batch collect` returns 200 lines whose greedy token ids equal `run --batch`'s.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, before, describe, test} from 'node:test'

import {Queue} from 'bullmq'
import {Redis} from 'ioredis'

import {BULL_PREFIX, lineJobId, modelQueueName} from '../src/core/queue/jobs.js'
import {runCli} from './helpers/cli.js'
import {killWorkers, startWorker, statusNow, waitForStatus} from './helpers/queue.js'
import {type RedisServer, startRedis} from './helpers/redis-server.js'
import {makeTempDir} from './helpers/safetensors-writer.js'

const tmp = makeTempDir('parscale-queue-fault-')
const env = {PARSCALE_CACHE: path.join(tmp, 'cache'), HF_HUB_OFFLINE: '1'}
const LINES = 200
// P = 1 and 8 new tokens keep the test well under a minute on two busy cores.
const GEN = ['--max-new-tokens', '8', '--temperature', '0', '--parallel', '1']
let redis: RedisServer

before(async () => {
  redis = await startRedis()
})
after(async () => {
  await killWorkers()
  await redis?.stop()
  fs.rmSync(tmp, {recursive: true, force: true})
})

const STARTS = ['def ', 'class ', 'import ', 'for ', 'while ', 'if ', 'return ', 'with ', 'try:\n    ', 'raise ']
const NAMES = ['parse', 'items', 'value', 'self', 'path', 'result', 'count', 'node', 'data', 'key', 'line', 'name', 'config', 'tree', 'buffer', 'index', 'stack', 'queue', 'cache', 'token']

function tokenIds(jsonLines: string): number[][] {
  return jsonLines.trim().split('\n').map((l) => (JSON.parse(l) as {token_ids: number[]}).token_ids)
}

describe('batch queue fault tolerance', () => {
  test(`${LINES} lines, two workers, one killed with SIGKILL after its first batch: collect equals run --batch`, async () => {
    const file = path.join(tmp, 'sweep.jsonl')
    const lines = Array.from({length: LINES}, (_, i) => JSON.stringify({prompt: `${STARTS[i % STARTS.length]}${NAMES[(i * 7) % NAMES.length]}_${i}`}))
    fs.writeFileSync(file, lines.join('\n') + '\n')
    const reference = await runCli(['run', '--batch', file, '--json', ...GEN], {env})
    assert.equal(reference.code, 0, reference.stderr)

    const submitted = await runCli(['batch', 'submit', file, '--queue', redis.url, ...GEN], {env})
    assert.equal(submitted.code, 0, submitted.stderr)
    const workerArgs = ['--queue', redis.url, '--batch-size', '8', '--stall-timeout', '2']
    const doomed = startWorker(workerArgs, env)
    await waitForStatus(redis.url, 'sweep', (s) => s.done >= 8)
    const survivor = startWorker(workerArgs, env)
    const atKill = await statusNow(redis.url, 'sweep')
    doomed.child.kill('SIGKILL')
    assert.equal(await doomed.exited, null, 'killed by the signal')
    assert.ok(atKill.active > 0 && atKill.done < LINES, `the killed worker held lines: ${JSON.stringify(atKill)}`)

    const done = await waitForStatus(redis.url, 'sweep', (s) => s.done === LINES, 120_000)
    assert.deepEqual([done.waiting, done.active, done.failed, done.missing], [0, 0, 0, 0])
    const collected = await runCli(['batch', 'collect', 'sweep', '--queue', redis.url], {env})
    assert.equal(collected.code, 0, collected.stderr)
    assert.equal(collected.stdout.trim().split('\n').length, LINES)
    assert.deepEqual(tokenIds(collected.stdout), tokenIds(reference.stdout))

    // The killed worker's lines were recovered as stalled jobs, not failed or run twice to completion.
    const fingerprint = /fingerprint (\w+)/.exec(submitted.stdout)![1]
    const client = new Redis(redis.url, {maxRetriesPerRequest: 1})
    const queue = new Queue(modelQueueName(fingerprint), {connection: client, prefix: BULL_PREFIX})
    const jobs = await Promise.all(Array.from({length: LINES}, (_, i) => queue.getJob(lineJobId('sweep', i + 1))))
    await queue.close()
    client.disconnect()
    assert.ok(jobs.some((j) => j!.stalledCounter > 0), 'some line came back from the killed worker')
    assert.ok(jobs.every((j) => j!.attemptsMade === 1), 'every line completed once')

    survivor.child.kill('SIGTERM')
    assert.equal(await survivor.exited, 0, survivor.stderr())
  })
})
