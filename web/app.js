// serve's chat page: the model's card sets up the controls, each prompt goes to the server's own
// /v1/chat/completions with "stream": true and "stream_weights": true, and the answer streams in
// token by token. The conversation lives in this page only (a new chat forgets it).
import {Api, ApiError, KeyNeeded} from './api.js'
import {FiguresPanel} from './figures.js'
import {Transcript, WeightsTooltip} from './transcript.js'

/**
 * The page's element with this id, checked to be of its type (index.html and this file agree).
 * @template {HTMLElement} T
 * @param {string} id
 * @param {new () => T} type
 * @returns {T}
 */
function $(id, type) {
  const node = document.getElementById(id)
  if (!(node instanceof type)) throw new Error(`index.html has no ${type.name} #${id}`)
  return node
}

const ui = {
  model: $('model', HTMLElement),
  parallel: $('parallel', HTMLSelectElement),
  temperature: $('temperature', HTMLInputElement),
  maxTokens: $('max-tokens', HTMLInputElement),
  system: $('system', HTMLTextAreaElement),
  systemNote: $('system-note', HTMLElement),
  newChat: $('new-chat', HTMLButtonElement),
  prompt: $('prompt', HTMLTextAreaElement),
  send: $('send', HTMLButtonElement),
  stop: $('stop', HTMLButtonElement),
  status: $('status', HTMLElement),
  composer: $('composer', HTMLFormElement),
  messages: $('messages', HTMLOListElement),
  intro: $('intro', HTMLElement),
  scroller: $('transcript', HTMLElement),
  keyDialog: $('key-dialog', HTMLDialogElement),
  keyForm: $('key-form', HTMLFormElement),
  keyInput: $('api-key', HTMLInputElement),
  keyError: $('key-error', HTMLElement),
  settings: $('settings', HTMLDetailsElement),
  bars: $('bars', HTMLInputElement),
  figures: $('figures', HTMLDetailsElement),
  figuresNote: $('figures-note', HTMLElement),
}

const api = new Api()
const transcript = new Transcript(ui.messages)
const figures = new FiguresPanel({api, image: $('chart', HTMLImageElement), table: $('figures-table', HTMLTableElement), note: ui.figuresNote})
new WeightsTooltip(ui.messages, $('tooltip', HTMLElement))

/** @type {import('./api.js').Message[]} The conversation sent with each prompt, in order. */
let history = []
/** @type {AbortController | undefined} The request in flight, if any. */
let inFlight

/** Reads the model's card (the P values it runs, the default) and fills the controls. */
async function connect() {
  /** @type {{data: import('./api.js').ModelCard[]}} */
  let list
  try {
    list = await api.json('/v1/models')
  } catch (error) {
    if (error instanceof KeyNeeded) return askForKey(api.key ? 'That key was refused. ' + error.message : undefined)
    ui.model.textContent = `cannot reach the server: ${messageOf(error)}`
    return
  }
  const card = list.data[0]
  ui.model.textContent = `${card.id} · P ${card.parallel.join(', ')} · context ${card.context_length} tokens`
  const options = [...card.parallel.map(String), 'auto']
  ui.parallel.replaceChildren(
    ...options.map((value) => {
      const option = document.createElement('option')
      option.value = value
      option.textContent = value
      return option
    }),
  )
  ui.parallel.value = String(card.default_parallel)
  ui.systemNote.hidden = card.chat_template !== false
  ui.send.disabled = false
  ui.prompt.focus()
  refreshFigures()
}

/** @param {string} [problem] why the last key did not do */
function askForKey(problem) {
  ui.keyError.textContent = problem ?? ''
  ui.keyError.hidden = !problem
  ui.model.textContent = 'this server needs an API key'
  if (!ui.keyDialog.open) ui.keyDialog.showModal()
  ui.keyInput.focus()
}

// Without a key nothing works: Escape does not dismiss the question.
ui.keyDialog.addEventListener('cancel', (event) => event.preventDefault())

ui.keyForm.addEventListener('submit', (event) => {
  event.preventDefault()
  const key = ui.keyInput.value.trim()
  if (!key) return
  api.setKey(key)
  ui.keyInput.value = ''
  ui.keyDialog.close()
  connect()
})

/** The figures panel follows each answer while it is open (a folded one costs the server no drawing). */
function refreshFigures() {
  if (!ui.figures.open) return
  figures.refresh().catch((error) => {
    if (error instanceof KeyNeeded) askForKey('The key was refused. ' + error.message)
    else ui.figuresNote.textContent = `The figures could not be loaded: ${messageOf(error)}`
  })
}

/**
 * The request body of the next turn, from the controls.
 * @returns {import('./api.js').ChatRequest}
 */
