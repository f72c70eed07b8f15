// COPY as Node streams with backpressure; an aborted COPY leaves the connection clean.
import { createHash } from 'node:crypto'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { ConnectionPool } from '../index'
import { collectGarbage, databaseUrl, describeWithPostgres, eventually, trackedPools } from './support/env'

const ROWS = 1_000_000
const line = (i: number) => `${i},SYM${i % 97},${(i % 10_000) / 100}\n`
const rssMiB = () => process.memoryUsage().rss / 2 ** 20

// Lines in chunks of about 64 KiB, made only as the pipeline asks for them; `hash` sees
// every byte sent.
function csv(rows: number, hash: ReturnType<typeof createHash>): Readable {
  let i = 0
  return new Readable({
    read() {
      if (i >= rows) return void this.push(null)
      let chunk = ''
      while (i < rows && chunk.length < 65_536) chunk += line(i++)
      hash.update(chunk)
      this.push(chunk)
    },
  })
}

describeWithPostgres('COPY on PostgreSQL', () => {
  const open = trackedPools()
  let admin: ConnectionPool
  beforeAll(async () => {
    admin = new ConnectionPool({ url: databaseUrl!, maxSize: 1, name: 'copy-admin' })
    await admin.execute('drop table if exists qm_ticks')
    await admin.execute('create table qm_ticks(ts bigint, sym text, px numeric)')
  })
  afterAll(async () => {
    await admin.execute('drop table if exists qm_ticks')
    await admin.close()
  })
  beforeEach(() => admin.execute('truncate qm_ticks'))

  it('copies 1 000 000 CSV rows in and out: counts and checksums match, memory bounded', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2 })
    await collectGarbage()
    const before = rssMiB()
    const sent = createHash('sha256')
    const started = performance.now()
    const writer = await pool.copyFrom('copy qm_ticks (ts, sym, px) from stdin (format csv)')
    await pipeline(csv(ROWS, sent), writer)
    const inMs = performance.now() - started
    expect(writer.rowCount).toBe(ROWS)
    expect((await pool.query('select count(*)::int as n from qm_ticks')).rows[0].n).toBe(ROWS)
    const peakIn = rssMiB() - before

    const got = createHash('sha256')
    let bytes = 0
    const outStarted = performance.now()
    const reader = await pool.copyTo('copy (select ts, sym, px from qm_ticks order by ts) to stdout (format csv)')
    await pipeline(
      reader,
      new Writable({
        write(chunk, _enc, cb) {
          bytes += chunk.length
          got.update(chunk)
          cb()
        },
      }),
    )
    const outMs = performance.now() - outStarted
    const peak = Math.max(peakIn, rssMiB() - before)
    expect(got.digest('hex')).toBe(sent.digest('hex'))
    process.stderr.write(
      `copy: ${ROWS} rows in ${inMs.toFixed(0)} ms (${((ROWS / inMs) * 1000).toFixed(0)} rows/s), out ${(bytes / 2 ** 20).toFixed(1)} MiB in ${outMs.toFixed(0)} ms; RSS growth ${peak.toFixed(1)} MiB\n`,
    )
    expect(peak).toBeLessThan(96)
    await eventually(() => pool.status(), (s) => s.inUse === 0, 1000)
  }, 120_000)

  it('aborts a COPY in on destroy: nothing copied, the next statement on that connection runs', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    const writer = await pool.copyFrom('copy qm_ticks (ts, sym, px) from stdin (format csv)')
    const failed = new Promise((resolve) => writer.on('error', resolve))
    writer.write('1,A,1.5\n2,B,2.5\n')
    await new Promise((r) => setTimeout(r, 20))
    writer.destroy(new Error('upstream failed'))
    expect(await failed).toMatchObject({ message: 'upstream failed' })
    await eventually(() => pool.status(), (s) => s.inUse === 0, 1000)
    expect((await pool.query('select count(*)::int as n from qm_ticks')).rows[0].n).toBe(0)
    expect((await pool.query('select 1 as one')).rows).toEqual([{ one: 1 }])
  })

  it('rejects bad data with the server\'s error and copies nothing', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    const writer = await pool.copyFrom('copy qm_ticks (ts, sym, px) from stdin (format csv)')
    await expect(pipeline(Readable.from(['1,A,1.5\n', 'not-a-number,B,2\n']), writer)).rejects.toMatchObject({
      code: 'QUERY_FAILED',
      sqlstate: '22P02',
    })
    expect((await pool.query('select count(*)::int as n from qm_ticks')).rows[0].n).toBe(0)
  })

  it('stops a COPY out early on destroy: cancelled on the server, the connection clean', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    const reader = await pool.copyTo('copy (select g, repeat($$x$$, 100) from generate_series(1, 5000000) g) to stdout')
    let chunks = 0
    for await (const _ of reader) if (++chunks === 3) break
    await eventually(() => pool.status(), (s) => s.inUse === 0, 3000)
    expect((await pool.query('select 2 as two')).rows).toEqual([{ two: 2 }])
  })

  it('refuses COPY on other backends with INVALID_ARGUMENT', async () => {
    const pool = open({ url: 'sqlite::memory:' })
    await expect(pool.copyFrom('copy t from stdin')).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
  })
})
