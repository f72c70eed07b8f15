// Self-check of the test-server helpers: starts a PostgreSQL primary + 2 standbys, PgBouncer
// (each binary found) and a Redis Cluster, runs real queries through each, fails over once,
// prints timings and stops everything. Run: npx tsx tools/check-test-servers.ts
// Prerequisites: tools/install-pgbouncer.sh and tools/build-pgbouncer.sh (as root).
import { Client } from 'pg'
import { pgQuery, startPgCluster, type PgCluster } from '../__test__/support/pg-cluster'
import { pgBouncerBinaries, startPgBouncer, versionAtLeast, type PgBouncer } from '../__test__/support/pgbouncer'
import { run, until } from '../__test__/support/processes'
import { startRedisCluster, type RedisCluster } from '../__test__/support/redis-cluster'

const timings: Array<[string, number]> = []
const results: Array<[string, string | undefined]> = []
const stops: Array<() => Promise<void>> = []

async function timed<T>(what: string, fn: () => Promise<T>): Promise<T> {
  const t0 = Date.now()
  const v = await fn()
  timings.push([what, Date.now() - t0])
  return v
}

function check(cond: unknown, what: string): void {
  if (!cond) throw new Error(`check failed: ${what}`)
}

const psql = (url: string, sql: string) => run('psql', [url, '-XAtq', '-v', 'ON_ERROR_STOP=1', '-c', sql]).then((s) => s.trim())

async function checkPgCluster(): Promise<PgCluster> {
  const cluster = await timed('pg cluster start (primary + 2 standbys)', () => startPgCluster({ standbys: 2, log: () => {} }))
  stops.push(cluster.stop)
  const [s0, s1] = cluster.standbys
  await psql(cluster.primary.url, 'create table qm_check (id int primary key, v text)')
  await psql(cluster.primary.url, "insert into qm_check values (1, 'one')")
  for (const s of cluster.standbys) {
    await until(`row 1 on standby ${s.port}`, 10_000, async () => ((await psql(s.url, 'select v from qm_check where id = 1')) === 'one') || undefined)
    check((await psql(s.url, 'select pg_is_in_recovery()')) === 't', 'standby in recovery')
  }
  // libpq's own multi-host handling picks the writable node.
  const rw = cluster.multiHostUrl({ targetSessionAttrs: 'read-write' })
  check(Number(await psql(rw, 'select inet_server_port()')) === cluster.primary.port, 'read-write URL reaches the primary')
  const ro = cluster.multiHostUrl({ targetSessionAttrs: 'standby' })
  check(Number(await psql(ro, 'select inet_server_port()')) !== cluster.primary.port, 'standby URL reaches a standby')

  await timed('pg primary fast stop', () => cluster.stopPrimary('fast'))
  await timed('pg primary start again', () => cluster.startPrimary())
  await psql(cluster.primary.url, "insert into qm_check values (2, 'two')")
  // Asynchronous replication: a crash now would lose row 2 on the standbys.
  await timed('pg wait for standbys to replay', () => cluster.waitReplicated())

  await timed('pg primary immediate stop', () => cluster.stopPrimary('immediate'))
  await timed('pg promote standby 0 (+ repoint standby 1)', () => cluster.promote(0, { repoint: true }))
  check(Number(await psql(rw, 'select inet_server_port()')) === s0.port, 'read-write URL reaches the promoted standby')
  await psql(s0.url, "insert into qm_check values (3, 'three')")
  await cluster.waitReplicated(s0)
  check((await psql(s1.url, 'select count(*) from qm_check')) === '3', 'standby 1 follows the new primary')
  return cluster
}

