// The README's quick start, runnable: `npm run example`.
import { mkdtempSync, rmSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { ConnectionPool } from '../index'

async function main(): Promise<void> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'qm-example-'))
  const pool = new ConnectionPool({
    url: process.env.DATABASE_URL ?? `sqlite:${path.join(dir, 'trading.db')}`,
    maxSize: 8,
    name: 'orders',
  })
  try {
    await pool.execute('create table if not exists fills(id integer primary key, sym text, qty integer)')
    await pool.transaction(async (tx) => {
      await tx.execute('insert into fills(sym, qty) values ($1, $2)', ['BTC', 3])
      await tx.execute('insert into fills(sym, qty) values ($1, $2)', ['ETH', 5])
    })
    const { rows } = await pool.query('select sym, qty from fills order by id')
    console.log(rows)
    console.log(pool.metrics())
  } finally {
    await pool.close()
    rmSync(dir, { recursive: true, force: true })
  }
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
