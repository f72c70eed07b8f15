// Redis stopped and started under load, and its connections reset by the proxy: the same
// guarantees as PostgreSQL, and a command cut off by a lost connection is CONNECTION_LOST with
// sent: true (it may have run), never QUERY_FAILED.
import { existsSync, mkdirSync } from 'node:fs'
import net from 'node:net'
import { ConnectionPool } from '../../index'
import { startFaultProxy, type FaultProxy } from '../support/fault-proxy'
import { removeDir, spawnServer, tempDir, until, type Server } from '../support/processes'
import { freePort } from '../support/servers'
import {
  cpuShare, errorsByKind, firstSuccessAfter, maxSettle, now, report, size, sleep, startLoad, timed, untyped, type Outcome,
} from '../support/faults'

const REDIS_SERVER = ['/usr/bin/redis-server', '/usr/local/bin/redis-server'].find(existsSync) ?? 'redis-server'
const ACQUIRE_MS = 1000
const MAX_SIZE = 8

/** One PING on a fresh socket: true on +PONG. */
function ping(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1')
    const done = (ok: boolean) => {
      sock.destroy()
      resolve(ok)
    }
    sock.setTimeout(500, () => done(false))
    sock.once('error', () => done(false))
    sock.once('connect', () => sock.write('PING\r\n'))
    sock.once('data', (d) => done(d.toString().startsWith('+PONG')))
  })
}

/** A redis-server this suite can stop and start again on the same port. */
async function throwawayRedis() {
  const port = await freePort()
  const dir = tempDir('qm-faults-redis-')
  mkdirSync(dir, { recursive: true })
  let server: Server | undefined
  const start = async () => {
    server = spawnServer(REDIS_SERVER, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir], { cwd: dir })
    await until(`redis-server on ${port}`, 10_000, async () => (await ping(port)) || undefined)
  }
  await start()
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    start,
    stop: async (signal: NodeJS.Signals) => {
      await server?.stop(signal, 5000)
      server = undefined
    },
    remove: async () => {
      await server?.stop('SIGKILL')
      removeDir(dir)
    },
  }
}

const isCutOff = (o: Outcome) => o.kind === 'CONNECTION_LOST/sent'

