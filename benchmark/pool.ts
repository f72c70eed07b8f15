// pool.query against pg (pg-pool) and postgres.js on the same server, in the same run.
//   npm run bench:pool            full: 5 rounds
//   npm run bench:pool -- --quick short form for CI
import { performance } from 'node:perf_hooks'
import pg from 'pg'
import postgres from 'postgres'

import { ConnectionPool } from '../index'
import { median, printTable, resolveDatabaseUrl, type Row } from './support'

interface Scenario {
  name: string
  concurrency: number
  poolSize: number
}

interface Client {
  name: string
  query: () => Promise<unknown>
  close: () => Promise<void>
}

interface Sample {
  qps: number
  p50: number
  p99: number
  mainCpuUsPerQuery: number
}

const quick = process.argv.includes('--quick')
const rounds = quick ? 1 : 5

async function measure(client: Client, concurrency: number): Promise<Sample> {
  const latencies = new Float64Array(concurrency)
  const elu0 = performance.eventLoopUtilization()
  const started = performance.now()
  await Promise.all(
    Array.from({ length: concurrency }, async (_, i) => {
      const t0 = performance.now()
      await client.query()
      latencies[i] = performance.now() - t0
    }),
  )
  const elapsed = performance.now() - started
  const elu = performance.eventLoopUtilization(elu0)
  latencies.sort()
  return {
    qps: (concurrency / elapsed) * 1000,
    p50: latencies[Math.floor(concurrency * 0.5)],
    p99: latencies[Math.floor(concurrency * 0.99)],
    mainCpuUsPerQuery: (elu.active * 1000) / concurrency,
  }
}

async function clients(url: string, size: number): Promise<Client[]> {
  const qm = new ConnectionPool({ url, maxSize: size, minIdle: size, acquireTimeoutMs: 60_000, name: `bench-${size}` })
  const pgPool = new pg.Pool({ connectionString: url, max: size })
  const sql = postgres(url, { max: size, onnotice: () => {} })
  return [
    { name: 'quartermaster', query: () => qm.query('select 1'), close: () => qm.close() },
    { name: 'pg (pg-pool)', query: () => pgPool.query('select 1'), close: () => pgPool.end() },
    { name: 'postgres.js', query: () => sql`select 1`, close: () => sql.end() },
  ]
}

async function main(): Promise<void> {
  const url = await resolveDatabaseUrl()
  const scenarios: Scenario[] = [
    { name: '10k concurrent select 1, pool 4', concurrency: quick ? 2000 : 10_000, poolSize: 4 },
    { name: '5000 concurrent select 1, pool 20', concurrency: quick ? 1000 : 5000, poolSize: 20 },
  ]
  const rows: Row[] = []
  for (const scenario of scenarios) {
    const all = await clients(url.url, scenario.poolSize)
    for (const c of all) await measure(c, 500) // warm: connections open, statements prepared, JIT hot
    const samples = new Map<string, Sample[]>(all.map((c) => [c.name, []]))
    for (let r = 0; r < rounds; r++) {
      for (const c of all) samples.get(c.name)!.push(await measure(c, scenario.concurrency))
    }
    const ours = median(samples.get('quartermaster')!.map((s) => s.qps))
    for (const c of all) {
      const s = samples.get(c.name)!
      const qps = s.map((x) => x.qps)
      rows.push({
        scenario: scenario.name,
        client: c.name,
        'q/s (median)': Math.round(median(qps)),
        'q/s min–max': `${Math.round(Math.min(...qps))}–${Math.round(Math.max(...qps))}`,
        'p50 ms': median(s.map((x) => x.p50)).toFixed(2),
        'p99 ms': median(s.map((x) => x.p99)).toFixed(2),
        'main-thread µs/query': median(s.map((x) => x.mainCpuUsPerQuery)).toFixed(2),
        'ours ÷ this': (ours / median(qps)).toFixed(2),
      })
    }
    for (const c of all) await c.close()
  }
  printTable(`pool.query vs peers (${rounds} round${rounds > 1 ? 's' : ''}, PostgreSQL ${url.source})`, rows)
  await url.stop()
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
