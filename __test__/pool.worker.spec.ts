import path from 'node:path'
import { Worker } from 'node:worker_threads'

import { ConnectionPool } from '../index'
import { databaseUrl } from './support/env'

// A worker terminated while its queries are in flight must not take the process down
// (owned futures; completions for a dead environment are dropped).
const workerSource = `
const { parentPort, workerData } = require('node:worker_threads')
const { ConnectionPool } = require(workerData.addon)
const pool = new ConnectionPool({ url: workerData.url, maxSize: 4 })
for (let i = 0; i < 2000; i++) pool.query(workerData.sql).catch(() => {})
pool.acquire().then((c) => c.query(workerData.sql)).catch(() => {})
parentPort.postMessage('busy')
`

async function mainThreadStillServes(): Promise<void> {
  const pool = new ConnectionPool({ url: 'sqlite::memory:' })
  expect((await pool.query('select 1 as x')).rows).toEqual([{ x: 1 }])
  await pool.close()
}

async function terminateMidFlight(url: string, sql: string): Promise<void> {
  const worker = new Worker(workerSource, { eval: true, workerData: { addon: path.join(__dirname, '..', 'index.js'), url, sql } })
  await new Promise((resolve, reject) => {
    worker.once('message', resolve)
    worker.once('error', reject)
  })
  await new Promise((r) => setTimeout(r, 5))
  await worker.terminate()
}

describe('worker threads', () => {
  it('survives workers terminated mid-query (SQLite)', async () => {
    for (let i = 0; i < 10; i++) await terminateMidFlight('sqlite::memory:', 'select 1')
    await mainThreadStillServes()
  })

  const pgIt = databaseUrl ? it : it.skip
  pgIt('survives workers terminated mid-query (PostgreSQL)', async () => {
    for (let i = 0; i < 10; i++) await terminateMidFlight(databaseUrl!, 'select pg_sleep(0.001)')
    await mainThreadStillServes()
  })
})
