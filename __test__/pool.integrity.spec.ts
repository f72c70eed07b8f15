// What a caller is told must be what the server did: no statement run twice, no "committed"
// transaction that rolled back, statements on a lease in the order issued, row counts from
// the command tag, no session state handed to the next caller. Faults come from a real TCP
// proxy in front of the real servers.
import { ConnectionPool } from '../index'
import { databaseUrl, describeWithPostgres, describeWithRedis, eventually, redisUrl, trackedPools } from './support/env'
import { startFaultProxy, type FaultProxy } from './support/fault-proxy'
import { mkdtempSync, rmSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'

// Errors made by the addon come from Node's own realm, not jest's sandbox: no instanceof.
const isError = (v: unknown) => Object.prototype.toString.call(v) === '[object Error]'
const settle = <T>(calls: Array<Promise<T>>) => Promise.allSettled(calls)
const rejections = (r: PromiseSettledResult<unknown>[]) =>
  r.filter((x): x is PromiseRejectedResult => x.status === 'rejected').map((x) => x.reason)

function target(url: string): { host: string; port: number } {
  const u = new URL(url)
  return { host: u.hostname, port: Number(u.port || (u.protocol.startsWith('redis') ? 6379 : 5432)) }
}

describeWithPostgres('PostgreSQL: what a caller is told is what happened', () => {
  const open = trackedPools()
  let admin: ConnectionPool
  let proxy: FaultProxy

  beforeAll(async () => {
    admin = new ConnectionPool({ url: databaseUrl!, maxSize: 2, name: 'integrity-admin' })
    await admin.execute('drop table if exists qm_orders, qm_child, qm_parent, qm_seq, qm_ver')
    await admin.execute('create table qm_orders(id serial primary key, tag text not null)')
    await admin.execute('create table qm_parent(id int primary key)')
    await admin.execute('create table qm_child(id serial primary key, parent int not null references qm_parent(id))')
    await admin.execute('create table qm_seq(id serial primary key, n int not null)')
    await admin.execute('create table qm_ver(id int primary key, version int not null)')
    proxy = await startFaultProxy(target(databaseUrl!))
  })
  afterAll(async () => {
    await admin.execute('drop table if exists qm_orders, qm_child, qm_parent, qm_seq, qm_ver')
    await admin.close()
    await proxy.close()
  })
  beforeEach(async () => {
    proxy.set('pass')
    await admin.execute('truncate qm_orders, qm_child, qm_parent, qm_seq, qm_ver')
  })

  const count = async (tag: string) =>
    (await admin.query('select count(*)::int as n from qm_orders where tag like $1', [tag])).rows[0].n as number
  const duplicates = async () =>
    (await admin.query('select tag from qm_orders group by tag having count(*) > 1')).rows.length

  it('never runs a statement twice when its answer is lost (pool path)', async () => {
    const pool = open({ url: proxy.url(databaseUrl!), maxSize: 2, acquireTimeoutMs: 5000 })
    // Both connections open, the insert prepared on both.
    await Promise.all(Array.from({ length: 8 }, (_, i) => pool.execute('insert into qm_orders(tag) values ($1)', [`warm-${i}`])))
    expect(pool.status().size).toBe(2)
    proxy.set('dropAnswers')
    const calls = Array.from({ length: 20 }, (_, i) => pool.execute('insert into qm_orders(tag) values ($1)', [`order-${i}`]))
    // The statements on the wire reach the server and commit; their answers never return.
    await eventually(() => count('order-%'), (n) => n >= 2)
    await new Promise((r) => setTimeout(r, 200))
    const reached = await count('order-%')
    proxy.resetAll()
    proxy.set('pass')
    const results = await settle(calls)
    const lost = rejections(results)
    // Callers whose statement ran are told it may have run; the rest run once, on new
    // connections. No statement is applied twice.
    for (const e of lost) expect(e).toMatchObject({ code: 'CONNECTION_LOST', sent: true })
    expect(lost.length).toBe(reached)
    expect(await duplicates()).toBe(0)
    expect(await count('order-%')).toBe(20)
    await pool.execute('insert into qm_orders(tag) values ($1)', ['after'])
    expect(await count('after')).toBe(1)
  })

  it('never runs a lease statement twice, and a lost lease is not continued elsewhere', async () => {
    const pool = open({ url: proxy.url(databaseUrl!), maxSize: 2 })
    const conn = await pool.acquire()
    await conn.execute('insert into qm_orders(tag) values ($1)', ['lease-warm'])
    proxy.set('dropAnswers')
    const lost = conn.execute('insert into qm_orders(tag) values ($1)', ['lease-1'])
    await eventually(() => count('lease-1'), (n) => n === 1)
    proxy.resetAll()
    proxy.set('pass')
    await expect(lost).rejects.toMatchObject({ code: 'CONNECTION_LOST', sent: true })
    await expect(conn.execute('insert into qm_orders(tag) values ($1)', ['lease-2'])).rejects.toMatchObject({ code: 'CONNECTION_LOST' })
    conn.release()
    expect(await count('lease-1')).toBe(1)
    expect(await count('lease-2')).toBe(0)
  })

  it('reports a transaction whose connection was lost, and never continues it on another connection', async () => {
    const pool = open({ url: proxy.url(databaseUrl!), maxSize: 2 })
    const outcome = pool.transaction(async (tx) => {
      await tx.execute('insert into qm_orders(tag) values ($1)', ['tx-a'])
      proxy.resetAll()
      await tx.execute('insert into qm_orders(tag) values ($1)', ['tx-b'])
    })
    await expect(outcome).rejects.toMatchObject({ code: 'CONNECTION_LOST' })
    expect(await count('tx-%')).toBe(0)
  })

  it('rejects transaction(fn) when the server rolled back because fn swallowed a failure', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2 })
    await pool.execute('insert into qm_parent(id) values (1)')
    const outcome = pool.transaction(async (tx) => {
      await tx.execute('insert into qm_orders(tag) values ($1)', ['swallowed'])
      await tx.execute('insert into qm_parent(id) values (1)').catch(() => 'ignored')
      return 'done'
    })
    await expect(outcome).rejects.toMatchObject({ code: 'QUERY_FAILED', rolledBack: true, sqlstate: '23505' })
    await expect(outcome).rejects.toThrow(/COMMIT did not commit.*duplicate key/)
    expect(await count('swallowed')).toBe(0)
    // A failure rolled back to a savepoint does not abort the transaction: it commits.
    await pool.transaction(async (tx) => {
      await tx.execute('insert into qm_orders(tag) values ($1)', ['kept'])
      await tx.query('savepoint s')
      await tx.execute('insert into qm_parent(id) values (1)').catch(() => 'ignored')
      await tx.query('rollback to savepoint s')
    })
    expect(await count('kept')).toBe(1)
    // By hand on a lease: COMMIT answered with ROLLBACK is an error too.
    const conn = await pool.acquire()
    await conn.query('begin')
    await conn.execute('insert into qm_parent(id) values (1)').catch(() => 'ignored')
    await expect(conn.query('commit')).rejects.toMatchObject({ rolledBack: true })
    conn.release()
  })

  it('runs statements on one lease in the order issued (1000 without awaiting)', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 4 })
    const conn = await pool.acquire()
    const inserts = Array.from({ length: 1000 }, (_, n) => conn.execute('insert into qm_seq(n) values ($1)', [n]))
    await Promise.all(inserts)
    const { rows } = await conn.query('select n from qm_seq order by id')
    conn.release()
    const outOfOrder = rows.filter((r, i) => r.n !== i).length
    expect(rows.length).toBe(1000)
    expect(outOfOrder).toBe(0)
  })

  it('keeps parent-before-child order on a lease (200 pairs) and statements inside its transaction', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 4 })
    const conn = await pool.acquire()
    const pairs = await settle(
      Array.from({ length: 200 }, (_, i) =>
        Promise.all([conn.execute('insert into qm_parent(id) values ($1)', [i]), conn.execute('insert into qm_child(parent) values ($1)', [i])]),
      ),
    )
    expect(rejections(pairs)).toEqual([])
    // Issued before ROLLBACK without awaiting: it lands inside the transaction and is undone.
    const steps = [conn.query('begin'), conn.execute('insert into qm_orders(tag) values ($1)', ['inside']), conn.query('rollback')]
    await Promise.all(steps)
    conn.release()
    await expect(conn.execute('insert into qm_orders(tag) values ($1)', ['after-release'])).rejects.toMatchObject({ code: 'POOL_CLOSED' })
    expect(await count('inside')).toBe(0)
    expect(await count('after-release')).toBe(0)
  })

  it('a release issued right after statements waits for them', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    const conn = await pool.acquire()
    const pending = [conn.query('begin'), conn.execute('insert into qm_orders(tag) values ($1)', ['before-release']), conn.query('commit')]
    conn.release()
    await Promise.all(pending)
    expect(await count('before-release')).toBe(1)
  })

  it('reads rowCount from the command tag, with and without the statement cache', async () => {
    for (const statementCache of [true, false]) {
      const pool = open({ url: databaseUrl!, maxSize: 1, statementCache })
      await pool.execute('insert into qm_ver(id, version) values ($1::int, 1)', [statementCache ? 1 : 2])
      const id = statementCache ? 1 : 2
      const updated = await pool.execute('update qm_ver set version = version + 1 where id = $1::int and version = $2::int', [id, 1])
      expect(updated.rowCount).toBe(1)
      const stale = await pool.execute('update qm_ver set version = version + 1 where id = $1::int and version = $2::int', [id, 1])
      expect(stale.rowCount).toBe(0)
      const viaQuery = await pool.query('update qm_ver set version = version + 1 where id = $1::int', [id])
      expect(viaQuery.rowCount).toBe(1)
      const returning = await pool.query('update qm_ver set version = version + 1 where id = $1::int returning version', [id])
      expect(returning.rowCount).toBe(1)
      expect(returning.rows).toEqual([{ version: 4 }])
    }
  })

  it('retires a connection whose protocol state is out of step (COPY through query) at once', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    await expect(pool.query('copy qm_seq(n) from stdin')).rejects.toMatchObject({ code: 'QUERY_FAILED' })
    // Closed before anyone else can be handed it (PostgreSQL would end that session on the
    // next caller's statement: "protocol synchronization was lost").
    const retired = await eventually(() => pool.metrics(), (m) => m.destroyed === 1, 1000)
    expect(retired.destroyed).toBe(1)
    const results = await Promise.all(Array.from({ length: 20 }, (_, i) => pool.query('select $1::int as i', [i])))
    expect(results.map((r) => r.rows[0].i)).toEqual(Array.from({ length: 20 }, (_, i) => i))
  })

  it('rolls back a COMMIT AND CHAIN left open on release: later autocommit writes persist', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    const conn = await pool.acquire()
    await conn.query('begin')
    await conn.execute('insert into qm_orders(tag) values ($1)', ['chained-1'])
    await conn.query('commit and chain')
    conn.release()
    await pool.execute('insert into qm_orders(tag) values ($1)', ['autocommit-after'])
    expect(await count('chained-1')).toBe(1)
    expect(await count('autocommit-after')).toBe(1)
  })

  it('re-prepares a cached statement after DEALLOCATE ALL or a changed result type', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    await admin.execute('drop table if exists qm_shape')
    await admin.execute('create table qm_shape(a int)')
    await admin.execute('insert into qm_shape values (1)')
    const conn = await pool.acquire()
    expect((await conn.query('select * from qm_shape')).rows).toEqual([{ a: 1 }])
    await admin.execute('alter table qm_shape add column b int default 2')
    expect((await conn.query('select * from qm_shape')).rows).toEqual([{ a: 1, b: 2 }])
    await conn.query('deallocate all')
    expect((await conn.query('select * from qm_shape')).rows).toEqual([{ a: 1, b: 2 }])
    conn.release()
    await admin.execute('drop table qm_shape')
  })

  it('never hands session state to the next caller: settings, advisory locks, temp tables', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    await pool.query("select set_config('qm.user', 'alice', false)")
    expect(['', null]).toContain((await pool.query("select current_setting('qm.user', true) as u")).rows[0].u)
    await pool.query('select pg_advisory_lock(4242)')
    // Released with the pooled session's reset: another session can take it.
    const other = await admin.acquire()
    const taken = await eventually(() => other.query('select pg_try_advisory_lock(4242) as got'), (r) => r.rows[0].got === true)
    expect(taken.rows[0].got).toBe(true)
    await other.query('select pg_advisory_unlock(4242)')
    other.release()
    const conn = await pool.acquire()
    await conn.query("set search_path = 'nowhere'")
    await conn.query('create temp table qm_scratch(x int)')
    conn.release()
    expect((await pool.query('show search_path')).rows[0].search_path).not.toBe('nowhere')
    await expect(pool.query('select * from qm_scratch')).rejects.toMatchObject({ sqlstate: '42P01' })
  })

  it('never pipelines a SET among other callers\' statements', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2 })
    const reads = Array.from({ length: 100 }, (_, i) =>
      i === 50 ? pool.query("set statement_timeout = '4321ms'") : pool.query('show statement_timeout'),
    )
    const rows = (await Promise.all(reads)).flatMap((r) => r.rows)
    expect(rows.filter((r) => r.statement_timeout === '4321ms')).toEqual([])
  })

  // global-setup sets QM_TEST_PANIC, which arms the hook for this exact statement text.
  it('turns a panic where statements run into INTERNAL and keeps serving', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2 })
    await expect(pool.query('-- qm:test-panic')).rejects.toMatchObject({ code: 'INTERNAL' })
    const conn = await pool.acquire()
    await expect(conn.query('-- qm:test-panic')).rejects.toMatchObject({ code: 'INTERNAL' })
    expect((await conn.query('select 1 as one')).rows).toEqual([{ one: 1 }])
    conn.release()
    const ok = await Promise.all(Array.from({ length: 100 }, (_, i) => pool.query('select $1::int as i', [i])))
    expect(ok).toHaveLength(100)
  })

  it('serves queued work on the connections it has while closing', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2 })
    const work = Array.from({ length: 40 }, () => pool.query('select pg_sleep(0.005)'))
    const closing = pool.close({ timeoutMs: 5000 })
    await Promise.all(work)
    await closing
    expect(pool.metrics().created).toBeLessThanOrEqual(2)
  })

  it('never refuses an acquire because keepalive pings hold the idle connections', async () => {
    // Slow round trips (a proxy adding 40 ms per chunk) make every keepalive ping last.
    const slow = await startFaultProxy(target(databaseUrl!))
    try {
      const pool = open({ url: slow.url(databaseUrl!), maxSize: 2, minIdle: 2, maxWaiting: 0, keepaliveMs: 40 })
      await eventually(() => pool.status(), (s) => s.idle === 2)
      slow.set({ perChunkDelayMs: 40 })
      const refused: string[] = []
      for (let i = 0; i < 12; i++) {
        await new Promise((r) => setTimeout(r, 70))
        const conn = await pool.acquire().catch((e) => {
          refused.push(e.code)
          return null
        })
        conn?.release()
      }
      expect(refused).toEqual([])
    } finally {
      await slow.close()
    }
  })
})

