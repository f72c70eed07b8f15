// The fault proxy itself, mostly in front of an in-process echo server (one check on PostgreSQL).
import net from 'node:net'
import { Client as PgClient } from 'pg'
import { startFaultProxy, type FaultProxy } from './support/fault-proxy'

const QUIET_MS = 200

interface Echo {
  port: number
  /** Everything the echo server received, across connections. */
  got(): string
  open(): number
  close(): Promise<void>
}

async function startEcho(): Promise<Echo> {
  let got = ''
  const socks = new Set<net.Socket>()
  const srv = net.createServer((sock) => {
    socks.add(sock)
    sock.on('error', () => {})
    sock.on('close', () => socks.delete(sock))
    sock.on('data', (chunk) => {
      got += chunk
      sock.write(chunk)
    })
  })
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve))
  return {
    port: (srv.address() as net.AddressInfo).port,
    got: () => got,
    open: () => socks.size,
    close: async () => {
      for (const s of socks) s.destroy()
      await new Promise((resolve) => srv.close(resolve))
    },
  }
}

interface Client {
  sock: net.Socket
  connected: Promise<void>
  received(): string
  error(): NodeJS.ErrnoException | undefined
  closed: Promise<void>
  /** Resolves with what has arrived once it includes `text`. */
  waitFor(text: string, timeoutMs?: number): Promise<string>
}

function connect(port: number): Client {
  let received = ''
  let error: NodeJS.ErrnoException | undefined
  const sock = net.connect(port, '127.0.0.1')
  sock.on('data', (chunk) => (received += chunk))
  sock.on('error', (err) => (error = err))
  const connected = new Promise<void>((resolve, reject) => {
    sock.once('connect', resolve)
    sock.once('error', reject)
  })
  connected.catch(() => {})
  const closed = new Promise<void>((resolve) => sock.once('close', () => resolve()))
  return {
    sock,
    connected,
    received: () => received,
    error: () => error,
    closed,
    waitFor: async (text, timeoutMs = 2000) => {
      const deadline = Date.now() + timeoutMs
      while (!received.includes(text)) {
        if (Date.now() > deadline) throw new Error(`no ${JSON.stringify(text)} within ${timeoutMs} ms (got ${JSON.stringify(received)})`)
        await new Promise((r) => setTimeout(r, 5))
      }
      return received
    },
  }
}

const quiet = () => new Promise((r) => setTimeout(r, QUIET_MS))

