// Cost-aware dispatch against its peers, in one run: SQLite small work against better-sqlite3,
// a PostgreSQL workload of fast statements mixed with slow reports against pg and postgres.js,
// and a connection spike through a proxy that adds connect latency.
//   npm run bench:dispatch            full
//   npm run bench:dispatch -- --quick short form for CI
import { mkdtempSync, rmSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import Database from 'better-sqlite3'
import pg from 'pg'
import postgres from 'postgres'

import { ConnectionPool } from '../index'
import { startFaultProxy } from '../__test__/support/fault-proxy'
import { printTable, resolveDatabaseUrl, type Row } from './support'

const quick = process.argv.includes('--quick')
const fmt = (n: number) => Math.round(n).toLocaleString('en-US')
const rate = (ops: number, ms: number) => (ops / ms) * 1000

function percentile(sorted: Float64Array, p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]
}

// ---- SQLite ---------------------------------------------------------------------------------

async function sqlite(): Promise<void> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'qm-bench-sqlite-'))
  const file = path.join(dir, 'bench.db')
  const reads = quick ? 20_000 : 200_000
  const writes = quick ? 5_000 : 50_000
  try {
    const seed = new Database(file)
    seed.pragma('journal_mode = WAL')
    seed.pragma('synchronous = NORMAL')
    seed.exec('create table quotes(id integer primary key, sym text, px real); create table fills(id integer primary key, sym text, qty integer)')
    const ins = seed.prepare('insert into quotes(sym, px) values (?, ?)')
    seed.transaction(() => {
      for (let i = 0; i < 10_000; i++) ins.run(`SYM${i}`, i / 7)
    })()
    seed.close()

    // The peer: better-sqlite3, synchronous, in its best configuration (WAL, NORMAL).
    const db = new Database(file)
    db.pragma('journal_mode = WAL')
    db.pragma('synchronous = NORMAL')
    const get = db.prepare('select sym, px from quotes where id = ?')
    const put = db.prepare('insert into fills(sym, qty) values (?, ?)')
    const pool = new ConnectionPool({ url: `sqlite:${file}`, maxSize: 4, name: 'bench-sqlite' })
    const read = 'select sym, px from quotes where id = $1'
    const write = 'insert into fills(sym, qty) values ($1, $2)'
    for (let i = 0; i < 2000; i++) {
      get.get((i % 10_000) + 1)
      await pool.query(read, [(i % 10_000) + 1]) // learn the statement, warm
      pool.querySync(read, [(i % 10_000) + 1])
    }

    // This machine's speed drifts by tens of percent within a run: the peer and each read
    // figure (64 readers too) and each one-by-one write figure are taken in rounds, in turn,
    // and summed over them.
    const rounds = quick ? 2 : 10
    const timed = { peerRead: 0, awaited: 0, sync: 0, readers64: 0, peerWrite: 0, awaitedWrite: 0 }
    const time = async (key: keyof typeof timed, work: () => unknown) => {
      const t = performance.now()
      await work()
      timed[key] += performance.now() - t
    }
    // n operations from 64 callers at once.
    const concurrent = async (n: number, op: (i: number) => Promise<unknown>) => {
      let next = 0
      await Promise.all(
        Array.from({ length: 64 }, async () => {
          while (next < n) await op(next++)
        }),
      )
    }
    let inlineAwaited = 0
    for (let r = 0; r < rounds; r++) {
      const n = reads / rounds
      await time('peerRead', () => {
        for (let i = 0; i < n; i++) get.get((i % 10_000) + 1)
      })
      const inline0 = pool.metrics().inlineStatements
      await time('awaited', async () => {
        for (let i = 0; i < n; i++) await pool.query(read, [(i % 10_000) + 1])
      })
      inlineAwaited += pool.metrics().inlineStatements - inline0
      await time('sync', () => {
        for (let i = 0; i < n; i++) pool.querySync(read, [(i % 10_000) + 1])
      })
      await time('readers64', () => concurrent(n, (i) => pool.query(read, [(i % 10_000) + 1])))
    }
    const inlineShare = inlineAwaited / reads
    for (let i = 0; i < 500; i++) await pool.execute(write, ['WARM', i])
    for (let r = 0; r < rounds; r++) {
      const n = writes / rounds
      await time('peerWrite', () => {
        for (let i = 0; i < n; i++) put.run('BTC', i)
      })
      await time('awaitedWrite', async () => {
        for (let i = 0; i < n; i++) await pool.execute(write, ['BTC', i])
      })
    }
    db.close()
    const peerRead = rate(reads, timed.peerRead)
    const awaited = rate(reads, timed.awaited)
    const sync = rate(reads, timed.sync)
    const readers64 = rate(reads, timed.readers64)
    const peerWrite = rate(writes, timed.peerWrite)
    const awaitedWrite = rate(writes, timed.awaitedWrite)

    const started = performance.now()
    await concurrent(writes, (i) => pool.execute(write, ['ETH', i]))
    const writers64 = rate(writes, performance.now() - started)
    await pool.close()

    const rows: Row[] = [
      { case: 'point read by primary key, awaited one by one', quartermaster: fmt(awaited), 'better-sqlite3': fmt(peerRead), ratio: +(awaited / peerRead).toFixed(2), note: `pool.query; ${(inlineShare * 100).toFixed(0)} % ran on the calling thread` },
      { case: 'point read, querySync', quartermaster: fmt(sync), 'better-sqlite3': fmt(peerRead), ratio: +(sync / peerRead).toFixed(2), note: '' },
      { case: 'point read, 64 concurrent callers, pool 4', quartermaster: fmt(readers64), 'better-sqlite3': fmt(peerRead), ratio: +(readers64 / peerRead).toFixed(2), note: 'peer: sequential (synchronous)' },
      { case: 'single-row insert, awaited one by one', quartermaster: fmt(awaitedWrite), 'better-sqlite3': fmt(peerWrite), ratio: +(awaitedWrite / peerWrite).toFixed(2), note: 'autocommit, WAL, synchronous=NORMAL' },
      { case: 'single-row insert, 64 concurrent', quartermaster: fmt(writers64), 'better-sqlite3': fmt(peerWrite), ratio: +(writers64 / peerWrite).toFixed(2), note: 'peer: sequential (synchronous)' },
    ]
    printTable('SQLite small work vs better-sqlite3 (operations/s; ratio: quartermaster ÷ better-sqlite3)', rows)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}

