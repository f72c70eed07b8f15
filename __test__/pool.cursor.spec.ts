// Cursors: rows in batches fetched only when the loop asks, memory bounded by the batch,
// the connection released as soon as the loop ends, breaks or throws.
import { collectGarbage, databaseUrl, describeWithPostgres, eventually, trackedPools } from './support/env'

const rssMiB = () => process.memoryUsage().rss / 2 ** 20

describeWithPostgres('cursor on PostgreSQL', () => {
  const open = trackedPools()

  it('streams 5 000 000 rows in batches of 10 000 with bounded memory', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2 })
    await collectGarbage()
    const before = rssMiB()
    let peak = before
    let count = 0
    let sum = 0
    let batches = 0
    for await (const batch of pool.cursor('select g from generate_series(1, $1::int) g', [5_000_000], { batchSize: 10_000 })) {
      batches++
      count += batch.length
      for (const row of batch) sum += row.g
      if (batches % 50 === 0) peak = Math.max(peak, rssMiB())
    }
    peak = Math.max(peak, rssMiB())
    expect(count).toBe(5_000_000)
    expect(sum).toBe((5_000_000 * 5_000_001) / 2)
    expect(batches).toBe(500)
    process.stderr.write(`cursor: 5M rows in ${batches} batches, RSS growth ${(peak - before).toFixed(1)} MiB\n`)
    expect(peak - before).toBeLessThan(64)
    // Released as the loop ends (the rollback that ends its transaction takes a round trip).
    expect((await eventually(() => pool.status(), (s) => s.inUse === 0, 100)).inUse).toBe(0)
  }, 120_000)

  it('releases its lease at once when the loop breaks or throws', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    for await (const batch of pool.cursor('select g from generate_series(1, 1000000) g', [], { batchSize: 100 })) {
      expect(batch).toHaveLength(100)
      break
    }
    await eventually(() => pool.status(), (s) => s.inUse === 0, 100)
    expect(pool.status().inUse).toBe(0)
    await expect(
      (async () => {
        for await (const _ of pool.cursor('select g from generate_series(1, 1000) g', [], { batchSize: 10 })) throw new Error('consumer failed')
      })(),
    ).rejects.toThrow('consumer failed')
    await eventually(() => pool.status(), (s) => s.inUse === 0, 100)
    // The connection comes back clean: an autocommit write persists.
    expect((await pool.query('select 1 as one')).rows).toEqual([{ one: 1 }])
  })

  it('runs inside a lease\'s open transaction and sees its uncommitted rows', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    const conn = await pool.acquire()
    await conn.query('begin')
    await conn.query('create temp table qm_cur(x int) on commit drop')
    await conn.query('insert into qm_cur select generate_series(1, 25)')
    const seen: number[] = []
    for await (const batch of conn.cursor('select x from qm_cur where x > $1 order by x', [5], { batchSize: 7 })) {
      seen.push(...batch.map((r) => r.x))
    }
    expect(seen).toEqual(Array.from({ length: 20 }, (_, i) => i + 6))
    // Still in the caller's transaction.
    expect((await conn.query('select count(*)::int as n from qm_cur')).rows[0].n).toBe(25)
    await conn.query('commit')
    conn.release()
  })

  it('closes on timeoutMs and on an AbortSignal', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    const slow = 'select g, pg_sleep(0.02) from generate_series(1, 1000) g'
    await expect(
      (async () => {
        for await (const _ of pool.cursor(slow, [], { batchSize: 5, timeoutMs: 150 })) {
          /* keep reading */
        }
      })(),
    ).rejects.toMatchObject({ code: 'QUERY_TIMEOUT' })
    await eventually(() => pool.status(), (s) => s.inUse === 0, 1000)
    const ac = new AbortController()
    let n = 0
    await expect(
      (async () => {
        for await (const _ of pool.cursor(slow, [], { batchSize: 5, signal: ac.signal })) if (++n === 2) ac.abort()
      })(),
    ).rejects.toMatchObject({ code: 'ABORT_ERR' })
    await eventually(() => pool.status(), (s) => s.inUse === 0, 1000)
    expect(pool.status().inUse).toBe(0)
  })
})

describe('cursor on SQLite', () => {
  const open = trackedPools()
  const series = 'with recursive r(n) as (select 1 union all select n + 1 from r where n < $1) select n from r'

  it('steps a statement in batches, one batch read ahead at most', async () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 2 })
    let count = 0
    let last = 0
    for await (const batch of pool.cursor(series, [250_000], { batchSize: 10_000 })) {
      expect(batch.length).toBeLessThanOrEqual(10_000)
      count += batch.length
      last = batch[batch.length - 1].n
    }
    expect(count).toBe(250_000)
    expect(last).toBe(250_000)
    expect(pool.status().inUse).toBe(0)
  })

  it('releases its connection when the loop breaks, and stops on timeoutMs', async () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 1 })
    for await (const batch of pool.cursor(series, [1_000_000], { batchSize: 10 })) {
      expect(batch).toHaveLength(10)
      break
    }
    await eventually(() => pool.status(), (s) => s.inUse === 0, 100)
    expect((await pool.query('select 2 as two')).rows).toEqual([{ two: 2 }])
    const endless = 'with recursive r(n) as (select 1 union all select n + 1 from r) select count(*) from r'
    await expect(
      (async () => {
        for await (const _ of pool.cursor(endless, [], { timeoutMs: 100 })) {
          /* never */
        }
      })(),
    ).rejects.toMatchObject({ code: 'QUERY_TIMEOUT' })
    await eventually(() => pool.status(), (s) => s.inUse === 0, 1000)
    expect((await pool.query('select 3 as three')).rows).toEqual([{ three: 3 }])
  })

  it('rejects bad options with INVALID_ARGUMENT', () => {
    const pool = open({ url: 'sqlite::memory:', maxSize: 1 })
    expect(() => pool.cursor('select 1', [], { batchSize: 0 })).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
  })
})
