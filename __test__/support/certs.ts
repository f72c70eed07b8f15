// A CA and a server certificate made with openssl for TLS tests. The server certificate names
// `localhost` and 127.0.0.1 only; `otherCa` signed nothing here.
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'

export function makeCertificates(): { ca: string; otherCa: string; cert: string; key: string } {
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
