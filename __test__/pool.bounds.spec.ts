// Nothing waits forever: per-call timeoutMs and AbortSignal, the pool's statementTimeoutMs,
// bounded transactions and acquires — a stopped PostgreSQL statement is cancelled on the
// server, not merely abandoned, and its connection goes back idle.
import { ConnectionPool } from '../index'
import { databaseUrl, describeWithPostgres, describeWithRedis, eventually, redisUrl, trackedPools } from './support/env'

const appName = (tag: string) => `qm_bounds_${tag}_${process.pid}`
const urlWith = (tag: string) => {
  const u = new URL(databaseUrl!)
  u.searchParams.set('application_name', appName(tag))
  return u.toString()
}
const elapsed = async <T>(work: Promise<T>) => {
  const started = performance.now()
  const outcome = await work.then(
    (value) => ({ value, error: undefined as any }),
    (error) => ({ value: undefined, error }),
  )
  return { ...outcome, ms: performance.now() - started }
}

describeWithPostgres('bounded work on PostgreSQL', () => {
  const open = trackedPools()
  let admin: ConnectionPool
  beforeAll(async () => {
    admin = new ConnectionPool({ url: databaseUrl!, maxSize: 2, name: 'bounds-admin' })
    await admin.execute('drop table if exists qm_bounded')
    await admin.execute('create table qm_bounded(id serial primary key, tag text)')
  })
  afterAll(async () => {
    await admin.execute('drop table if exists qm_bounded')
    await admin.close()
  })
  const sleeping = async (tag: string) =>
    (await admin.query("select pid from pg_stat_activity where application_name = $1 and query like '%pg_sleep%' and state = 'active'", [appName(tag)])).rows
  const busy = async (tag: string) =>
    (await admin.query("select pid, state from pg_stat_activity where application_name = $1 and state <> 'idle'", [appName(tag)])).rows

  it('times out a statement and cancels it on the server; the pool serves on', async () => {
    const pool = open({ url: urlWith('timeout'), maxSize: 2 })
    await pool.query('select 1')
    const { error, ms } = await elapsed(pool.query('select pg_sleep(10)', [], { timeoutMs: 100 }))
    expect(error).toMatchObject({ code: 'QUERY_TIMEOUT', timeoutMs: 100 })
    expect(ms).toBeLessThan(150)
    const gone = await eventually(() => sleeping('timeout'), (rows) => rows.length === 0, 100)
    expect(gone).toEqual([])
    const next = await Promise.all(Array.from({ length: 100 }, (_, i) => pool.query('select $1::int as i', [i])))
    expect(next.map((r) => r.rows[0].i)).toEqual(Array.from({ length: 100 }, (_, i) => i))
  })

  it('aborts through an AbortSignal with ABORT_ERR and the reason as cause', async () => {
    const pool = open({ url: urlWith('abort'), maxSize: 2 })
    const ac = new AbortController()
    const reason = new Error('user navigated away')
    setTimeout(() => ac.abort(reason), 50)
    const { error, ms } = await elapsed(pool.query('select pg_sleep(10)', [], { signal: ac.signal }))
    expect(error).toMatchObject({ code: 'ABORT_ERR', name: 'AbortError' })
    expect(error.cause).toBe(reason)
    expect(ms).toBeLessThan(150)
    expect(await eventually(() => sleeping('abort'), (rows) => rows.length === 0, 100)).toEqual([])
    expect((await pool.query('select 2 as two')).rows).toEqual([{ two: 2 }])
  })

  it('rejects an already-aborted signal at once without touching a connection', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    const before = pool.metrics().totalGets
    const err = await pool.query('select 1', [], { signal: AbortSignal.abort('stop') }).catch((e) => e)
    expect(err).toMatchObject({ code: 'ABORT_ERR', cause: 'stop' })
    expect(pool.metrics().totalGets).toBe(before)
    expect(pool.metrics().created).toBe(0)
  })

  it('bounds every statement with statementTimeoutMs, enforced by the server', async () => {
    const pool = open({ url: urlWith('stmt'), maxSize: 2, statementTimeoutMs: 100 })
    const { error, ms } = await elapsed(pool.query('select pg_sleep(10)'))
    expect(error).toMatchObject({ code: 'QUERY_TIMEOUT', sqlstate: '57014' })
    expect(ms).toBeLessThan(600)
    expect(await eventually(() => sleeping('stmt'), (rows) => rows.length === 0, 100)).toEqual([])
    // Fast statements still pipeline: 500 concurrent succeed.
    const fast = await Promise.all(Array.from({ length: 500 }, (_, i) => pool.query('select $1::int as i', [i])))
    expect(fast).toHaveLength(500)
  })

  it('rolls back a transaction that runs past its timeoutMs; nothing it wrote is visible', async () => {
    const pool = open({ url: urlWith('tx'), maxSize: 2 })
    const { error, ms } = await elapsed(
      pool.transaction(
        async (tx) => {
          await tx.execute('insert into qm_bounded(tag) values ($1)', ['tx-timeout'])
          await tx.query('select pg_sleep(10)')
        },
        { timeoutMs: 200 },
      ),
    )
    expect(error).toMatchObject({ code: 'QUERY_TIMEOUT' })
    expect(ms).toBeLessThan(400)
    expect((await admin.query('select count(*)::int as n from qm_bounded where tag = $1', ['tx-timeout'])).rows[0].n).toBe(0)
    expect(await eventually(() => busy('tx'), (rows) => rows.length === 0, 1000)).toEqual([])
    // Also when fn stalls between statements (no statement to cancel).
    const stalled = await elapsed(
      pool.transaction(
        async (tx) => {
          await tx.execute('insert into qm_bounded(tag) values ($1)', ['tx-stalled'])
          await new Promise((r) => setTimeout(r, 1000))
        },
        { timeoutMs: 150 },
      ),
    )
    expect(stalled.error).toMatchObject({ code: 'QUERY_TIMEOUT' })
    expect(stalled.ms).toBeLessThan(400)
    await eventually(() => pool.status(), (s) => s.inUse === 0, 2000)
    expect((await admin.query('select count(*)::int as n from qm_bounded where tag = $1', ['tx-stalled'])).rows[0].n).toBe(0)
  })

  it('aborts a transaction through its signal', async () => {
    const pool = open({ url: urlWith('txabort'), maxSize: 2 })
    const ac = new AbortController()
    const outcome = pool.transaction(
      async (tx) => {
        await tx.execute('insert into qm_bounded(tag) values ($1)', ['tx-abort'])
        setTimeout(() => ac.abort(), 20)
        await tx.query('select pg_sleep(10)')
      },
      { signal: ac.signal },
    )
    await expect(outcome).rejects.toMatchObject({ code: 'ABORT_ERR' })
    expect((await admin.query('select count(*)::int as n from qm_bounded where tag = $1', ['tx-abort'])).rows[0].n).toBe(0)
  })

  it('stops waiting for a connection when the acquire is aborted or times out', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1, acquireTimeoutMs: 10_000 })
    const held = await pool.acquire()
    const ac = new AbortController()
    setTimeout(() => ac.abort(), 30)
    const aborted = await elapsed(pool.acquire({ signal: ac.signal }))
    expect(aborted.error).toMatchObject({ code: 'ABORT_ERR' })
    expect(aborted.ms).toBeLessThan(500)
    const timed = await elapsed(pool.acquire({ timeoutMs: 50 }))
    expect(timed.error).toMatchObject({ code: 'QUERY_TIMEOUT', sent: false })
    expect(pool.status().waiting).toBe(0)
    held.release()
    const again = await pool.acquire()
    again.release()
  })

  it('keeps a lease usable after one of its statements timed out (cancelled, connection idle)', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    const conn = await pool.acquire()
    await expect(conn.query('select pg_sleep(5)', [], { timeoutMs: 50 })).rejects.toMatchObject({ code: 'QUERY_TIMEOUT' })
    expect((await conn.query('select 3 as three')).rows).toEqual([{ three: 3 }])
    conn.release()
  })

  it('never fails the neighbours of a timed-out statement', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 4 })
    const calls = Array.from({ length: 400 }, (_, i) =>
      i === 200 ? pool.query('select pg_sleep(5)', [], { timeoutMs: 50 }) : pool.query('select $1::int as i', [i]),
    )
    const results = await Promise.allSettled(calls)
    const failed = results.map((r, i) => [r.status, i] as const).filter(([s]) => s === 'rejected').map(([, i]) => i)
    expect(failed).toEqual([200])
  })

  it('leaves no busy backend and no leaked connection after 1000 timeouts under load', async () => {
    const pool = open({ url: urlWith('many'), maxSize: 8, acquireTimeoutMs: 20_000 })
    const outcomes = await Promise.allSettled(
      Array.from({ length: 1000 }, (_, i) =>
        i % 2 === 0 ? pool.query('select pg_sleep(1)', [], { timeoutMs: 20 }) : pool.query('select $1::int as i', [i]),
      ),
    )
    const codes = new Map<string, number>()
    for (const o of outcomes) {
      const code = o.status === 'fulfilled' ? 'ok' : o.reason.code
      codes.set(code, (codes.get(code) ?? 0) + 1)
    }
    expect(codes.get('ok')).toBe(500)
    expect(codes.get('QUERY_TIMEOUT')).toBe(500)
    expect(await eventually(() => busy('many'), (rows) => rows.length === 0, 2000)).toEqual([])
    const status = await eventually(() => pool.status(), (s) => s.inUse === 0, 2000)
    expect(status.inUse).toBe(0)
    expect(status.size).toBeLessThanOrEqual(8)
    expect((await admin.query('select count(*)::int as n from pg_stat_activity where application_name = $1', [appName('many')])).rows[0].n).toBeLessThanOrEqual(8)
  })
})