describe('fault proxy', () => {
  let echo: Echo
  let proxy: FaultProxy
  const clients: Client[] = []
  const client = () => {
    const c = connect(proxy.port)
    clients.push(c)
    return c
  }

  beforeEach(async () => {
    echo = await startEcho()
    proxy = await startFaultProxy({ host: '127.0.0.1', port: echo.port })
  })
  afterEach(async () => {
    for (const c of clients.splice(0)) c.sock.destroy()
    await proxy.close()
    await echo.close()
  })

  test('pass forwards both ways and counts flows', async () => {
    const c = client()
    await c.connected
    c.sock.write('hello')
    await c.waitFor('hello')
    expect(proxy.connections()).toBe(1)
    expect(proxy.accepted()).toBe(1)
    c.sock.end()
    await c.closed
    await new Promise((r) => setTimeout(r, 20))
    expect(proxy.connections()).toBe(0)
    expect(proxy.accepted()).toBe(1)
  })

  test('url swaps host and port', () => {
    expect(proxy.url('postgres://u:p@db.example:5432/test?sslmode=disable')).toBe(`postgres://u:p@127.0.0.1:${proxy.port}/test?sslmode=disable`)
    expect(proxy.url('redis://127.0.0.1:6379')).toBe(`redis://127.0.0.1:${proxy.port}`)
  })

  test('latency delays the connect and every chunk, in order', async () => {
    proxy.set({ connectDelayMs: 150 })
    let t0 = Date.now()
    const slow = client()
    await slow.connected
    slow.sock.write('a')
    await slow.waitFor('a')
    expect(Date.now() - t0).toBeGreaterThanOrEqual(145)

    proxy.set({ perChunkDelayMs: 100 })
    t0 = Date.now()
    slow.sock.write('b')
    await slow.waitFor('ab')
    // One delay on the way up, one on the way down.
    expect(Date.now() - t0).toBeGreaterThanOrEqual(195)

    // A chunk sent after the delay drops must not overtake one still delayed.
    slow.sock.write('c')
    await new Promise((r) => setTimeout(r, 20)) // 'c' now waits in the proxy
    proxy.set('pass')
    slow.sock.write('d')
    await slow.waitFor('abcd')
    expect(slow.received()).toBe('abcd')
  })

  test('a FIN is forwarded in order: the answer to a half-closed request arrives', async () => {
    proxy.set({ perChunkDelayMs: 30 })
    const c = client()
    c.sock.end('last words')
    await c.closed
    expect(c.received()).toBe('last words')
    expect(c.error()).toBeUndefined()
  })

  test('blackholeAll accepts and reads but never answers', async () => {
    const old = client()
    await old.connected
    proxy.set('blackholeAll')
    old.sock.write('ping')
    const fresh = client()
    await fresh.connected // the connect itself succeeds
    fresh.sock.write('ping')
    await quiet()
    expect(old.received()).toBe('')
    expect(fresh.received()).toBe('')
    expect(echo.got()).toBe('')
    expect(old.error()).toBeUndefined()
    proxy.set('pass')
    old.sock.write('pong')
    await old.waitFor('pong')
  })

  test('resetAll resets the client (ECONNRESET) and the server side', async () => {
    const c = client()
    await c.connected
    c.sock.write('x')
    await c.waitFor('x')
    expect(echo.open()).toBe(1)
    proxy.resetAll()
    await c.closed
    expect(c.error()?.code).toBe('ECONNRESET')
    await new Promise((r) => setTimeout(r, 20))
    expect(echo.open()).toBe(0)
    // The one-shot leaves the mode alone: new flows pass.
    const next = client()
    next.sock.write('y')
    await next.waitFor('y')
  })

  test("mode 'resetAll' also resets new connections", async () => {
    proxy.set('resetAll')
    const c = client()
    await c.closed
    expect(c.error()?.code).toBe('ECONNRESET')
  })

  test('refuse makes connects fail while open flows carry on', async () => {
    const old = client()
    await old.connected
    proxy.set('refuse')
    const refused = client()
    await expect(refused.connected).rejects.toMatchObject({ code: 'ECONNREFUSED' })
    old.sock.write('still')
    await old.waitFor('still')
    proxy.set('pass')
    const again = client()
    again.sock.write('back')
    await again.waitFor('back')
  })

  test('dropAnswers forwards requests and loses the answers', async () => {
    const c = client()
    await c.connected
    proxy.set('dropAnswers')
    c.sock.write('request')
    await quiet()
    expect(echo.got()).toBe('request')
    expect(c.received()).toBe('')
  })

  test('blackholeExisting silences open flows, new flows pass', async () => {
    const old = client()
    await old.connected
    old.sock.write('1')
    await old.waitFor('1')
    proxy.blackholeExisting()
    const fresh = client()
    fresh.sock.write('2')
    await fresh.waitFor('2')
    old.sock.write('3')
    await quiet()
    expect(old.received()).toBe('1')
    expect(echo.got()).toBe('12')
    // The forgotten flow stays forgotten whatever the mode.
    proxy.set('pass')
    old.sock.write('4')
    await quiet()
    expect(old.received()).toBe('1')
  })

  test('close destroys every flow', async () => {
    const a = client()
    const b = client()
    await Promise.all([a.connected, b.connected])
    a.sock.write('a')
    await a.waitFor('a')
    await proxy.close()
    await Promise.all([a.closed, b.closed])
    expect(proxy.connections()).toBe(0)
    await new Promise((r) => setTimeout(r, 20))
    expect(echo.open()).toBe(0)
  })
})

// The same faults on the real protocol (DATABASE_URL is set by global-setup when it can be).
const withPostgres = process.env.DATABASE_URL ? describe : describe.skip
withPostgres('fault proxy in front of PostgreSQL', () => {
  let proxy: FaultProxy
  const clients: PgClient[] = []
  const pgClient = async () => {
    const c = new PgClient({ connectionString: proxy.url(process.env.DATABASE_URL!), query_timeout: QUIET_MS })
    c.on('error', () => {})
    clients.push(c)
    await c.connect()
    return c
  }

  beforeEach(async () => {
    const u = new URL(process.env.DATABASE_URL!)
    proxy = await startFaultProxy({ host: u.hostname, port: Number(u.port || 5432) })
  })
  afterEach(async () => {
    await proxy.close()
    await Promise.all(clients.splice(0).map((c) => c.end().catch(() => {})))
  })

  test('pass answers, blackholeAll times out, resetAll fails the connection', async () => {
    const c = await pgClient()
    expect((await c.query('select 1 as one')).rows).toEqual([{ one: 1 }])
    proxy.set('blackholeAll')
    await expect(c.query('select 2')).rejects.toThrow(/timeout/i)
    proxy.set('pass')
    const d = await pgClient()
    expect((await d.query('select 3 as three')).rows).toEqual([{ three: 3 }])
    const failed = new Promise<Error>((resolve) => d.once('error', resolve))
    proxy.resetAll()
    expect(String(await failed)).toMatch(/ECONNRESET|terminated/)
  })
})
