// serve's chat page in a real browser: Debian's chromium, headless, driven by playwright-core,
// against real servers on 127.0.0.1. On the default model: a prompt at P = 4 streams tokens whose
// weights equal the API's, a second turn continues the conversation, stop ends the generation on
// the server, the figures panel fills, at 1280 and 360 px. On the fake model: markup in the
// user's text and in the answer stays text, errors show, and the API key is asked for.
import assert from 'node:assert/strict'
import fs from 'node:fs'
import {after, before, describe, test} from 'node:test'

import type OpenAI from 'openai'
import type {Page} from 'playwright-core'

import {ServeEngine} from '../src/core/serve/engine.js'
import {RunningServer} from '../src/core/serve/server.js'
import {answersPayload, browserSkip, launchBrowser, MARKUP_ALPHABET, openPage, PAYLOAD, type Browser} from './helpers/browser.js'
import {makeTempDir} from './helpers/safetensors-writer.js'
import {eventually, openaiClient, startFakeServer, type FakeServer} from './helpers/serve.js'

const skip = browserSkip()

// One browser for the file (a tab per test): starting chromium takes seconds.
let browser: Browser
before(async () => {
  if (!skip) browser = await launchBrowser()
})
after(async () => {
  await browser?.close()
})

interface PageToken {
  text: string
  weights: number[]
}

/** Sends `prompt` from the page; returns whether Send was disabled right after, and the answer once it is finished. */
async function ask(page: Page, prompt: string): Promise<{sendDisabled: boolean; tokens: PageToken[]; finish: string}> {
  await page.fill('#prompt', prompt)
  // Clicked inside the page, so the button's state is read before any answer can arrive.
  const sendDisabled = await page.evaluate(() => {
    const send = document.getElementById('send') as HTMLButtonElement
    send.click()
    return send.disabled
  })
  await page.waitForSelector('#answer[data-finish]', {timeout: 60_000})
  return {sendDisabled, tokens: await answerTokens(page), finish: await page.getAttribute('#answer', 'data-finish') ?? ''}
}

async function answerTokens(page: Page): Promise<PageToken[]> {
  return page.$$eval('#answer .token', (spans) => spans.map((s) => ({text: s.textContent ?? '', weights: JSON.parse((s as HTMLElement).dataset.weights ?? 'null') as number[]})))
}

/** Nothing sticks out sideways, and the controls are on screen. */
async function checkLayout(page: Page, width: number): Promise<void> {
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth)
  assert.ok(overflow <= 0, `the page is ${overflow} px wider than the ${width} px window`)
  for (const selector of ['#prompt', '#send', '#parallel']) {
    const box = await page.locator(selector).boundingBox()
    assert.ok(box && box.x >= 0 && box.x + box.width <= width && box.width > 0, `${selector} within the window: ${JSON.stringify(box)}`)
  }
}

