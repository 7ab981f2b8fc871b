// What both programs here need around a Spool of their own: a free port, `spool serve`
// ($SPOOL_BIN) on it, stopping it by a signal, and stream names signed as anycable-rails signs
// them. Imported by cable.test.mjs and browser/browser.mjs; not a test file itself.

import { spawn } from 'node:child_process'
import { createHmac } from 'node:crypto'
import { createServer } from 'node:net'

export const SPOOL_BIN = process.env.SPOOL_BIN

export function freePort() {
  return new Promise((resolve, reject) => {
    let server = createServer()
    server.listen(0, '127.0.0.1', () => {
      let { port } = server.address()
      server.close(() => resolve(port))
    })
    server.on('error', reject)
  })
}

// `spool serve` on 127.0.0.1:`port` with `args`, resolved once it listens.
export function serve(port, args) {
  return new Promise((resolve, reject) => {
    let child = spawn(
      SPOOL_BIN,
      ['serve', '--listen', `127.0.0.1:${port}`, ...args],
      { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, SPOOL_LOG: 'info' } }
    )
    let log = ''
    child.stderr.on('data', chunk => {
      log += chunk
      if (process.env.SPOOL_TEST_LOGS) process.stderr.write(chunk)
      if (/listening/.test(log)) resolve(child)
    })
    child.on('exit', code => reject(new Error(`spool exited (${code}) before listening:\n${log}`)))
  })
}

export function stop(child, signal) {
  return new Promise(resolve => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve()
    child.once('exit', () => resolve())
    child.kill(signal)
  })
}

// Rails' MessageVerifier, as anycable-rails signs stream names (written here, not taken from
// Spool, so the two are checked against each other).
export function signed(stream, secret) {
  let encoded = Buffer.from(JSON.stringify(stream)).toString('base64')
  let digest = createHmac('sha256', secret).update(encoded).digest('hex')
  return `${encoded}--${digest}`
}
