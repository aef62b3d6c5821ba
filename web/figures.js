// The side panel's chart: this server's measured latency and memory per P. The server draws
// the chart (SVG, vega in Node); the page fetches it with the API key and shows it in an <img>
// from a blob: URL, where an SVG can run nothing. The numbers are also listed in a table.

/**
 * @typedef {{parallel: number, generations: number, ttft_ms: number, decode_ms_per_token: number | null, peak_rss_bytes: number}} FiguresOfP
 * @typedef {{parallel: number[], live: FiguresOfP[], bench: {model: string, setting: string} | null}} Figures
 */

export class FiguresPanel {
  /** @param {{api: import('./api.js').Api, image: HTMLImageElement, table: HTMLTableElement, note: HTMLElement}} parts */
  constructor({api, image, table, note}) {
    this.api = api
    this.image = image
    this.table = table
    this.note = note
    /** @type {string | undefined} the chart's blob: URL, revoked when replaced */
    this.url = undefined
  }

  async refresh() {
    /** @type {Figures} */
    const figures = await this.api.json('/ui/figures.json')
    const measured = figures.live.length > 0 || figures.bench !== null
    this.note.textContent = measured
      ? figures.bench
        ? `Medians of this server's recent requests, and the bench report (${figures.bench.setting}).`
        : "Medians of this server's recent requests at each P (time to first token includes queueing)."
      : 'No requests measured yet: send a prompt, at several P to compare them.'
    this.fillTable(figures)
    if (!measured) {
      this.image.hidden = true
      return
    }
    const blob = await (await this.api.get('/ui/figures.svg')).blob()
    const previous = this.url
    this.url = URL.createObjectURL(blob)
    this.image.src = this.url
    this.image.alt = describe(figures)
    this.image.hidden = false
    if (previous) URL.revokeObjectURL(previous)
  }

  /** @param {Figures} figures */
  fillTable({live}) {
    const body = this.table.tBodies[0]
    body.replaceChildren(
      ...live.map((f) => {
        const row = document.createElement('tr')
        for (const cell of [String(f.parallel), ms(f.ttft_ms), f.decode_ms_per_token === null ? '–' : ms(f.decode_ms_per_token), bytes(f.peak_rss_bytes), String(f.generations)]) {
          const td = document.createElement('td')
          td.textContent = cell
          row.append(td)
        }
        return row
      }),
    )
    this.table.hidden = live.length === 0
  }
}

/** @param {number} value */
function ms(value) {
  return value >= 100 ? value.toFixed(0) : value.toFixed(1)
}

/** @param {number} value */
function bytes(value) {
  return value >= 1e9 ? `${(value / 1e9).toFixed(2)} GB` : `${(value / 1e6).toFixed(0)} MB`
}

/**
 * The chart in words, for the image's alternative text.
 * @param {Figures} figures
 */
function describe({live}) {
  if (live.length === 0) return 'Chart of the bench report: decode latency, time to first token and memory per P.'
  return `Chart per P. ${live.map((f) => `P=${f.parallel}: TTFT ${ms(f.ttft_ms)} ms, decode ${f.decode_ms_per_token === null ? 'not measured' : `${ms(f.decode_ms_per_token)} ms/token`}, RSS ${bytes(f.peak_rss_bytes)}`).join('; ')}.`
}
