// The chat page's tests: a fake model whose answers are markup, and Debian's chromium driven by
// playwright-core (its own browser download is unreachable here; CI installs chromium, .ci/run).
import assert from 'node:assert/strict'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {chromium, type BrowserContext, type Page} from 'playwright-core'

import {ALPHABET, END} from './fake-decoder.js'

/** The fake model's characters, with those of markup. */
export const MARKUP_ALPHABET = ALPHABET + '<>="./()1'
export const PAYLOAD = '<img src=x onerror="window.pwned=1">'

/** A fake model's script: after the last ':' of its history it writes PAYLOAD, then stops. */
export function answersPayload(history: number[]): number {
  const at = history.lastIndexOf(ALPHABET.indexOf(':'))
  if (at < 0) return END
  return MARKUP_ALPHABET.indexOf(PAYLOAD[history.length - 1 - at] ?? '|')
}

export const CHROMIUM = process.env.PARSCALE_CHROMIUM ?? '/usr/bin/chromium'

/**
 * Why the browser tests cannot run, or undefined when they can. .ci/run installs chromium and
 * sets PARSCALE_REQUIRE_CHROMIUM=1, so there a missing browser fails instead of skipping.
 */
export function browserSkip(): string | undefined {
  if (fs.existsSync(CHROMIUM)) return undefined
  const message = `no chromium at ${CHROMIUM} (apt-get install chromium, or set PARSCALE_CHROMIUM)`
  if (process.env.PARSCALE_REQUIRE_CHROMIUM) assert.fail(`${message}: the browser tests are required here`)
  return `${message}: the browser tests are skipped`
}

export interface Browser {
  context: BrowserContext
  close(): Promise<void>
}

/** Headless chromium with a fresh profile, no network of its own; `close` removes the profile. */
export async function launchBrowser(): Promise<Browser> {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'parscale-chromium-'))
  try {
    const context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    })
    return {
      context,
      close: async () => {
        await context.close()
        fs.rmSync(profile, {recursive: true, force: true})
      },
    }
  } catch (error) {
    fs.rmSync(profile, {recursive: true, force: true})
    throw error
  }
}

/** A new tab at `width` px whose console errors, uncaught exceptions and failed loads are collected. */
export async function openPage(browser: Browser, url: string, width: number): Promise<{page: Page; problems: string[]}> {
  const page = await browser.context.newPage()
  const problems: string[] = []
  page.on('console', (message) => {
    if (message.type() === 'error' || message.type() === 'warning') problems.push(`console ${message.type()}: ${message.text()}`)
  })
  page.on('pageerror', (error) => problems.push(`uncaught: ${error.message}`))
  page.on('requestfailed', (request) => {
    // A stopped answer is an aborted fetch: that one is expected.
    if (!(request.url().endsWith('/v1/chat/completions') && request.failure()?.errorText === 'net::ERR_ABORTED')) problems.push(`failed: ${request.url()} ${request.failure()?.errorText}`)
  })
  await page.setViewportSize({width, height: width < 500 ? 740 : 800})
  await page.goto(url)
  return {page, problems}
}
