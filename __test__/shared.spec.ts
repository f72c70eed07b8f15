import path from 'node:path'
import { Worker } from 'node:worker_threads'

import { ConnectionPool, ModelCache } from '../index'
import { databaseUrl, describeWithPostgres } from './support/env'

const ADDON = path.join(__dirname, '..', 'index.js')
const SAMPLE = path.join(__dirname, '..', 'models', 'sample-mlp.safetensors')

/** Runs `body` (CommonJS, with `addon`, `data` and an async `done(value)` in scope) in a worker thread. */
function inWorker<T>(body: string, data: unknown = null): Promise<T> {
  const source = `
const { parentPort, workerData } = require('node:worker_threads')
const addon = require(workerData.addon)
const data = workerData.data
const done = (value) => parentPort.postMessage({ value })
;(async () => { ${body} })().catch((e) => parentPort.postMessage({ error: String(e && e.stack || e), code: e && e.code }))
`
  const worker = new Worker(source, { eval: true, workerData: { addon: ADDON, data } })
  return new Promise<T>((resolve, reject) => {
    worker.once('message', (m: { value?: T; error?: string; code?: string }) => {
      void worker.terminate()
      if (m.error) reject(Object.assign(new Error(m.error), { code: m.code }))
      else resolve(m.value as T)
    })
    worker.once('error', reject)
  })
}

const codeOf = (p: Promise<unknown> | (() => unknown)) =>
  (async () => {
    try {
      await (typeof p === 'function' ? p() : p)
    } catch (e: any) {
      return e.code as string
    }
    return undefined
  })()

describe('pools shared by name across worker_threads', () => {
  const options = { url: 'sqlite::memory:', name: 'shared-orders', maxSize: 2 }

  it('workers asking for one name use one pool: they see one in-memory database', async () => {
    const pool = ConnectionPool.shared(options)
    await pool.execute('create table fills (worker integer, qty integer)')
    const written = await Promise.all(
      [1, 2, 3].map((w) =>
        inWorker<number>(
          `const pool = addon.ConnectionPool.shared(data.options)
           for (let i = 0; i < 10; i++) await pool.execute('insert into fills values ($1, $2)', [data.w, i])
           const { rows } = await pool.query('select count(*) as n from fills where worker = $1', [data.w])
           await pool.close()
           done(rows[0].n)`,
          { options, w },
        ),
      ),
    )
    expect(written).toEqual([10, 10, 10])
    // The workers closed their handles; the pool (and its database) is still the main thread's.
    const { rows } = await pool.query('select worker, count(*) as n from fills group by worker order by worker')
    expect(rows).toEqual([
      { worker: 1, n: 10 },
      { worker: 2, n: 10 },
      { worker: 3, n: 10 },
    ])
    expect(pool.status().maxSize).toBe(2)
    expect(pool.status().size).toBeLessThanOrEqual(2)
    await pool.close()
  })

  it('close() lets go of one handle; the last close closes the pool', async () => {
    const a = ConnectionPool.shared(options)
    const b = ConnectionPool.shared(options)
    await a.execute('create table t (x integer)')
    await a.close()
    expect(await codeOf(a.query('select 1'))).toBe('POOL_CLOSED')
    expect(await codeOf(() => a.tryAcquire())).toBe('POOL_CLOSED')
    expect(await codeOf(a.acquire())).toBe('POOL_CLOSED')
    expect((await b.query('select count(*) as n from t')).rows).toEqual([{ n: 0 }]) // same database, still open
    await b.close()
    expect(await codeOf(b.query('select 1'))).toBe('POOL_CLOSED')
    // Every handle closed: the name now makes a new pool (a new in-memory database).
    const c = ConnectionPool.shared(options)
    expect(await codeOf(c.query('select * from t'))).toBe('QUERY_FAILED')
    await c.close()
  })

  it('asking with other options or without a name is INVALID_ARGUMENT, naming the pool', async () => {
    const pool = ConnectionPool.shared(options)
    let err: any
    try {
      ConnectionPool.shared({ ...options, maxSize: 3 })
    } catch (e) {
      err = e
    }
    expect(err.code).toBe('INVALID_ARGUMENT')
    expect(err.message).toMatch(/pool 'shared-orders' is already shared with other options/)
    expect(await codeOf(() => ConnectionPool.shared({ url: 'sqlite::memory:' }))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(() => ConnectionPool.shared({ url: 'sqlite::memory:', name: '' }))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(() => ConnectionPool.shared({ url: 'nope://x', name: 'bad' }))).toBe('INVALID_ARGUMENT')
    await pool.close()
  })

  it('a worker terminated mid-query does not take the shared pool down', async () => {
    const pool = ConnectionPool.shared(options)
    const worker = new Worker(
      `const { parentPort, workerData } = require('node:worker_threads')
       const pool = require(workerData.addon).ConnectionPool.shared(workerData.options)
       for (let i = 0; i < 2000; i++) pool.query('select 1').catch(() => {})
       parentPort.postMessage('busy')`,
      { eval: true, workerData: { addon: ADDON, options } },
    )
    await new Promise((resolve, reject) => worker.once('message', resolve).once('error', reject))
    await worker.terminate()
    expect((await pool.query('select 2 as x')).rows).toEqual([{ x: 2 }])
    await pool.execute('create table marker (x integer)')
    await pool.close()
    // The dead worker's handle was let go when its environment was torn down, so the close
    // above was the last: the name now makes a new pool with a new database.
    const next = ConnectionPool.shared(options)
    expect(await codeOf(next.query('select * from marker'))).toBe('QUERY_FAILED')
    await next.close()
  })
})

