// Spool's /cable against AnyCable's own JavaScript client, @anycable/core, as an app uses it
// (docs/anycable.md). Each test starts `spool serve` ($SPOOL_BIN) itself, so it can restart
// or kill -9 it. Run by crates/spool/tests/anycable_js.rs (`node --test`).

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createHmac } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { createCable } from '@anycable/core'
import WebSocket from 'ws'

import { freePort, serve as serveSpool, signed as signedWith, stop } from './spool.mjs'

const SECRET = 'js-anycable-secret'
const API_KEY = 'js-api-key'
const BROADCAST_KEY = createHmac('sha256', SECRET).update('broadcast-cable').digest('hex')

const signed = (stream, secret = SECRET) => signedWith(stream, secret)

// `spool serve` on `port`, resolved once it listens.
const serve = (port, args) =>
  serveSpool(port, ['--api-key', API_KEY, '--anycable-secret', SECRET, ...args])

function cable(port, query = '', opts = {}) {
  return createCable(`ws://127.0.0.1:${port}/cable${query}`, {
    websocketImplementation: WebSocket,
    protocol: 'actioncable-v1-ext-json',
    logLevel: process.env.SPOOL_TEST_LOGS ? 'debug' : 'error',
    ...opts
  })
}

async function publish(port, stream, body, idempotencyKey) {
  let headers = { authorization: `Bearer ${API_KEY}` }
  if (idempotencyKey) headers['idempotency-key'] = idempotencyKey
  let r = await fetch(`http://127.0.0.1:${port}/v1/streams/${encodeURIComponent(stream)}/messages`, {
    method: 'POST', headers, body
  })
  if (r.status !== 201) throw new Error(`publish answered ${r.status}: ${await r.text()}`)
  return r.json()
}

async function broadcast(port, body, key = BROADCAST_KEY) {
  let r = await fetch(`http://127.0.0.1:${port}/_broadcast`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify(body)
  })
  return r.status
}

// Resolves once `predicate()` holds (checked every 20 ms), or fails after `ms`.
async function until(predicate, ms = 20000, what = 'a condition') {
  let deadline = Date.now() + ms
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 20))
  }
}

test('a signed stream gets /_broadcast and Spool publishes; a bad signature is rejected', async () => {
  let port = await freePort()
  let server = await serve(port, ['--engine', 'memory'])
  let c = cable(port)
  try {
    let channel = c.streamFromSigned(signed('chat/42'))
    let got = []
    channel.on('message', (msg, meta) => got.push({ msg, meta }))
    await channel.ensureSubscribed()

    assert.equal(await broadcast(port, { stream: 'chat/42', data: JSON.stringify({ text: 'hi' }) }), 201)
    await publish(port, 'chat/42', JSON.stringify({ text: 'from spool' }))
    await until(() => got.length === 2, 10000, 'two messages')
    assert.deepEqual(got.map(g => g.msg), [{ text: 'hi' }, { text: 'from spool' }])
    assert.deepEqual(got.map(g => g.meta.offset), [1, 2])
    assert.equal(got[0].meta.stream, 'chat/42')

    let forged = c.streamFromSigned(signed('chat/42', 'not-the-secret'))
    await assert.rejects(forged.ensureSubscribed(), /rejected/i)
    assert.equal(await broadcast(port, { stream: 'chat/42', data: 'x' }, 'wrong-key'), 401)
  } finally {
    c.disconnect()
    await stop(server, 'SIGTERM')
  }
})

test('restarts and kill -9 while broadcasting: the client catches up with every message once, in order', async () => {
  let port = await freePort()
  let dir = mkdtempSync(join(tmpdir(), 'spool-anycable-js-'))
  let args = ['--engine', 'disk', '--data-dir', dir]
  let server = await serve(port, args)
  let c = cable(port)
  try {
    let channel = c.streamFromSigned(signed('feed'))
    let got = []
    channel.on('message', (msg, meta) => got.push({ n: msg.n, offset: meta.offset }))
    await channel.ensureSubscribed()

    const TOTAL = 300
    let published = 0
    let publisher = (async () => {
      for (let n = 1; n <= TOTAL; n++) {
        // Retried while the server is down; the key makes a retry of a message that did get
        // stored before a kill -9 append nothing.
        for (;;) {
          try {
            await publish(port, 'feed', JSON.stringify({ n }), `feed-${n}`)
            break
          } catch {
            await new Promise(resolve => setTimeout(resolve, 50))
          }
        }
        published = n
        await new Promise(resolve => setTimeout(resolve, 5))
      }
    })()

    await until(() => got.length >= 50, 20000, '50 messages')
    await stop(server, 'SIGTERM') // graceful: disconnect server_restart, the client reconnects
    server = await serve(port, args)
    await until(() => got.length >= 150 && published >= 150, 30000, '150 messages after the restart')
    await stop(server, 'SIGKILL') // no goodbye: the client restores its session
    server = await serve(port, args)
    await publisher
    await until(() => got.length >= TOTAL, 30000, `all ${TOTAL} messages (have ${got.length})`)
    await new Promise(resolve => setTimeout(resolve, 500))

    assert.equal(got.length, TOTAL, 'no message twice')
    assert.deepEqual(got.map(g => g.n), Array.from({ length: TOTAL }, (_, i) => i + 1))
    assert.deepEqual(got.map(g => g.offset), Array.from({ length: TOTAL }, (_, i) => i + 1))
  } finally {
    c.disconnect()
    await stop(server, 'SIGTERM')
    rmSync(dir, { recursive: true, force: true })
  }
})