describe('bounded work on SQLite', () => {
  const open = trackedPools()
  const runaway = 'with recursive r(n) as (select 1 union all select n + 1 from r) select count(*) as n from r'

  it('interrupts a runaway statement on timeoutMs and serves on', async () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 2 })
    const { error, ms } = await elapsed(pool.query(runaway, [], { timeoutMs: 100 }))
    expect(error).toMatchObject({ code: 'QUERY_TIMEOUT' })
    expect(ms).toBeLessThan(500)
    expect((await pool.query('select 1 as one')).rows).toEqual([{ one: 1 }])
  })

  it('interrupts on statementTimeoutMs and on an AbortSignal', async () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 2, statementTimeoutMs: 100 })
    const stmt = await elapsed(pool.query(runaway))
    expect(stmt.error).toMatchObject({ code: 'QUERY_TIMEOUT', timeoutMs: 100 })
    expect(stmt.ms).toBeLessThan(300)
    const ac = new AbortController()
    setTimeout(() => ac.abort(), 50)
    const free = open({ url: 'sqlite::memory:', maxSize: 1 })
    const aborted = await elapsed(free.query(runaway, [], { signal: ac.signal }))
    expect(aborted.error).toMatchObject({ code: 'ABORT_ERR' })
    expect(aborted.ms).toBeLessThan(300)
    expect((await free.query('select 2 as two')).rows).toEqual([{ two: 2 }])
  })

  it('rejects a bad timeoutMs with INVALID_ARGUMENT', async () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 1 })
    await expect(pool.query('select 1', [], { timeoutMs: -5 })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    await expect(pool.query('select 1', [], { timeoutMs: 'soon' as any })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
  })
})

describeWithRedis('bounded work on Redis', () => {
  const open = trackedPools()
  it('times out a blocking command, closes its connection and serves on', async () => {
    const pool = open({ url: redisUrl!, maxSize: 2 })
    const { error, ms } = await elapsed(pool.command('BLPOP', `qm:bounds:${process.pid}:empty`, 5, { timeoutMs: 100 }))
    expect(error).toMatchObject({ code: 'QUERY_TIMEOUT', sent: true })
    expect(ms).toBeLessThan(300)
    expect(await pool.command('PING')).toBe('PONG')
    expect(pool.metrics().destroyed).toBeGreaterThanOrEqual(1)
  })
})
