// The seed's test scenarios as named benchmark / soak scenarios, each printing its figures and
// whether it met its target.
//   npm run bench:scenarios             full
//   npm run bench:scenarios -- --quick  short form for CI
//
// PostgreSQL from DATABASE_URL (else a throwaway embedded one). Pool-size scaling runs sizes up
// to 50 on PostgreSQL (the local server allows max_connections 100, shared with whatever else
// runs) and sizes up to 200 on SQLite (`sqlite::memory:`), where connections cost no server slot.
import { performance } from 'node:perf_hooks'

import { ConnectionPool } from '../index'
import { printTable, resolveDatabaseUrl, type Row } from './support'

const quick = process.argv.includes('--quick')
let failures = 0

function pct(sorted: number[], p: number): number {
  if (sorted.length === 0) return 0
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]
}

const ms = (x: number) => +x.toFixed(2)
const verdict = (ok: boolean) => {
  if (!ok) failures++
  return ok ? 'PASS' : 'FAIL'
}
const sleep = (t: number) => new Promise<void>((r) => setTimeout(r, t))

/** 5000 concurrent pool.query calls on a pool of 20: every one must succeed (target ≥ 95 %). */
async function concurrent5000(url: string): Promise<Row> {
  const pool = new ConnectionPool({ url, maxSize: 20, acquireTimeoutMs: 30_000, name: 'scenario-5000' })
  const n = 5000
  const started = performance.now()
  const results = await Promise.allSettled(Array.from({ length: n }, (_, i) => pool.query('select $1::int as i', [i])))
  const elapsed = performance.now() - started
  const ok = results.filter((r) => r.status === 'fulfilled' && (r.value.rows as Array<{ i: number }>)[0].i !== undefined).length
  const rate = (ok / n) * 100
  await pool.close()
  return {
    scenario: '5000 concurrent operations (pool 20)',
    figures: `${ok}/${n} succeeded (${rate.toFixed(2)} %) in ${elapsed.toFixed(0)} ms`,
    target: 'success ≥ 95 %',
    result: verdict(rate >= 95),
  }
}

/**
 * 5× overload: 50 callers on a pool of 10, each holding its lease 200 ms, with a 300 ms acquire
 * deadline. Those that cannot get a connection in time must fail with a typed POOL_TIMEOUT, every
 * call must settle (no hang), and the pool must serve normally afterwards.
 */
async function overload(url: string): Promise<Row> {
  const size = 10
  const callers = size * 5
  const holdMs = 200
  const timeoutMs = 300
  const pool = new ConnectionPool({ url, maxSize: size, minIdle: size, acquireTimeoutMs: timeoutMs, name: 'scenario-overload' })
  await Promise.all(Array.from({ length: size }, () => pool.query('select 1')))
  const codes = new Map<string, number>()
  const waits: number[] = []
  const started = performance.now()
  const settled = Promise.all(
    Array.from({ length: callers }, async () => {
      const t0 = performance.now()
      try {
        const conn = await pool.acquire()
        waits.push(performance.now() - t0)
        try {
          await conn.query('select 1')
          await sleep(holdMs)
        } finally {
          conn.release()
        }
        codes.set('ok', (codes.get('ok') ?? 0) + 1)
      } catch (err) {
        waits.push(performance.now() - t0)
        const code = (err as { code?: string }).code ?? 'untyped'
        codes.set(code, (codes.get(code) ?? 0) + 1)
      }
    }),
  )
  // No hang: everything settles well within hold + deadline (plus slack for a loaded machine).
  const bound = holdMs * 2 + timeoutMs + 2000
  const hung = await Promise.race([settled.then(() => false), sleep(bound).then(() => true)])
  const elapsed = performance.now() - started
  const after = await pool.query('select 1 as ok')
  const status = pool.status()
  const recovered = (after.rows as Array<{ ok: number }>)[0].ok === 1 && status.inUse === 0 && status.waiting === 0
  await pool.close()
  const ok = codes.get('ok') ?? 0
  const timeouts = codes.get('POOL_TIMEOUT') ?? 0
  const other = callers - ok - timeouts
  const maxWait = Math.max(...waits)
  return {
    scenario: `5× overload (${callers} callers, pool ${size}, hold ${holdMs} ms, deadline ${timeoutMs} ms)`,
    figures: `${ok} served, ${timeouts} POOL_TIMEOUT, ${other} other; all settled in ${elapsed.toFixed(0)} ms; max wait ${maxWait.toFixed(0)} ms; pool serves after: ${recovered}`,
    target: 'typed timeouts, no hang, recovers',
    result: verdict(!hung && other === 0 && timeouts > 0 && ok >= size && recovered && maxWait < timeoutMs + 500),
  }
}

