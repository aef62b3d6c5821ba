import assert from 'node:assert/strict'
import {mkdirSync, mkdtempSync, rmSync} from 'node:fs'
import {tmpdir} from 'node:os'
import {join} from 'node:path'
import {describe, it} from 'node:test'

import {UserError} from '../src/core/errors.js'
import {isRepoId, knownModelNames, resolveFamilyName, suggestModelNames} from '../src/core/hub/families.js'
import {globToRegExp, selectFiles} from '../src/core/hub/files.js'

function throwsUser(fn: () => unknown, ...patterns: RegExp[]): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof UserError, `expected a UserError, got ${err}`)
    for (const re of patterns) assert.match(err.message, re)
    return true
  })
}

describe('ParScale families', () => {
  it('knows every published name', () => {
    const names = new Set(knownModelNames())
    for (const n of [
      'ParScale-0.7B-P1-Python',
      'ParScale-4.7B-P8-Pile',
      'ParScale-1.8B-P2',
      'ParScale-1.8B-P8-Inst',
      'ParScale-Qwen-3B-P2-Python',
      'ParScale-QwenInit-3B-P1-Pile',
    ]) {
      assert.ok(names.has(n), n)
    }
    assert.ok(!names.has('ParScale-Qwen-3B-P1-Python'))
    // 6 sizes × 2 data × 4 P + 1.8B base and Inst × 4 + Qwen-3B × 3 + QwenInit × 2 × 4
    assert.equal(names.size, 48 + 8 + 3 + 8)
  })

  it('maps a family name to its -P{N} sibling', () => {
    assert.equal(resolveFamilyName('ParScale/ParScale-1.8B-P1-Inst', 8), 'ParScale/ParScale-1.8B-P8-Inst')
    assert.equal(resolveFamilyName('ParScale/ParScale-1.8B-P4', 2), 'ParScale/ParScale-1.8B-P2')
    assert.equal(resolveFamilyName('ParScale/ParScale-3B-P2-Pile', 1), 'ParScale/ParScale-3B-P1-Pile')
    assert.equal(resolveFamilyName('ParScale/ParScale-QwenInit-3B-P2-Python', 4), 'ParScale/ParScale-QwenInit-3B-P4-Python')
    assert.equal(resolveFamilyName('ParScale/ParScale-1.8B-Inst', 4), 'ParScale/ParScale-1.8B-P4-Inst', 'family name without P')
    assert.equal(resolveFamilyName('ParScale-1.8B-P4-Inst'), 'ParScale/ParScale-1.8B-P4-Inst', 'bare published name')
    assert.equal(resolveFamilyName('parscale/parscale-1.8b-p4-inst'), 'ParScale/ParScale-1.8B-P4-Inst', 'canonical case')
    assert.equal(resolveFamilyName('ParScale/ParScale-1.8B-P1@main', 2), 'ParScale/ParScale-1.8B-P2@main', 'keeps the revision')
    assert.equal(resolveFamilyName('someone/other-model'), 'someone/other-model', 'other repos pass through')
    assert.equal(resolveFamilyName('ParScale/tiny-p4'), 'ParScale/tiny-p4', 'far from every published name: passes')
  })

  it('lists the available P when the family lacks one', () => {
    throwsUser(() => resolveFamilyName('ParScale/ParScale-Qwen-3B-P4-Python', 1), /ParScale\/ParScale-Qwen-3B-Python is published for P = 2, 4, 8, not P = 1/)
    throwsUser(() => resolveFamilyName('ParScale/ParScale-1.8B-P3'), /published for P = 1, 2, 4, 8, not P = 3/)
    throwsUser(() => resolveFamilyName('ParScale/ParScale-1.8B-Inst'), /a family, not a model/, /--parallel/, /P = 1, 2, 4, 8/)
    throwsUser(() => resolveFamilyName('ParScale/ParScale-1.8B-P1', 0), /positive integer/)
  })

  it('suggests the closest published names on a typo', () => {
    throwsUser(() => resolveFamilyName('ParScale/ParScale-1.8B-P4-Intruct'), /not a published ParScale model/, /did you mean ParScale\/ParScale-1\.8B-P4-Inst\b/)
    throwsUser(() => resolveFamilyName('ParScale/ParScale-1.8-P4-Python', 2), /did you mean ParScale\/ParScale-1\.8B-P4-Python/)
    throwsUser(() => resolveFamilyName('ParScale-QwenInit-3B-P2-Pyton'), /did you mean ParScale\/ParScale-QwenInit-3B-P2-Python/)
    throwsUser(() => resolveFamilyName('someone/model', 4), /--parallel maps a published ParScale family/)
    throwsUser(() => resolveFamilyName('nothing-like-it'), /not a Hugging Face repo id/)
    assert.deepEqual(suggestModelNames('ParScale/ParScale-1.8B-P8-Inst', 1), ['ParScale/ParScale-1.8B-P8-Inst'])
    assert.deepEqual(suggestModelNames('completely/different'), [])
  })

  it('tells repo ids from local paths', () => {
    assert.equal(isRepoId('ParScale/ParScale-1.8B-P4'), true)
    assert.equal(isRepoId('ParScale/ParScale-1.8B-P4@main'), true)
    assert.equal(isRepoId('ParScale-1.8B-P4'), false)
    assert.equal(isRepoId('./models/x'), false)
    assert.equal(isRepoId('/abs/path'), false)
    assert.equal(isRepoId('a/b/c'), false)
    assert.equal(isRepoId('a/../b'), false)
    assert.equal(isRepoId('a--b/c'), false)
    const dir = mkdtempSync(join(tmpdir(), 'parscale-isrepo-'))
    const cwd = process.cwd()
    try {
      mkdirSync(join(dir, 'org', 'name'), {recursive: true})
      process.chdir(dir)
      assert.equal(isRepoId('org/name'), false, 'an existing folder is a path')
      assert.equal(isRepoId('org/other'), true)
    } finally {
      process.chdir(cwd)
      rmSync(dir, {recursive: true, force: true})
    }
  })
})

