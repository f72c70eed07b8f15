// Scaling out on the data tier's own engines, against real servers the suite starts: a
// PostgreSQL primary with streaming standbys (failover, read pools) and PgBouncer in
// transaction mode (1.18 without the statement cache, >= 1.21 with max_prepared_statements).
import { ConnectionPool } from '../index'
import { eventually, trackedPools } from './support/env'
import { startPgCluster, type PgCluster } from './support/pg-cluster'
import { pgBouncerBinaries, startPgBouncer, versionAtLeast, type PgBouncer } from './support/pgbouncer'

const inCi = process.env.CI === 'true'
const loudSkip = (what: string) => {
  if (inCi) throw new Error(`CI: ${what} is missing (tools/install-pgbouncer.sh / build-pgbouncer.sh)`)
  process.stderr.write(`\n*** SKIPPED: ${what} ***\n`)
}
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

describe('PostgreSQL primary with standbys', () => {
  const open = trackedPools()
  let cluster: PgCluster
  beforeAll(async () => {
    cluster = await startPgCluster({ standbys: 2, log: () => {} })
    const setup = new ConnectionPool({ url: cluster.primary.url, maxSize: 1 })
    await setup.execute('create table qm_orders(id int primary key, at timestamptz default now())')
    await setup.close()
    await cluster.waitReplicated()
  }, 90_000)
  afterAll(async () => {
    await cluster?.stop()
  })

  it('spreads a read pool over both standbys (load_balance_hosts=random, read-only)', async () => {
    const url = cluster.multiHostUrl({ nodes: 'standbys', targetSessionAttrs: 'read-only', params: { load_balance_hosts: 'random' } })
    const reads = open({ url, maxSize: 8, minIdle: 8 })
    await eventually(() => reads.status(), (s) => s.size === 8, 10_000)
    const ports = new Map<number, number>()
    const results = await Promise.all(Array.from({ length: 400 }, () => reads.query('select inet_server_port() as port, pg_is_in_recovery() as standby')))
    for (const r of results) {
      expect(r.rows[0].standby).toBe(true)
      ports.set(r.rows[0].port, (ports.get(r.rows[0].port) ?? 0) + 1)
    }
    const hosts = reads.status().hosts
    process.stderr.write(`read pool: queries per standby port ${JSON.stringify([...ports])}; connections ${JSON.stringify(hosts)}\n`)
    expect([...ports.keys()].sort()).toEqual(cluster.standbys.map((s) => s.port).sort())
    expect(hosts.map((h) => h.host).sort()).toEqual(cluster.standbys.map((s) => `127.0.0.1:${s.port}`).sort())
    expect(hosts.reduce((n, h) => n + h.connections, 0)).toBe(8)
    // prefer-standby over every host still lands on standbys while there are some.
    const prefer = open({ url: cluster.multiHostUrl({ targetSessionAttrs: 'prefer-standby' }), maxSize: 2 })
    expect((await prefer.query('select pg_is_in_recovery() as standby')).rows[0].standby).toBe(true)
  })

  it('follows a failover: writes resume on the promoted standby within the deadline, none lost', async () => {
    const url = cluster.multiHostUrl({ targetSessionAttrs: 'read-write' })
    const writes = open({ url, maxSize: 8, acquireTimeoutMs: 10_000, connectTimeoutMs: 1000 })
    let next = 1
    let running = true
    const acked: number[] = []
    const errors = new Map<string, number>()
    let promotedAt = 0
    let firstAfterPromotion = 0
    const writer = async () => {
      while (running) {
        const id = next++
        try {
          await writes.execute('insert into qm_orders(id) values ($1)', [id])
          acked.push(id)
          if (promotedAt && !firstAfterPromotion) firstAfterPromotion = Date.now()
        } catch (e: any) {
          const key = `${e.code}${e.sent !== undefined ? ` sent=${e.sent}` : ''}`
          errors.set(key, (errors.get(key) ?? 0) + 1)
        }
      }
    }
    const writers = Array.from({ length: 16 }, writer)
    await sleep(500)
    const ackedBefore = acked.length
    // A clean stop (fast) sends every committed WAL record to the standbys first.
    await cluster.stopPrimary('fast')
    await sleep(300)
    await cluster.promote(0, { repoint: true })
    promotedAt = Date.now()
    await eventually(() => firstAfterPromotion, (t) => t > 0, 10_000)
    await sleep(500)
    running = false
    await Promise.all(writers)
    const onNew = new ConnectionPool({ url: cluster.standbys[0].url, maxSize: 1 })
    const present = new Set(((await onNew.query('select id from qm_orders')).rows as Array<{ id: number }>).map((r) => r.id))
    await onNew.close()
    const lost = acked.filter((id) => !present.has(id))
    const figures = {
      writesBefore: ackedBefore,
      writesAfter: acked.length - ackedBefore,
      promotionToFirstSuccessMs: firstAfterPromotion - promotedAt,
      errors: Object.fromEntries(errors),
      lost: lost.length,
      hosts: writes.status().hosts,
    }
    process.stderr.write(`failover: ${JSON.stringify(figures)}\n`)
    expect(lost).toEqual([])
    expect(figures.promotionToFirstSuccessMs).toBeLessThan(10_000)
    expect(writes.status().hosts.map((h) => h.host)).toEqual([`127.0.0.1:${cluster.standbys[0].port}`])
    // Every error a writer saw says whether its statement may have run.
    for (const code of errors.keys()) expect(code).toMatch(/^(CONNECTION_LOST sent=(true|false)|POOL_TIMEOUT)$/)
  }, 60_000)
})

