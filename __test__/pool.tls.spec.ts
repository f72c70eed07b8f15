import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { ConnectionPool } from '../index'
import { startPostgres } from './support/servers'

// A throwaway PostgreSQL with TLS on, its certificate signed by a CA made here with openssl.
// The certificate names `localhost` and 127.0.0.1 only.
function makeCertificates(): { ca: string; otherCa: string; cert: string; key: string } {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'qm-tls-'))
  const run = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' })
  try {
    for (const name of ['ca', 'other']) {
      run('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', `/CN=qm test ${name}`,
        '-keyout', `${name}.key`, '-out', `${name}.crt`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign')
    }
    run('req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost', '-keyout', 'server.key', '-out', 'server.csr')
    writeFileSync(path.join(dir, 'ext.cnf'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n')
    run('x509', '-req', '-in', 'server.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2', '-out', 'server.crt', '-extfile', 'ext.cnf')
    const read = (f: string) => readFileSync(path.join(dir, f), 'utf8')
    return { ca: read('ca.crt'), otherCa: read('other.crt'), cert: read('server.crt'), key: read('server.key') }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}

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
