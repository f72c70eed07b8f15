// Redis Cluster (cluster: true) against a real 3-master, 3-replica cluster the suite starts:
// keys routed by slot, MOVED followed after a manual failover, a killed master's replica
// promoted with commands succeeding again within the deadline, pipelines kept in one slot.
import { existsSync } from 'node:fs'
import { trackedPools } from './support/env'
import { startRedisCluster, type RedisCluster } from './support/redis-cluster'

const haveRedis = ['/usr/bin/redis-server', '/usr/local/bin/redis-server'].some(existsSync)
const describeWithCluster: jest.Describe = haveRedis
  ? describe
  : ((((name: string, fn: () => void) => {
      if (process.env.CI === 'true') throw new Error('CI: redis-server is missing for the Redis Cluster suite')
      process.stderr.write(`\n*** SKIPPED: Redis Cluster (${name}) — no redis-server ***\n`)
      describe.skip(name, fn)
    }) as unknown) as jest.Describe)

describeWithCluster('ConnectionPool on a Redis Cluster', () => {
  const open = trackedPools()
  let cluster: RedisCluster
  beforeAll(async () => {
    cluster = await startRedisCluster({ nodeTimeoutMs: 1000, log: () => {} })
  }, 60_000)
  afterAll(async () => {
    await cluster?.stop()
  })

  const masters = () => cluster.nodes.filter((n) => n.role === 'master' && n.running)

  it('routes keys by slot across every master', async () => {
    const pool = open({ url: cluster.url, cluster: true, maxSize: 4 })
    await Promise.all(Array.from({ length: 1000 }, (_, i) => pool.command('SET', `k:${i}`, String(i))))
    const got = await Promise.all(Array.from({ length: 1000 }, (_, i) => pool.command('GET', `k:${i}`)))
    expect(got).toEqual(Array.from({ length: 1000 }, (_, i) => String(i)))
    // Every master holds some of them.
    for (const m of masters()) {
      const keys = Number(await cluster.cli(m.port, 'DBSIZE'))
      expect(keys).toBeGreaterThan(0)
    }
  })

  it('keeps a pipeline in one slot, and refuses one that spans slots', async () => {
    const pool = open({ url: cluster.url, cluster: true, maxSize: 2 })
    const replies = await pool.pipeline([
      ['SET', '{acct:7}.bal', '100'],
      ['INCRBY', '{acct:7}.bal', 5],
      ['GET', '{acct:7}.bal'],
    ])
    expect(replies).toEqual(['OK', 105, '105'])
    await expect(pool.pipeline([['SET', 'a', '1'], ['SET', 'b', '2']])).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    await expect(pool.command('MULTI')).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
  })

  it('follows MOVED after a manual failover', async () => {
    const pool = open({ url: cluster.url, cluster: true, maxSize: 2 })
    await pool.command('SET', 'moved:key', 'v1')
    let failedOver = false
    for (const m of masters()) {
      if (Number(await cluster.cli(m.port, 'EXISTS', 'moved:key')) === 1) {
        await cluster.failover(m.port, 'manual')
        failedOver = true
        break
      }
    }
    expect(failedOver).toBe(true)
    // The pool's slot map still names the old master: it answers MOVED, which is followed.
    expect(await pool.command('GET', 'moved:key')).toBe('v1')
    expect(await pool.command('SET', 'moved:key', 'v2')).toBe('OK')
  }, 30_000)

  it('serves again within the deadline after a master is killed and its replica promoted', async () => {
    const pool = open({ url: cluster.url, cluster: true, maxSize: 4, acquireTimeoutMs: 15_000 })
    await Promise.all(Array.from({ length: 100 }, (_, i) => pool.command('SET', `fo:${i}`, String(i))))
    const victim = masters()[0]
    const killed = cluster.failover(victim.port, 'kill')
    const started = Date.now()
    const errors = new Map<string, number>()
    let firstOkAfterPromotion = 0
    let promoted = false
    killed.then(() => (promoted = true))
    while (Date.now() - started < 12_000) {
      const outcome = await Promise.allSettled(Array.from({ length: 20 }, (_, i) => pool.command('GET', `fo:${i}`)))
      for (const o of outcome) {
        if (o.status === 'rejected') errors.set(o.reason.code, (errors.get(o.reason.code) ?? 0) + 1)
      }
      if (promoted && outcome.every((o) => o.status === 'fulfilled')) {
        firstOkAfterPromotion = Date.now()
        break
      }
    }
    await killed
    process.stderr.write(`redis cluster failover: all reads back ${firstOkAfterPromotion - started} ms after the kill; errors ${JSON.stringify([...errors])}\n`)
    expect(firstOkAfterPromotion).toBeGreaterThan(0)
    const values = await Promise.all(Array.from({ length: 100 }, (_, i) => pool.command('GET', `fo:${i}`)))
    expect(values).toEqual(Array.from({ length: 100 }, (_, i) => String(i)))
    for (const code of errors.keys()) expect(['CONNECTION_LOST', 'QUERY_FAILED']).toContain(code)
  }, 60_000)

  it('rejects listen on a cluster pool and a bad cluster url with INVALID_ARGUMENT', async () => {
    const pool = open({ url: cluster.url, cluster: true, maxSize: 1 })
    await expect(pool.listen('x', () => {})).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    expect(() => open({ url: 'postgres://h1,h2/db', cluster: true })).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }))
  })
})