// ---- PostgreSQL: fast statements mixed with slow reports ------------------------------------

interface Mixed {
  fast: Float64Array
  fastCount: number
  reports: number
}

async function mixedRun(query: (i: number) => Promise<unknown>, report: () => Promise<unknown>, seconds: number): Promise<Mixed> {
  const latencies: number[] = []
  let reports = 0
  let running = true
  const workers = Array.from({ length: 64 }, async (_, w) => {
    let i = 0
    while (running) {
      const t0 = performance.now()
      await query(w * 1_000_000 + i++)
      latencies.push(performance.now() - t0)
    }
  })
  const reporter = (async () => {
    while (running) {
      const next = performance.now() + 25
      void report().then(() => reports++)
      await new Promise((r) => setTimeout(r, Math.max(0, next - performance.now())))
    }
  })()
  await new Promise((r) => setTimeout(r, seconds * 1000))
  running = false
  await Promise.all([...workers, reporter])
  const sorted = Float64Array.from(latencies).sort()
  return { fast: sorted, fastCount: latencies.length, reports }
}

async function mixed(url: string): Promise<void> {
  const seconds = quick ? 1.5 : 5
  const fast = 'select $1::int as i'
  const reportSql = 'select pg_sleep(0.05), count(*) from generate_series(1, 1000)'
  const rows: Row[] = []
  const qm = new ConnectionPool({ url, maxSize: 8, minIdle: 8, name: 'bench-mixed' })
  const pgPool = new pg.Pool({ connectionString: url, max: 8 })
  const sql = postgres(url, { max: 8, onnotice: () => {} })
  const clients: Array<{ name: string; query: (i: number) => Promise<unknown>; report: () => Promise<unknown> }> = [
    { name: 'quartermaster', query: (i) => qm.query(fast, [i % 1000]), report: () => qm.query(reportSql) },
    { name: 'pg (pg-pool)', query: (i) => pgPool.query(fast, [i % 1000]), report: () => pgPool.query(reportSql) },
    { name: 'postgres.js', query: (i) => sql.unsafe(fast, [i % 1000], { prepare: true }), report: () => sql.unsafe(reportSql) },
  ]
  for (const c of clients) await mixedRun(c.query, c.report, 0.5) // warm
  const results = new Map<string, Mixed>()
  for (const c of clients) results.set(c.name, await mixedRun(c.query, c.report, seconds))
  const pgResult = results.get('pg (pg-pool)')!
  for (const c of clients) {
    const r = results.get(c.name)!
    rows.push({
      client: c.name,
      'fast q/s': fmt(r.fastCount / seconds),
      'fast p50 ms': +percentile(r.fast, 0.5).toFixed(2),
      'fast p99 ms': +percentile(r.fast, 0.99).toFixed(2),
      'fast p99.9 ms': +percentile(r.fast, 0.999).toFixed(2),
      'reports/s': +(r.reports / seconds).toFixed(1),
      'throughput ÷ pg': +(r.fastCount / pgResult.fastCount).toFixed(2),
    })
  }
  printTable('PostgreSQL mixed: 64 workers of fast select $1::int + a 50 ms report every 25 ms, pool 8', rows)
  await qm.close()
  await pgPool.end()
  await sql.end()
}

