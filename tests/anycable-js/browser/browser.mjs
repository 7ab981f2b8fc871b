// @anycable/web in headless Chromium against Spool's /cable, on a page served from another
// origin (a static server on another port): subscribe to a signed stream, restart the server
// (disk engine; SIGTERM, then kill -9) while messages are published, and check that the page
// catches up with every message once, in order — by its stream positions after the graceful
// restart (AnyCable's client drops its session on `disconnect`), by restoring its session after
// the kill. Chromium is driven over the DevTools
// protocol (--remote-debugging-port) with `ws`; the page loads @anycable/web from
// node_modules through an import map. Run by crates/spool/tests/anycable_browser.rs:
//
//   SPOOL_BIN=target/debug/spool CHROMIUM=/usr/bin/chromium node browser/browser.mjs
//
// Exits 0 with "ok" on success, 1 with the reason otherwise; bounded to 120 s in all.

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { createServer as httpServer } from 'node:http'
import { tmpdir } from 'node:os'
import { dirname, extname, join, normalize } from 'node:path'
import { fileURLToPath } from 'node:url'

import WebSocket from 'ws'

import { SPOOL_BIN, freePort, serve as serveSpool, signed as signedWith, stop } from '../spool.mjs'

const CHROMIUM = process.env.CHROMIUM || 'chromium'
const SECRET = 'browser-anycable-secret'
const API_KEY = 'browser-api-key'
const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..')
const TOTAL = 120

const log = (...args) => { if (process.env.SPOOL_TEST_LOGS) console.error('[browser test]', ...args) }

const signed = stream => signedWith(stream, SECRET)

// Spool allows WebSocket upgrades from the page's origin only when told (--cors-origin, as
// AnyCable's --allowed_origins).
const serve = (port, dir, origin) =>
  serveSpool(port, ['--api-key', API_KEY, '--anycable-secret', SECRET, '--engine', 'disk',
    '--data-dir', dir, '--cors-origin', origin])

async function publish(port, stream, n) {
  let r = await fetch(`http://127.0.0.1:${port}/v1/streams/${encodeURIComponent(stream)}/messages`, {
    method: 'POST',
    headers: { authorization: `Bearer ${API_KEY}`, 'idempotency-key': `m${n}` },
    body: JSON.stringify({ n })
  })
  if (r.status !== 201) throw new Error(`publish answered ${r.status}: ${await r.text()}`)
}

// The page and node_modules, from the test's folder, on another origin than Spool's.
function staticServer(port) {
  const types = { '.html': 'text/html', '.mjs': 'text/javascript', '.js': 'text/javascript' }
  let server = httpServer((req, res) => {
    let path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname))
    if (path.includes('..') || !(path.startsWith('/browser/') || path.startsWith('/node_modules/'))) {
      res.writeHead(404).end()
      return
    }
    try {
      let body = readFileSync(join(ROOT, path))
      res.writeHead(200, { 'content-type': types[extname(path)] || 'application/octet-stream' })
      res.end(body)
    } catch {
      res.writeHead(404).end()
    }
  })
  return new Promise(resolve => server.listen(port, '127.0.0.1', () => resolve(server)))
}

// Headless Chromium and a DevTools session on one page.
async function browser(url) {
  let profile = mkdtempSync(join(tmpdir(), 'spool-chromium-'))
  let child = spawn(CHROMIUM, [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    `--user-data-dir=${profile}`, '--remote-debugging-port=0', 'about:blank'
  ], { stdio: ['ignore', 'ignore', 'pipe'], detached: true })
  let endpoint = await new Promise((resolve, reject) => {
    let out = ''
    let timer = setTimeout(() => reject(new Error(`chromium gave no DevTools endpoint:\n${out}`)), 30000)
    child.stderr.on('data', chunk => {
      out += chunk
      let m = /DevTools listening on (ws:\/\/\S+)/.exec(out)
      if (m) { clearTimeout(timer); resolve(m[1]) }
    })
    child.on('exit', code => { clearTimeout(timer); reject(new Error(`chromium exited (${code}):\n${out}`)) })
  }).catch(e => {
    try { process.kill(-child.pid, 'SIGKILL') } catch {}
    throw e
  })
  let ws = new WebSocket(endpoint)
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
  let next = 0
  let pending = new Map()
  let console_ = []
  ws.on('message', data => {
    let msg = JSON.parse(data)
    if (msg.method === 'Runtime.exceptionThrown') {
      console_.push(`exception: ${JSON.stringify(msg.params.exceptionDetails).slice(0, 500)}`)
    } else if (msg.method === 'Runtime.consoleAPICalled') {
      console_.push(`${msg.params.type}: ${msg.params.args.map(a => a.value ?? a.description).join(' ')}`)
    }
    if (msg.id && pending.has(msg.id)) {
      let { resolve, reject } = pending.get(msg.id)
      pending.delete(msg.id)
      if (msg.error) reject(new Error(JSON.stringify(msg.error)))
      else resolve(msg.result)
    }
  })
  let call = (method, params = {}, sessionId) => new Promise((resolve, reject) => {
    let id = ++next
    pending.set(id, { resolve, reject })
    ws.send(JSON.stringify({ id, method, params, sessionId }))
  })
  let { targetId } = await call('Target.createTarget', { url })
  let { sessionId } = await call('Target.attachToTarget', { targetId, flatten: true })
  await call('Runtime.enable', {}, sessionId)
  let evaluate = async expression => {
    let r = await call('Runtime.evaluate', { expression, returnByValue: true }, sessionId)
    if (r.exceptionDetails) throw new Error(`page: ${JSON.stringify(r.exceptionDetails)}`)
    return r.result.value
  }
  let close = async () => {
    try { await Promise.race([call('Browser.close'), new Promise(r => setTimeout(r, 3000))]) } catch {}
    ws.close()
    // Chromium's helpers (zygote, renderer, crashpad) outlive a SIGKILL of the browser for a
    // moment and go on writing the profile: kill its whole process group (it was started as
    // a group leader), then remove the profile with retries. A profile that still cannot be
    // removed is a leftover temp dir, not a failure of what this test checks.
    try { process.kill(-child.pid, 'SIGKILL') } catch {}
    await stop(child, 'SIGKILL')
    try {
      rmSync(profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 200 })
    } catch (e) {
      console.error(`warning: could not remove Chromium's profile ${profile}: ${e.message}`)
    }
  }
  return { evaluate, close, console: console_ }
}

