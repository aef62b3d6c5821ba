// `npm run bench:page`: the chat page's time to first token against the API's, for the same
// request. Starts `parscale serve` (a child process, as deployed) on the default model and, in
// each round, sends the same conversation once through the API (fetch, streamed, as an API client
// sees it: from the request to the first token's chunk) and once from the page in headless
// chromium (from the click on Send to the first frame painted after the first token's element
// appeared), alternating which goes first. Target: page ≤ 1.5× API, the median of the paired
// per-round ratios. Settings (environment): BENCH_ROUNDS (9), BENCH_PARALLEL (4),
// BENCH_MAX_TOKENS (8), BENCH_PROMPT, BENCH_THREADS. Run under `flock /tmp/parscale-bench.lock`.
import {median} from '../src/core/bench/stats.js'
import {launchBrowser, openPage} from '../test/helpers/browser.js'
import {spawnServe} from '../test/helpers/serve.js'

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 9)
const PARALLEL = Number(process.env.BENCH_PARALLEL ?? 4)
const MAX_TOKENS = Number(process.env.BENCH_MAX_TOKENS ?? 8)
const PROMPT = process.env.BENCH_PROMPT ?? 'def fibonacci(n):'
const THREADS = process.env.BENCH_THREADS

const log = (line: string) => process.stderr.write(`${line}\n`)

/** The page's request body for the first turn of a chat (as app.js builds it). */
const body = {messages: [{role: 'user', content: PROMPT}], stream_weights: true, parallel: PARALLEL, max_tokens: MAX_TOKENS, stream: true}

/** Milliseconds from sending the request to the chunk of the first generated token. */
async function apiTtft(url: string): Promise<number> {
  const started = performance.now()
  const response = await fetch(`${url}/v1/chat/completions`, {method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify(body)})
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader()
  let text = ''
  let first: number | undefined
  for (;;) {
    const {value, done} = await reader.read()
    if (done) break
    text += value
    first ??= text.includes('"stream_weights"') ? performance.now() : undefined
  }
  if (first === undefined) throw new Error(`no token in the API's answer: ${text.slice(0, 200)}`)
  return first - started
}

async function main(): Promise<void> {
  const server = await spawnServe(THREADS ? ['--threads', THREADS] : [])
  const browser = await launchBrowser()
  try {
    const {page, problems} = await openPage(browser, server.url, 1280)
    await page.waitForSelector('#send:not([disabled])')
    await page.selectOption('#parallel', String(PARALLEL))
    await page.fill('#max-tokens', String(MAX_TOKENS))

    /** Milliseconds from the click on Send to the first frame after the first token's element appeared. */
    const pageTtft = async (): Promise<number> => {
      await page.click('#new-chat')
      await page.fill('#prompt', PROMPT)
      // After each answer the page fetches the figures' chart, which the server draws in a worker
      // thread (a few hundred ms of CPU here): the next measurement waits for it, so neither side
      // runs beside a drawing.
      const chartDrawn = page.waitForResponse((response) => response.url().endsWith('/ui/figures.svg'))
      const measured = page.evaluate(
        () =>
          new Promise<number>((resolve) => {
            const messages = document.getElementById('messages')!
            const observer = new MutationObserver(() => {
              if (!messages.querySelector('#answer .token')) return
              observer.disconnect()
              requestAnimationFrame(() => resolve(performance.now() - started))
            })
            observer.observe(messages, {childList: true, subtree: true})
            const started = performance.now()
            document.getElementById('send')!.click()
          }),
      )
      const ms = await measured
      await page.waitForSelector('#answer[data-finish]')
      await (await chartDrawn).finished()
      return ms
    }

    log(`warm-up (P = ${PARALLEL}, ${MAX_TOKENS} tokens, prompt ${JSON.stringify(PROMPT)})`)
    await apiTtft(server.url)
    await pageTtft()
    const rounds: {api: number; page: number}[] = []
    for (let round = 0; round < ROUNDS; round++) {
      // Alternate the order, so neither side always runs on a server just woken by the other.
      const apiFirst = round % 2 === 0
      const first = apiFirst ? await apiTtft(server.url) : await pageTtft()
      const second = apiFirst ? await pageTtft() : await apiTtft(server.url)
      const measured = apiFirst ? {api: first, page: second} : {api: second, page: first}
      rounds.push(measured)
      log(`round ${round + 1}: API ${measured.api.toFixed(1)} ms, page ${measured.page.toFixed(1)} ms, ratio ${(measured.page / measured.api).toFixed(2)}`)
    }
    if (problems.length > 0) throw new Error(`the page reported problems: ${problems.join('; ')}`)
    const ratios = rounds.map((r) => r.page / r.api).sort((a, b) => a - b)
    const quarter = (q: number) => ratios[Math.min(ratios.length - 1, Math.floor(q * ratios.length))]!
    const ratio = median(ratios)
    console.log(`time to first token, P = ${PARALLEL}, ${ROUNDS} paired rounds:`)
    console.log(`  API  median ${median(rounds.map((r) => r.api)).toFixed(1)} ms`)
    console.log(`  page median ${median(rounds.map((r) => r.page)).toFixed(1)} ms (click → first token painted)`)
    console.log(`  page / API: median ${ratio.toFixed(2)}, middle half ${quarter(0.25).toFixed(2)}–${quarter(0.75).toFixed(2)}, range ${ratios[0]!.toFixed(2)}–${ratios.at(-1)!.toFixed(2)}`)
    console.log(`  target ≤ 1.50: ${ratio <= 1.5 ? 'met' : 'MISSED'}`)
    await page.close()
    if (ratio > 1.5) process.exitCode = 1
  } finally {
    await browser.close()
    await server.stop()
  }
}

await main()
