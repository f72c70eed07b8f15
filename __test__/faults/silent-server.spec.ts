// Servers that accept and never answer: a listener that never writes, the proxy silent from the
// start, and a stalled TLS handshake. Every call is rejected within acquireTimeoutMs + 50 ms
// at p99, as POOL_TIMEOUT with phase 'connect' (a deadline that expires is a timeout).
import net from 'node:net'
import { ConnectionPool, type PoolOptions } from '../../index'
import { databaseUrl } from '../support/env'
import { startFaultProxy, type FaultProxy } from '../support/fault-proxy'
import { errorsByKind, hostPort, maxSettle, report, settleQuantile, size, timed, type Outcome } from '../support/faults'

const ACQUIRE_MS = 300
const SLACK_MS = 50

/** Accepts and reads; `onData` may answer, else nothing is ever written. */
async function silentServer(onData?: (sock: net.Socket, chunk: Buffer) => void) {
  const socks = new Set<net.Socket>()
  const srv = net.createServer((sock) => {
    socks.add(sock)
    sock.on('error', () => {})
    sock.on('close', () => socks.delete(sock))
    if (onData) sock.on('data', (chunk) => onData(sock, chunk))
  })
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve))
  return {
    port: (srv.address() as net.AddressInfo).port,
    accepted: () => socks.size,
    close: async () => {
      for (const s of socks) s.destroy()
      await new Promise((resolve) => srv.close(resolve))
    },
  }
}

/** `rounds` rounds of `concurrency` calls on a fresh pool each round (so every call must connect). */
async function rejections(options: PoolOptions, call: (pool: ConnectionPool) => Promise<unknown>): Promise<Outcome[]> {
  const outcomes: Outcome[] = []
  for (let round = 0; round < size(10, 3); round++) {
    const pool = new ConnectionPool({ acquireTimeoutMs: ACQUIRE_MS, maxSize: 4, ...options })
    outcomes.push(...(await Promise.all(Array.from({ length: 20 }, () => timed(() => call(pool))))))
    await pool.close({ timeoutMs: 100 })
  }
  return outcomes
}

function check(scenario: string, backend: 'postgres' | 'redis', outcomes: Outcome[]) {
  const p99 = settleQuantile(outcomes, 0.99)
  report({
    scenario,
    backend,
    calls: outcomes.length,
    errors: errorsByKind(outcomes),
    firstSuccessMs: null,
    maxSettleMs: maxSettle(outcomes),
    deadlineMs: ACQUIRE_MS + SLACK_MS,
    bound: 'acquireTimeoutMs',
    notes: `p50 ${Math.round(settleQuantile(outcomes, 0.5))} ms, p99 ${Math.round(p99)} ms`,
  })
  expect(errorsByKind(outcomes)).toEqual({ 'POOL_TIMEOUT/connect': outcomes.length })
  expect(p99).toBeLessThanOrEqual(ACQUIRE_MS + SLACK_MS)
  // Not given up early either: the deadline is what ended them.
  expect(settleQuantile(outcomes, 0.01)).toBeGreaterThanOrEqual(ACQUIRE_MS - 5)
}

const pgUrl = (port: number) => `postgres://postgres@127.0.0.1:${port}/test`
const pgCall = (pool: ConnectionPool) => pool.query('select 1')
const redisCall = (pool: ConnectionPool) => pool.command('PING')

describe('fault: a server that accepts and never answers', () => {
  let silent: Awaited<ReturnType<typeof silentServer>>
  // Answers PostgreSQL's SSLRequest with 'S' (go ahead with TLS), then never speaks again.
  let tlsStall: Awaited<ReturnType<typeof silentServer>>
  let proxy: FaultProxy
  beforeAll(async () => {
    silent = await silentServer()
    tlsStall = await silentServer((sock, chunk) => {
      if (chunk.length === 8 && chunk.readUInt32BE(4) === 80877103) sock.write('S')
    })
    proxy = await startFaultProxy(hostPort(databaseUrl ?? 'postgres://127.0.0.1:5432/test'))
    proxy.set('blackholeAll')
  })
  afterAll(async () => {
    await silent?.close()
    await tlsStall?.close()
    await proxy?.close()
  })

  it('PostgreSQL, a listener that never writes', async () => {
    check('PostgreSQL: server accepts and never answers', 'postgres', await rejections({ url: pgUrl(silent.port) }, pgCall))
  })

  it('PostgreSQL, behind the proxy blackholing from the start', async () => {
    check('PostgreSQL: proxy blackholes from the start', 'postgres', await rejections({ url: pgUrl(proxy.port) }, pgCall))
  })

  it('PostgreSQL, TLS handshake stalled after the server agreed to TLS', async () => {
    check('PostgreSQL: TLS handshake stalled (tls require)', 'postgres',
      await rejections({ url: pgUrl(tlsStall.port), tls: { mode: 'require' } }, pgCall))
  })

  it('PostgreSQL, TLS pool at a listener that never writes', async () => {
    check('PostgreSQL: TLS pool at a silent server (tls require)', 'postgres',
      await rejections({ url: pgUrl(silent.port), tls: { mode: 'require' } }, pgCall))
  })

  it('Redis, a listener that never writes', async () => {
    check('Redis: server accepts and never answers', 'redis', await rejections({ url: `redis://127.0.0.1:${silent.port}` }, redisCall))
  })

  it('Redis, TLS handshake stalled (rediss://)', async () => {
    check('Redis: TLS handshake stalled (rediss, tls require)', 'redis',
      await rejections({ url: `rediss://127.0.0.1:${silent.port}`, tls: { mode: 'require' } }, redisCall))
  })
})
