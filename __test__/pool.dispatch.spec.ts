// Cost-aware dispatch: cheap SQLite statements without a thread hop (and never once they are
// slow), one SQLite writer under WAL, slow PostgreSQL statements kept out of shared pipelines,
// and a spike served by warm connections without a connection storm.
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { databaseUrl, describeWithPostgres, eventually, trackedPools } from './support/env'
import { startFaultProxy } from './support/fault-proxy'

describe('SQLite on the calling thread', () => {
  const open = trackedPools()
  let dir: string
  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'qm-dispatch-'))
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  const inline = (pool: { metrics(): { inlineStatements: number } }) => pool.metrics().inlineStatements

  // inlineMicros is raised in these tests so a loaded machine cannot push a point read over
  // the default 200 µs; what is asserted is where statements run, not how fast.
  it('runs a cheap statement inline once it is known, settling at once', async () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 4, inlineMicros: 2000 })
    await pool.execute('create table q(id integer primary key, px real)')
    await pool.execute('insert into q(px) values (1.5), (2.5)')
    await pool.query('select px from q where id = $1', [1]) // learnt off the thread
    const before = inline(pool)
    for (let i = 0; i < 100; i++) expect((await pool.query('select px from q where id = $1', [1])).rows).toEqual([{ px: 1.5 }])
    // (A run slower than the calling-thread bound would go off the thread: none here.)
    expect(inline(pool) - before).toBeGreaterThanOrEqual(90)
    // And the synchronous twins.
    expect(pool.querySync('select px from q where id = $1', [2]).rows).toEqual([{ px: 2.5 }])
    expect(pool.executeSync('update q set px = px + 1 where id = $1', [2]).rowCount).toBe(1)
    const lease = await pool.acquire()
    expect(lease.querySync('select px from q where id = 2').rows).toEqual([{ px: 3.5 }])
    lease.release()
  })

  it('never runs a statement inline once its estimate is slow', async () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 2, inlineMicros: 2000 })
    const count = 'with recursive r(n) as (select 1 union all select n + 1 from r where n < $1) select count(*) as c from r'
    for (let i = 0; i < 5; i++) await pool.query(count, [10])
    const cheap = inline(pool)
    expect((await pool.query(count, [10])).rows).toEqual([{ c: 10 }])
    expect(inline(pool)).toBe(cheap + 1)
    // The same statement, now far over the calling-thread limit: cut off there, run again off
    // the thread (it had no effect), correct, and from then on never inline.
    const big = await pool.query(count, [3_000_000])
    expect(big.rows).toEqual([{ c: 3_000_000 }])
    const after = inline(pool)
    expect(after).toBe(cheap + 1)
    for (let i = 0; i < 3; i++) expect((await pool.query(count, [10])).rows).toEqual([{ c: 10 }])
    expect(inline(pool)).toBe(after)
  })

  it('runs writes and reads together through one writer without SQLITE_BUSY', async () => {
    const pool = open({ url: `sqlite:${path.join(dir, 'mixed.db')}`, maxSize: 4 })
    await pool.execute('create table fills(id integer primary key, qty integer)')
    const work = Array.from({ length: 2000 }, (_, i) => {
      if (i % 10 === 0)
        return pool.transaction(async (tx) => {
          const { rows } = await tx.query('select count(*) as n from fills')
          await tx.execute('insert into fills(qty) values ($1)', [rows[0].n])
        })
      return i % 2 ? pool.execute('insert into fills(qty) values ($1)', [i]) : pool.query('select count(*) as n from fills')
    })
    const results = await Promise.allSettled(work)
    const failed = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected').map((r) => r.reason.message)
    expect(failed).toEqual([])
    expect((await pool.query('select count(*) as n from fills')).rows[0].n).toBe(1000 + 200)
  })

  // Group commit: writes issued in one turn of the event loop share one transaction.
  const walBytes = (file: string) => {
    try {
      return statSync(`${file}-wal`).size
    } catch {
      return 0
    }
  }

  it('commits concurrent inserts together: the WAL grows by a few pages, not one commit each', async () => {
    const file = path.join(dir, 'group.db')
    const pool = open({ url: `sqlite:${file}`, maxSize: 4, inlineMicros: 2000 })
    const page = (await pool.query('pragma page_size')).rows[0].page_size as number
    await pool.execute('create table fills(id integer primary key, qty integer)')
    for (let i = 0; i < 3; i++) await pool.execute('insert into fills(qty) values ($1)', [-1]) // learnt
    const inserts = async () => {
      const before = walBytes(file)
      const results = await Promise.all(Array.from({ length: 64 }, (_, i) => pool.execute('insert into fills(qty) values ($1)', [i])))
      expect(results.every((r) => r.rowCount === 1)).toBe(true)
      expect(new Set(results.map((r) => r.lastInsertId)).size).toBe(64)
      // One commit each would append at least 64 frames (a page and its 24-byte header).
      expect(walBytes(file) - before).toBeLessThan(8 * (page + 24))
    }
    await inserts() // on the calling thread
    // Queued behind a transaction holding the writer: the dispatcher commits them together.
    const tx = await pool.acquire()
    await tx.query('begin immediate')
    const queued = inserts()
    await new Promise((resolve) => setTimeout(resolve, 20))
    await tx.query('commit')
    tx.release()
    await queued
    const { rows } = await pool.query('select count(*) as n, sum(qty) as total from fills where qty >= 0')
    expect(rows[0]).toEqual({ n: 128, total: 63 * 64 })
  })

  it('never sleeps in the busy handler on the calling thread while another connection holds the lock', async () => {
    const pool = open({ url: `sqlite:${path.join(dir, 'busy.db')}`, maxSize: 4, inlineMicros: 2000 })
    await pool.execute('create table t(v integer)')
    for (let i = 0; i < 3; i++) await pool.execute('insert into t(v) values ($1)', [i]) // learnt
    const tx = await pool.acquire()
    await tx.query('begin immediate')
    const started = performance.now()
    const one = pool.execute('insert into t(v) values ($1)', [10])
    const group = Promise.all([11, 12, 13].map((v) => pool.execute('insert into t(v) values ($1)', [v])))
    await Promise.resolve() // the turn's microtasks: the group is offered to the calling thread
    // Waiting for the lock here (busyTimeoutMs) would have blocked the event loop for seconds.
    expect(performance.now() - started).toBeLessThan(1000)
    await tx.query('commit')
    tx.release()
    expect((await one).rowCount).toBe(1)
    expect((await group).map((r) => r.rowCount)).toEqual([1, 1, 1])
    expect((await pool.query('select count(*) as n from t')).rows[0].n).toBe(7)
  })

  it('fails one write of a group alone; one that rolls the transaction back costs the others nothing', async () => {
    const pool = open({ url: `sqlite:${path.join(dir, 'group-errors.db')}`, maxSize: 4, inlineMicros: 2000 })
    await pool.execute('create table u(k integer unique)')
    for (const sql of ['insert into u(k) values ($1)', 'insert or rollback into u(k) values ($1)']) {
      await pool.execute(sql, [-1000 - sql.length]) // learnt
      const base = sql.includes('rollback') ? 100 : 0
      // The 6th repeats a key already stored: a constraint error (plain: that statement is
      // undone; OR ROLLBACK: the whole transaction is, and the other writes must run again).
      await pool.execute(sql, [base + 5])
      const keys = Array.from({ length: 20 }, (_, i) => base + i)
      const results = await Promise.allSettled(keys.map((k) => pool.execute(sql, [k])))
      const rejected = results.flatMap((r, i) => (r.status === 'rejected' ? [i] : []))
      expect(rejected).toEqual([5])
      expect(String((results[5] as PromiseRejectedResult).reason.message)).toMatch(/UNIQUE/)
      const { rows } = await pool.query('select count(*) as n, count(distinct k) as d from u where k between $1 and $2', [base, base + 19])
      expect(rows[0]).toEqual({ n: 20, d: 20 }) // 19 new and the one stored before, none twice
    }
  })

  it('answers reads issued together each with its own rows, one failing alone', async () => {
    const pool = open({ url: `sqlite:${path.join(dir, 'reads.db')}`, maxSize: 4, inlineMicros: 2000 })
    await pool.execute('create table q(id integer primary key, sym text)')
    await pool.execute("with recursive n(i) as (select 1 union all select i + 1 from n where i < 100) insert into q(sym) select 'S' || i from n")
    const read = 'select id, sym from q where id = $1'
    const overflow = 'select abs($1) as v' // abs of the smallest 64-bit integer overflows
    for (let i = 0; i < 3; i++) {
      await pool.query(read, [1]) // learnt: cheap and read-only
      await pool.query(overflow, [-5])
    }
    const before = pool.metrics().inlineStatements
    const results = await Promise.allSettled([
      ...Array.from({ length: 40 }, (_, i) => pool.query(read, [i + 1])),
      pool.query(overflow, [-9223372036854775808n]),
      pool.query(overflow, [-7]),
    ])
    results.slice(0, 40).forEach((r, i) => {
      expect(r.status).toBe('fulfilled')
      expect((r as PromiseFulfilledResult<any>).value.rows).toEqual([{ id: i + 1, sym: `S${i + 1}` }])
    })
    expect(results[40].status).toBe('rejected')
    expect(String((results[40] as PromiseRejectedResult).reason.message)).toMatch(/overflow/)
    expect((results[41] as PromiseFulfilledResult<any>).value.rows).toEqual([{ v: 7 }])
    expect(pool.metrics().inlineStatements - before).toBeGreaterThanOrEqual(40) // none left the thread
  })

  it('gives reads of one text issued together the columns of their own snapshot', async () => {
    const pool = open({ url: `sqlite:${path.join(dir, 'columns.db')}`, maxSize: 4, inlineMicros: 2000 })
    await pool.execute('create table c(id integer primary key, sym text)')
    await pool.execute("insert into c(sym) values ('A'), ('B')")
    const star = 'select * from c where id = $1'
    for (let i = 0; i < 3; i++) await pool.query(star, [1]) // learnt: cheap and read-only
    // An id with no row first: its columns still come from the statement.
    const group = () => Promise.all([3, 1, 2, 3, 2].map((id) => pool.query(star, [id])))
    const before = await group()
    expect(before.map((r) => r.rows)).toEqual([[], [{ id: 1, sym: 'A' }], [{ id: 2, sym: 'B' }], [], [{ id: 2, sym: 'B' }]])
    expect(before.every((r) => r.fields.join() === 'id,sym')).toBe(true)
    await pool.execute('alter table c add column px real')
    await pool.execute('update c set px = 2.5')
    const after = await group()
    expect(after.map((r) => r.rows)).toEqual([[], [{ id: 1, sym: 'A', px: 2.5 }], [{ id: 2, sym: 'B', px: 2.5 }], [], [{ id: 2, sym: 'B', px: 2.5 }]])
    expect(after.every((r) => r.fields.join() === 'id,sym,px')).toBe(true)
  })

  it('begins and commits a transaction on the calling thread when the writer is idle', async () => {
    const pool = open({ url: `sqlite:${path.join(dir, 'tx.db')}`, maxSize: 4 })
    await pool.execute('create table pos(sym text primary key, qty integer)')
    await pool.execute("insert into pos values ('BTC', 0)")
    await pool.transaction(async (tx) => {
      await tx.execute('update pos set qty = qty + 1')
    })
    const before = inline(pool)
    for (let i = 0; i < 5; i++) {
      await pool.transaction(async (tx) => {
        await tx.execute('update pos set qty = qty + 1')
      })
    }
    expect(inline(pool) - before).toBeGreaterThanOrEqual(10) // BEGIN IMMEDIATE and COMMIT, each time
    expect((await pool.query('select qty from pos')).rows[0].qty).toBe(6)
    // A throw still rolls back; a transaction with a bound takes the queued path and commits.
    await expect(
      pool.transaction(async (tx) => {
        await tx.execute('update pos set qty = 100')
        throw new Error('boom')
      }),
    ).rejects.toThrow('boom')
    await pool.transaction(async (tx) => tx.execute('update pos set qty = qty + 1'), { timeoutMs: 5000 })
    expect((await pool.query('select qty from pos')).rows[0].qty).toBe(7)
  })

  it("runs a transaction's cheap writes on the calling thread, never cutting one off mid-transaction", async () => {
    const pool = open({ url: `sqlite:${path.join(dir, 'txinline.db')}`, maxSize: 4, inlineMicros: 2000 })
    await pool.execute('create table fills(n integer)')
    const fill = 'with recursive r(i) as (select 1 union all select i + 1 from r where i < $1) insert into fills(n) select i from r'
    for (let i = 0; i < 3; i++) await pool.transaction(async (tx) => tx.execute(fill, [1])) // learnt: cheap
    let before = inline(pool)
    await pool.transaction(async (tx) => {
      await tx.execute(fill, [2])
      await tx.execute(fill, [3])
    })
    // BEGIN, both writes and COMMIT: none left the thread.
    expect(inline(pool) - before).toBe(4)
    // The same write, this time far over the calling-thread bound: cutting it off would roll
    // the whole transaction back, so it runs to the end and the transaction commits whole…
    await pool.transaction(async (tx) => {
      await tx.execute(fill, [1])
      await tx.execute(fill, [400_000])
    })
    expect((await pool.query('select count(*) as c from fills')).rows[0].c).toBe(3 + 2 + 3 + 1 + 400_000)
    // …and from then on it takes the queue.
    before = inline(pool)
    await pool.transaction(async (tx) => tx.execute(fill, [1]))
    expect(inline(pool) - before).toBe(2) // BEGIN and COMMIT only
  })

  it("waits for another connection's write lock in a lease's transaction instead of failing", async () => {
    const url = `sqlite:${path.join(dir, 'txlocked.db')}`
    const pool = open({ url, maxSize: 2, inlineMicros: 2000 })
    await pool.execute('create table t(v integer)')
    const lease = await pool.acquire()
    for (let i = 0; i < 3; i++) await lease.execute('insert into t(v) values ($1)', [i]) // learnt: cheap
    // Another pool on the file holds the write lock for 200 ms.
    const other = open({ url, maxSize: 1 })
    let holding!: () => void
    const held = new Promise<void>((resolve) => (holding = resolve))
    const otherTx = other.transaction(async (tx) => {
      await tx.execute('insert into t(v) values (100)')
      holding()
      await new Promise((resolve) => setTimeout(resolve, 200))
    })
    await held
    // Inside a transaction the insert meets the lock at once on the calling thread: it must
    // wait for it off the thread, not fail with SQLITE_BUSY.
    await lease.execute('begin')
    await expect(lease.execute('insert into t(v) values ($1)', [7])).resolves.toMatchObject({ rowCount: 1 })
    await lease.execute('commit')
    lease.release()
    await otherTx
    expect((await pool.query('select count(*) as c from t')).rows[0].c).toBe(5)
  })

  it('checkpoints off the calling thread and keeps the WAL bounded under writers and readers that never pause', async () => {
    const checkpointThreads = () =>
      process.platform !== 'linux'
        ? 0
        : readdirSync('/proc/self/task').filter((t) => {
            try {
              return readFileSync(`/proc/self/task/${t}/comm`, 'utf8').startsWith('qm-sqlite-check')
            } catch {
              return false // the thread ended while we looked
            }
          }).length
    const threadsBefore = checkpointThreads() // other pools' in this process
    const file = path.join(dir, 'wal.db')
    const pool = open({ url: `sqlite:${file}`, maxSize: 8 })
    await pool.execute('create table t(id integer primary key, sym text, qty integer)')
    await pool.execute('create index t_sym on t(sym, id)')
    const until = Date.now() + 5000
    let maxWal = 0
    const watch = setInterval(() => {
      try {
        maxWal = Math.max(maxWal, statSync(`${file}-wal`).size)
      } catch {
        // not there yet
      }
    }, 25)
    let n = 0
    const readers = Array.from({ length: 8 }, async () => {
      for (let k = 1; Date.now() < until; k++) {
        await pool.query('select count(*) as c from t where sym = $1', ['A'])
        if (k % 50 === 0) await new Promise(setImmediate)
      }
    })
    const writers = Array.from({ length: 16 }, async () => {
      while (Date.now() < until) await pool.execute('insert into t(sym, qty) values ($1, $2)', ['A', n++])
    })
    await Promise.all([...readers, ...writers])
    clearInterval(watch)
    // Every insert is there; the log was checkpointed into the database file and started over
    // (the database file holds the rows; SQLite's own checkpoint let the log pass 160 MiB here).
    // Unchecked, the file would hold only the schema (a few pages); how many rows 5 s brings
    // depends on the machine (about 1 MiB of them on a slow one).
    expect((await pool.query('select count(*) as c from t')).rows[0].c).toBe(n)
    expect(statSync(file).size).toBeGreaterThan(256 << 10)
    expect(maxWal).toBeLessThan(100 * 2 ** 20)
    // The checkpoint thread (and its connection) ends with the pool.
    if (process.platform !== 'linux') return // threads are counted from /proc
    expect(checkpointThreads()).toBeGreaterThanOrEqual(1)
    await pool.close()
    await eventually(checkpointThreads, (count) => count <= threadsBefore)
  })

  it('takes each grouped statement as it was when called: a reused params array, a Buffer changed later', async () => {
    const pool = open({ url: `sqlite:${path.join(dir, 'params.db')}`, maxSize: 4, inlineMicros: 2000 })
    await pool.execute('create table t(v integer, b blob)')
    for (let i = 0; i < 3; i++) await pool.execute('insert into t(v, b) values ($1, $2)', [-1, null]) // learnt
    const params: unknown[] = [0, null]
    const buf = Buffer.from([1])
    const done: Promise<unknown>[] = []
    for (let i = 0; i < 20; i++) {
      params[0] = i
      params[1] = i === 7 ? buf : null
      done.push(pool.execute('insert into t(v, b) values ($1, $2)', params))
    }
    buf[0] = 99 // after the call: the row keeps what was passed
    await Promise.all(done)
    const { rows } = await pool.query('select v, b from t where v >= 0 order by v')
    expect(rows.map((r: any) => r.v)).toEqual(Array.from({ length: 20 }, (_, i) => i))
    expect(rows[7].b).toEqual(Buffer.from([1]))
  })

  it('runs the statements issued before close() in the same turn', async () => {
    const file = path.join(dir, 'close.db')
    const pool = open({ url: `sqlite:${file}`, maxSize: 4, inlineMicros: 2000 })
    await pool.execute('create table t(v integer)')
    for (let i = 0; i < 3; i++) await pool.execute('insert into t(v) values ($1)', [-1]) // learnt
    const results = Array.from({ length: 30 }, (_, i) => pool.execute('insert into t(v) values ($1)', [i]))
    await pool.close()
    expect((await Promise.allSettled(results)).filter((r) => r.status === 'rejected')).toEqual([])
    const check = open({ url: `sqlite:${file}`, maxSize: 1 })
    expect((await check.query('select count(*) as n from t where v >= 0')).rows[0].n).toBe(30)
  })

  it('fails only the write that breaks a deferred constraint at COMMIT', async () => {
    const pool = open({ url: `sqlite:${path.join(dir, 'deferred.db')}`, maxSize: 4, inlineMicros: 2000 })
    await pool.execute('create table parent(id integer primary key)')
    await pool.execute('create table child(id integer primary key, parent integer references parent(id) deferrable initially deferred)')
    await pool.execute('insert into parent(id) values (1)')
    const insert = 'insert into child(parent) values ($1)'
    for (let i = 0; i < 3; i++) await pool.execute(insert, [1]) // learnt
    const results = await Promise.allSettled(Array.from({ length: 12 }, (_, i) => pool.execute(insert, [i === 6 ? 999 : 1])))
    expect(results.flatMap((r, i) => (r.status === 'rejected' ? [i] : []))).toEqual([6])
    expect(String((results[6] as PromiseRejectedResult).reason.message)).toMatch(/FOREIGN KEY/)
    expect((await pool.query('select count(*) as n from child')).rows[0].n).toBe(3 + 11)
  })

  it('never runs inline with inlineMicros: 0, and rejects a bad inlineMicros', async () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 2, inlineMicros: 0 })
    for (let i = 0; i < 20; i++) await pool.query('select 1 as one')
    expect(inline(pool)).toBe(0)
    expect(() => open({ url: 'sqlite::memory:', inlineMicros: 5000 })).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
  })

  it('refuses querySync on other backends with INVALID_ARGUMENT', () => {
    const pool = open({ url: 'redis://127.0.0.1:1', maxSize: 1 })
    expect(() => pool.querySync('select 1')).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
  })
})

