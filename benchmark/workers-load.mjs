// One worker of benchmark/streams.ts: `queries` statements, `inFlight` at a time, through the
// client under test — quartermaster's pool shared by every worker, or a pool of its own.
import { createRequire } from 'node:module'
import { workerData } from 'node:worker_threads'

const require = createRequire(import.meta.url)
const { client, url, queries, inFlight, totalPool, workers } = workerData

async function open() {
  if (client === 'quartermaster') {
    const { ConnectionPool } = require('../index.js')
    const pool = ConnectionPool.shared({ url, maxSize: totalPool, name: 'bench-workers' })
    return { query: (i) => pool.query('select $1::int as i', [i]), close: () => pool.close() }
  }
  const own = Math.max(1, Math.floor(totalPool / workers))
  if (client === 'pg') {
    const pg = require('pg')
    const pool = new pg.Pool({ connectionString: url, max: own })
    return { query: (i) => pool.query('select $1::int as i', [i]), close: () => pool.end() }
  }
  const postgres = require('postgres')
  const sql = postgres(url, { max: own, onnotice: () => {} })
  return { query: (i) => sql`select ${i}::int as i`, close: () => sql.end() }
}

const c = await open()
let next = 0
await Promise.all(
  Array.from({ length: inFlight }, async () => {
    while (next < queries) await c.query(next++)
  }),
)
await c.close()