async function checkPgBouncer(upstreamPort: number): Promise<void> {
  const binaries = pgBouncerBinaries()
  check(binaries.length, 'a pgbouncer binary (tools/install-pgbouncer.sh)')
  check(binaries.some((b) => versionAtLeast(b.version, '1.21')), 'pgbouncer >= 1.21 (tools/build-pgbouncer.sh)')
  for (const bin of binaries) {
    const modern = versionAtLeast(bin.version, '1.21')
    const bouncer: PgBouncer = await timed(`pgbouncer ${bin.version} start`, () =>
      startPgBouncer({ upstream: { host: '127.0.0.1', port: upstreamPort }, binary: bin.path, maxPreparedStatements: modern ? 50 : undefined, poolSize: 2 }))
    stops.push(bouncer.stop)
    check(bouncer.version === bin.version, 'reported version')
    check((await psql(bouncer.url, 'select count(*) from qm_check')) === '3', `query through pgbouncer ${bin.version}`)
    if (modern) {
      // Named statements from 4 clients over 2 server connections: needs max_prepared_statements.
      const clients = await Promise.all([0, 1, 2, 3].map(async () => {
        const c = new Client({ connectionString: bouncer.url })
        await c.connect()
        return c
      }))
      for (let round = 0; round < 3; round++) {
        const rows = await Promise.all(clients.map((c, i) => c.query({ name: 'qm_by_id', text: 'select $1::int + 1 as n', values: [i] })))
        rows.forEach((r, i) => check(r.rows[0].n === i + 1, 'prepared statement result'))
      }
      await Promise.all(clients.map((c) => c.end()))
    } else {
      let refused = false
      await startPgBouncer({ upstream: { host: '127.0.0.1', port: upstreamPort }, binary: bin.path, maxPreparedStatements: 10 }).catch(() => (refused = true))
      check(refused, 'maxPreparedStatements refused on an old pgbouncer')
    }
    await bouncer.stop()
  }
}

async function checkRedisCluster(): Promise<void> {
  const cluster: RedisCluster = await timed('redis cluster start (3+3)', () => startRedisCluster({ log: () => {} }))
  stops.push(cluster.stop)
  check(cluster.nodes.filter((n) => n.role === 'master').length === 3 && cluster.nodes.length === 6, '3 masters + 3 replicas')
  const anyPort = cluster.nodes[0].port
  for (let i = 0; i < 20; i++) await cluster.cli(anyPort, '-c', 'set', `key:${i}`, String(i))
  check((await cluster.cli(cluster.nodes[5].port, '-c', 'get', 'key:7')).trim() === '7', 'cluster get')

  const first = cluster.nodes.find((n) => n.role === 'master')!
  const replica = cluster.nodes.find((n) => n.masterPort === first.port)!
  await timed('redis manual failover (CLUSTER FAILOVER)', () => cluster.failover(first.port, 'manual'))
  check(cluster.nodes.find((n) => n.port === replica.port)?.role === 'master', 'replica promoted (manual)')

  const victim = cluster.nodes.find((n) => n.role === 'master' && n.port !== replica.port)!
  const heir = cluster.nodes.find((n) => n.masterPort === victim.port)!
  await timed('redis failover by killing a master', () => cluster.failover(victim.port, 'kill'))
  check(cluster.nodes.find((n) => n.port === heir.port)?.role === 'master', 'replica promoted (kill)')
  check((await cluster.cli(heir.port, '-c', 'get', 'key:7')).trim() === '7', 'data survives failover')
  await timed('redis restart the killed node', () => cluster.restartNode(victim.port))
  check(cluster.nodes.find((n) => n.port === victim.port)?.role === 'replica', 'killed master rejoins as a replica')
}

async function step(name: string, fn: () => Promise<void>): Promise<void> {
  try {
    await fn()
    results.push([name, undefined])
  } catch (err) {
    results.push([name, String(err instanceof Error ? err.stack : err)])
  }
}

async function main(): Promise<void> {
  let cluster: PgCluster | undefined
  await step('postgres primary + standbys', async () => {
    cluster = await checkPgCluster()
  })
  await step('pgbouncer', async () => {
    check(cluster, 'a running PostgreSQL cluster')
    // The promoted standby is the writable node now.
    await pgQuery(cluster!.standbys[0].port, 'select 1')
    await checkPgBouncer(cluster!.standbys[0].port)
  })
  await step('redis cluster', checkRedisCluster)
  for (const stop of stops.reverse()) await stop().catch(() => {})

  console.log('\ntimings:')
  for (const [what, ms] of timings) console.log(`  ${what.padEnd(46)} ${(ms / 1000).toFixed(2)} s`)
  console.log()
  for (const [name, err] of results) console.log(`${err ? 'FAIL' : 'ok  '} ${name}${err ? `\n${err}` : ''}`)
  const failed = results.filter(([, err]) => err).length
  console.log(`check-test-servers: ${results.length - failed} passed, ${failed} failed`)
  process.exitCode = failed ? 1 : 0
}

main().catch((err) => {
  console.error(err)
  process.exitCode = 1
})