/** 32 workers calling pool.query back to back for 10 s (quick: 3 s); target > 1000 ops/s. */
async function throughput(url: string): Promise<{ row: Row; latencies: number[] }> {
  const seconds = quick ? 3 : 10
  const pool = new ConnectionPool({ url, maxSize: 16, minIdle: 16, name: 'scenario-throughput' })
  await Promise.all(Array.from({ length: 16 }, () => pool.query('select 1')))
  const latencies: number[] = []
  let errors = 0
  const end = performance.now() + seconds * 1000
  const started = performance.now()
  await Promise.all(
    Array.from({ length: 32 }, async () => {
      while (performance.now() < end) {
        const t0 = performance.now()
        try {
          await pool.query('select $1::int + 1 as v', [latencies.length])
          latencies.push(performance.now() - t0)
        } catch {
          errors++
        }
      }
    }),
  )
  const elapsed = (performance.now() - started) / 1000
  await pool.close()
  const opsPerSec = latencies.length / elapsed
  return {
    row: {
      scenario: `throughput over ${seconds} s (32 workers, pool 16)`,
      figures: `${Math.round(opsPerSec)} ops/s, ${latencies.length} ops, ${errors} errors`,
      target: '> 1000 ops/s',
      result: verdict(opsPerSec > 1000 && errors === 0),
    },
    latencies,
  }
}

/** 100 users × 50 requests each: read a quote, place an order, one in five a transaction. */
async function realistic(url: string): Promise<Row> {
  const users = 100
  const requests = 50
  const table = `qm_scenario_orders_${process.pid}`
  const pool = new ConnectionPool({ url, maxSize: 20, acquireTimeoutMs: 30_000, name: 'scenario-users' })
  await pool.execute(`create table if not exists ${table} (id bigint generated always as identity primary key, user_id int not null, sym text not null, qty int not null, price double precision not null)`)
  const latencies: number[] = []
  let errors = 0
  const started = performance.now()
  try {
    await Promise.all(
      Array.from({ length: users }, async (_, user) => {
        for (let r = 0; r < requests; r++) {
          const t0 = performance.now()
          try {
            const sym = ['BTC', 'ETH', 'SOL'][r % 3]
            if (r % 5 === 4) {
              await pool.transaction(async (tx) => {
                await tx.execute(`insert into ${table} (user_id, sym, qty, price) values ($1, $2, $3, $4)`, [user, sym, 1, 100 + r])
                await tx.query(`select count(*) as n from ${table} where user_id = $1`, [user])
              })
            } else if (r % 2 === 0) {
              await pool.query(`select coalesce(max(price), 0) as last from ${table} where sym = $1`, [sym])
            } else {
              await pool.execute(`insert into ${table} (user_id, sym, qty, price) values ($1, $2, $3, $4)`, [user, sym, 2, 100 + r])
            }
            latencies.push(performance.now() - t0)
          } catch {
            errors++
          }
          await sleep(Math.random() * 2) // think time
        }
      }),
    )
  } finally {
    await pool.execute(`drop table if exists ${table}`)
  }
  const elapsed = (performance.now() - started) / 1000
  await pool.close()
  latencies.sort((a, b) => a - b)
  const total = users * requests
  return {
    scenario: `realistic workload: ${users} users × ${requests} requests (pool 20)`,
    figures: `${latencies.length}/${total} ok, ${Math.round(latencies.length / elapsed)} req/s, p50 ${ms(pct(latencies, 50))} ms, p99 ${ms(pct(latencies, 99))} ms, ${elapsed.toFixed(1)} s`,
    target: 'all succeed',
    result: verdict(errors === 0 && latencies.length === total),
  }
}