function requestBody() {
  const system = ui.system.value.trim()
  /** @type {import('./api.js').ChatRequest} */
  const body = {
    messages: [...(system ? [{role: 'system', content: system}] : []), ...history],
    stream_weights: true,
    parallel: ui.parallel.value === 'auto' ? 'auto' : Number(ui.parallel.value),
  }
  const temperature = ui.temperature.valueAsNumber
  if (Number.isFinite(temperature)) body.temperature = temperature
  const maxTokens = ui.maxTokens.valueAsNumber
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens
  return body
}

/** @param {boolean} answering */
function setAnswering(answering) {
  ui.send.disabled = answering
  ui.stop.hidden = !answering
  ui.status.textContent = answering ? 'answering…' : ''
  document.body.classList.toggle('answering', answering)
}

/** What scrolls the conversation: its own pane on a wide screen, the page on a narrow one. */
function scroller() {
  const pane = ui.scroller
  return pane.scrollHeight > pane.clientHeight + 1 ? pane : document.documentElement
}

/**
 * Keeps the newest text in view while the reader is at the bottom (not while reading back).
 * @param {boolean} atBottom
 */
function follow(atBottom) {
  const target = scroller()
  if (atBottom) target.scrollTop = target.scrollHeight
}

function nearBottom() {
  const target = scroller()
  return target.scrollHeight - target.scrollTop - target.clientHeight < 48
}

async function send() {
  const text = ui.prompt.value
  if (inFlight || ui.send.disabled || text.trim() === '') return
  // A new chat started meanwhile replaces `history`: this turn finishes into its own conversation.
  const conversation = history
  conversation.push({role: 'user', content: text})
  const controller = new AbortController()
  inFlight = controller
  // The request leaves first; the page updates while the server works on it.
  const startedAt = performance.now()
  const chunks = api.streamChat(requestBody(), controller.signal)
  setAnswering(true)
  ui.prompt.value = ''
  ui.intro.hidden = true
  const userNode = transcript.addUser(text)
  const answer = transcript.startAnswer()
  follow(true)
  /** @type {number | undefined} */
  let parallel
  /** @type {string | undefined} */
  let finishReason
  /** @type {unknown} */
  let failure
  try {
    for await (const chunk of chunks) {
      parallel = chunk.parallel ?? parallel
      const choice = chunk.choices?.[0]
      if (!choice) continue
      const content = choice.delta?.content ?? ''
      const atBottom = nearBottom()
      // One token per chunk when streamed; the text goes with the first token of a chunk.
      if (choice.stream_weights) choice.stream_weights.forEach((weights, i) => answer.addToken(i === 0 ? content : '', weights))
      else if (content !== '') answer.addText(content)
      if (choice.finish_reason) finishReason = choice.finish_reason
      follow(atBottom)
    }
  } catch (error) {
    if (!controller.signal.aborted) failure = error
  }
  inFlight = undefined
  const stopped = controller.signal.aborted
  if (failure && answer.tokens === 0) {
    // Nothing came back: the turn is not part of the conversation.
    answer.node.remove()
    conversation.pop()
    userNode.classList.add('failed')
    if (failure instanceof KeyNeeded) askForKey('The key was refused. ' + failure.message)
    transcript.addError(errorText(failure))
  } else {
    answer.finish({parallel, startedAt, finishReason, stopped})
    conversation.push({role: 'assistant', content: answer.text})
    if (failure) transcript.addError(`The answer was cut off: ${messageOf(failure)}`)
  }
  setAnswering(false)
  follow(true)
  refreshFigures()
}

/** @param {unknown} error */
function messageOf(error) {
  return error instanceof Error ? error.message : String(error)
}

/** @param {unknown} error */
function errorText(error) {
  if (error instanceof KeyNeeded) return error.message
  if (!(error instanceof ApiError)) return `The request failed: ${messageOf(error)}`
  if (error.code === 'context_length_exceeded') return `${error.message}. A new chat (in Settings) starts over with an empty conversation.`
  return error.message
}

ui.composer.addEventListener('submit', (event) => {
  event.preventDefault()
  send()
})

ui.prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault()
    send()
  }
})

ui.figures.addEventListener('toggle', refreshFigures)

ui.bars.addEventListener('change', () => document.body.classList.toggle('no-bars', !ui.bars.checked))

ui.stop.addEventListener('click', () => inFlight?.abort())

document.addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && inFlight) inFlight.abort()
})

ui.newChat.addEventListener('click', () => {
  inFlight?.abort()
  history = []
  transcript.clear()
  ui.intro.hidden = false
  ui.prompt.focus()
})

// Side panels start folded on a narrow screen, where the conversation needs the room.
if (window.matchMedia('(max-width: 860px)').matches) {
  ui.settings.open = false
  ui.figures.open = false
}

connect()
