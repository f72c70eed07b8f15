import { ConnectionPool } from 'quartermaster'

const pool = new ConnectionPool({
  url: process.env.DATABASE_URL ?? 'sqlite:./trading.db', // or postgres://…, redis://…
  maxSize: 20,
  acquireTimeoutMs: 5000,
  name: 'orders',
})

async function main(): Promise<void> {
  await pool.execute('create table if not exists fills(id integer primary key, sym text, qty integer)')
  await pool.transaction(async (tx) => {
    await tx.execute('insert into fills(sym, qty) values ($1, $2)', ['BTC', 3])
  })
  {
    await using conn = await pool.acquire() // returned at the end of the block, even on throw
    const { rows } = await conn.query('select sym, sum(qty) as qty from fills group by sym')
    console.log(rows, pool.metrics().acquire.p99)
  }
  await pool.close()
}

main()