describe('PgBouncer in transaction mode', () => {
  const open = trackedPools()
  let cluster: PgCluster
  beforeAll(async () => {
    cluster = await startPgCluster({ standbys: 1, log: () => {} })
  }, 60_000)
  afterAll(async () => {
    await cluster?.stop()
  })

  async function exercise(bouncer: PgBouncer, statementCache: boolean) {
    const pool = open({ url: bouncer.url, maxSize: 20, statementCache, acquireTimeoutMs: 20_000 })
    // Parameterised statements: with no statement cache the types come from the JS values
    // (and casts); with the cache PgBouncer maps the prepared statements per server.
    const results = await Promise.all(
      Array.from({ length: 2000 }, (_, i) => pool.query('select $1::int + 1 as n, $2::text as t', [i, `v${i}`])),
    )
    expect(results.every((r, i) => r.rows[0].n === i + 1 && r.rows[0].t === `v${i}`)).toBe(true)
    const done = await Promise.all(
      Array.from({ length: 200 }, (_, i) =>
        pool.transaction(async (tx) => (await tx.query('select $1::int as i, txid_current() as x', [i])).rows[0].i),
      ),
    )
    expect(done).toEqual(Array.from({ length: 200 }, (_, i) => i))
    // Session state does not cross leases.
    await pool.transaction(async (tx) => {
      await tx.query("set statement_timeout = '4321'")
    })
    const after = await pool.transaction(async (tx) => (await tx.query('show statement_timeout')).rows[0].statement_timeout)
    expect(after).not.toBe('4321ms')
    return pool
  }

  it('works through Debian PgBouncer 1.18 with statementCache: false', async () => {
    const binary = pgBouncerBinaries().find((b) => b.version.startsWith('1.18'))
    if (!binary) return loudSkip('PgBouncer 1.18 (Debian package pgbouncer)')
    const bouncer = await startPgBouncer({ upstream: { host: '127.0.0.1', port: cluster.primary.port }, binary: binary.path })
    try {
      await exercise(bouncer, false)
    } finally {
      await bouncer.stop()
    }
  }, 60_000)

  it('works through PgBouncer >= 1.21 with max_prepared_statements and the statement cache on', async () => {
    const binary = pgBouncerBinaries().find((b) => versionAtLeast(b.version, '1.21.0'))
    if (!binary) return loudSkip('PgBouncer >= 1.21 (tools/build-pgbouncer.sh)')
    const bouncer = await startPgBouncer({
      upstream: { host: '127.0.0.1', port: cluster.primary.port },
      binary: binary.path,
      maxPreparedStatements: 200,
    })
    try {
      const pool = await exercise(bouncer, true)
      expect(pool.metrics().errors).toBe(0)
    } finally {
      await bouncer.stop()
    }
  }, 60_000)
})
