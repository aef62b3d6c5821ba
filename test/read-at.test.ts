import assert from 'node:assert/strict'
import fs from 'node:fs'
import path from 'node:path'
import {after, test} from 'node:test'
import {readAt} from '../src/core/read-at.js'
import {makeTempDir} from './helpers/safetensors-writer.js'

const work = makeTempDir()
after(() => fs.rmSync(work, {recursive: true, force: true}))

test('readAt fills the buffer from the position, and reads short only where the file ends', () => {
  const file = path.join(work, 'bytes.bin')
  fs.writeFileSync(file, Uint8Array.from({length: 100}, (_, i) => i))
  const fd = fs.openSync(file, 'r')
  try {
    const middle = new Uint8Array(10)
    assert.equal(readAt(fd, middle, 40), 10)
    assert.deepEqual([...middle], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49])
    const pastTheEnd = new Uint8Array(30)
    assert.equal(readAt(fd, pastTheEnd, 90), 10)
    assert.deepEqual([...pastTheEnd.subarray(0, 10)], [90, 91, 92, 93, 94, 95, 96, 97, 98, 99])
    assert.equal(readAt(fd, new Uint8Array(4), 100), 0)
    assert.equal(readAt(fd, new Uint8Array(0), 0), 0)
  } finally {
    fs.closeSync(fd)
  }
})
