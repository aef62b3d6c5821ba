import {HubApiError, InvalidApiResponseFormatError} from '@huggingface/hub'

import {UserError} from '../errors.js'
import {suggestModelNames} from './families.js'
import {networkErrorCode, UNREACHABLE_CODES} from './http.js'

/** Turns what the Hub, the network or the disk threw during a pull into one-line UserErrors. */

export interface HubErrorContext {
  repoId: string
  revision: string
  endpoint: string
  /** `X-Error-Code` / `X-Error-Message` the server sent with a failed response, by URL. */
  errorInfo?: (url: string) => {code?: string; message?: string} | undefined
}

const TOKEN_HINT = 'pass --token or set HF_TOKEN'

function oneLine(s: string): string {
  return s.replace(/\s+/g, ' ').trim()
}

function fileOfUrl(url: string): string | undefined {
  const m = /\/resolve\/[^/]+\/(.+?)(?:\?|$)/.exec(url)
  return m ? decodeURIComponent(m[1]) : undefined
}

function fromHttp(err: HubApiError, ctx: HubErrorContext): UserError {
  const info = ctx.errorInfo?.(err.url)
  const code = info?.code ?? ''
  const repo = ctx.repoId
  const file = fileOfUrl(err.url)
  const what = file ? `${repo}: ${file}` : repo
  switch (err.statusCode) {
    case 401:
    case 403: {
      if (code === 'RepoNotFound') {
        return new UserError(`${repo} was not found at ${ctx.endpoint}, or it is private or gated: if you have access, ${TOKEN_HINT} (HTTP ${err.statusCode})`)
      }
      const gated = code === 'GatedRepo' ? 'is gated' : 'is gated or private'
      const tokenNote = err.statusCode === 403 ? 'accept its terms on the Hub with your account, then use a token of that account' : TOKEN_HINT
      return new UserError(`access to ${what} denied (HTTP ${err.statusCode}): the repository ${gated}; ${tokenNote}${err.statusCode === 403 ? ` (${TOKEN_HINT})` : ''}`)
    }
    case 404: {
      if (code === 'RevisionNotFound') return new UserError(`revision "${ctx.revision}" not found in ${repo} at ${ctx.endpoint}`)
      if (code === 'EntryNotFound' && file) return new UserError(`${repo}: ${file} not found at revision ${ctx.revision}`)
      const suggestions = suggestModelNames(repo)
      if (suggestions.some((s) => s.toLowerCase() === repo.toLowerCase())) suggestions.length = 0 // a published name: no typo
      const hint = suggestions.length > 0 ? `; did you mean ${suggestions.join(', ')}?` : ''
      if (code === 'RepoNotFound' || ctx.revision === 'main') return new UserError(`repository ${repo} not found at ${ctx.endpoint}${hint}`)
      return new UserError(`repository ${repo} or its revision "${ctx.revision}" not found at ${ctx.endpoint}${hint}`)
    }
    case 429:
      return new UserError(`the hub at ${ctx.endpoint} is rate-limiting requests for ${what} (HTTP 429); try again later, or ${TOKEN_HINT} for a higher limit`)
    default:
      if (err.statusCode >= 500) return new UserError(`the hub at ${ctx.endpoint} failed for ${what} (HTTP ${err.statusCode}) after several tries; try again later`)
      return new UserError(`the hub at ${ctx.endpoint} refused ${what} (HTTP ${err.statusCode}: ${oneLine(err.message).slice(0, 160)})`)
  }
}

/**
 * The UserError for `err`: HTTP 401/403 (gated/private: how to pass a token), 404 (repo or
 * revision, with close published names), network down (names the endpoint), disk errors
 * (name the path). Aborts and UserErrors pass through; anything else becomes a UserError that
 * keeps the original message.
 */
export function toUserError(err: unknown, ctx: HubErrorContext): Error {
  if (err instanceof UserError) return new UserError(oneLine(err.message), err.exitCode)
  if ((err as Error)?.name === 'AbortError') return err as Error
  if (err instanceof HubApiError) return fromHttp(err, ctx)
  if (err instanceof InvalidApiResponseFormatError) {
    return new UserError(`the server at ${ctx.endpoint} does not answer like a Hugging Face hub for ${ctx.repoId} (${oneLine(err.message)})`)
  }
  const code = networkErrorCode(err)
  if (code === 'ENOSPC' || code === 'EDQUOT') {
    const path = (err as NodeJS.ErrnoException).path
    return new UserError(`disk full${path ? ` while writing ${path}` : ''}: free some space, or set HF_HUB_CACHE to a folder on a larger disk`)
  }
  if (code === 'EACCES' || code === 'EPERM' || code === 'EROFS') {
    const path = (err as NodeJS.ErrnoException).path
    return new UserError(`cannot write ${path ?? 'the Hugging Face cache'} (${code}): set HF_HUB_CACHE to a writable folder`)
  }
  if (code && (UNREACHABLE_CODES.has(code) || code === 'EAI_AGAIN' || code.startsWith('UND_ERR') || code === 'ECONNRESET' || code === 'ETIMEDOUT')) {
    return new UserError(`cannot reach the hub at ${ctx.endpoint} (${code}): check the network or HF_ENDPOINT; HF_HUB_OFFLINE=1 uses the cache only`)
  }
  if (code && /^(ERR_TLS|CERT_|DEPTH_ZERO|SELF_SIGNED|UNABLE_TO)/.test(code)) {
    return new UserError(`TLS error talking to ${ctx.endpoint} (${code})`)
  }
  if (err instanceof TypeError && /fetch failed/i.test(err.message)) {
    const cause = err.cause instanceof Error ? ` (${oneLine(err.cause.message)})` : ''
    return new UserError(`cannot reach the hub at ${ctx.endpoint}${cause}: check the network or HF_ENDPOINT; HF_HUB_OFFLINE=1 uses the cache only`)
  }
  const message = err instanceof Error ? err.message : String(err)
  return new UserError(`pulling ${ctx.repoId} from ${ctx.endpoint} failed: ${oneLine(message)}`)
}
