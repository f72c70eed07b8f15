// Overload: every connection held, then 10 000 acquire timeouts in a row (HikariCP's
// TestSaturatedPool830). Afterwards pg_stat_activity shows no zombie: exactly the pool's own
// connections, at or under maxSize, and the pool serves at once when the leases come back.
import { ConnectionPool } from '../../index'
import { databaseUrl, describeWithPostgres, eventually } from '../support/env'
import { errorsByKind, firstSuccessAfter, maxSettle, now, report, timed, withAppName, type Outcome } from '../support/faults'

const MAX_SIZE = 4
const ACQUIRE_MS = 2
const TIMEOUTS = 10_000

describeWithPostgres('fault: overload, 10 000 acquire timeouts in a row', () => {
  it('leaves no zombie connection on the server and serves at once afterwards', async () => {
    const app = `qm_faults_overload_${process.pid}`
    const admin = new ConnectionPool({ url: databaseUrl!, maxSize: 1, name: 'faults-overload-admin' })
    const pool = new ConnectionPool({ url: withAppName(databaseUrl!, app), maxSize: MAX_SIZE, minIdle: MAX_SIZE, acquireTimeoutMs: ACQUIRE_MS, name: 'faults-overload' })
    const backends = async () =>
      (await admin.query('select count(*)::int as n from pg_stat_activity where application_name = $1', [app])).rows[0].n as number
    try {
      // Hold every connection: minIdle warms them (a 2 ms deadline is too short to connect).
      await eventually(() => pool.status(), (s) => s.idle === MAX_SIZE)
      const held = Array.from({ length: MAX_SIZE }, () => pool.tryAcquire()!)
      expect(pool.status()).toMatchObject({ size: MAX_SIZE, inUse: MAX_SIZE })
      // Bursts of 100 queued callers, half acquire() and half query(), until 10 000 timed out.
      const outcomes: Outcome[] = []
      while (outcomes.length < TIMEOUTS) {
        outcomes.push(...(await Promise.all(Array.from({ length: 100 }, (_, i) =>
          timed(() => (i % 2 ? pool.query('select 1') : pool.acquire().then((c) => c.release())))))))
      }
      const duringOverload = await backends()
      const status = pool.status()
      const releasedAt = now()
      for (const lease of held) lease.release()
      // One caller at a time: each finds a free connection at once, even with a 2 ms deadline.
      const after: Outcome[] = []
      for (let n = 0; n < 100; n++) after.push(await timed(() => pool.query('select $1::int as n', [n])))
      const afterBackends = await backends()
      report({
        scenario: `overload: ${TIMEOUTS} acquire timeouts in a row (acquireTimeoutMs ${ACQUIRE_MS}, all ${MAX_SIZE} connections held)`,
        backend: 'postgres',
        calls: outcomes.length + after.length,
        errors: errorsByKind([...outcomes, ...after]),
        firstSuccessMs: firstSuccessAfter(after, releasedAt),
        maxSettleMs: maxSettle(outcomes),
        deadlineMs: null,
        bound: 'acquireTimeoutMs',
        notes: `backends on the server during ${duringOverload}, after ${afterBackends} (maxSize ${MAX_SIZE}); pool size ${status.size}, waiting ${status.waiting}; metrics timeouts ${pool.metrics().timeouts}`,
      })
      expect(errorsByKind(outcomes)).toEqual({ 'POOL_TIMEOUT/wait': outcomes.length })
      expect(status).toMatchObject({ size: MAX_SIZE, inUse: MAX_SIZE })
      expect(duringOverload).toBe(MAX_SIZE)
      expect(after.filter((o) => !o.ok).map((o) => `${o.kind}: ${o.message}`)).toEqual([])
      expect(afterBackends).toBeLessThanOrEqual(MAX_SIZE)
      expect(afterBackends).toBe(pool.status().size)
      expect(pool.status().waiting).toBe(0)
      await pool.close({ timeoutMs: 1000 })
      // Closed: nothing of it is left on the server.
      expect(await eventually(backends, (n) => n === 0, 2000)).toBe(0)
    } finally {
      await pool.close({ timeoutMs: 1000 })
      await admin.close()
    }
  })
})
