import {Args, Help} from '@oclif/core'

import {BaseCommand} from '../base-command.js'
import {UsageError} from '../core/errors.js'
import {unknownCommandMessage} from '../hooks/command-not-found.js'

export default class HelpCommand extends BaseCommand {
  static override summary = 'Show help for parscale or one of its commands (as --help or -h does)'
  static override examples = ['<%= config.bin %> help', '<%= config.bin %> help run', '<%= config.bin %> help batch submit']
  static override strict = false
  static override args = {
    command: Args.string({description: 'command, e.g. run or "batch submit" (default: the list of commands)'}),
  }

  async run(): Promise<void> {
    const {argv} = await this.parse(HelpCommand)
    const words = (argv as string[]).filter((word) => !word.startsWith('-'))
    const id = words.join(':')
    if (id !== '' && !this.config.findCommand(id) && !this.config.findTopic(id)) throw new UsageError(unknownCommandMessage(id, this.config))
    await new Help(this.config, this.config.pjson.oclif.helpOptions).showHelp(words)
  }
}
