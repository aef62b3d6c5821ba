/**
 * The page's chart, drawn in a worker thread: vega takes about 0.2 s of CPU per chart on a busy
 * 2-core machine, which on the server's event loop would stall every stream it is sending.
 */
import {parentPort} from 'node:worker_threads'

import {renderSvg} from '../../../ui/charts/render-svg.js'
import {servedChartSpec, type ServedChartInput} from '../../../ui/charts/serve-charts.js'

export interface ChartRequest {
  id: number
  input: ServedChartInput
}

export type ChartReply = {id: number; svg: string} | {id: number; error: string}

parentPort?.on('message', async ({id, input}: ChartRequest) => {
  let reply: ChartReply
  try {
    reply = {id, svg: await renderSvg(servedChartSpec(input))}
  } catch (error) {
    reply = {id, error: error instanceof Error ? (error.stack ?? error.message) : String(error)}
  }
  parentPort?.postMessage(reply)
})
