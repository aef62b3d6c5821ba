// The conversation on the page: user and assistant messages, the answer being streamed token by
// token, each token underlined by a bar of its P stream weights, and a panel that lists them when
// a token is hovered or tapped. Every text goes in through textContent: never parsed as HTML.

/** One colour per stream (Tableau 10, as the bench charts; more streams take hues around the wheel). */
const PALETTE = ['#4c78a8', '#f58518', '#54a24b', '#e45756', '#72b7b2', '#b279a2', '#eeca3b', '#9d755d', '#ff9da6', '#bab0ac']

/** @param {number} stream */
export function streamColor(stream) {
  return stream < PALETTE.length ? PALETTE[stream] : `hsl(${(stream * 137.5) % 360} 55% 55%)`
}

/**
 * A horizontal bar of the weights, stacked in stream order (a CSS gradient: no element per stream).
 * @param {number[]} weights
 */
export function weightsGradient(weights) {
  let at = 0
  const stops = weights.map((w, stream) => {
    const from = at
    at += w * 100
    return `${streamColor(stream)} ${from.toFixed(2)}% ${at.toFixed(2)}%`
  })
  return `linear-gradient(to right, ${stops.join(', ')})`
}

/**
 * @template {keyof HTMLElementTagNameMap} K
 * @param {K} tag
 * @param {string} [className]
 * @param {string} [text] set as text, never parsed
 * @returns {HTMLElementTagNameMap[K]}
 */
function element(tag, className, text) {
  const node = document.createElement(tag)
  if (className) node.className = className
  if (text !== undefined) node.textContent = text
  return node
}

export class Transcript {
  /** @param {HTMLOListElement} list */
  constructor(list) {
    this.list = list
  }

  get empty() {
    return this.list.childElementCount === 0
  }

  clear() {
    this.list.replaceChildren()
  }

  /** @param {string} text */
  addUser(text) {
    const item = this.message('user', 'You')
    item.body.textContent = text
    return item.node
  }

  /** A new answer: it becomes #answer (the previous one gives the id up). */
  startAnswer() {
    this.list.querySelector('#answer')?.removeAttribute('id')
    const {node, body} = this.message('assistant', 'Model')
    node.id = 'answer'
    return new AnswerView(node, body)
  }

  /** @param {string} text */
  addError(text) {
    const node = element('li', 'message error')
    node.setAttribute('role', 'alert')
    node.append(element('div', 'body', text))
    this.list.append(node)
    return node
  }

  /**
   * @param {'user' | 'assistant'} role
   * @param {string} label
   */
  message(role, label) {
    const node = element('li', `message ${role}`)
    node.dataset.role = role
    const body = element('div', 'body')
    node.append(element('div', 'who', label), body)
    this.list.append(node)
    return {node, body}
  }
}

/** The answer being streamed: its tokens, and what is measured while they arrive. */
export class AnswerView {
  /**
   * @param {HTMLLIElement} node
   * @param {HTMLDivElement} body
   */
  constructor(node, body) {
    this.node = node
    this.body = body
    this.text = ''
    this.tokens = 0
    /** @type {number[]} each stream's weights summed over the tokens */
    this.sums = []
    /** @type {number | undefined} */
    this.firstAt = undefined
    /** @type {number | undefined} */
    this.lastAt = undefined
    node.classList.add('streaming')
  }

  /**
   * One generated token: its text (may be empty: EOS, part of a character) and its P weights.
   * @param {string} text
   * @param {number[] | undefined} weights
   */
  addToken(text, weights) {
    const span = element('span', 'token', text)
    if (weights) {
      span.dataset.weights = JSON.stringify(weights)
      span.style.backgroundImage = weightsGradient(weights)
      weights.forEach((w, stream) => (this.sums[stream] = (this.sums[stream] ?? 0) + w))
    }
    this.body.append(span)
    this.tokens++
    this.text += text
    this.lastAt = performance.now()
    this.firstAt ??= this.lastAt
  }

  /**
   * Text that belongs to no single token (held back until the answer was cut off).
   * @param {string} text
   */
  addText(text) {
    this.body.append(document.createTextNode(text))
    this.text += text
  }

  /** Mean weight per stream over the answer's tokens. */
  get meanWeights() {
    return this.tokens === 0 ? [] : this.sums.map((sum) => sum / this.tokens)
  }