describeWithPostgres('a shared PostgreSQL pool across worker_threads', () => {
  it('4 workers × 50 concurrent queries open at most maxSize connections between them', async () => {
    const options = { url: databaseUrl!, name: 'shared-pg', maxSize: 4 }
    const pool = ConnectionPool.shared(options)
    const pids = await Promise.all(
      [0, 1, 2, 3].map(() =>
        inWorker<number[]>(
          `const pool = addon.ConnectionPool.shared(data)
           const results = await Promise.all(Array.from({ length: 50 }, () =>
             pool.query('select pg_backend_pid() as pid, pg_sleep(0.005)')))
           await pool.close()
           done(results.map((r) => r.rows[0].pid))`,
          options,
        ),
      ),
    )
    const distinct = new Set(pids.flat())
    expect(pids.flat()).toHaveLength(200)
    // Unshared, four workers would open up to 16 connections.
    expect(distinct.size).toBeLessThanOrEqual(4)
    expect(pool.status().size).toBeLessThanOrEqual(4)
    await pool.close()
  })
})

describe('model caches shared by name across worker_threads', () => {
  it('workers load one copy of the weights; the main thread sees it', async () => {
    const options = { name: 'shared-forecast', device: 'cpu', cleanupIntervalMs: 0 }
    const cache = ModelCache.shared(options)
    const run = () =>
      inWorker<number[]>(
        `const cache = addon.ModelCache.shared(data.options)
         const model = await cache.load('mlp', data.file)
         const y = model.predictSync(new Float32Array(8).fill(0.5))
         model.release()
         done(Array.from(y))`,
        { options, file: SAMPLE },
      )
    const first = await run()
    const outputs = [first, ...(await Promise.all([run(), run()]))]
    expect(outputs[1]).toEqual(outputs[0])
    expect(outputs[2]).toEqual(outputs[0])
    const stats = cache.stats()
    expect(stats.models).toBe(1)
    expect(stats.misses).toBe(1) // loaded once…
    expect(stats.hits).toBe(2) // …and found resident by the other two workers
    const model = cache.get('mlp')!
    expect(Array.from(model.predictSync(new Float32Array(8).fill(0.5)))).toEqual(outputs[0])
    expect(await codeOf(() => ModelCache.shared({ ...options, maxModels: 5 }))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(() => ModelCache.shared({ device: 'cpu' }))).toBe('INVALID_ARGUMENT')
    cache.clear()
  })
})