test('history after retention dropped it: reject_history', async () => {
  let port = await freePort()
  let server = await serve(port, ['--engine', 'memory', '--history-limit', '2'])
  let c = cable(port)
  try {
    let channel = c.streamFromSigned(signed('short'))
    let got = []
    let infos = []
    channel.on('message', (msg, meta) => got.push(meta.offset))
    channel.on('info', info => infos.push(info.type))
    await channel.ensureSubscribed()
    await publish(port, 'short', JSON.stringify({ n: 1 }))
    await until(() => got.length === 1, 10000, 'the first message')

    // The client goes away; retention moves past its position while it is gone.
    c.disconnect()
    for (let n = 2; n <= 6; n++) await publish(port, 'short', JSON.stringify({ n }))
    await c.connect()
    await until(() => infos.includes('history_not_found'), 10000, 'reject_history')
    assert.ok(!infos.includes('history_received'), `${infos}`)
    // Live messages continue.
    await publish(port, 'short', JSON.stringify({ n: 7 }))
    await until(() => got.includes(7), 10000, 'the live message')
  } finally {
    c.disconnect()
    await stop(server, 'SIGTERM')
  }
})

function jwt(claims, secret = SECRET) {
  let b64 = v => Buffer.from(JSON.stringify(v)).toString('base64url')
  let body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`
}

test('an expiring token: disconnect token_expired, and the tokenRefresher reconnects', async () => {
  let port = await freePort()
  let server = await serve(port, ['--engine', 'memory', '--anycable-enforce-jwt'])
  let now = () => Math.floor(Date.now() / 1000)
  let refreshed = 0
  let closes = []
  let c = cable(port, `?jid=${jwt({ ext: '{"user_id":1}', exp: now() + 2 })}`, {
    tokenRefresher: async transport => {
      refreshed++
      transport.setParam('jid', jwt({ ext: '{"user_id":1}', exp: now() + 3600 }))
    }
  })
  let connects = 0
  c.on('connect', () => connects++)
  c.on('close', ev => closes.push(ev && ev.reason))
  try {
    await c.connect()
    await until(() => closes.includes('token_expired'), 10000, 'token_expired')
    await until(() => refreshed === 1 && connects === 2, 10000, 'the reconnect with a new token')

    // Without a valid token the connection is refused.
    let bad = cable(port, `?jid=${jwt({ ext: '{}' }, 'wrong')}`)
    let reasons = []
    bad.on('close', ev => reasons.push(ev && ev.reason))
    await bad.connect().catch(() => {})
    await until(() => reasons.includes('unauthorized'), 10000, 'unauthorized')
    bad.disconnect()
  } finally {
    c.disconnect()
    await stop(server, 'SIGTERM')
  }
})

test('whisper: the other subscribers get it, the sender does not, nothing is stored', async () => {
  let port = await freePort()
  let server = await serve(port, ['--engine', 'memory', '--anycable-public-streams'])
  let [a, b] = [cable(port), cable(port)]
  try {
    let [ca, cb] = [a.streamFrom('room/5'), b.streamFrom('room/5')]
    let [gotA, gotB] = [[], []]
    ca.on('message', (msg, meta) => gotA.push({ msg, meta }))
    cb.on('message', (msg, meta) => gotB.push({ msg, meta }))
    await ca.ensureSubscribed()
    await cb.ensureSubscribed()
    await ca.whisper({ event: 'typing', name: 'Ann' })
    await until(() => gotB.length === 1, 10000, 'the whisper')
    assert.deepEqual(gotB[0].msg, { event: 'typing', name: 'Ann' })
    assert.equal(gotB[0].meta, undefined, 'a whisper has no position')
    // Not stored: the first durable message is offset 1, and the sender got only that.
    await publish(port, 'room/5', JSON.stringify({ durable: true }))
    await until(() => gotA.length === 1 && gotB.length === 2, 10000, 'the durable message')
    assert.deepEqual(gotA.map(g => g.meta.offset), [1])
    assert.deepEqual(gotB[1].meta.offset, 1)
  } finally {
    a.disconnect()
    b.disconnect()
    await stop(server, 'SIGTERM')
  }
})

test('--anycable-pong-timeout: a client sending pongs stays, one that does not gets no_pong', async () => {
  let port = await freePort()
  let server = await serve(port, [
    '--engine', 'memory', '--anycable-pong-timeout', '2s', '--anycable-ping-interval', '1s'
  ])
  let ponging = cable(port, '', { protocolOptions: { pongs: true } })
  let silent = cable(port)
  try {
    let [pongingEvents, silentEvents] = [[], []]
    ponging.on('disconnect', ev => pongingEvents.push(ev.reason))
    silent.on('disconnect', ev => silentEvents.push(ev.reason))
    await ponging.connect()
    await silent.connect()
    await until(() => silentEvents.includes('no_pong'), 10000, 'no_pong for the silent client')
    await new Promise(resolve => setTimeout(resolve, 3000))
    assert.deepEqual(pongingEvents, [], 'the client that sends pongs is never disconnected')
    assert.equal(ponging.state, 'connected')
  } finally {
    ponging.disconnect()
    silent.disconnect()
    await stop(server, 'SIGTERM')
  }
})
