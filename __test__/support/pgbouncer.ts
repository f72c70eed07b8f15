// PgBouncer in transaction pool mode in front of a PostgreSQL, on a free port, for tests of
// pooling behind a pooler. Binaries: Debian's (tools/install-pgbouncer.sh, 1.18) and one built
// from trixie's source (tools/build-pgbouncer.sh, >= 1.21, which has max_prepared_statements).
import { execFileSync } from 'node:child_process'
import { existsSync, readdirSync, writeFileSync } from 'node:fs'
import path from 'node:path'
import { freePort } from './servers'
import { removeDir, serverIdentity, spawnServer, tempDir, waitForPort } from './processes'

export interface PgBouncerBinary {
  path: string
  /** e.g. '1.18.0' */
  version: string
}

export interface PgBouncer {
  port: number
  /** postgres://postgres@127.0.0.1:PORT/<database> */
  url: string
  version: string
  stop(): Promise<void>
}

const BUILD_ROOT = path.join(__dirname, '..', '..', '.tmp')

export function versionAtLeast(version: string, min: string): boolean {
  const a = version.split('.').map(Number)
  const b = min.split('.').map(Number)
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if ((a[i] ?? 0) !== (b[i] ?? 0)) return (a[i] ?? 0) > (b[i] ?? 0)
  }
  return true
}

function binaryVersion(bin: string): string {
  const out = execFileSync(bin, ['--version'], { encoding: 'utf8' })
  const m = /PgBouncer\s+(\d+(?:\.\d+)+)/.exec(out)
  if (!m) throw new Error(`${bin} --version printed no version: ${out}`)
  return m[1]
}

/** The PgBouncer binaries on this machine, oldest first: Debian's and those under .tmp/. */
export function pgBouncerBinaries(): PgBouncerBinary[] {
  const candidates = ['/usr/sbin/pgbouncer']
  if (existsSync(BUILD_ROOT)) {
    for (const d of readdirSync(BUILD_ROOT)) if (d.startsWith('pgbouncer-')) candidates.push(path.join(BUILD_ROOT, d, 'bin', 'pgbouncer'))
  }
  return candidates
    .filter((p) => existsSync(p))
    .map((p) => ({ path: p, version: binaryVersion(p) }))
    .sort((x, y) => (versionAtLeast(x.version, y.version) ? 1 : -1))
}

export async function startPgBouncer(opts: {
  upstream: { host: string; port: number }
  binary?: string
  /** > 0 needs PgBouncer >= 1.21 (picked when `binary` is not given). Default 0 = off on every version. */
  maxPreparedStatements?: number
  database?: string
  poolSize?: number
  /** Users allowed in (auth_type trust still wants them in the auth_file). */
  users?: string[]
}): Promise<PgBouncer> {
  const needsNew = (opts.maxPreparedStatements ?? 0) > 0
  const binaries = pgBouncerBinaries()
  const chosen = opts.binary
    ? { path: opts.binary, version: binaryVersion(opts.binary) }
    : (needsNew ? binaries.filter((b) => versionAtLeast(b.version, '1.21')).pop() : binaries[0])
  if (!chosen) throw new Error('no suitable pgbouncer binary: run tools/install-pgbouncer.sh (and tools/build-pgbouncer.sh for >= 1.21)')
  const hasSetting = versionAtLeast(chosen.version, '1.21')
  if (needsNew && !hasSetting) {
    throw new Error(`max_prepared_statements needs PgBouncer >= 1.21, ${chosen.path} is ${chosen.version}: run tools/build-pgbouncer.sh`)
  }

  const as = serverIdentity()
  const dir = tempDir('qm-pgb-', as)
  const port = await freePort()
  const database = opts.database ?? 'test'
  const users = opts.users ?? ['postgres', 'root']
  writeFileSync(path.join(dir, 'userlist.txt'), users.map((u) => `"${u}" ""\n`).join(''))
  const ini = [
    '[databases]',
    `* = host=${opts.upstream.host} port=${opts.upstream.port}`,
    '[pgbouncer]',
    'listen_addr = 127.0.0.1',
    `listen_port = ${port}`,
    'unix_socket_dir =',
    'auth_type = trust',
    `auth_file = ${path.join(dir, 'userlist.txt')}`,
    'pool_mode = transaction',
    'max_client_conn = 500',
    `default_pool_size = ${opts.poolSize ?? 10}`,
    `admin_users = ${users.join(',')}`,
    // Drivers send these at startup; PgBouncer refuses unknown startup parameters otherwise.
    'ignore_startup_parameters = extra_float_digits,options,search_path',
    // Explicit, since the default changed across versions (0 in 1.21, 200 from 1.22).
    ...(hasSetting ? [`max_prepared_statements = ${opts.maxPreparedStatements ?? 0}`] : []),
  ].join('\n')
  const iniPath = path.join(dir, 'pgbouncer.ini')
  writeFileSync(iniPath, ini + '\n')

  const server = spawnServer(chosen.path, [iniPath], { as, cwd: dir, reapSignal: 'SIGKILL' })
  const died = server.exited.then(() => {
    throw new Error(`pgbouncer ${chosen.version} exited during startup:\n${server.output()}`)
  })
  try {
    await Promise.race([waitForPort(port, 10_000), died])
  } catch (err) {
    await server.stop('SIGKILL')
    removeDir(dir)
    throw err
  }
  return {
    port,
    url: `postgres://${users[0]}@127.0.0.1:${port}/${database}`,
    version: chosen.version,
    stop: async () => {
      // SIGINT: "safe shutdown" waits for clients; SIGTERM exits at once.
      await server.stop('SIGTERM', 5000)
      removeDir(dir)
    },
  }
}