describe('file selection', () => {
  it('globs: * within a folder, ** across, ? and classes', () => {
    assert.ok(globToRegExp('*.json').test('config.json'))
    assert.ok(!globToRegExp('*.json').test('sub/config.json'))
    assert.ok(globToRegExp('**/*.json').test('sub/config.json'))
    assert.ok(globToRegExp('**/*.json').test('config.json'))
    assert.ok(globToRegExp('model-0000[12]-of-?????.safetensors').test('model-00002-of-00002.safetensors'))
    assert.ok(!globToRegExp('tokenizer*.json').test('tokenizerXjson'))
  })

  it('takes what running needs and never pickles or code', () => {
    const listing = [
      'config.json',
      'generation_config.json',
      'tokenizer.json',
      'tokenizer_config.json',
      'special_tokens_map.json',
      'vocab.json',
      'merges.txt',
      'model-00001-of-00002.safetensors',
      'model.safetensors.index.json',
      'pytorch_model.bin',
      'modeling_qwen2_parscale.py',
      'README.md',
      'optimizer.pt',
    ].map((path) => ({path, size: 1}))
    const names = (include?: string[]): string[] => selectFiles('o/r', listing, include).map((f) => f.path)
    assert.deepEqual(names(), listing.slice(0, 9).map((f) => f.path).sort())
    assert.deepEqual(names(['*']), [...listing.slice(0, 9).map((f) => f.path), 'README.md'].sort())
    throwsUser(() => selectFiles('o/r', [{path: 'C:/x.json', size: 1}]), /unsafe file name/)
    throwsUser(() => selectFiles('o/r', [{type: 'directory', path: '..', size: 0}]), /unsafe file name/)
  })
})
