/**
 * oclif calls this for a command it does not have (`parscale bogus`, `parscale batch foo`):
 * a usage error naming what was typed, the closest commands and where the list is.
 */
import type {Hook, Interfaces} from '@oclif/core'

import {UsageError} from '../core/errors.js'
import {levenshtein} from '../core/format.js'
import {commandName} from '../error-report.js'

export function unknownCommandMessage(id: string, config: Pick<Interfaces.Config, 'commandIDs' | 'findTopic'>): string {
  // oclif joins every word before the first flag into the id (`rnu hello` → `rnu:hello`): the
  // command typed is the longest known topic and the one word after it; the rest are arguments.
  const words = id.split(':')
  let depth = 0
  while (depth < words.length - 1 && config.findTopic(words.slice(0, depth + 1).join(':'))) depth++
  const known = depth > 0 ? words.slice(0, depth).join(':') : undefined
  const typed = words.slice(0, depth + 1).join(' ')
  const candidates = config.commandIDs.filter((c) => (known ? c.startsWith(`${known}:`) : true)).map(commandName)
  const limit = Math.max(2, Math.ceil(typed.length / 3))
  const close = candidates
    .map((name) => ({name, d: levenshtein(typed, name)}))
    .filter((c) => c.d <= limit)
    .sort((a, b) => a.d - b.d || a.name.localeCompare(b.name))
    .slice(0, 2)
    .map((c) => `\`parscale ${c.name}\``)
  const hint = close.length > 0 ? `did you mean ${close.join(' or ')}? ` : ''
  const list = known ? `\`parscale ${commandName(known)} --help\` lists its commands` : '`parscale --help` lists the commands'
  return `unknown command "${typed}"; ${hint}${list}`
}

const hook: Hook<'command_not_found'> = async function ({id, config}) {
  throw new UsageError(unknownCommandMessage(id, config))
}

export default hook