describe('fault: Redis stopped and started, connections reset', () => {
  let redis: Awaited<ReturnType<typeof throwawayRedis>>
  let proxy: FaultProxy
  beforeAll(async () => {
    redis = await throwawayRedis()
    proxy = await startFaultProxy({ host: '127.0.0.1', port: redis.port })
  })
  afterAll(async () => {
    await proxy?.close()
    await redis?.remove()
  })

  it('stopped and started under load: serves within 100 ms of it accepting, no error after, no spin while down', async () => {
    const pool = new ConnectionPool({ url: redis.url, maxSize: MAX_SIZE, acquireTimeoutMs: ACQUIRE_MS, name: 'faults-redis-restart' })
    try {
      const load = startLoad((n) => pool.command('INCR', `qm:faults:${n % 64}`), 32)
      await sleep(size(2000, 500))
      const stopAt = now()
      await redis.stop('SIGTERM')
      ;(globalThis as any).gc?.()
      const downAt = now()
      const cpu0 = process.cpuUsage()
      await sleep(size(3000, 1500))
      const cpuDown = cpuShare(cpu0, process.cpuUsage(), now() - downAt)
      let acceptAt = 0
      const starting = redis.start()
      while (!acceptAt) {
        const t = now()
        if (await ping(redis.port)) acceptAt = t
        else await sleep(5)
      }
      await starting
      await sleep(size(2000, 500))
      const outcomes = await load.stop()

      const afterAccept = outcomes.filter((o) => !o.ok && o.end > acceptAt + 100)
      const firstSuccessMs = firstSuccessAfter(outcomes, acceptAt)
      report({
        scenario: 'Redis stopped (SIGTERM) and started under load',
        backend: 'redis',
        calls: outcomes.length,
        errors: errorsByKind(outcomes),
        firstSuccessMs,
        maxSettleMs: maxSettle(outcomes),
        deadlineMs: ACQUIRE_MS,
        bound: 'acquireTimeoutMs',
        notes: `down ${size(3, 1.5)} s, process CPU while down ${(cpuDown * 100).toFixed(1)} % of a core; ` +
          `errors in flight at the stop ${outcomes.filter((o) => !o.ok && o.start < stopAt).length}, ending > 100 ms after it accepts ${afterAccept.length}`,
      })
      expect(untyped(outcomes)).toEqual([])
      expect(outcomes.filter((o) => o.code === 'QUERY_FAILED').map((o) => o.message)).toEqual([])
      expect(afterAccept.map((o) => `${o.kind}: ${o.message}`)).toEqual([])
      expect(cpuDown).toBeLessThan(0.05)
      expect(await pool.command('PING')).toBe('PONG')
      expect(firstSuccessMs).not.toBeNull()
      expect(firstSuccessMs!).toBeLessThanOrEqual(100)
    } finally {
      await pool.close({ timeoutMs: 1000 })
    }
  })

  it('every connection reset under load: only commands on the wire fail, as CONNECTION_LOST sent: true', async () => {
    const pool = new ConnectionPool({ url: proxy.url(redis.url), maxSize: MAX_SIZE, acquireTimeoutMs: ACQUIRE_MS, name: 'faults-redis-reset' })
    try {
      const load = startLoad((n) => pool.command('INCR', `qm:faults:${n % 64}`), 64)
      await sleep(size(1000, 300))
      const resets: number[] = []
      for (let round = 0; round < size(10, 4); round++) {
        resets.push(now())
        proxy.resetAll()
        await sleep(size(500, 300))
      }
      const outcomes = await load.stop()
      const failures = outcomes.filter((o) => !o.ok)
      const firsts = resets.map((t) => firstSuccessAfter(outcomes, t) ?? Infinity)
      report({
        scenario: `Redis: every connection reset by the proxy under load, ${resets.length} rounds`,
        backend: 'redis',
        calls: outcomes.length,
        errors: errorsByKind(outcomes),
        firstSuccessMs: Math.max(...firsts),
        maxSettleMs: maxSettle(outcomes),
        deadlineMs: null,
        bound: 'none',
        notes: `cut off (CONNECTION_LOST sent) ${failures.filter(isCutOff).length}, any other error ${failures.filter((o) => !isCutOff(o)).length}`,
      })
      expect(failures.filter((o) => !isCutOff(o)).map((o) => `${o.kind}: ${o.message}`)).toEqual([])
      expect(Math.max(...firsts)).toBeLessThanOrEqual(100)
    } finally {
      await pool.close({ timeoutMs: 1000 })
    }
  })

  it('a command cut off by a lost connection is CONNECTION_LOST with sent: true, never QUERY_FAILED', async () => {
    const pool = new ConnectionPool({ url: proxy.url(redis.url), maxSize: 4, acquireTimeoutMs: ACQUIRE_MS, name: 'faults-redis-cut' })
    try {
      // BLPOP waits on the server: surely on the wire when the connection goes.
      const byReset = timed(() => pool.command('BLPOP', 'qm:faults:never', '5'))
      await sleep(200)
      proxy.resetAll()
      const byKill = pool.command('BLPOP', 'qm:faults:never', '5')
      const killed = timed(() => byKill)
      await sleep(200)
      await redis.stop('SIGKILL')
      const outcomes = [await byReset, await killed]
      await redis.start()
      report({
        scenario: 'Redis: BLPOP cut off by a reset, and by the server killed',
        backend: 'redis',
        calls: outcomes.length,
        errors: errorsByKind(outcomes),
        firstSuccessMs: null,
        maxSettleMs: maxSettle(outcomes),
        deadlineMs: null,
        bound: 'none',
        notes: outcomes.map((o) => o.kind ?? 'ok').join(' / '),
      })
      expect(outcomes.map((o) => o.kind)).toEqual(['CONNECTION_LOST/sent', 'CONNECTION_LOST/sent'])
      expect(await pool.command('PING')).toBe('PONG')
    } finally {
      await pool.close({ timeoutMs: 1000 })
    }
  })
})
