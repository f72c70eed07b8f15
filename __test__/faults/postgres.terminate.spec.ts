// pg_terminate_backend on every pool connection, again and again, under load: a statement
// not yet sent never fails (it runs on a fresh connection); only statements on the wire when
// their backend died may fail, and then with CONNECTION_LOST, sent: true.
import { ConnectionPool } from '../../index'
import { databaseUrl, describeWithPostgres } from '../support/env'
import { errorsByKind, firstSuccessAfter, maxSettle, now, report, size, sleep, startLoad, withAppName } from '../support/faults'

const MAX_SIZE = 8
const ACQUIRE_MS = 2000

describeWithPostgres('fault: pg_terminate_backend on every pool connection under load', () => {
  it('reports only statements on the wire, as CONNECTION_LOST sent: true; every other call succeeds', async () => {
    const app = `qm_faults_terminate_${process.pid}`
    const admin = new ConnectionPool({ url: databaseUrl!, maxSize: 1, name: 'faults-terminate-admin' })
    const pool = new ConnectionPool({ url: withAppName(databaseUrl!, app), maxSize: MAX_SIZE, acquireTimeoutMs: ACQUIRE_MS, name: 'faults-terminate' })
    try {
      const load = startLoad((n) => pool.query('select $1::int as n', [n]), 64)
      await sleep(size(1000, 300))
      const kills: number[] = []
      let killed = 0
      for (let round = 0; round < size(10, 4); round++) {
        kills.push(now())
        const { rows } = await admin.query('select pg_terminate_backend(pid) as ok from pg_stat_activity where application_name = $1', [app])
        killed += rows.length
        await sleep(size(500, 300))
      }
      await sleep(300)
      const outcomes = await load.stop()

      const failures = outcomes.filter((o) => !o.ok)
      const onTheWire = failures.filter((o) => o.kind === 'CONNECTION_LOST/sent')
      const firsts = kills.map((t) => firstSuccessAfter(outcomes, t) ?? Infinity)
      report({
        scenario: `pg_terminate_backend on every pool connection under load, ${kills.length} rounds`,
        backend: 'postgres',
        calls: outcomes.length,
        errors: errorsByKind(outcomes),
        firstSuccessMs: Math.max(...firsts),
        maxSettleMs: maxSettle(outcomes),
        deadlineMs: null,
        bound: 'none',
        notes: `${killed} backends terminated; in flight (CONNECTION_LOST sent) ${onTheWire.length}, any other error ${failures.length - onTheWire.length}`,
      })

      expect(killed).toBeGreaterThanOrEqual(kills.length)
      expect(failures.filter((o) => o.kind !== 'CONNECTION_LOST/sent').map((o) => `${o.kind}: ${o.message}`)).toEqual([])
      const { rows } = await admin.query('select count(*)::int as n from pg_stat_activity where application_name = $1', [app])
      expect(rows[0].n).toBeLessThanOrEqual(MAX_SIZE)
      expect((await pool.query('select 2 as two')).rows).toEqual([{ two: 2 }])
    } finally {
      await pool.close({ timeoutMs: 1000 })
      await admin.close()
    }
  })
})
