import { createReadStream, createWriteStream } from 'node:fs'
import { pipeline } from 'node:stream/promises'
import { ConnectionPool } from 'quartermaster'

const pool = new ConnectionPool({ url: process.env.DATABASE_URL ?? 'postgres://localhost/trading', statementTimeoutMs: 30_000 })

async function main(): Promise<void> {
  // Bounded work: a timed-out or aborted statement is cancelled on the server.
  await pool.query('select * from quotes where sym = $1', ['BTC'], { timeoutMs: 250 }) // QUERY_TIMEOUT past it
  const ac = new AbortController()
  setTimeout(() => ac.abort(new Error('client went away')), 1000)
  await pool.query('select pg_sleep(5)', [], { signal: ac.signal }).catch((e) => console.log(e.code, e.cause)) // ABORT_ERR
  await pool.transaction(async (tx) => {
    await tx.execute('update positions set qty = qty + $1 where id = $2', [3, 7])
  }, { timeoutMs: 2000 }) // the whole transaction; rolled back past it

  // LISTEN/NOTIFY that survives reconnects: onListen runs after each (re)connect.
  const listener = await pool.listen('fills', (payload) => console.log('fill', JSON.parse(payload)), {
    onListen: () => console.log('listening: resync anything missed'),
  })
  await pool.notify('fills', JSON.stringify({ id: 1, qty: 3 }))

  // Cursors: batches fetched only as the loop asks; break releases the connection.
  for await (const batch of pool.cursor('select * from ticks where day = $1', ['2026-12-01'], { batchSize: 5000 })) {
    console.log(batch.length, batch[0])
  }

  // COPY as Node streams with backpressure.
  await pipeline(createReadStream('ticks.csv'), await pool.copyFrom('copy ticks (ts, sym, px) from stdin (format csv)'))
  await pipeline(await pool.copyTo('copy (select * from fills) to stdout (format csv)'), createWriteStream('fills.csv'))

  await listener.unlisten()
  await pool.close()
}

main()
