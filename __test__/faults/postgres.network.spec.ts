// Network faults between the pool and PostgreSQL, from the fault proxy: idle connections
// reset, existing flows silenced while new ones pass (a NAT that forgot them), everything
// silenced. Every call settles within acquireTimeoutMs + 50 ms, succeeding or with a typed
// error, and the pool serves again as soon as traffic flows.
import { ConnectionPool, type PoolOptions } from '../../index'
import { databaseUrl, describeWithPostgres, eventually } from '../support/env'
import { startFaultProxy, type FaultProxy } from '../support/fault-proxy'
import {
  errorsByKind, firstSuccessAfter, hostPort, maxSettle, now, report, size, sleep, startLoad, timed, untyped, withAppName, type Outcome,
} from '../support/faults'

const ACQUIRE_MS = 1000
const MAX_SIZE = 8
const SLACK_MS = 50

const late = (outcomes: Outcome[], boundMs: number) =>
  outcomes.filter((o) => o.end - o.start > boundMs + SLACK_MS).map((o) => `${Math.round(o.end - o.start)} ms: ${o.kind ?? 'ok'} ${o.message ?? ''}`)

describeWithPostgres('fault: network faults between the pool and PostgreSQL', () => {
  let proxy: FaultProxy
  let admin: ConnectionPool
  const pools: ConnectionPool[] = []
  const app = (tag: string) => `qm_faults_net_${tag}_${process.pid}`
  const open = (tag: string, options: Partial<PoolOptions> = {}) => {
    const pool = new ConnectionPool({
      url: withAppName(proxy.url(databaseUrl!), app(tag)), maxSize: MAX_SIZE, minIdle: MAX_SIZE,
      acquireTimeoutMs: ACQUIRE_MS, connectTimeoutMs: ACQUIRE_MS, name: `faults-net-${tag}`, ...options,
    })
    pools.push(pool)
    return pool
  }
  const warm = async (pool: ConnectionPool) => {
    await Promise.all(Array.from({ length: 4 * MAX_SIZE }, () => pool.query('select 1')))
    await eventually(() => pool.status(), (s) => s.size === MAX_SIZE && s.idle === MAX_SIZE)
  }
  const backends = async (tag: string) =>
    (await admin.query('select count(*)::int as n from pg_stat_activity where application_name = $1', [app(tag)])).rows[0].n as number

  beforeAll(async () => {
    proxy = await startFaultProxy(hostPort(databaseUrl!))
    admin = new ConnectionPool({ url: databaseUrl!, maxSize: 1, name: 'faults-net-admin' })
  })
  afterEach(async () => {
    proxy.set('pass')
    await Promise.all(pools.splice(0).map((p) => p.close({ timeoutMs: 500 })))
  })
  afterAll(async () => {
    await admin?.close()
    await proxy?.close()
  })

  it('idle connections reset by a middlebox: every next call succeeds on a fresh connection', async () => {
    const pool = open('reset')
    await warm(pool)
    const resetAt = now()
    proxy.resetAll()
    const load = startLoad((n) => pool.query('select $1::int as n', [n], { timeoutMs: ACQUIRE_MS }), 32)
    await sleep(size(1000, 300))
    const outcomes = await load.stop()
    report({
      scenario: 'idle connections reset by the proxy, then load',
      backend: 'postgres',
      calls: outcomes.length,
      errors: errorsByKind(outcomes),
      firstSuccessMs: firstSuccessAfter(outcomes, resetAt),
      maxSettleMs: maxSettle(outcomes),
      deadlineMs: ACQUIRE_MS + SLACK_MS,
      bound: 'timeoutMs = acquireTimeoutMs',
      notes: `${MAX_SIZE} idle connections reset; ${pool.metrics().destroyed} closed by the pool`,
    })
    expect(outcomes.filter((o) => !o.ok).map((o) => `${o.kind}: ${o.message}`)).toEqual([])
    expect(late(outcomes, ACQUIRE_MS)).toEqual([])
    expect(await backends('reset')).toBeLessThanOrEqual(MAX_SIZE)
  })

  it('idle connections silently dropped by a NAT (new flows pass): calls succeed on fresh connections in time', async () => {
    // The default ratio: connectTimeoutMs = acquireTimeoutMs.
    const pool = open('natidle')
    await warm(pool)
    // Idle past the validation grace (500 ms), so checkout pings before handing a connection out.
    await sleep(800)
    const faultAt = now()
    proxy.blackholeExisting()
    const outcomes = await Promise.all(Array.from({ length: 20 }, (_, n) => timed(() => pool.query('select $1::int as n', [n], { timeoutMs: ACQUIRE_MS }))))
    const next = await Promise.all(Array.from({ length: 20 }, (_, n) => timed(() => pool.query('select $1::int as n', [n], { timeoutMs: ACQUIRE_MS }))))
    report({
      scenario: 'idle connections silently dropped (NAT), new flows pass: 20 calls, then 20 more',
      backend: 'postgres',
      calls: outcomes.length + next.length,
      errors: errorsByKind([...outcomes, ...next]),
      firstSuccessMs: firstSuccessAfter([...outcomes, ...next], faultAt),
      maxSettleMs: maxSettle([...outcomes, ...next]),
      deadlineMs: ACQUIRE_MS + SLACK_MS,
      bound: 'timeoutMs = acquireTimeoutMs',
      notes: `first 20: ${outcomes.filter((o) => o.ok).length} succeeded; next 20: ${next.filter((o) => o.ok).length} succeeded`,
    })
    expect(untyped([...outcomes, ...next])).toEqual([])
    expect(late([...outcomes, ...next], ACQUIRE_MS)).toEqual([])
    // Recovered once the silent ones are gone…
    expect(next.filter((o) => !o.ok).map((o) => `${o.kind}: ${o.message}`)).toEqual([])
    // …and a dead idle connection is replaced on checkout, never costing the caller its deadline.
    expect(outcomes.filter((o) => !o.ok).map((o) => `${o.kind}: ${o.message}`)).toEqual([])
  })

  it('existing flows blackholed while new ones pass: bounded calls settle in time, then it serves', async () => {
    const pool = open('nat')
    await warm(pool)
    const load = startLoad((n) => pool.query('select $1::int as n', [n], { timeoutMs: ACQUIRE_MS }), 32)
    await sleep(size(500, 200))
    const faultAt = now()
    proxy.blackholeExisting()
    await sleep(ACQUIRE_MS + size(2000, 1000))
    const outcomes = await load.stop()
    const recovered = faultAt + ACQUIRE_MS + SLACK_MS
    const afterRecovery = outcomes.filter((o) => !o.ok && o.start >= recovered)
    report({
      scenario: 'existing flows blackholed, new ones pass, under load',
      backend: 'postgres',
      calls: outcomes.length,
      errors: errorsByKind(outcomes),
      firstSuccessMs: firstSuccessAfter(outcomes, faultAt),
      maxSettleMs: maxSettle(outcomes),
      deadlineMs: ACQUIRE_MS + SLACK_MS,
      bound: 'timeoutMs = acquireTimeoutMs',
      notes: `errors in calls issued after the silenced statements' bound ${afterRecovery.length}`,
    })
    expect(untyped(outcomes)).toEqual([])
    expect(late(outcomes, ACQUIRE_MS)).toEqual([])
    expect(afterRecovery.map((o) => `${o.kind}: ${o.message}`)).toEqual([])
  })

  it('everything blackholed: every call settles in time with a typed error; traffic flows, it serves', async () => {
    const pool = open('blackhole')
    await warm(pool)
    const load = startLoad((n) => pool.query('select $1::int as n', [n], { timeoutMs: ACQUIRE_MS }), 32)
    await sleep(size(500, 200))
    const faultAt = now()
    proxy.set('blackholeAll')
    await sleep(size(3000, 2000))
    const flowingAt = now()
    proxy.set('pass')
    await sleep(ACQUIRE_MS + size(2000, 1000))
    const outcomes = await load.stop()
    const during = outcomes.filter((o) => o.start >= faultAt + SLACK_MS && o.end <= flowingAt)
    const afterFlowing = outcomes.filter((o) => !o.ok && o.start >= flowingAt + 100)
    const firstSuccessMs = firstSuccessAfter(outcomes, flowingAt)
    report({
      scenario: 'everything blackholed for a while, under load',
      backend: 'postgres',
      calls: outcomes.length,
      errors: errorsByKind(outcomes),
      firstSuccessMs,
      maxSettleMs: maxSettle(outcomes),
      deadlineMs: ACQUIRE_MS + SLACK_MS,
      bound: 'timeoutMs = acquireTimeoutMs',
      notes: `silent ${size(3, 2)} s; calls issued ≥ 100 ms after traffic flows that failed ${afterFlowing.length}`,
    })
    expect(untyped(outcomes)).toEqual([])
    expect(late(outcomes, ACQUIRE_MS)).toEqual([])
    // Nothing issued into the silence succeeds: the typed errors are real.
    expect(during.filter((o) => o.ok)).toEqual([])
    expect(firstSuccessMs).not.toBeNull()
    // Usually 30–50 ms; bounded by one connect timeout, since an attempt that started in the
    // silence may hold recovery for up to connectTimeoutMs (seen once in four short runs).
    expect(firstSuccessMs!).toBeLessThanOrEqual(ACQUIRE_MS + 100)
    expect(afterFlowing.map((o) => `${o.kind}: ${o.message}`)).toEqual([])
    expect(await backends('blackhole')).toBeLessThanOrEqual(MAX_SIZE)
  })

  it('existing flows blackholed, statements bounded by statementTimeoutMs only: each still settles', async () => {
    const STATEMENT_MS = 500
    const pool = open('stmt', { statementTimeoutMs: STATEMENT_MS })
    await warm(pool)
    const faultAt = now()
    proxy.blackholeExisting()
    // One statement per silenced connection, nothing else in the way.
    const calls = Array.from({ length: MAX_SIZE }, (_, n) => timed(() => pool.query('select $1::int as n', [n])))
    const bound = ACQUIRE_MS + STATEMENT_MS
    const settled = await Promise.race([Promise.all(calls), sleep(bound + 2000).then(() => null)])
    // Unstick whatever is left so the pool can close.
    proxy.resetAll()
    const outcomes = settled ?? (await Promise.all(calls))
    const unsettledInTime = settled === null
    report({
      scenario: 'existing flows blackholed, idle pool, statementTimeoutMs only',
      backend: 'postgres',
      calls: outcomes.length,
      errors: errorsByKind(outcomes),
      firstSuccessMs: firstSuccessAfter(outcomes, faultAt),
      maxSettleMs: maxSettle(outcomes),
      deadlineMs: bound + SLACK_MS,
      bound: `statementTimeoutMs ${STATEMENT_MS} (+ acquireTimeoutMs)`,
      notes: unsettledInTime ? `calls still pending ${bound + 2000} ms later, settled only by resetting the flows` : '',
    })
    expect(unsettledInTime).toBe(false)
    expect(untyped(outcomes)).toEqual([])
    expect(late(outcomes, bound)).toEqual([])
  })
})
