// Child of shutdown.spec.ts: queues 1000 statements, closes the pool under them, tallies how
// each settled, checks the server for leftover backends, prints one JSON line, and then must
// exit on its own (nothing here keeps the event loop alive).
const { Client } = require('pg')
const { ConnectionPool } = require('../../index.js')

const url = new URL(process.env.QM_URL)
const app = process.env.QM_APP
const adminUrl = url.toString()
url.searchParams.set('application_name', app)

async function backends() {
  const client = new Client({ connectionString: adminUrl })
  await client.connect()
  try {
    const deadline = Date.now() + 1000
    for (;;) {
      const { rows } = await client.query('select count(*)::int as n from pg_stat_activity where application_name = $1', [app])
      if (rows[0].n === 0 || Date.now() > deadline) return rows[0].n
      await new Promise((r) => setTimeout(r, 10))
    }
  } finally {
    await client.end()
  }
}

async function main() {
  const pool = new ConnectionPool({ url: url.toString(), maxSize: 4, acquireTimeoutMs: 10_000, name: 'faults-shutdown' })
  await Promise.all(Array.from({ length: 8 }, () => pool.query('select 1')))
  const before = await backends().catch(() => -1)
  const tally = { served: 0, closed: 0, other: {} }
  const calls = Array.from({ length: Number(process.env.QM_STATEMENTS) }, (_, n) =>
    pool.query('select pg_sleep(0.002), $1::int as n', [n]).then(
      () => tally.served++,
      (e) => {
        if (e.code === 'POOL_CLOSED') tally.closed++
        else {
          const kind = `${e.code}${e.sent === true ? '/sent' : ''}`
          tally.other[kind] = (tally.other[kind] ?? 0) + 1
        }
      },
    ),
  )
  const closingAt = Date.now()
  process.stdout.write(JSON.stringify({ closingAt }) + '\n')
  await pool.close({ timeoutMs: Number(process.env.QM_CLOSE_MS) })
  const closeMs = Date.now() - closingAt
  await Promise.all(calls)
  const settledMs = Date.now() - closingAt
  const left = await backends()
  process.stdout.write(JSON.stringify({ ...tally, before, left, closeMs, settledMs }) + '\n')
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack) + '\n')
  process.exitCode = 2
})