describe('SQLite: what a caller is told is what happened', () => {
  const open = trackedPools()
  let dir: string
  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'qm-integrity-'))
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  it('reports no lastInsertId for an insert that inserted nothing', async () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 1 })
    await pool.execute('create table t(id integer primary key, v text unique)')
    const first = await pool.execute('insert into t(v) values ($1)', ['a'])
    expect(first).toMatchObject({ rowCount: 1, lastInsertId: 1 })
    const ignored = await pool.execute('insert or ignore into t(v) values ($1)', ['a'])
    expect(ignored.rowCount).toBe(0)
    expect(ignored.lastInsertId).toBeUndefined()
    const update = await pool.execute('update t set v = $1 where id = 1', ['b'])
    expect(update.rowCount).toBe(1)
    expect(update.lastInsertId).toBeUndefined()
  })

  it('runs read-then-write transactions side by side without SQLITE_BUSY', async () => {
    const pool = open({ url: `sqlite:${path.join(dir, 'rw.db')}`, maxSize: 4 })
    await pool.execute('create table acct(id integer primary key, bal integer)')
    await pool.execute('insert into acct values (1, 0)')
    const transfer = () =>
      pool.transaction(async (tx) => {
        const { rows } = await tx.query('select bal from acct where id = 1')
        await new Promise((r) => setTimeout(r, 5))
        await tx.execute('update acct set bal = $1 where id = 1', [rows[0].bal + 1])
      })
    const results = await settle(Array.from({ length: 8 }, transfer))
    expect(rejections(results)).toEqual([])
    expect((await pool.query('select bal from acct')).rows[0].bal).toBe(8)
  })

  it('lets readers of sqlite::memory: in while a lease holds a write transaction', async () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 3, acquireTimeoutMs: 2000 })
    await pool.execute('create table t(x integer)')
    await pool.execute('insert into t values (1)')
    const writer = await pool.acquire()
    await writer.query('begin immediate')
    await writer.execute('insert into t values (2)')
    // Readers see the last commit at once (WAL), never the uncommitted row.
    expect((await pool.query('select count(*) as n from t')).rows).toEqual([{ n: 1 }])
    await writer.query('commit')
    writer.release()
    expect((await pool.query('select count(*) as n from t')).rows).toEqual([{ n: 2 }])
  })

  it('turns a panic on the calling thread (querySync) into INTERNAL and keeps serving', () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 2 })
    expect(() => pool.querySync('-- qm:test-panic')).toThrow(expect.objectContaining({ code: 'INTERNAL' }))
    expect(pool.querySync('select 1 as one').rows).toEqual([{ one: 1 }])
  })

  it('closes a connection whose PRAGMA changed it instead of handing it on', async () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 1 })
    await pool.execute('create table p(id integer primary key)')
    await pool.execute('create table c(p integer references p(id))')
    await pool.execute('pragma foreign_keys = off')
    await expect(pool.execute('insert into c values (99)')).rejects.toMatchObject({ code: 'QUERY_FAILED' })
  })
})

