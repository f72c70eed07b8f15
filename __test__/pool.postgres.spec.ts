import { ConnectionPool, type PooledConnection } from '../index'
import { collectGarbage, databaseUrl, describeWithPostgres, eventually, trackedPools } from './support/env'

const appName = (tag: string) => `qm_test_${tag}_${process.pid}`
const urlWith = (tag: string) => {
  const u = new URL(databaseUrl!)
  u.searchParams.set('application_name', appName(tag))
  return u.toString()
}

describeWithPostgres('ConnectionPool on PostgreSQL', () => {
  // Every pool a test opens is closed after it, pass or fail.
  const open = trackedPools()

  let admin: ConnectionPool
  beforeAll(async () => {
    admin = new ConnectionPool({ url: databaseUrl!, maxSize: 2, name: 'admin' })
    await admin.execute('drop table if exists qm_fills')
    await admin.execute('create table qm_fills(id serial primary key, sym text not null, qty int not null)')
  })
  afterAll(async () => {
    await admin.execute('drop table if exists qm_fills')
    await admin.close()
  })

  const backends = async (tag: string) =>
    (await admin.query('select pid, state, backend_xid from pg_stat_activity where application_name = $1', [appName(tag)])).rows

  it('maps PostgreSQL types both ways', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2 })
    const when = new Date('2026-01-02T03:04:05.678Z')
    const { rows, fields } = await pool.query(
      `select $1::int2 as i2, $2::int4 as i4, $3::int8 as i8, $4::float8 as f8, $5::numeric as n,
              $6::bool as b, $7::text as t, $8::jsonb as j, $9::timestamptz as ts, $10::bytea as raw,
              $11::uuid as id, $12::int4[] as arr, null::text as nothing, $13::json as j2, $14::float4 as f4`,
      [7, 123456, 9007199254740993n, 1.5, '12345.678900', true, 'héllo', { a: [1, 'x'] }, when, Buffer.from([0, 255]),
        '6f1c1b2a-3d4e-4f50-8a6b-7c8d9e0f1a2b', [1, 2, null], [1, 2], 0.25],
    )
    expect(fields).toHaveLength(15)
    expect(rows[0]).toEqual({
      i2: 7, i4: 123456, i8: 9007199254740993n, f8: 1.5, n: '12345.678900', b: true, t: 'héllo', j: { a: [1, 'x'] },
      ts: when, raw: Buffer.from([0, 255]), id: '6f1c1b2a-3d4e-4f50-8a6b-7c8d9e0f1a2b', arr: [1, 2, null], nothing: null,
      j2: [1, 2], f4: 0.25,
    })
    const asText = open({ url: databaseUrl!, maxSize: 1, int8: 'string' })
    expect((await asText.query('select 42::int8 as n')).rows[0].n).toBe('42')
    await asText.close()
    await pool.close()
  })

  it('runs 5000 concurrent queries on a pool of 20, all succeeding', async () => {
    const pool = open({ url: urlWith('c5000'), maxSize: 20, acquireTimeoutMs: 30_000 })
    const results = await Promise.allSettled(Array.from({ length: 5000 }, (_, i) => pool.query('select $1::int as i', [i])))
    const ok = results.filter((r) => r.status === 'fulfilled') as PromiseFulfilledResult<any>[]
    expect(ok).toHaveLength(5000)
    expect(ok.every((r, i) => r.value.rows[0].i === i)).toBe(true)
    expect(pool.status().size).toBeLessThanOrEqual(20)
    const m = pool.metrics()
    expect(m.successfulGets).toBe(5000)
    expect(m.successRate).toBe(100)
    expect(m.query.p50).toBeGreaterThan(0)
    await pool.close()
  })

  it('degrades gracefully under 5x overload: typed failures, no hang, bounded connections', async () => {
    const pool = open({ url: urlWith('overload'), maxSize: 4, acquireTimeoutMs: 100, maxWaiting: 12 })
    const calls = Array.from({ length: 20 }, () => pool.query('select pg_sleep(0.2)'))
    const settled = await Promise.allSettled(calls)
    const failures = settled.filter((r) => r.status === 'rejected') as PromiseRejectedResult[]
    expect(settled.length).toBe(20)
    expect(failures.length).toBeGreaterThan(0)
    for (const f of failures) expect(['POOL_TIMEOUT', 'POOL_EXHAUSTED']).toContain(f.reason.code)
    expect(failures.some((f) => f.reason.code === 'POOL_EXHAUSTED')).toBe(true)
    expect((await backends('overload')).length).toBeLessThanOrEqual(4)
    const m = pool.metrics()
    expect(m.timeouts + m.rejected).toBe(failures.length)
    expect(pool.recommendations().some((r) => r.kind === 'increase-max-size')).toBe(true)
    await pool.close()
  })

  it('returns 100 leases dropped without release after gc, counting them', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 100, acquireTimeoutMs: 10_000 })
    await (async () => {
      const leases = await Promise.all(Array.from({ length: 100 }, () => pool.acquire()))
      expect(pool.status().inUse).toBe(100)
      leases.length = 0
    })()
    await collectGarbage()
    const status = await eventually(() => pool.status(), (s) => s.inUse === 0)
    expect(status.inUse).toBe(0)
    expect(status.idle).toBe(status.size)
    expect(pool.metrics().leakedLeases).toBe(100)
    await pool.close()
  })

  it('never lets an uncommitted insert from a dropped lease become visible', async () => {
    const pool = open({ url: urlWith('dirty'), maxSize: 1 })
    await (async () => {
      const conn = await pool.acquire()
      await conn.query('begin')
      await conn.execute('insert into qm_fills(sym, qty) values ($1, $2)', ['LEAK', 1])
    })()
    await collectGarbage()
    await eventually(() => pool.status(), (s) => s.inUse === 0)
    const visible = await admin.query('select count(*)::int as n from qm_fills where sym = $1', ['LEAK'])
    expect(visible.rows[0].n).toBe(0)
    const sessions = await eventually(() => backends('dirty'), (rows) => rows.every((r: any) => r.state === 'idle'))
    expect(sessions.length).toBe(1)
    expect(sessions[0].state).toBe('idle')
    // The connection is reused clean: a new insert commits on its own.
    await pool.execute('insert into qm_fills(sym, qty) values ($1, $2)', ['CLEAN', 1])
    expect((await admin.query('select count(*)::int as n from qm_fills where sym = $1', ['CLEAN'])).rows[0].n).toBe(1)
    expect(pool.metrics().leakedLeases).toBe(1)
    await pool.close()
  })

  it('replaces connections killed by pg_terminate_backend: next 100 queries succeed', async () => {
    const pool = open({ url: urlWith('terminate'), maxSize: 5, minIdle: 5 })
    await Promise.all(Array.from({ length: 20 }, () => pool.query('select 1')))
    await eventually(() => backends('terminate'), (rows) => rows.length === 5)
    const killed = await admin.query('select pg_terminate_backend(pid) as ok from pg_stat_activity where application_name = $1', [appName('terminate')])
    expect(killed.rows.length).toBeGreaterThan(0)
    // pg_terminate_backend only signals; once the backends have gone, every statement sent
    // after is known unsent on a dead connection and runs on a fresh one.
    const killedPids = new Set((await backends('terminate')).map((r: any) => r.pid))
    await eventually(() => backends('terminate'), (rows) => rows.every((r: any) => !killedPids.has(r.pid)))
    const results = await Promise.allSettled(Array.from({ length: 100 }, (_, i) => pool.query('select $1::int as i', [i])))
    const failed = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected').map((r) => `${r.reason.code} ${r.reason.message}`)
    expect(failed).toEqual([])
    expect(pool.metrics().destroyed).toBeGreaterThanOrEqual(killed.rows.length)
    await pool.close()
  })

  it('reports SQL errors with SQLSTATE and keeps the connection usable', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    const err = await pool.query('selec 1').catch((e) => e)
    expect(err.code).toBe('QUERY_FAILED')
    expect(err.sqlstate).toBe('42601')
    expect(err.message).toMatch(/syntax error/)
    const conn = await pool.acquire()
    await conn.query('begin')
    await expect(conn.query('select 1/0')).rejects.toMatchObject({ sqlstate: '22012' })
    await conn.query('rollback')
    expect((await conn.query('select 1 as one')).rows).toEqual([{ one: 1 }])
    conn.release()
    await expect(pool.query('select $1::int', [() => 1])).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    await expect(pool.query('select $1::int', [Symbol('x')])).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    await expect(pool.query('select $1::int', [1, 2])).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    expect((await pool.query('select 2 as two')).rows[0].two).toBe(2)
    await pool.close()
  })

  it('commits transactions and rolls back on throw', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2 })
    const id = await pool.transaction(async (tx: PooledConnection) => {
      const r = await tx.query('insert into qm_fills(sym, qty) values ($1, $2) returning id', ['TX', 3])
      return r.rows[0].id
    })
    expect(typeof id).toBe('number')
    await expect(
      pool.transaction(async (tx) => {
        await tx.execute('insert into qm_fills(sym, qty) values ($1, $2)', ['TXFAIL', 3])
        throw new Error('abort')
      }),
    ).rejects.toThrow('abort')
    const n = await pool.query('select sym from qm_fills where sym like $1 order by sym', ['TX%'])
    expect(n.rows).toEqual([{ sym: 'TX' }])
    await pool.close()
  })

  it('warms minIdle, retires idle connections and recycles over-age ones', async () => {
    const pool = open({ url: urlWith('lifecycle'), maxSize: 6, minIdle: 2, idleTimeoutMs: 150, maxLifetimeMs: 400, keepaliveMs: 100 })
    await eventually(() => pool.status(), (s) => s.size === 2)
    expect(pool.status().size).toBe(2)
    await Promise.all(Array.from({ length: 6 }, () => pool.query('select pg_sleep(0.05)')))
    expect(pool.status().size).toBeGreaterThan(2)
    const shrunk = await eventually(() => pool.status(), (s) => s.size === 2, 3000)
    expect(shrunk.size).toBe(2)
    const m = await eventually(() => pool.metrics(), (x) => x.recycled >= 4 && x.created >= 8, 3000)
    expect(m.recycled).toBeGreaterThanOrEqual(4)
    expect(m.created).toBeGreaterThanOrEqual(8)
    await pool.close()
  })

  it('drains on close: queued work is served, then every socket closes and new work is refused', async () => {
    const pool = open({ url: urlWith('drain'), maxSize: 2 })
    const work = Array.from({ length: 6 }, () => pool.query('select pg_sleep(0.05) as s'))
    const closing = pool.close({ timeoutMs: 5000 })
    await expect(pool.query('select 1')).rejects.toMatchObject({ code: 'POOL_CLOSED' })
    const done = await Promise.allSettled(work)
    expect(done.every((r) => r.status === 'fulfilled')).toBe(true)
    await closing
    const left = await eventually(() => backends('drain'), (rows) => rows.length === 0)
    expect(left).toEqual([])
    expect(() => pool.tryAcquire()).toThrow(expect.objectContaining({ code: 'POOL_CLOSED' }))
  })

  it('resizes and reports status, metrics, health', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2, name: 'orders' })
    expect(pool.name).toMatch(/^orders/)
    pool.resize(5)
    const leases = await Promise.all(Array.from({ length: 5 }, () => pool.acquire()))
    expect(pool.status()).toMatchObject({ maxSize: 5, size: 5, inUse: 5, idle: 0 })
    const h = pool.health()
    expect(h.utilizationPercent).toBe(100)
    expect(h.status).not.toBe('healthy')
    leases.forEach((l) => l.release())
    expect(pool.health()).toMatchObject({ status: 'healthy', availableConnections: 5 })
    expect(() => pool.resize(0)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
    await pool.close()
  })

  it('reports a lease held past leakDetectionMs with the stack of its acquire', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1, leakDetectionMs: 50 })
    const conn = await (async function takeForTooLong() {
      return pool.acquire()
    })()
    await new Promise((r) => setTimeout(r, 80))
    const leaks = pool.leaks()
    expect(leaks).toHaveLength(1)
    expect(leaks[0].ageMs).toBeGreaterThanOrEqual(50)
    expect(leaks[0].stack).toMatch(/pool\.postgres\.spec\.ts:\d+/)
    conn.release()
    expect(pool.leaks()).toHaveLength(0)
    await pool.close()
  })

  it('fails fast with a typed error when the server is unreachable, retrying inside the deadline', async () => {
    const pool = open({ url: 'postgres://postgres:secret-pw@127.0.0.1:1/test', acquireTimeoutMs: 400, connectTimeoutMs: 100 })
    const started = Date.now()
    const err = await pool.query('select 1').catch((e) => e)
    const elapsed = Date.now() - started
    expect(['CONNECT_FAILED', 'POOL_TIMEOUT']).toContain(err.code)
    expect(err.message).not.toContain('secret-pw')
    expect(elapsed).toBeLessThan(2000)
    expect(pool.metrics().errors).toBeGreaterThan(1) // retried with backoff, not once, not spinning
    expect(pool.metrics().errors).toBeLessThan(50)
    await pool.close()
  })

  it('works without a statement cache (PgBouncer transaction mode)', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2, statementCache: false })
    const { rows } = await pool.query('select $1::int8 + 1 as n, $2::text as t', [41, 'x'])
    expect(rows).toEqual([{ n: 42n, t: 'x' }])
    await pool.close()
  })
})
