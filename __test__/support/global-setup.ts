import { startPostgres, startRedis } from './servers'

// Under CI a server that cannot be found or started fails the run; elsewhere the suites
// that need it skip and say why.
export default async function globalSetup(): Promise<void> {
  const inCi = process.env.CI === 'true'
  // Arms the addon's test-only panic hook (a statement of exactly '-- qm:test-panic').
  process.env.QM_TEST_PANIC = '1'
  const stops: Array<() => Promise<void>> = []
  if (!process.env.DATABASE_URL) {
    try {
      const pg = await startPostgres()
      process.env.DATABASE_URL = pg.url
      process.env.QM_STARTED_POSTGRES = '1'
      stops.push(pg.stop)
    } catch (err) {
      if (inCi) throw new Error(`CI: no DATABASE_URL and embedded PostgreSQL failed to start: ${err}`)
      process.env.QM_POSTGRES_UNAVAILABLE = String(err)
    }
  }
  if (!process.env.REDIS_URL) {
    try {
      const redis = await startRedis()
      process.env.REDIS_URL = redis.url
      stops.push(redis.stop)
    } catch (err) {
      if (inCi) throw new Error(`CI: no REDIS_URL and redis-server failed to start: ${err}`)
      process.env.QM_REDIS_UNAVAILABLE = String(err)
    }
  }
  ;(globalThis as any).__qmStops = stops
}
