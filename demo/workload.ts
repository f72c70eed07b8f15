// The demo's trading workload: a quotes/orders/positions schema, a market-data ticker that runs
// the sample models on recent prices, and order-flow workers using pool.query, pool.execute and
// pool.transaction concurrently.
import path from 'node:path'
import { performance } from 'node:perf_hooks'

import type { ConnectionPool, Model, ModelCache } from '../index'

export const SYMBOLS = ['BTC', 'ETH', 'SOL', 'AAPL'] as const
/** Time steps the sample LSTM reads (its `sequenceLength`). */
const WINDOW = 10

/** A result row (typed here: `QueryResult.rows` is `Rows` in index.d.ts). */
type Row = Record<string, unknown>

/** Latencies and counters the live view and the report read. */
export class Tally {
  readonly startedAt = performance.now()
  ops = { query: 0, execute: 0, transaction: 0 }
  failures = 0
  lastError = ''
  ordersPlaced = 0
  ordersFilled = 0
  ticks = 0
  predictions = 0
  lastSignal = new Map<string, number>()
  private all: number[] = []
  private recent: number[] = []
  private byKind: Record<keyof Tally['ops'], number[]> = { query: [], execute: [], transaction: [] }

  record(kind: keyof Tally['ops'], ms: number): void {
    this.ops[kind]++
    this.all.push(ms)
    this.recent.push(ms)
    this.byKind[kind].push(ms)
  }

  /** The 99th percentile of each kind's latencies over the run. */
  p99ByKind(): Record<keyof Tally['ops'], number> {
    const p99 = (v: number[]) => percentile([...v].sort((a, b) => a - b), 99)
    return { query: p99(this.byKind.query), execute: p99(this.byKind.execute), transaction: p99(this.byKind.transaction) }
  }

  fail(err: unknown): void {
    this.failures++
    this.lastError = err instanceof Error ? `${(err as { code?: string }).code ?? err.name}: ${err.message}` : String(err)
  }

  get total(): number {
    return this.ops.query + this.ops.execute + this.ops.transaction
  }

  /** Latencies since the previous call (for the live view), sorted. */
  takeRecent(): number[] {
    const r = this.recent.sort((a, b) => a - b)
    this.recent = []
    return r
  }

  /** Every latency of the run, sorted. */
  allSorted(): number[] {
    return [...this.all].sort((a, b) => a - b)
  }
}

export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return 0
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]
}

/** Table names, prefixed per run on PostgreSQL so a shared database is left as it was found. */
export interface Tables {
  quotes: string
  orders: string
  positions: string
}

export function tableNames(backend: string): Tables {
  const prefix = backend === 'postgres' ? `qm_demo_${process.pid}_` : ''
  return { quotes: `${prefix}quotes`, orders: `${prefix}orders`, positions: `${prefix}positions` }
}

export async function createSchema(pool: ConnectionPool, t: Tables): Promise<void> {
  const pg = pool.backend === 'postgres'
  const id = pg ? 'bigint generated always as identity primary key' : 'integer primary key'
  const real = pg ? 'double precision' : 'real'
  await pool.execute(`create table if not exists ${t.quotes} (id ${id}, sym text not null, price ${real} not null, volume ${real} not null)`)
  await pool.execute(`create index if not exists ${t.quotes}_sym on ${t.quotes} (sym, id)`)
  await pool.execute(
    `create table if not exists ${t.orders} (id ${id}, sym text not null, side text not null, qty integer not null, price ${real} not null, status text not null)`,
  )
  await pool.execute(`create table if not exists ${t.positions} (sym text primary key, qty integer not null, cash ${real} not null)`)
  await pool.transaction(async (tx) => {
    for (const sym of SYMBOLS) {
      await tx.execute(`insert into ${t.positions} (sym, qty, cash) values ($1, 0, 0)`, [sym])
      let price = startPrice(sym)
      for (let i = 0; i < WINDOW; i++) {
        price *= 1 + (Math.random() - 0.5) * 0.002
        await tx.execute(`insert into ${t.quotes} (sym, price, volume) values ($1, $2, $3)`, [sym, price, 1 + Math.random() * 10])
      }
    }
  })
}

export async function dropSchema(pool: ConnectionPool, t: Tables): Promise<void> {
  for (const name of [t.orders, t.quotes, t.positions]) await pool.execute(`drop table if exists ${name}`)
}

function startPrice(sym: string): number {
  return { BTC: 65_000, ETH: 3_400, SOL: 150, AAPL: 190 }[sym] ?? 100
}

export interface Models {
  cache: ModelCache
  lstm: Model
  mlp: Model
}

/** Loads the sample models shipped under models/ through the cache. */
export async function loadModels(cache: ModelCache): Promise<Models> {
  const dir = path.join(__dirname, '..', 'models')
  const lstm = await cache.load('sample-lstm', path.join(dir, 'sample-lstm.safetensors'))
  const mlp = await cache.load('sample-mlp', path.join(dir, 'sample-mlp.safetensors'))
  return { cache, lstm, mlp }
}

/**
 * One market-data tick per symbol: a new quote (pool.execute), the recent window back
 * (pool.query), the LSTM run on it and the MLP on summary features. The models are looked up in
 * the cache every tick, as a service handling many symbols would.
 */
