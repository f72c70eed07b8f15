// The lease cycle — check a connection out and give it back, nothing run on it — against
// generic-pool and tarn, in the same process run.
//   npm run bench:lease             full: 5 rounds
//   npm run bench:lease -- --quick  short form for CI
//
// What it measures: the pool's own bookkeeping per checkout + return, as a JS caller pays it.
//   - SQLite (`sqlite::memory:`): quartermaster leases real SQLite connections held in Rust;
//     generic-pool and tarn pool a trivial JS object ({ id }) from a synchronous factory, so
//     they pay nothing for their resource — the most favourable setting for them.
//   - PostgreSQL: every pool holds the same number of real, already-open connections
//     (quartermaster its own; generic-pool and tarn node-postgres `pg.Client`s), all opened
//     before timing; no statement is sent during the timed cycles.
// Peers have no synchronous try-acquire, so the `tryAcquire + release` rows compare our
// synchronous `tryAcquire()` with their fastest path, `await acquire()`.
// Validation is off for the peers (no `validate` hook / `testOnBorrow`); quartermaster validates
// only connections idle for more than 500 ms, which a hot loop never reaches.
import { performance } from 'node:perf_hooks'

import * as genericPool from 'generic-pool'
import pg from 'pg'
import { Pool as TarnPool } from 'tarn'

import { ConnectionPool } from '../index'
import { median, printTable, resolveDatabaseUrl, type Row } from './support'

const quick = process.argv.includes('--quick')
const ROUNDS = quick ? 2 : 5
const WINDOW_MS = quick ? 250 : 1000
const POOL_SIZE = 8
const CALLERS = 64

interface Peer {
  name: string
  /** Synchronous checkout + return, or null when the pool has none. */
  trySync: (() => boolean) | null
  acquireRelease: () => Promise<void>
  close: () => Promise<void>
}

type Resource = { id: number } | pg.Client

function quartermaster(url: string, name: string): Peer {
  const pool = new ConnectionPool({ url, maxSize: POOL_SIZE, minIdle: POOL_SIZE, acquireTimeoutMs: 60_000, name })
  return {
    name: 'quartermaster',
    trySync: () => {
      const c = pool.tryAcquire()
      if (!c) return false
      c.release()
      return true
    },
    acquireRelease: async () => {
      const c = await pool.acquire()
      c.release()
    },
    close: () => pool.close(),
  }
}

function genericPoolPeer(create: () => Promise<Resource>, destroy: (r: Resource) => Promise<void>): Peer {
  const pool = genericPool.createPool<Resource>({ create, destroy }, { max: POOL_SIZE, min: POOL_SIZE })
  return {
    name: 'generic-pool',
    trySync: null,
    acquireRelease: async () => {
      const r = await pool.acquire()
      await pool.release(r)
    },
    close: async () => {
      await pool.drain()
      await pool.clear()
    },
  }
}

function tarnPeer(create: () => Promise<Resource>, destroy: (r: Resource) => Promise<void>): Peer {
  const pool = new TarnPool<Resource>({ create, destroy, min: POOL_SIZE, max: POOL_SIZE, acquireTimeoutMillis: 60_000 })
  return {
    name: 'tarn',
    trySync: null,
    acquireRelease: async () => {
      const r = await pool.acquire().promise
      pool.release(r)
    },
    close: async () => {
      await pool.destroy()
    },
  }
}

/** Every peer, its connections opened and warmed before anything is timed. */
async function peers(backend: 'sqlite' | 'postgres', url: string): Promise<Peer[]> {
  let next = 0
  const create =
    backend === 'sqlite'
      ? async (): Promise<Resource> => ({ id: next++ })
      : async (): Promise<Resource> => {
          const c = new pg.Client({ connectionString: url })
          await c.connect()
          return c
        }
  const destroy = async (r: Resource) => {
    if (r instanceof pg.Client) await r.end()
  }
  const all = [quartermaster(url, `lease-${backend}`), genericPoolPeer(create, destroy), tarnPeer(create, destroy)]
  // Open all POOL_SIZE connections of each (acquire them all at once, then return them).
  for (const p of all) {
    await Promise.all(Array.from({ length: POOL_SIZE }, () => p.acquireRelease()))
    for (let i = 0; i < 2000; i++) await p.acquireRelease()
  }
  return all
}

