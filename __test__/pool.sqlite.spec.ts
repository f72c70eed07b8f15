import { spawnSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import v8 from 'node:v8'

import { ConnectionPool } from '../index'
import { collectGarbage, eventually } from './support/env'

describe('ConnectionPool on SQLite', () => {
  let dir: string
  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'qm-sqlite-'))
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  it('shares one in-memory database across the pool and maps values', async () => {
    const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 4, name: 'mem-values' })
    await pool.execute('create table quotes(sym text primary key, price real, qty integer, raw blob, big integer)')
    const ins = await pool.execute('insert into quotes values (?1, ?2, ?3, ?4, ?5)', ['BTC', 64000.5, 3, Buffer.from([1, 2, 3]), 9007199254740993n])
    expect(ins.rowCount).toBe(1)
    expect(ins.lastInsertId).toBe(1)
    // Every connection of the pool sees the row: hold two leases at once and read on both.
    const a = await pool.acquire()
    const b = await pool.acquire()
    const [ra, rb] = await Promise.all([a.query('select * from quotes'), b.query('select count(*) as n from quotes')])
    a.release()
    b.release()
    expect(ra.rows).toEqual([{ sym: 'BTC', price: 64000.5, qty: 3, raw: Buffer.from([1, 2, 3]), big: 9007199254740993n }])
    expect(ra.fields).toEqual(['sym', 'price', 'qty', 'raw', 'big'])
    expect(rb.rows[0].n).toBe(1)
    await pool.close()
  })

  it('shapes rows of any size, odd column names and a changed schema', async () => {
    const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 2, name: 'mem-shapes' })
    await pool.execute('create table t(id integer primary key, sym text)')
    await pool.execute("with recursive n(i) as (select 1 union all select i + 1 from n where i < 3000) insert into t(sym) select 'S' || i from n")
    // Small results are handed to JavaScript as call arguments, larger ones as one array, the
    // largest built natively row by row.
    for (const n of [1, 20, 21, 100, 2048, 3000]) {
      const { rows, rowCount, fields } = pool.querySync('select id, sym from t where id <= $1 order by id', [n])
      expect(rowCount).toBe(n)
      expect(fields).toEqual(['id', 'sym'])
      expect(rows).toEqual(Array.from({ length: n }, (_, i) => ({ id: i + 1, sym: `S${i + 1}` })))
    }
    // A column named __proto__ is a plain own property; a repeated name keeps the last value.
    const odd = pool.querySync(`select 1 as "__proto__", 2 as "a b", 3 as x, 4 as x, 5 as "0"`)
    // (Rows come from the addon's realm, not jest's: compare prototypes by shape.)
    expect(Object.getPrototypeOf(Object.getPrototypeOf(odd.rows[0]))).toBeNull()
    expect(Object.getOwnPropertyNames(odd.rows[0]).sort()).toEqual(['0', '__proto__', 'a b', 'x'])
    expect(Object.entries(odd.rows[0])).toEqual(expect.arrayContaining([['__proto__', 1], ['a b', 2], ['x', 4], ['0', 5]]))
    expect(odd.fields).toEqual(['__proto__', 'a b', 'x', 'x', '0'])
    // One column named "" is not no column.
    const blank = pool.querySync('select 7 as ""')
    expect(blank.fields).toEqual([''])
    expect(blank.rows).toEqual([{ '': 7 }])
    // The same text after a schema change returns the new columns.
    const star = 'select * from t where id = 1'
    expect(pool.querySync(star).rows).toEqual([{ id: 1, sym: 'S1' }])
    await pool.execute('alter table t add column px real')
    await pool.execute('update t set px = 1.5 where id = 1')
    expect(pool.querySync(star).rows).toEqual([{ id: 1, sym: 'S1', px: 1.5 }])
    expect((await pool.query(star)).fields).toEqual(['id', 'sym', 'px'])
    await pool.close()
  })

  it('keeps repeated reads prepared without changing what they return or see', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'qm-kept-'))
    const url = `sqlite:${path.join(dir, 'kept.db')}`
    const pool = new ConnectionPool({ url, maxSize: 2 })
    const other = new ConnectionPool({ url, maxSize: 1 })
    try {
      // Every kind of parameter, each text run twice (the second run reuses the prepared
      // statement): the same values back.
      const echo = 'select $1 as v'
      const values: unknown[] = [null, 42, -7, 1.5, '', 'a\u0000b', 'é€𝄞', Buffer.alloc(0), Buffer.from([0, 1, 255]), 2n ** 60n, 9007199254740993n]
      for (const v of values) {
        for (let round = 0; round < 2; round++) {
          const got = pool.querySync(echo, [v]).rows[0].v
          if (Buffer.isBuffer(v)) expect(Buffer.from(got as Uint8Array)).toEqual(v)
          else expect(got).toEqual(v)
        }
      }
      expect(pool.querySync(echo, [true]).rows[0].v).toBe(1)
      expect(pool.querySync(echo, [new Date(0)]).rows[0].v).toBe('1970-01-01T00:00:00.000Z')
      // The wrong number of parameters is refused, and the statement still serves after it.
      for (const params of [[], [1, 2], undefined]) {
        expect(() => pool.querySync(echo, params)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT', message: expect.stringContaining('parameter') }))
      }
      expect(pool.querySync(echo, [3]).rows).toEqual([{ v: 3 }])
      // A read failing as it runs leaves the statement ready for the next call.
      const field = "select json_extract($1, '$.a') as a"
      expect(pool.querySync(field, ['{"a": 1}']).rows).toEqual([{ a: 1 }])
      expect(() => pool.querySync(field, ['{nope'])).toThrow(expect.objectContaining({ code: 'QUERY_FAILED' }))
      expect(pool.querySync(field, ['{"a": 2}']).rows).toEqual([{ a: 2 }])
      // Up to 16 parameters go spread, more as one array: both are bound in order.
      for (const n of [15, 16, 17, 40]) {
        const sum = `select ${Array.from({ length: n }, (_, i) => `$${i + 1} * ${i + 1}`).join(' + ')} as s`
        const params = Array.from({ length: n }, (_, i) => i + 1)
        expect(pool.querySync(sum, params).rows[0].s).toBe(params.reduce((a, i) => a + i * i, 0))
      }
      expect(pool.querySync('select typeof($1) as t, length($1) as n', [Buffer.alloc(0)]).rows).toEqual([{ t: 'blob', n: 0 }])
      // Each read sees what another connection committed just before it: a kept statement
      // holds no snapshot between calls.
      await pool.execute('create table fills(id integer primary key, qty integer)')
      // A write returning rows runs once and returns them (it is never kept as a read).
      expect(pool.querySync('insert into fills(qty) values ($1) returning qty', [0]).rows).toEqual([{ qty: 0 }])
      await pool.execute('delete from fills')
      const count = 'select count(*) as n from fills'
      for (let i = 1; i <= 20; i++) {
        await other.execute('insert into fills(qty) values ($1)', [i])
        expect(pool.querySync(count).rows).toEqual([{ n: i }])
        expect((await pool.query(count)).rows).toEqual([{ n: i }])
      }
      // More texts than a connection keeps prepared: the oldest start over, still right.
      for (let k = 0; k < 150; k++) expect(pool.querySync(`select ${k} as k, $1 as v`, [k]).rows).toEqual([{ k, v: k }])
      expect(pool.querySync(echo, [5]).rows).toEqual([{ v: 5 }])
    } finally {
      await other.close()
      await pool.close()
      rmSync(dir, { recursive: true, force: true })
    }
  })

  it("leaves nothing of a lease's statements to the old generation, and checks whose they are", async () => {
    // A lease lives briefly. Functions made for each one outlived the young-generation
    // collections (about 2 KB promoted per lease), so a workload of transactions spent 5 to
    // 12 ms in each of those collections instead of under one.
    const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 2, name: 'mem-lease-gc' })
    const gc = (globalThis as any).gc as (o?: { type: 'minor' | 'major' }) => void
    const oldSpace = () => v8.getHeapSpaceStatistics().find((s) => s.space_name === 'old_space')!.space_used_size
    try {
      await pool.execute('create table t(x integer)')
      const cycle = async () => {
        const lease = await pool.acquire()
        lease.querySync('select 1 as one')
        lease.executeSync('insert into t values ($1)', [1])
        await lease.query('select count(*) as n from t')
        lease.release()
      }
      for (let i = 0; i < 200; i++) await cycle() // code compiled, caches filled
      await collectGarbage()
      const before = oldSpace()
      const n = 4000
      for (let i = 0; i < n; i++) await cycle()
      for (let i = 0; i < 3; i++) gc({ type: 'minor' })
      const promotedPerLease = (oldSpace() - before) / n
      expect(promotedPerLease).toBeLessThan(512)
      // The leases' shared functions refuse a receiver that is not a lease.
      const lease = await pool.acquire()
      const proto = Object.getPrototypeOf(lease)
      lease.release()
      const fake = Object.create(proto)
      const refused = expect.objectContaining({ code: 'INVALID_ARGUMENT', message: expect.stringContaining('PooledConnection') })
      expect(() => fake.querySync('select 1')).toThrow(refused)
      const otherClass = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 1, name: 'mem-lease-gc-2' })
      try {
        Object.setPrototypeOf(otherClass, proto)
        expect(() => otherClass.querySync('select 1')).toThrow(refused)
        expect(() => (otherClass as any).executeSync('select 1')).toThrow(refused)
        expect(() => (otherClass as any).query('select 1')).toThrow(refused)
      } finally {
        Object.setPrototypeOf(otherClass, ConnectionPool.prototype)
        await otherClass.close()
      }
    } finally {
      await pool.close()
    }
  })

  it('survives the addon loaded twice into one process', () => {
    // Each load is its own napi environment in the same Node environment: a per-load cleanup
    // hook registered twice with the same arguments would abort Node.
    const addon = require.resolve('../index.js').replace(/index\.js$/, '')
    const script = `
      const fs = require('fs'), path = require('path')
      const file = fs.readdirSync(${JSON.stringify(addon)}).find((f) => /^quartermaster\\..*\\.node$/.test(f))
      const load = () => { const m = { exports: {} }; process.dlopen(m, path.join(${JSON.stringify(addon)}, file)); return m.exports }
      const first = load(), second = load()
      for (const { ConnectionPool } of [first, second]) {
        const pool = new ConnectionPool({ url: 'sqlite::memory:' })
        process.stdout.write(JSON.stringify(pool.querySync('select 1 as x, 2 as y').rows))
      }`
    const run = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 30_000 })
    expect(run.stderr).toBe('')
    expect(run.status).toBe(0)
    expect(run.stdout).toBe('[{"x":1,"y":2}][{"x":1,"y":2}]')
  })

  it('keeps data in a file across pools', async () => {
    const url = `sqlite:${path.join(dir, 'trading.db')}`
    const writer = new ConnectionPool({ url, maxSize: 2 })
    await writer.execute('create table fills(id integer primary key, qty integer)')
    await writer.execute('insert into fills(qty) values (?1), (?2)', [3, 4])
    await writer.close()
    const reader = new ConnectionPool({ url, maxSize: 2 })
    const { rows } = await reader.query('select sum(qty) as total from fills')
    expect(rows[0].total).toBe(7)
    await reader.close()
  })

  it('commits a transaction and rolls one back on throw', async () => {
    const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 2 })
    await pool.execute('create table positions(id integer primary key, qty integer)')
    await pool.execute('insert into positions values (1, 0)')
    const out = await pool.transaction(async (tx) => {
      await tx.execute('update positions set qty = qty + ?1 where id = 1', [5])
      return 'done'
    })
    expect(out).toBe('done')
    await expect(
      pool.transaction(async (tx) => {
        await tx.execute('update positions set qty = qty + ?1 where id = 1', [100])
        throw new Error('risk check failed')
      }),
    ).rejects.toThrow('risk check failed')
    const { rows } = await pool.query('select qty from positions where id = 1')
    expect(rows[0].qty).toBe(5)
    expect(pool.status().inUse).toBe(0)
    await pool.close()
  })

  it('releases a lease with await using, even on throw', async () => {
    const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 1 })
    const run = async () => {
      await using conn = await pool.acquire()
      expect(pool.status().inUse).toBe(1)
      await conn.query('select 1')
      throw new Error('boom')
    }
    await expect(run()).rejects.toThrow('boom')
    expect(pool.status().inUse).toBe(0)
    {
      using conn = pool.tryAcquire()!
      expect(conn).not.toBeNull()
      expect(pool.tryAcquire()).toBeNull()
    }
    const again = pool.tryAcquire()
    expect(again).not.toBeNull()
    again!.release() // (left out, close() would wait for it)
    await pool.close()
  })

  it('passes text of every length through whole, in SQL and in parameters', async () => {
    const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 1 })
    // Strings are read into a 256-byte buffer first: a character of 2, 3 or 4 bytes straddles
    // its end at some length here, and must never be cut off.
    for (const wide of ['é', '€', '𝄞']) {
      for (let k = 236; k <= 262; k++) {
        const text = 'a'.repeat(k) + wide + 'b'
        expect(pool.querySync('select $1 as t', [text]).rows[0].t).toBe(text)
        const sql = `select '${text}' as t`
        expect(pool.querySync(sql).rows[0].t).toBe(text)
        expect((await pool.query(sql)).rows[0].t).toBe(text)
      }
    }
    await pool.close()
  })

  it('rejects SQL that is not a string with INVALID_ARGUMENT, on pools and leases', async () => {
    const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 2 })
    const lease = await pool.acquire()
    for (const on of [pool, lease]) {
      await expect(on.query(42 as any)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringContaining('sql must be a string') })
      await expect(on.execute(undefined as any)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
      expect(() => on.querySync({} as any)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
      expect(() => on.executeSync(null as any)).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
      expect(on.querySync('select 1 as x').rows).toEqual([{ x: 1 }])
      // The functions behind these calls hold the native object's address: no code outside the
      // addon can get hold of them (and so call one after its object is gone).
      expect((on as any)._bare).toBeUndefined()
      expect(Object.getOwnPropertySymbols(on).map((s) => (on as any)[s]).filter((v) => typeof v === 'object' && v && 'querySync' in v)).toEqual([])
    }
    lease.release()
    await pool.close()
  })

  it('reclaims a dropped lease that ran statements', async () => {
    const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 1 })
    await (async () => {
      const lease = await pool.acquire()
      expect(lease.querySync('select 1 as x').rows).toEqual([{ x: 1 }])
      expect((await lease.query('select 2 as x')).rows).toEqual([{ x: 2 }])
      expect(lease.executeSync('create table t(x)').rowCount).toBe(0)
    })()
    await collectGarbage()
    await eventually(() => pool.status(), (s) => s.inUse === 0)
    expect(pool.metrics().leakedLeases).toBe(1)
    expect(pool.querySync('select 3 as x').rows).toEqual([{ x: 3 }])
    await pool.close()
  })

  it('reports a syntax error as QUERY_FAILED and keeps serving', async () => {
    const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 1 })
    await expect(pool.query('selec 1')).rejects.toMatchObject({ code: 'QUERY_FAILED' })
    await expect(pool.query('select ?1 as x', [])).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    expect((await pool.query('select 2 as x')).rows).toEqual([{ x: 2 }])
    await pool.close()
  })
})
