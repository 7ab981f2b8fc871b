// The page the browser test opens (from another origin than Spool's): @anycable/web as an
// app uses it, subscribed to a signed stream; what it gets is kept in `window.spool` for the
// driver (browser.mjs) to read.
import { createCable } from '@anycable/web'

const q = new URLSearchParams(location.search)
const state = (window.spool = { received: [], events: [], errors: [], subscribed: false })

const cable = createCable(q.get('cable'), {
  protocol: 'actioncable-v1-ext-json',
  logLevel: 'error'
})
cable.on('connect', ev => state.events.push({ type: 'connect', restored: !!ev.restored }))
cable.on('disconnect', ev => state.events.push({ type: 'disconnect', reason: ev.reason || null }))

const channel = cable.streamFromSigned(q.get('signed'))
channel.on('message', (msg, meta) => state.received.push({ n: msg.n, offset: meta ? meta.offset : null }))
channel.ensureSubscribed().then(
  () => { state.subscribed = true },
  e => state.errors.push(String(e))
)