/** Cycles per second of `cycle` run back to back by one caller for WINDOW_MS. */
async function sequential(cycle: () => Promise<void>): Promise<number> {
  let n = 0
  const started = performance.now()
  const end = started + WINDOW_MS
  while (performance.now() < end) {
    for (let i = 0; i < 100; i++) await cycle()
    n += 100
  }
  return (n / (performance.now() - started)) * 1000
}

/** Cycles per second of the synchronous `cycle`, yielding to the event loop every 1000. */
async function sequentialSync(cycle: () => boolean): Promise<number> {
  let n = 0
  const started = performance.now()
  const end = started + WINDOW_MS
  while (performance.now() < end) {
    for (let i = 0; i < 1000; i++) if (cycle()) n++
    await new Promise((r) => setImmediate(r))
  }
  return (n / (performance.now() - started)) * 1000
}

/** Cycles per second with CALLERS callers contending for POOL_SIZE connections. */
async function contended(cycle: () => Promise<void>): Promise<number> {
  let n = 0
  const started = performance.now()
  const end = started + WINDOW_MS
  await Promise.all(
    Array.from({ length: CALLERS }, async () => {
      while (performance.now() < end) {
        await cycle()
        n++
      }
    }),
  )
  return (n / (performance.now() - started)) * 1000
}

interface Case {
  name: string
  run: (p: Peer) => Promise<number>
}

const CASES: Case[] = [
  { name: 'tryAcquire + release, 1 caller', run: (p) => (p.trySync ? sequentialSync(p.trySync) : sequential(p.acquireRelease)) },
  { name: 'acquire + release, 1 caller', run: (p) => sequential(p.acquireRelease) },
  { name: `acquire + release, ${CALLERS} callers on ${POOL_SIZE} connections`, run: (p) => contended(p.acquireRelease) },
]

async function bench(backend: 'sqlite' | 'postgres', url: string, label: string): Promise<Row[]> {
  const all = await peers(backend, url)
  const rows: Row[] = []
  for (const c of CASES) {
    const samples = new Map<string, number[]>(all.map((p) => [p.name, []]))
    for (let r = 0; r < ROUNDS; r++) {
      // Rotate the order each round so no peer always runs first (or last) on a warm CPU.
      for (let i = 0; i < all.length; i++) {
        const p = all[(i + r) % all.length]
        samples.get(p.name)!.push(await c.run(p))
      }
    }
    const ours = median(samples.get('quartermaster')!)
    for (const p of all) {
      const s = samples.get(p.name)!
      rows.push({
        backend: label,
        case: c.name,
        pool: p.name + (p.name !== 'quartermaster' && c.name.startsWith('tryAcquire') ? ' (await acquire)' : ''),
        'cycles/s (median)': Math.round(median(s)),
        'min–max': `${Math.round(Math.min(...s))}–${Math.round(Math.max(...s))}`,
        'µs/cycle': +(1e6 / median(s)).toFixed(2),
        'ours ÷ this': +(ours / median(s)).toFixed(2),
      })
    }
  }
  for (const p of all) await p.close()
  return rows
}

async function main(): Promise<void> {
  console.log(`lease cycle benchmark (${quick ? 'quick' : 'full'}): pool of ${POOL_SIZE}, ${ROUNDS} rounds of ${WINDOW_MS} ms, node ${process.version}`)
  const sqlite = await bench('sqlite', 'sqlite::memory:', 'SQLite sqlite::memory: (peers: trivial JS resource)')
  printTable(`Lease cycle, SQLite (${ROUNDS} rounds, median)`, sqlite)
  const db = await resolveDatabaseUrl()
  try {
    const postgresRows = await bench('postgres', db.url, `PostgreSQL (peers: pg.Client), ${db.source}`)
    printTable(`Lease cycle, PostgreSQL (${ROUNDS} rounds, median)`, postgresRows)
  } finally {
    await db.stop()
  }
  console.log('ours ÷ this > 1 favours quartermaster')
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