/** RSS before and after a sustained load (200k queries; quick: 50k), after a GC each time. */
async function memory(url: string): Promise<Row> {
  const total = quick ? 50_000 : 200_000
  const pool = new ConnectionPool({ url, maxSize: 16, name: 'scenario-memory' })
  const gc = (globalThis as { gc?: () => void }).gc
  const settle = async () => {
    for (let i = 0; i < 3; i++) {
      gc?.()
      await sleep(20)
    }
  }
  // Warm first so allocator pools and prepared statements exist before the baseline.
  for (let i = 0; i < 5; i++) await Promise.all(Array.from({ length: 1000 }, () => pool.query('select 1')))
  await settle()
  const before = process.memoryUsage().rss
  let peak = before
  for (let done = 0; done < total; done += 1000) {
    await Promise.all(Array.from({ length: 1000 }, (_, i) => pool.query('select $1::int as v', [done + i])))
    if (done % 10_000 === 0) peak = Math.max(peak, process.memoryUsage().rss)
  }
  await settle()
  const after = process.memoryUsage().rss
  await pool.close()
  const growthMb = (after - before) / 2 ** 20
  return {
    scenario: `memory bounded under load (${total / 1000}k queries, 1000 in flight)`,
    figures: `rss ${(before / 2 ** 20).toFixed(1)} → ${(after / 2 ** 20).toFixed(1)} MiB (${growthMb >= 0 ? '+' : ''}${growthMb.toFixed(1)} MiB, peak ${(peak / 2 ** 20).toFixed(1)} MiB)${gc ? '' : ' — run with --expose-gc for a settled reading'}`,
    target: 'growth < 50 MiB',
    result: verdict(growthMb < 50),
  }
}

/** Pool size scaling: 2000 concurrent queries (quick: 1000) at each size. */
async function scaling(url: string, backend: string, sizes: number[]): Promise<Row[]> {
  const n = quick ? 1000 : 2000
  const rows: Row[] = []
  for (const size of sizes) {
    const pool = new ConnectionPool({ url, maxSize: size, minIdle: size, acquireTimeoutMs: 60_000, name: `scaling-${size}` })
    await Promise.all(Array.from({ length: size }, () => pool.query('select 1')))
    const runs: Array<{ qps: number; p99: number }> = []
    for (let r = 0; r < (quick ? 1 : 3); r++) {
      const lat = new Float64Array(n)
      const started = performance.now()
      await Promise.all(
        Array.from({ length: n }, async (_, i) => {
          const t0 = performance.now()
          await pool.query('select 1')
          lat[i] = performance.now() - t0
        }),
      )
      const elapsed = performance.now() - started
      lat.sort()
      runs.push({ qps: (n / elapsed) * 1000, p99: lat[Math.floor(n * 0.99)] })
    }
    runs.sort((a, b) => a.qps - b.qps)
    const mid = runs[Math.floor(runs.length / 2)]
    const m = pool.metrics()
    rows.push({
      backend,
      'pool size': size,
      'q/s': Math.round(mid.qps),
      'p99 ms': ms(mid.p99),
      'connections opened': m.created,
      'success %': m.successRate,
    })
    await pool.close()
  }
  return rows
}

async function main(): Promise<void> {
  const db = await resolveDatabaseUrl()
  console.log(`seed scenarios (${quick ? 'quick' : 'full'}) on PostgreSQL ${db.source}, node ${process.version}`)
  try {
    const rows: Row[] = []
    rows.push(await concurrent5000(db.url))
    rows.push(await overload(db.url))
    const tp = await throughput(db.url)
    rows.push(tp.row)
    rows.push(await realistic(db.url))
    rows.push(await memory(db.url))
    printTable('Seed scenarios (PostgreSQL)', rows)

    const lat = tp.latencies.sort((a, b) => a - b)
    printTable('Latency percentiles of pool.query (the throughput run, ms, measured in JS end to end)', [
      {
        ops: lat.length,
        p50: ms(pct(lat, 50)),
        p90: ms(pct(lat, 90)),
        p95: ms(pct(lat, 95)),
        p99: ms(pct(lat, 99)),
        max: ms(lat[lat.length - 1] ?? 0),
      },
    ])
    printTable('Pool size scaling (concurrent select 1; PostgreSQL ≤ 50 to stay under max_connections, SQLite up to 200)', [
      ...(await scaling(db.url, 'PostgreSQL', [1, 5, 10, 20, 50])),
      ...(await scaling('sqlite::memory:', 'SQLite memory', [1, 10, 50, 100, 200])),
    ])
  } finally {
    await db.stop()
  }
  console.log(failures ? `\n${failures} scenario(s) FAILED` : '\nall scenarios met their targets')
  process.exitCode = failures ? 1 : 0
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