async function until(what, predicate, ms = 30000) {
  let deadline = Date.now() + ms
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 50))
  }
}

async function main() {
  assert.ok(SPOOL_BIN, 'SPOOL_BIN names the spool binary')
  let [port, pagePort] = [await freePort(), await freePort()]
  let dir = mkdtempSync(join(tmpdir(), 'spool-browser-'))
  let origin = `http://127.0.0.1:${pagePort}`
  let server = await serve(port, dir, origin)
  let pages = await staticServer(pagePort)
  let url = `http://127.0.0.1:${pagePort}/browser/page.html?` + new URLSearchParams({
    cable: `ws://127.0.0.1:${port}/cable`,
    signed: signed('browser/feed')
  })
  let b = await browser(url)
  try {
    let state = () => b.evaluate('JSON.stringify(window.spool || null)').then(JSON.parse)
    await until('the page to subscribe', async () => {
      let s = await state()
      if (s && s.errors.length) throw new Error(`the page failed: ${s.errors}`)
      return s && s.subscribed
    })
    log('subscribed')
    let n = 1
    let publishTo = async last => { for (; n <= last; n++) await publish(port, 'browser/feed', n) }
    let received = async count => until(`${count} messages`, async () => (await state()).received.length >= count, 60000)
    await publishTo(TOTAL / 3)
    await received(TOTAL / 3)
    // A graceful restart (SIGTERM: disconnect server_restart, after which the client drops
    // its session id), then messages: the client resubscribes with its stream positions and
    // gets the history it missed.
    await stop(server, 'SIGTERM')
    server = await serve(port, dir, origin)
    await publishTo((2 * TOTAL) / 3)
    await received((2 * TOTAL) / 3)
    // kill -9 (no disconnect frame: the client keeps its session id), then messages: the
    // session is restored and the history request catches it up. Sessions are saved once a
    // second (SPEC §3): the kill comes after the new session's first save.
    await new Promise(resolve => setTimeout(resolve, 2000))
    await stop(server, 'SIGKILL')
    server = await serve(port, dir, origin)
    await publishTo(TOTAL)
    await received(TOTAL)
    // Nothing more arrives (a duplicate would show up here).
    await new Promise(resolve => setTimeout(resolve, 500))
    let s = await state()
    assert.deepEqual(s.received.map(r => r.n), Array.from({ length: TOTAL }, (_, i) => i + 1),
      'every message once, in order')
    assert.deepEqual(s.received.map(r => r.offset), Array.from({ length: TOTAL }, (_, i) => i + 1))
    let connects = s.events.filter(e => e.type === 'connect')
    assert.equal(connects.length, 3, `connected three times: ${JSON.stringify(s.events)}`)
    assert.ok(connects[2].restored, `the session was restored after kill -9: ${JSON.stringify(s.events)}`)
    assert.ok(s.events.some(e => e.type === 'disconnect' && e.reason === 'server_restart'),
      JSON.stringify(s.events))
    console.log(`ok: ${TOTAL} messages once and in order across a restart and a kill -9; events ${JSON.stringify(s.events)}`)
  } catch (e) {
    let where = await b.evaluate('location.href + " " + document.readyState + " " + JSON.stringify(window.spool || null)').catch(e => String(e))
    throw new Error(`${e.message}\npage: ${where}\npage console:\n${b.console.join('\n')}`)
  } finally {
    await b.close()
    pages.close()
    await stop(server, 'SIGTERM')
    rmSync(dir, { recursive: true, force: true })
  }
}

let timer = setTimeout(() => { console.error('the browser test took over 120 s'); process.exit(1) }, 120000)
main().then(
  () => { clearTimeout(timer); process.exit(0) },
  e => { console.error(e && e.stack || e); process.exit(1) }
)