describeWithPostgres('PostgreSQL dispatch', () => {
  const open = trackedPools()

  it('never pipelines fast statements behind a statement known to be slow', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2 })
    const slow = 'select pg_sleep(0.2) as slow'
    await pool.query(slow) // its record says slow from now on
    const order: string[] = []
    const calls = [
      pool.query(slow).then(() => order.push('slow')),
      ...Array.from({ length: 60 }, (_, i) => pool.query('select $1::int as i', [i]).then(() => order.push('fast'))),
    ]
    await Promise.all(calls)
    expect(order.indexOf('slow')).toBe(60)
  })

  it('keeps a fast statement pipelined after a deep burst: its own cost is profiled, not its wait', async () => {
    // Every chunk delayed 25 ms each way: a round trip costs ~50 ms, so run one at a time the
    // 40 statements below would take ≥ 2 s; pipelined on the one connection, a few round trips.
    const proxy = await startFaultProxy({ host: new URL(databaseUrl!).hostname, port: Number(new URL(databaseUrl!).port || 5432) })
    try {
      proxy.set({ perChunkDelayMs: 25 })
      const pool = open({ url: proxy.url(databaseUrl!), maxSize: 1, acquireTimeoutMs: 30_000 })
      await pool.query('select 1')
      const fast = 'select $1::int as i'
      // 500 statements deep on one connection: the last waits behind 499 others.
      await Promise.all(Array.from({ length: 500 }, (_, i) => pool.query(fast, [i])))
      const started = performance.now()
      const rows = await Promise.all(Array.from({ length: 40 }, (_, i) => pool.query(fast, [i])))
      const took = performance.now() - started
      expect(rows.map((r) => r.rows[0].i)).toEqual(Array.from({ length: 40 }, (_, i) => i))
      expect(took).toBeLessThan(1000)
    } finally {
      await proxy.close()
    }
  })

  it('serves a spike with its warm connections, opening a bounded number of new ones', async () => {
    const proxy = await startFaultProxy({ host: new URL(databaseUrl!).hostname, port: Number(new URL(databaseUrl!).port || 5432) })
    try {
      proxy.set({ connectDelayMs: 150 })
      const pool = open({ url: proxy.url(databaseUrl!), maxSize: 50, minIdle: 5, acquireTimeoutMs: 10_000 })
      await eventually(() => pool.status(), (s) => s.idle === 5, 5000)
      const created = pool.metrics().created
      const results = await Promise.all(Array.from({ length: 50 }, () => pool.query('select pg_sleep(0.002)')))
      expect(results).toHaveLength(50)
      const opened = pool.metrics().created - created
      process.stderr.write(`spike: 50 callers, 5 warm connections, +150 ms connects: ${opened} new connections\n`)
      expect(opened).toBeLessThanOrEqual(3)
    } finally {
      await proxy.close()
    }
  })
})
