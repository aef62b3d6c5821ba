/** The flag every queue command takes: where Redis is. */
import {Flags} from '@oclif/core'

export const queueFlag = Flags.string({
  description: 'Redis URL of the queue (redis://[:password@]host:port[/db], rediss:// for TLS)',
  helpValue: 'URL',
  required: true,
})
