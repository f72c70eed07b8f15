// LISTEN/NOTIFY and SUBSCRIBE/PUBLISH on one dedicated connection per pool that survives
// reconnects: every channel listened to again, onListen called so the app can resync.
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { databaseUrl, describeWithPostgres, describeWithRedis, eventually, redisUrl, trackedPools } from './support/env'
import { startPgCluster, type PgCluster } from './support/pg-cluster'
import { freePort } from './support/servers'
import { waitForPort } from './support/processes'

const waitFor = <T>(probe: () => T, ok: (v: T) => boolean, timeoutMs = 5000) => eventually(probe, ok, timeoutMs)

describeWithPostgres('listen / notify on PostgreSQL', () => {
  const open = trackedPools()
  const channel = (tag: string) => `qm_${tag}_${process.pid}`

  it('delivers 10 000 notifications complete and in order', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2 })
    const got: string[] = []
    const listener = await pool.listen(channel('bulk'), (payload) => got.push(payload))
    await pool.query('select pg_notify($1, g::text) from generate_series(1, 10000) g', [channel('bulk')])
    await waitFor(() => got.length, (n) => n === 10_000)
    expect(got).toEqual(Array.from({ length: 10_000 }, (_, i) => String(i + 1)))
    await listener.unlisten()
  })

  it('quotes channel names, sends through notify(), keeps others going when a callback throws', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2 })
    const odd = `we "ird"; drop table x; -- ${process.pid}`
    const seen: string[] = []
    const good = await pool.listen(odd, (payload, ch) => seen.push(`${ch}:${payload}`))
    const bad = await pool.listen(odd, () => {
      throw new Error('callback bug')
    })
    await pool.notify(odd, 'one')
    await pool.notify(odd, 'two')
    await waitFor(() => seen.length, (n) => n === 2)
    expect(seen).toEqual([`${odd}:one`, `${odd}:two`])
    await waitFor(() => bad.errors, (n) => n === 2)
    expect(pool.metrics().listenerErrors).toBe(2)
    await good.unlisten()
    await bad.unlisten()
    await pool.notify(odd, 'after')
    await new Promise((r) => setTimeout(r, 100))
    expect(seen).toHaveLength(2)
  })

  it('listens again after pg_terminate_backend on its connection and calls onListen', async () => {
    const pool = open({ url: databaseUrl!, maxSize: 2 })
    const admin = open({ url: databaseUrl!, maxSize: 1 })
    const got: string[] = []
    let listens = 0
    const listener = await pool.listen(channel('term'), (p) => got.push(p), { onListen: () => listens++ })
    await waitFor(() => listens, (n) => n === 1)
    const killed = await admin.query(
      "select pg_terminate_backend(pid) as ok from pg_stat_activity where query like 'LISTEN%' and query like $1",
      [`%${channel('term')}%`],
    )
    expect(killed.rows.length).toBe(1)
    const started = Date.now()
    await waitFor(() => listens, (n) => n === 2, 2000)
    expect(listens).toBe(2)
    expect(Date.now() - started).toBeLessThan(2000)
    await pool.notify(channel('term'), 'after-reconnect')
    await waitFor(() => got, (g) => g.includes('after-reconnect'))
    expect(got).toEqual(['after-reconnect'])
    await listener.unlisten()
  })

  describe('across a full server restart', () => {
    let cluster: PgCluster
    beforeAll(async () => {
      cluster = await startPgCluster({ standbys: 1, log: () => {} })
    }, 60_000)
    afterAll(async () => {
      await cluster?.stop()
    })

    it('reconnects, calls onListen within 2 s of the server accepting, and receives later notifications', async () => {
      const pool = open({ url: cluster.primary.url, maxSize: 2, acquireTimeoutMs: 10_000 })
      const got: string[] = []
      let listens = 0
      const listener = await pool.listen('restart', (p) => got.push(p), { onListen: () => listens++ })
      await pool.notify('restart', 'before')
      await waitFor(() => got.length, (n) => n === 1)
      await cluster.stopPrimary('fast')
      await new Promise((r) => setTimeout(r, 300))
      await cluster.startPrimary()
      const accepting = Date.now()
      await waitFor(() => listens, (n) => n === 2, 2000)
      expect(Date.now() - accepting).toBeLessThan(2000)
      await pool.notify('restart', 'after')
      await waitFor(() => got.length, (n) => n === 2)
      expect(got).toEqual(['before', 'after'])
      await listener.unlisten()
    }, 30_000)
  })

  it('rejects listening on SQLite and bad channel names with INVALID_ARGUMENT', async () => {
    const sqlite = open({ url: 'sqlite::memory:' })
    await expect(sqlite.listen('x', () => {})).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    const pool = open({ url: databaseUrl!, maxSize: 1 })
    await expect(pool.listen('', () => {})).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    await expect(pool.listen('x'.repeat(64), () => {})).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    await expect(pool.listen('x', 'not a function' as any)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
  })
})

describeWithRedis('subscribe / publish on Redis', () => {
  const open = trackedPools()

  it('delivers in order, and pattern subscriptions', async () => {
    const pool = open({ url: redisUrl!, maxSize: 2 })
    const ch = `qm:listen:${process.pid}`
    const got: string[] = []
    const byPattern: string[] = []
    const exact = await pool.listen(ch, (p) => got.push(p))
    const pattern = await pool.listen(`qm:listen:${process.pid}*`, (p, name) => byPattern.push(`${name}=${p}`), { pattern: true })
    for (let i = 0; i < 1000; i++) await pool.notify(ch, String(i))
    await waitFor(() => got.length, (n) => n === 1000)
    expect(got).toEqual(Array.from({ length: 1000 }, (_, i) => String(i)))
    await waitFor(() => byPattern.length, (n) => n === 1000)
    expect(byPattern[999]).toBe(`${ch}=999`)
    await exact.unlisten()
    await pattern.unlisten()
  })

  it('subscribes again after a redis-server restart and calls onListen', async () => {
    const port = await freePort()
    const dir = mkdtempSync(path.join(os.tmpdir(), 'qm-redis-restart-'))
    const start = async () => {
      const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir], { stdio: 'ignore' })
      await waitForPort(port, 10_000)
      return child
    }
    let server = await start()
    try {
      const pool = open({ url: `redis://127.0.0.1:${port}`, maxSize: 2, acquireTimeoutMs: 10_000 })
      const got: string[] = []
      let listens = 0
      const listener = await pool.listen('restart', (p) => got.push(p), { onListen: () => listens++ })
      await pool.notify('restart', 'before')
      await waitFor(() => got.length, (n) => n === 1)
      server.kill('SIGKILL')
      await new Promise((r) => server.once('exit', r))
      server = await start()
      const accepting = Date.now()
      await waitFor(() => listens, (n) => n === 2, 2000)
      expect(Date.now() - accepting).toBeLessThan(2000)
      await pool.notify('restart', 'after')
      await waitFor(() => got.length, (n) => n === 2)
      expect(got).toEqual(['before', 'after'])
      await listener.unlisten()
    } finally {
      server.kill('SIGKILL')
      rmSync(dir, { recursive: true, force: true })
    }
  })
})