export async function tick(pool: ConnectionPool, t: Tables, models: Models, tally: Tally): Promise<void> {
  await Promise.all(
    SYMBOLS.map(async (sym) => {
      const t0 = performance.now()
      const last = await pool.query(`select price from ${t.quotes} where sym = $1 order by id desc limit 1`, [sym])
      const lastPrice = Number((last.rows as Row[])[0]?.price ?? startPrice(sym))
      const drift = (tally.lastSignal.get(sym) ?? 0) * 1e-4
      const price = lastPrice * (1 + drift + (Math.random() - 0.5) * 0.002)
      await pool.execute(`insert into ${t.quotes} (sym, price, volume) values ($1, $2, $3)`, [sym, price, 1 + Math.random() * 10])
      tally.record('execute', performance.now() - t0)

      const t1 = performance.now()
      const rows = (await pool.query(`select price, volume from ${t.quotes} where sym = $1 order by id desc limit ${WINDOW}`, [sym])).rows as Row[]
      tally.record('query', performance.now() - t1)
      const prices = rows.map((r) => Number(r.price)).reverse()
      const volumes = rows.map((r) => Number(r.volume)).reverse()
      if (prices.length < WINDOW) return

      const lstm = models.cache.get('sample-lstm') ?? models.lstm
      const mlp = models.cache.get('sample-mlp') ?? models.mlp
      // LSTM input: WINDOW steps × 4 features (return, log-price deviation, volume, range).
      const mean = prices.reduce((a: number, b: number) => a + b, 0) / prices.length
      const seq = new Float32Array(lstm.sequenceLength * lstm.inputSize)
      for (let i = 0; i < WINDOW; i++) {
        const prev = prices[Math.max(0, i - 1)]
        seq[i * 4] = (prices[i] - prev) / prev * 100
        seq[i * 4 + 1] = Math.log(prices[i] / mean) * 100
        seq[i * 4 + 2] = volumes[i] / 10
        seq[i * 4 + 3] = (Math.max(...prices) - Math.min(...prices)) / mean * 100
      }
      const [lstmOut] = await lstm.predict(seq)
      // MLP input: 8 summary features.
      const feats = new Float32Array(mlp.inputSize)
      feats.set([seq[36], seq[37], seq[38], seq[39], seq[0], seq[20], lstmOut, volumes.reduce((a: number, b: number) => a + b, 0) / 100])
      const [signal] = mlp.predictSync(feats)
      tally.predictions += 2
      tally.lastSignal.set(sym, Math.max(-1, Math.min(1, signal)))
    }),
  )
  tally.ticks++
}

/**
 * One order-flow worker until `until` (performance.now()): reads a price, places an order, and
 * one time in four fills it in a transaction that moves the position.
 */
export async function orderFlow(pool: ConnectionPool, t: Tables, tally: Tally, until: () => boolean): Promise<void> {
  while (!until()) {
    const sym = SYMBOLS[Math.floor(Math.random() * SYMBOLS.length)]
    try {
      let t0 = performance.now()
      const rows = (await pool.query(`select price from ${t.quotes} where sym = $1 order by id desc limit 1`, [sym])).rows as Row[]
      tally.record('query', performance.now() - t0)
      const price = Number(rows[0]?.price ?? startPrice(sym))
      const signal = tally.lastSignal.get(sym) ?? 0
      const side = signal + (Math.random() - 0.5) > 0 ? 'buy' : 'sell'
      const qty = 1 + Math.floor(Math.random() * 5)

      if (Math.random() < 0.75) {
        t0 = performance.now()
        await pool.execute(`insert into ${t.orders} (sym, side, qty, price, status) values ($1, $2, $3, $4, 'open')`, [sym, side, qty, price])
        tally.record('execute', performance.now() - t0)
        tally.ordersPlaced++
      } else {
        t0 = performance.now()
        await pool.transaction(async (tx) => {
          await tx.execute(`insert into ${t.orders} (sym, side, qty, price, status) values ($1, $2, $3, $4, 'filled')`, [sym, side, qty, price])
          const signed = side === 'buy' ? qty : -qty
          await tx.execute(`update ${t.positions} set qty = qty + $1, cash = cash - $2 where sym = $3`, [signed, signed * price, sym])
        })
        tally.record('transaction', performance.now() - t0)
        tally.ordersPlaced++
        tally.ordersFilled++
      }
    } catch (err) {
      tally.fail(err)
    }
  }
}

/** Positions and order counts at the end, read back through the pool. */
export async function book(pool: ConnectionPool, t: Tables): Promise<{ orders: number; filled: number; positions: Array<{ sym: string; qty: number }> }> {
  const counts = await pool.query(`select count(*) as n, sum(case when status = 'filled' then 1 else 0 end) as filled from ${t.orders}`)
  const positions = await pool.query(`select sym, qty from ${t.positions} order by sym`)
  return {
    orders: Number((counts.rows as Row[])[0].n),
    filled: Number((counts.rows as Row[])[0].filled ?? 0),
    positions: (positions.rows as Row[]).map((r) => ({ sym: String(r.sym), qty: Number(r.qty) })),
  }
}
