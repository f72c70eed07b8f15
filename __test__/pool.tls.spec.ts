import { ConnectionPool } from '../index'
import { makeCertificates } from './support/certs'
import { startPostgres, startRedis } from './support/servers'

// A throwaway PostgreSQL with TLS on, its certificate signed by a CA made here with openssl.

describe('ConnectionPool over TLS (rustls)', () => {
  let certs: ReturnType<typeof makeCertificates>
  let server: { url: string; stop: () => Promise<void> }
  beforeAll(async () => {
    certs = makeCertificates()
    server = await startPostgres({ cert: certs.cert, key: certs.key })
  }, 60_000)
  afterAll(async () => server && (await server.stop()))

  const sslInUse = async (pool: ConnectionPool) =>
    (await pool.query('select ssl from pg_stat_ssl where pid = pg_backend_pid()')).rows[0].ssl

  it('verify-full accepts the server whose certificate the CA signed for this host', async () => {
    const pool = new ConnectionPool({ url: server.url, tls: { mode: 'verify-full', ca: certs.ca } })
    expect(await sslInUse(pool)).toBe(true)
    await pool.close()
  })

  it('verify-full refuses a certificate from another CA, at once and without the password', async () => {
    const pool = new ConnectionPool({ url: server.url, tls: { mode: 'verify-full', ca: certs.otherCa }, acquireTimeoutMs: 3000 })
    const started = Date.now()
    const err = await pool.query('select 1').catch((e) => e)
    expect(err.code).toBe('CONNECT_FAILED')
    expect(err.message).toMatch(/certificate/i)
    expect(err.message).not.toContain(':postgres@')
    expect(Date.now() - started).toBeLessThan(2000) // not retried until the deadline
    await pool.close()
  })

  it('verify-full checks the host name; verify-ca checks only the chain', async () => {
    const byName = server.url.replace('127.0.0.1', '127.0.0.2') // a loopback address the certificate does not name
    const full = new ConnectionPool({ url: byName, tls: { mode: 'verify-full', ca: certs.ca }, acquireTimeoutMs: 3000 })
    await expect(full.query('select 1')).rejects.toMatchObject({ code: 'CONNECT_FAILED' })
    await full.close()
    const chainOnly = new ConnectionPool({ url: byName, tls: { mode: 'verify-ca', ca: certs.ca } })
    expect(await sslInUse(chainOnly)).toBe(true)
    await chainOnly.close()
  })

  it('require encrypts without verifying; sslmode in the URL works too', async () => {
    const pool = new ConnectionPool({ url: `${server.url}?sslmode=require` })
    expect(await sslInUse(pool)).toBe(true)
    await pool.close()
    const plain = new ConnectionPool({ url: `${server.url}?sslmode=disable` })
    expect(await sslInUse(plain)).toBe(false)
    await plain.close()
  })
})

describe('Redis over TLS (rediss://)', () => {
  let certs: ReturnType<typeof makeCertificates>
  let server: { url: string; stop: () => Promise<void> }
  beforeAll(async () => {
    certs = makeCertificates()
    server = await startRedis({ cert: certs.cert, key: certs.key, ca: certs.ca })
  }, 30_000)
  afterAll(async () => server && (await server.stop()))

  it('verifies the server against tls.ca', async () => {
    const pool = new ConnectionPool({ url: server.url, tls: { ca: certs.ca } })
    expect(await pool.command('PING')).toBe('PONG')
    await pool.close()
  })

  it('refuses a server certificate from another CA', async () => {
    const pool = new ConnectionPool({ url: server.url, tls: { ca: certs.otherCa }, acquireTimeoutMs: 2000 })
    await expect(pool.command('PING')).rejects.toMatchObject({ code: 'CONNECT_FAILED' })
    await pool.close()
  })

  it("encrypts without verifying with mode 'require'", async () => {
    const pool = new ConnectionPool({ url: server.url, tls: { mode: 'require' } })
    expect(await pool.command('PING')).toBe('PONG')
    await pool.close()
  })

  it('refuses tls options on a plain redis:// URL', () => {
    expect(() => new ConnectionPool({ url: server.url.replace('rediss', 'redis'), tls: { ca: certs.ca } })).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT' }),
    )
  })
})