// ---- connection spike through a slow-connecting proxy ---------------------------------------

async function spike(url: string): Promise<void> {
  const u = new URL(url)
  const proxy = await startFaultProxy({ host: u.hostname, port: Number(u.port || 5432) })
  proxy.set({ connectDelayMs: 150 })
  const through = proxy.url(url)
  const rows: Row[] = []
  try {
    const qm = new ConnectionPool({ url: through, maxSize: 50, minIdle: 5, acquireTimeoutMs: 30_000, name: 'bench-spike' })
    while (qm.status().idle < 5) await new Promise((r) => setTimeout(r, 20))
    const accepted = proxy.accepted()
    let t = performance.now()
    await Promise.all(Array.from({ length: 50 }, () => qm.query('select pg_sleep(0.002)')))
    const qmMs = performance.now() - t
    rows.push({ client: 'quartermaster (minIdle 5, maxSize 50)', 'new connections': proxy.accepted() - accepted, 'spike done in ms': +qmMs.toFixed(0) })
    await qm.close()

    const pgPool = new pg.Pool({ connectionString: through, max: 50 })
    const warm = await Promise.all(Array.from({ length: 5 }, () => pgPool.connect()))
    warm.forEach((c) => c.release())
    const pgAccepted = proxy.accepted()
    t = performance.now()
    await Promise.all(Array.from({ length: 50 }, () => pgPool.query('select pg_sleep(0.002)')))
    rows.push({ client: 'pg (pg-pool, 5 warm, max 50)', 'new connections': proxy.accepted() - pgAccepted, 'spike done in ms': +(performance.now() - t).toFixed(0) })
    await pgPool.end()
  } finally {
    await proxy.close()
  }
  printTable('Spike: 50 callers at once, 5 warm connections, connect +150 ms (proxy), 2 ms query', rows)
}

async function main(): Promise<void> {
  await sqlite()
  const db = await resolveDatabaseUrl()
  try {
    await mixed(db.url)
    await spike(db.url)
  } finally {
    await db.stop()
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err)
    process.exit(1)
  },
)
