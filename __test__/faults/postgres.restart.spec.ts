// PostgreSQL stopped and started under load, on a throwaway server of this suite: no crash,
// no error once the server accepts again (beyond statements in flight at the stop), the first
// success within 100 ms of it accepting, and no CPU spin while it is down.
import { ConnectionPool } from '../../index'
import { pgQuery, startPgCluster, type PgCluster } from '../support/pg-cluster'
import {
  cpuShare, errorsByKind, firstSuccessAfter, maxSettle, now, report, size, sleep, startLoad, untyped, withAppName, type Outcome,
} from '../support/faults'

const ACQUIRE_MS = 1000
const MAX_SIZE = 8

describe('fault: PostgreSQL stopped and started under load', () => {
  let cluster: PgCluster
  beforeAll(async () => {
    cluster = await startPgCluster({ standbys: 1 })
  }, 90_000)
  afterAll(async () => cluster && (await cluster.stop()))

  /** Stops the server, keeps it down for `downMs`, starts it; returns when it accepts and the CPU share while down. */
  async function outage(downMs: number): Promise<{ stopAt: number; acceptAt: number; cpu: number }> {
    const stopAt = now()
    await cluster.stopPrimary('fast')
    // Garbage from before is not the pool's: collect it before measuring.
    ;(globalThis as any).gc?.()
    const downAt = now()
    const cpu0 = process.cpuUsage()
    await sleep(downMs)
    const cpu = cpuShare(cpu0, process.cpuUsage(), now() - downAt)
    // "Accepts" = a fresh client runs a statement; probed every 5 ms while it starts.
    let acceptAt = 0
    const starting = cluster.startPrimary()
    while (!acceptAt) {
      const t = now()
      if (await pgQuery(cluster.primary.port, 'select 1').then(() => true, () => false)) acceptAt = t
      else await sleep(5)
    }
    await starting
    return { stopAt, acceptAt, cpu }
  }

  it('serves again within 100 ms of the server accepting, with no error after and no spin while down', async () => {
    const app = `qm_faults_restart_${process.pid}`
    const pool = new ConnectionPool({ url: withAppName(cluster.primary.url, app), maxSize: MAX_SIZE, acquireTimeoutMs: ACQUIRE_MS, name: 'faults-restart' })
    try {
      const load = startLoad((n) => pool.query('select $1::int as n', [n]), 32)
      await sleep(size(2000, 500))
      // Several outages: how soon the pool reconnects depends on where its backoff stands.
      const outages: Array<Awaited<ReturnType<typeof outage>>> = []
      for (let i = 0; i < size(3, 2); i++) {
        outages.push(await outage(size(3000, 1500)))
        await sleep(size(1500, 500))
      }
      const outcomes = await load.stop()

      const between = (o: Outcome, i: number) => o.end >= outages[i].stopAt && (i + 1 === outages.length || o.end < outages[i + 1].stopAt)
      const perOutage = outages.map((w, i) => {
        const mine = outcomes.filter((o) => between(o, i))
        return {
          inFlight: mine.filter((o) => !o.ok && o.start < w.stopAt).length,
          afterAccept: mine.filter((o) => !o.ok && o.end > w.acceptAt + 100),
          firstSuccessMs: firstSuccessAfter(mine, w.acceptAt),
        }
      })
      const afterAccept = perOutage.flatMap((p) => p.afterAccept)
      const firsts = perOutage.map((p) => p.firstSuccessMs ?? Infinity)
      const cpus = outages.map((w) => w.cpu)
      report({
        scenario: `PostgreSQL stopped (fast) and started under load, ${outages.length} outages`,
        backend: 'postgres',
        calls: outcomes.length,
        errors: errorsByKind(outcomes),
        firstSuccessMs: Math.max(...firsts),
        maxSettleMs: maxSettle(outcomes),
        deadlineMs: ACQUIRE_MS,
        bound: 'acquireTimeoutMs',
        notes: `down ${size(3, 1.5)} s each; first success per outage ${firsts.map((f) => Math.round(f)).join(' / ')} ms; ` +
          `process CPU while down ≤ ${(Math.max(...cpus) * 100).toFixed(1)} % of a core; ` +
          `errors in flight at the stop ${perOutage.reduce((n, p) => n + p.inFlight, 0)}, ending > 100 ms after it accepts ${afterAccept.length}`,
      })

      expect(untyped(outcomes)).toEqual([])
      expect(afterAccept.map((o) => `${o.kind}: ${o.message}`)).toEqual([])
      expect(Math.max(...cpus)).toBeLessThan(0.05)
      // Serving normally again, at or under maxSize on the server.
      expect((await pool.query('select 1 as one')).rows).toEqual([{ one: 1 }])
      const backends = await pgQuery(cluster.primary.port, `select count(*)::int as n from pg_stat_activity where application_name = '${app}'`)
      expect(backends[0].n).toBeLessThanOrEqual(MAX_SIZE)
      // Last: the bound the connect backoff (25 ms doubling to 1 s) misses after longer outages.
      expect(Math.max(...firsts)).toBeLessThanOrEqual(100)
    } finally {
      await pool.close({ timeoutMs: 1000 })
    }
  })
})