describe('the chat page in chromium, on the default model', {skip}, () => {
  const cache = makeTempDir('parscale-page-')
  let engine: ServeEngine
  let server: RunningServer
  let client: OpenAI

  before(async () => {
    process.env.PARSCALE_CACHE = cache
    engine = await ServeEngine.open(undefined, {maxBatch: 8, maxQueue: 64})
    server = await RunningServer.listen(engine, {host: '127.0.0.1', port: 0, page: {}})
    client = openaiClient(server.url)
  })

  after(async () => {
    await server?.shutdown(10_000)
    delete process.env.PARSCALE_CACHE
    fs.rmSync(cache, {recursive: true, force: true})
  })

  /** The API's answer to the same conversation at P = 4, with its weights. */
  async function apiAnswer(messages: OpenAI.Chat.ChatCompletionMessageParam[], maxTokens: number): Promise<{text: string; weights: number[][]}> {
    const answer = await client.chat.completions.create({model: 'parscale-default', messages, max_tokens: maxTokens, parallel: 4, stream_weights: true} as OpenAI.Chat.ChatCompletionCreateParamsNonStreaming)
    return {text: answer.choices[0].message.content ?? '', weights: (answer.choices[0] as unknown as {stream_weights: number[][]}).stream_weights}
  }

  test('1280 px: a prompt at P = 4 streams tokens with the weights the API gives; a second turn continues the conversation; figures per P', async () => {
    const {page, problems} = await openPage(browser, server.url, 1280)
    try {
      await page.waitForSelector('#send:not([disabled])')
      assert.deepEqual(await page.$$eval('#parallel option', (options) => options.map((o) => (o as HTMLOptionElement).value)), ['1', '2', '4', '8', 'auto'])
      assert.equal(await page.inputValue('#parallel'), '8', "the server's default P")
      await checkLayout(page, 1280)
      await page.selectOption('#parallel', '4')
      await page.fill('#max-tokens', '24')

      const first = await ask(page, 'def fibonacci(n):')
      assert.equal(first.sendDisabled, true, 'Send is disabled while answering')
      assert.equal(await page.isDisabled('#send'), false, 'and enabled after')
      const expected = await apiAnswer([{role: 'user', content: 'def fibonacci(n):'}], 24)
      assert.equal(first.tokens.length, expected.weights.length, 'one .token per generated token')
      assert.equal(first.tokens.map((t) => t.text).join(''), expected.text)
      assert.deepEqual(first.tokens.map((t) => t.weights), expected.weights)
      for (const {weights} of first.tokens) {
        assert.equal(weights.length, 4)
        assert.ok(Math.abs(weights.reduce((a, b) => a + b, 0) - 1) < 1e-5)
      }
      assert.equal(await page.textContent('#answer .body'), expected.text)
      assert.equal(await page.getAttribute('#answer', 'data-parallel'), '4')
      assert.match((await page.textContent('#answer .meta')) ?? '', /^P = 4 · TTFT \d+ ms · 24 tokens · [\d.]+ tokens\/s · length limit/)

      const second = await ask(page, '\nclass Parser:')
      const expectedSecond = await apiAnswer(
        [
          {role: 'user', content: 'def fibonacci(n):'},
          {role: 'assistant', content: expected.text},
          {role: 'user', content: '\nclass Parser:'},
        ],
        24,
      )
      assert.equal(second.tokens.map((t) => t.text).join(''), expectedSecond.text, 'the answer to the whole conversation')
      assert.deepEqual(second.tokens.map((t) => t.weights), expectedSecond.weights)
      assert.deepEqual(await page.$$eval('#messages > li', (items) => items.map((i) => (i as HTMLElement).dataset.role)), ['user', 'assistant', 'user', 'assistant'])
      assert.equal(await page.$$eval('#answer', (answers) => answers.length), 1)
      assert.equal(await page.$eval('#messages > li:last-child', (li) => li.id), 'answer', 'the latest answer is #answer')

      // Hovering a token shows its P weights.
      await page.hover('#answer .token >> nth=2')
      await page.waitForSelector('#tooltip:not([hidden])')
      assert.equal(await page.$$eval('#tooltip .row', (rows) => rows.length), 4)
      assert.match((await page.textContent('#tooltip .hint')) ?? '', /P = 4/)

      // The figures panel: the server's chart (SVG from a blob) and a row for P = 4.
      await page.waitForFunction(() => {
        const chart = document.getElementById('chart') as HTMLImageElement
        return !chart.hidden && chart.complete && chart.naturalWidth > 0
      })
      assert.deepEqual(await page.$$eval('#figures-table tbody tr td:first-child', (cells) => cells.map((c) => c.textContent)), ['4'])
      assert.deepEqual(problems, [])
    } finally {
      await page.close()
    }
  })

  test('360 px: the layout fits; a prompt at the default P streams; a tap shows a token\'s weights', async () => {
    const {page, problems} = await openPage(browser, server.url, 360)
    try {
      await page.waitForSelector('#send:not([disabled])')
      await checkLayout(page, 360)
      await page.click('#settings summary')
      await page.fill('#max-tokens', '12')
      await page.click('#settings summary')
      const answer = await ask(page, 'import os\n')
      assert.equal(answer.tokens.length, 12)
      assert.ok(answer.tokens.every((t) => t.weights.length === 8), 'P = 8, the default')
      await checkLayout(page, 360)
      await page.click('#answer .token >> nth=1')
      await page.waitForSelector('#tooltip:not([hidden])')
      const box = await page.locator('#tooltip').boundingBox()
      assert.ok(box && box.x >= 0 && box.x + box.width <= 360, `the weights panel fits: ${JSON.stringify(box)}`)
      assert.deepEqual(problems, [])
    } finally {
      await page.close()
    }
  })

  test('stop: the answer ends where it was, the server drops the generation, and the next turn works', async () => {
    const {page, problems} = await openPage(browser, server.url, 1280)
    try {
      await page.waitForSelector('#send:not([disabled])')
      await page.fill('#max-tokens', '400')
      await page.fill('#prompt', 'import os\n')
      await page.click('#send')
      await page.waitForFunction(() => document.querySelectorAll('#answer .token').length >= 3)
      assert.equal(await page.isVisible('#stop'), true)
      await page.click('#stop')
      await page.waitForSelector('#answer[data-finish="stopped"]')
      const tokens = await answerTokens(page)
      assert.ok(tokens.length >= 3 && tokens.length < 400, `${tokens.length} tokens`)
      assert.equal(await page.isDisabled('#send'), false)
      assert.equal(await page.isVisible('#stop'), false)
      await eventually('the server has dropped the generation', () => engine.inProgress === 0, 10_000)
      await page.fill('#max-tokens', '4')
      const next = await ask(page, '\nimport sys')
      assert.equal(next.tokens.length, 4)
      assert.deepEqual(problems, [])
    } finally {
      await page.close()
    }
  })
})

