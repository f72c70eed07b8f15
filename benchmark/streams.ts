// COPY and sharing, against their peers in one run: 1 000 000 CSV rows in and out through
// copyFrom / copyTo against postgres.js's .writable() / .readable(), and 4 worker_threads on
// one shared pool against 4 workers each with its own pg / postgres.js pool of the same total
// size (throughput and server connections).
//   npm run bench:streams            full
//   npm run bench:streams -- --quick short form for CI
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { Worker } from 'node:worker_threads'
import postgres from 'postgres'

import { ConnectionPool } from '../index'
import { printTable, resolveDatabaseUrl, type Row } from './support'

const quick = process.argv.includes('--quick')
const fmt = (n: number) => Math.round(n).toLocaleString('en-US')

function csv(rows: number): Readable {
  let i = 0
  return new Readable({
    read() {
      if (i >= rows) return void this.push(null)
      let chunk = ''
      while (i < rows && chunk.length < 65_536) {
        chunk += `${i},SYM${i % 97},${(i % 10_000) / 100}\n`
        i++
      }
      this.push(chunk)
    },
  })
}

const sink = () =>
  new Writable({
    write(_chunk, _enc, cb) {
      cb()
    },
  })

async function copy(url: string): Promise<void> {
  const rows = quick ? 200_000 : 1_000_000
  const admin = new ConnectionPool({ url, maxSize: 1, name: 'bench-copy-admin' })
  await admin.execute('drop table if exists qm_bench_ticks')
  await admin.execute('create unlogged table qm_bench_ticks(ts bigint, sym text, px numeric)')
  const qm = new ConnectionPool({ url, maxSize: 2, name: 'bench-copy' })
  const sql = postgres(url, { max: 2, onnotice: () => {} })
  const copyIn = 'copy qm_bench_ticks (ts, sym, px) from stdin (format csv)'
  const copyOut = 'copy (select ts, sym, px from qm_bench_ticks) to stdout (format csv)'
  const results: Row[] = []
  const timed = async (what: string, client: string, run: () => Promise<void>) => {
    await admin.execute(what === 'in' ? 'truncate qm_bench_ticks' : 'select 1')
    const t = performance.now()
    await run()
    const ms = performance.now() - t
    return { what, client, ms }
  }
  const samples: Array<{ what: string; client: string; ms: number }> = []
  for (let round = 0; round < (quick ? 1 : 3); round++) {
    samples.push(await timed('in', 'quartermaster', async () => pipeline(csv(rows), await qm.copyFrom(copyIn))))
    samples.push(await timed('out', 'quartermaster', async () => pipeline(await qm.copyTo(copyOut), sink())))
    samples.push(await timed('in', 'postgres.js', async () => pipeline(csv(rows), await sql.unsafe(copyIn).writable())))
    samples.push(await timed('out', 'postgres.js', async () => pipeline(await sql.unsafe(copyOut).readable(), sink())))
  }
  for (const what of ['in', 'out']) {
    const best = (client: string) => Math.min(...samples.filter((s) => s.what === what && s.client === client).map((s) => s.ms))
    const ours = best('quartermaster')
    const theirs = best('postgres.js')
    results.push({
      copy: what === 'in' ? `${fmt(rows)} CSV rows in (copyFrom / .writable())` : `${fmt(rows)} rows out as CSV (copyTo / .readable())`,
      'quartermaster rows/s': fmt((rows / ours) * 1000),
      'postgres.js rows/s': fmt((rows / theirs) * 1000),
      ratio: +(theirs / ours).toFixed(2),
    })
  }
  printTable('COPY vs postgres.js (best of rounds; ratio: quartermaster ÷ postgres.js throughput)', results)
  await admin.execute('drop table if exists qm_bench_ticks')
  await Promise.all([qm.close(), admin.close(), sql.end()])
}

async function workers(url: string): Promise<void> {
  const perWorker = quick ? 5_000 : 40_000
  const rows: Row[] = []
  const admin = new ConnectionPool({ url, maxSize: 1, name: 'bench-workers-admin' })
  for (const client of ['quartermaster', 'pg', 'postgres.js']) {
    const app = `qm_bench_workers_${client.replace(/\W/g, '')}_${process.pid}`
    const u = new URL(url)
    u.searchParams.set('application_name', app)
    let peak = 0
    const watch = setInterval(async () => {
      const r = await admin.query('select count(*)::int as n from pg_stat_activity where application_name = $1', [app]).catch(() => null)
      if (r) peak = Math.max(peak, r.rows[0].n)
    }, 50)
    const started = performance.now()
    await Promise.all(
      Array.from(
        { length: 4 },
        () =>
          new Promise<void>((resolve, reject) => {
            const w = new Worker(path.join(__dirname, 'workers-load.mjs'), {
              workerData: { client, url: u.toString(), queries: perWorker, inFlight: 32, totalPool: 8, workers: 4 },
            })
            w.once('error', reject)
            w.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`${client} worker exited ${code}`))))
          }),
      ),
    )
    const ms = performance.now() - started
    clearInterval(watch)
    rows.push({
      client: client === 'quartermaster' ? 'quartermaster (ConnectionPool.shared, 8)' : `${client} (own pool of 2 per worker)`,
      'queries/s': fmt(((perWorker * 4) / ms) * 1000),
      'server connections (peak)': peak,
    })
  }
  await admin.close()
  printTable('4 worker_threads × 32 in flight: one shared pool of 8 vs a pool of 2 per worker (same total)', rows)
}

async function main(): Promise<void> {
  const db = await resolveDatabaseUrl()
  try {
    await copy(db.url)
    await workers(db.url)
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
