import { ConnectionPool, type PoolOptions } from '../../index'

// Which servers this run has. A suite that needs a missing one skips loudly (never under CI:
// global-setup fails the run there instead).
export const databaseUrl = process.env.DATABASE_URL
export const redisUrl = process.env.REDIS_URL

function skipNotice(what: string, why: string | undefined): void {
  const line = `\n*** SKIPPED: ${what} suites — ${why ?? 'not configured'} ***\n`
  process.stderr.write(line)
}

export const describeWithPostgres: jest.Describe = databaseUrl
  ? describe
  : (((name: string, fn: () => void) => {
      skipNotice(`PostgreSQL (${name})`, process.env.QM_POSTGRES_UNAVAILABLE ?? 'DATABASE_URL unset')
      describe.skip(name, fn)
    }) as unknown as jest.Describe)

export const describeWithRedis: jest.Describe = redisUrl
  ? describe
  : (((name: string, fn: () => void) => {
      skipNotice(`Redis (${name})`, process.env.QM_REDIS_UNAVAILABLE ?? 'REDIS_URL unset')
      describe.skip(name, fn)
    }) as unknown as jest.Describe)

/** Collects garbage until finalizers have run (`node --expose-gc`). */
export async function collectGarbage(): Promise<void> {
  const gc = (globalThis as any).gc as (() => void) | undefined
  if (!gc) throw new Error('run jest with node --expose-gc (npm test does)')
  for (let i = 0; i < 3; i++) {
    gc()
    await new Promise((resolve) => setImmediate(resolve))
  }
}

export async function eventually<T>(probe: () => Promise<T> | T, ok: (v: T) => boolean, timeoutMs = 5000): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const v = await probe()
    if (ok(v) || Date.now() > deadline) return v
    await new Promise((r) => setTimeout(r, 20))
  }
}

/** Opens pools for a suite and closes every one after each test, pass or fail. */
export function trackedPools(): (options: PoolOptions) => ConnectionPool {
  const opened: ConnectionPool[] = []
  afterEach(async () => {
    await Promise.all(opened.splice(0).map((p) => p.close({ timeoutMs: 1000 })))
  })
  return (options) => {
    const pool = new ConnectionPool(options)
    opened.push(pool)
    return pool
  }
}
