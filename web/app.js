// serve's chat page: the model's card sets up the controls, each prompt goes to the server's own
// /v1/chat/completions with "stream": true and "stream_weights": true, and the answer streams in
// token by token. The conversation lives in this page only (a new chat forgets it).
import {Api, ApiError, KeyNeeded} from './api.js'
import {FiguresPanel} from './figures.js'
import {Transcript, WeightsTooltip} from './transcript.js'

const $ = (id) => document.getElementById(id)

const ui = {
  model: $('model'),
  parallel: $('parallel'),
  temperature: $('temperature'),
  maxTokens: $('max-tokens'),
  system: $('system'),
  systemNote: $('system-note'),
  newChat: $('new-chat'),
  prompt: $('prompt'),
  send: $('send'),
  stop: $('stop'),
  status: $('status'),
  composer: $('composer'),
  messages: $('messages'),
  intro: $('intro'),
  scroller: $('transcript'),
  keyDialog: $('key-dialog'),
  keyForm: $('key-form'),
  keyInput: $('api-key'),
  keyError: $('key-error'),
  settings: $('settings'),
  bars: $('bars'),
  figures: $('figures'),
}

const api = new Api()
const transcript = new Transcript(ui.messages)
const figures = new FiguresPanel({api, image: $('chart'), table: $('figures-table'), note: $('figures-note')})
new WeightsTooltip(ui.messages, $('tooltip'))

/** The conversation sent with each prompt: {role, content} in order. */
let history = []
/** The request in flight, if any. */
let inFlight

/** Reads the model's card (the P values it runs, the default) and fills the controls. */
async function connect() {
  let list
  try {
    list = await api.json('/v1/models')
  } catch (error) {
    if (error instanceof KeyNeeded) return askForKey(api.key ? 'That key was refused. ' + error.message : undefined)
    ui.model.textContent = `cannot reach the server: ${error.message}`
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

function refreshFigures() {
  figures.refresh().catch((error) => {
    if (error instanceof KeyNeeded) askForKey('The key was refused. ' + error.message)
    else $('figures-note').textContent = `The figures could not be loaded: ${error.message}`
  })
}

/** The request body of the next turn, from the controls. */
function requestBody() {
  const system = ui.system.value.trim()
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

function setAnswering(answering) {
  ui.send.disabled = answering
  ui.stop.hidden = !answering
  ui.status.textContent = answering ? 'answering…' : ''
  document.body.classList.toggle('answering', answering)
}

/** What scrolls the conversation: its own pane on a wide screen, the page on a narrow one. */
function scroller() {
  const pane = ui.scroller
  return pane.scrollHeight > pane.clientHeight + 1 ? pane : document.scrollingElement
}

/** Keeps the newest text in view while the reader is at the bottom (not while reading back). */
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
  ui.prompt.value = ''
  ui.intro.hidden = true
  const userNode = transcript.addUser(text)
  // A new chat started meanwhile replaces `history`: this turn finishes into its own conversation.
  const conversation = history
  conversation.push({role: 'user', content: text})
  const body = requestBody()
  const answer = transcript.startAnswer()
  follow(true)
  const controller = new AbortController()
  inFlight = controller
  setAnswering(true)
  const startedAt = performance.now()
  let parallel
  let finishReason
  let failure
  try {
    for await (const chunk of api.streamChat(body, controller.signal)) {
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
    if (failure) transcript.addError(`The answer was cut off: ${failure.message}`)
  }
  setAnswering(false)
  follow(true)
  refreshFigures()
}

function errorText(error) {
  if (!(error instanceof ApiError || error instanceof KeyNeeded)) return `The request failed: ${error.message}`
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