  /**
   * After the last token: P used, TTFT, tokens/s and the streams' mean weights under the answer.
   * @param {{parallel: number | undefined, startedAt: number, finishReason: string | undefined, stopped: boolean}} outcome
   */
  finish({parallel, startedAt, finishReason, stopped}) {
    this.node.classList.remove('streaming')
    const {firstAt, lastAt} = this
    const ttft = firstAt === undefined ? undefined : firstAt - startedAt
    const seconds = this.tokens > 1 && firstAt !== undefined && lastAt !== undefined ? (lastAt - firstAt) / 1000 : 0
    const rate = seconds > 0 ? (this.tokens - 1) / seconds : undefined
    Object.assign(this.node.dataset, {
      parallel: String(parallel ?? ''),
      tokens: String(this.tokens),
      ...(ttft === undefined ? {} : {ttftMs: ttft.toFixed(1)}),
      ...(rate === undefined ? {} : {tokensPerS: rate.toFixed(1)}),
      finish: stopped ? 'stopped' : (finishReason ?? ''),
    })
    const parts = [
      parallel === undefined ? undefined : `P = ${parallel}`,
      ttft === undefined ? undefined : `TTFT ${formatMs(ttft)}`,
      `${this.tokens} token${this.tokens === 1 ? '' : 's'}`,
      rate === undefined ? undefined : `${rate.toFixed(1)} tokens/s`,
      stopped ? 'stopped' : finishReason === 'length' ? 'length limit' : undefined,
    ].filter((part) => part !== undefined)
    const meta = element('div', 'meta')
    meta.append(element('span', 'figures', parts.join(' · ')))
    const mean = this.meanWeights
    if (mean.length > 1) meta.append(meanWeightsLegend(mean))
    this.node.append(meta)
  }
}

/** @param {number} ms */
function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(0)} ms`
}

/**
 * The streams' mean weights over an answer: one swatch and number per stream.
 * @param {number[]} mean
 */
function meanWeightsLegend(mean) {
  const legend = element('span', 'streams')
  legend.title = 'mean weight of each stream over this answer'
  const bar = element('span', 'mean-bar')
  bar.style.backgroundImage = weightsGradient(mean)
  legend.append(bar)
  mean.forEach((w, stream) => {
    const chip = element('span', 'chip')
    const swatch = element('span', 'swatch')
    swatch.style.backgroundColor = streamColor(stream)
    chip.append(swatch, document.createTextNode(`s${stream + 1} ${w.toFixed(2)}`))
    legend.append(chip)
  })
  return legend
}

/**
 * The token under an event, if any.
 * @param {Event} event
 * @returns {HTMLElement | null}
 */
function tokenOf(event) {
  return event.target instanceof Element ? event.target.closest('.token') : null
}

/**
 * The panel that shows a token's weights: it follows the mouse over tokens, and a click or a tap
 * (touch screens have no hover) pins it until the next click elsewhere.
 */
export class WeightsTooltip {
  /**
   * @param {HTMLElement} container where the tokens are
   * @param {HTMLElement} panel
   */
  constructor(container, panel) {
    this.panel = panel
    /** @type {HTMLElement | undefined} */
    this.current = undefined
    this.pinned = false
    container.addEventListener('pointerover', (event) => {
      const token = tokenOf(event)
      if (token && event.pointerType === 'mouse' && !this.pinned) this.show(token)
    })
    container.addEventListener('pointerout', (event) => {
      if (event.pointerType === 'mouse' && !this.pinned && tokenOf(event) === this.current) this.hide()
    })
    document.addEventListener('click', (event) => {
      const token = tokenOf(event)
      if (!token || (token === this.current && this.pinned)) return this.hide()
      this.show(token)
      this.pinned = !this.panel.hidden
    })
    window.addEventListener('scroll', () => this.current && this.place(this.current), {capture: true, passive: true})
    window.addEventListener('resize', () => this.hide())
  }

  /** @param {HTMLElement} token */
  show(token) {
    if (!token.dataset.weights) return
    /** @type {number[]} */
    const weights = JSON.parse(token.dataset.weights)
    const largest = Math.max(...weights)
    const rows = weights.map((w, stream) => {
      const row = element('div', 'row')
      const swatch = element('span', 'swatch')
      swatch.style.backgroundColor = streamColor(stream)
      const track = element('span', 'track')
      const fill = element('span', 'fill')
      fill.style.width = `${(w / largest) * 100}%`
      fill.style.backgroundColor = streamColor(stream)
      track.append(fill)
      row.append(swatch, element('span', 'name', `s${stream + 1}`), track, element('span', 'value', w.toFixed(3)))
      return row
    })
    const even = 1 / weights.length
    this.panel.replaceChildren(
      element('div', 'title', `token ${JSON.stringify(token.textContent)}`),
      ...rows,
      element('div', 'hint', `P = ${weights.length} · an even split is ${even.toFixed(3)} each`),
    )
    this.panel.hidden = false
    this.current?.classList.remove('active')
    this.current = token
    token.classList.add('active')
    this.place(token)
  }

  /** @param {HTMLElement} token */
  place(token) {
    const rect = token.getBoundingClientRect()
    const {offsetWidth: width, offsetHeight: height} = this.panel
    const margin = 8
    const left = Math.min(Math.max(margin, rect.left), window.innerWidth - width - margin)
    let top = rect.bottom + 6
    if (top + height > window.innerHeight - margin) top = Math.max(margin, rect.top - height - 6)
    this.panel.style.left = `${left}px`
    this.panel.style.top = `${top}px`
  }

  hide() {
    this.panel.hidden = true
    this.pinned = false
    this.current?.classList.remove('active')
    this.current = undefined
  }
}