describeWithRedis('Redis: what a caller is told is what happened', () => {
  const open = trackedPools()
  const key = (k: string) => `qm:integrity:${process.pid}:${k}`
  let proxy: FaultProxy
  let direct: ConnectionPool
  beforeAll(async () => {
    proxy = await startFaultProxy(target(redisUrl!))
    direct = new ConnectionPool({ url: redisUrl!, maxSize: 1, name: 'integrity-redis' })
  })
  afterAll(async () => {
    await direct.close()
    await proxy.close()
  })

  it('reports a command whose answer was lost as CONNECTION_LOST, and never repeats it', async () => {
    await direct.command('DEL', key('n'))
    const pool = open({ url: proxy.url(redisUrl!), maxSize: 2 })
    await pool.command('PING')
    proxy.set('dropAnswers')
    const calls = Array.from({ length: 20 }, () => pool.command('INCR', key('n')))
    await eventually(() => direct.command('GET', key('n')), (v) => Number(v) >= 1)
    await new Promise((r) => setTimeout(r, 200))
    const reached = Number(await direct.command('GET', key('n')))
    proxy.resetAll()
    proxy.set('pass')
    const lost = rejections(await settle(calls))
    for (const e of lost) expect(e).toMatchObject({ code: 'CONNECTION_LOST', sent: true })
    expect(lost.length).toBe(reached)
    // Each INCR applied exactly once: the lost ones by the server, the rest afterwards.
    expect(await direct.command('GET', key('n'))).toBe('20')
  })

  it('reports EXEC with one failing command as applied, the failure in its place', async () => {
    const pool = open({ url: redisUrl!, maxSize: 1 })
    await pool.command('SET', key('text'), 'not a number')
    // On Redis a transaction whose fn returns nothing resolves with EXEC's replies.
    const replies = (await pool.transaction(async (tx) => {
      await tx.command('SET', key('a'), '1')
      await tx.command('INCR', key('text'))
      await tx.command('SET', key('b'), '2')
    })) as unknown as unknown[]
    expect(replies[0]).toBe('OK')
    expect(isError(replies[1])).toBe(true)
    expect(replies[1]).toMatchObject({ code: 'QUERY_FAILED', message: expect.stringMatching(/not an integer/) })
    expect(replies[2]).toBe('OK')
    expect(await pool.command('MGET', key('a'), key('b'))).toEqual(['1', '2'])
    const piped = await pool.pipeline([
      ['INCR', key('text')],
      ['SET', key('c'), '3'],
    ])
    expect(isError(piped[0])).toBe(true)
    expect(piped[1]).toBe('OK')
    await pool.command('DEL', key('a'), key('b'), key('c'), key('text'))
  })

  it('never stalls other callers behind a blocking command (BLMPOP, BRPOPLPUSH)', async () => {
    const pool = open({ url: redisUrl!, maxSize: 3 })
    const order: string[] = []
    const fast = (n: number) => Array.from({ length: n }, (_, i) => pool.command('ECHO', `x${i}`).then(() => order.push('fast')))
    const calls = [
      ...fast(10),
      pool.command('BLMPOP', 1, 1, key('empty1'), 'LEFT').then(() => order.push('blocking')),
      pool.command('BRPOPLPUSH', key('empty2'), key('dst'), 1).then(() => order.push('blocking')),
      ...fast(50),
    ]
    await Promise.all(calls)
    expect(order.slice(0, 60)).toEqual(Array(60).fill('fast'))
  })
})