describe('the chat page in chromium, on a fake model', {skip}, () => {
  async function withServer(options: Parameters<typeof startFakeServer>[0], body: (s: FakeServer) => Promise<void>): Promise<void> {
    const s = await startFakeServer({page: {}, alphabet: MARKUP_ALPHABET, script: answersPayload, ...options})
    try {
      await body(s)
    } finally {
      await s.close()
    }
  }

  test('markup in the user\'s text and in the model\'s answer is shown as text, never run or parsed', () =>
    withServer({}, async (s) => {
      const {page, problems} = await openPage(browser, s.url, 1280)
      try {
        await page.waitForSelector('#send:not([disabled])')
        const prompt = `${PAYLOAD} say:`
        for (let turn = 0; turn < 2; turn++) {
          const answer = await ask(page, prompt)
          assert.equal(answer.tokens.map((t) => t.text).join(''), PAYLOAD)
          assert.equal(answer.tokens.length, PAYLOAD.length + 1, 'each character, then the end token')
          assert.ok(answer.tokens.every((t) => t.weights.length === 1 && t.weights[0] === 1), 'P = 1, the default')
        }
        assert.deepEqual(await page.$$eval('#messages [data-role="user"] .body', (bodies) => bodies.map((b) => b.textContent)), [prompt, prompt])
        assert.equal(await page.textContent('#answer .body'), PAYLOAD)
        assert.equal(await page.$$eval('#messages img, #messages script, #messages [onerror]', (found) => found.length), 0)
        assert.equal(await page.evaluate(() => (window as unknown as {pwned?: number}).pwned), undefined)
        assert.deepEqual(problems, [], 'a blocked script would have left a CSP error here')
      } finally {
        await page.close()
      }
    }))

  test('an error answer (a prompt over the context) shows as a message; the failed turn leaves the conversation', () =>
    withServer({context: 40}, async (s) => {
      const {page, problems} = await openPage(browser, s.url, 360)
      try {
        await page.waitForSelector('#send:not([disabled])')
        await page.fill('#prompt', 'a'.repeat(50))
        await page.click('#send')
        await page.waitForSelector('#messages .error')
        assert.match((await page.textContent('#messages .error')) ?? '', /maximum context length is 40 tokens/)
        assert.equal(await page.$$eval('#messages .user.failed', (failed) => failed.length), 1)
        assert.equal(await page.isDisabled('#send'), false)
        const answer = await ask(page, 'b:')
        assert.equal(answer.tokens.map((t) => t.text).join(''), PAYLOAD, 'the next prompt is sent without the failed one')
        // Chromium reports the refused request itself on the console; nothing else may be there.
        assert.deepEqual(problems.filter((p) => !/status of 400/.test(p)), [])
      } finally {
        await page.close()
      }
    }))

  test('with --api-key the page asks for the key, says when it is refused, and works once it is right', () =>
    withServer({apiKey: 'sesame'}, async (s) => {
      const {page, problems} = await openPage(browser, s.url, 1280)
      try {
        await page.waitForSelector('#key-dialog[open]')
        assert.equal(await page.isDisabled('#send'), true, 'nothing can be sent without the key')
        await page.fill('#api-key', 'wrong')
        await page.click('#key-form button')
        await page.waitForSelector('#key-error:not([hidden])')
        assert.match((await page.textContent('#key-error')) ?? '', /refused.*Incorrect API key/)
        assert.equal(await page.isVisible('#key-dialog'), true)
        await page.fill('#api-key', 'sesame')
        await page.click('#key-form button')
        await page.waitForSelector('#send:not([disabled])')
        assert.equal(await page.isVisible('#key-dialog'), false)
        assert.deepEqual(await page.$$eval('#parallel option', (options) => options.map((o) => (o as HTMLOptionElement).value)), ['1', '2', 'auto'])
        const answer = await ask(page, 'say:')
        assert.equal(answer.tokens.map((t) => t.text).join(''), PAYLOAD)
        await page.waitForFunction(() => (document.getElementById('chart') as HTMLImageElement).naturalWidth > 0)
        assert.deepEqual(problems.filter((p) => !/status of 401/.test(p)), [])
      } finally {
        await page.close()
      }
    }))
})
