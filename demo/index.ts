// `npm run demo`: a small trading workload on quartermaster — order flow through one connection
// pool (SQLite in a temp dir by default, PostgreSQL with --database-url / DATABASE_URL), the
// sample models run on every market-data tick through a ModelCache, a live terminal view, and a
// final report with health() and the key figures.
//
//   npm run demo
//   npm run demo -- --duration 30 --concurrency 32
//   npm run demo -- --database-url postgres://postgres@127.0.0.1:5432/test --device cpu
import { mkdtempSync, rmSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { parseArgs } from 'node:util'

import { ConnectionPool, Metrics, ModelCache } from '../index'
import { LiveView, printReport, useColour, type ViewContext } from './view'
import { book, createSchema, dropSchema, loadModels, orderFlow, percentile, Tally, tableNames, tick, type Tables } from './workload'

const USAGE = `usage: npm run demo -- [options]
  --duration SECONDS     how long the order flow runs (default 10)
  --concurrency N        concurrent order-flow workers (default 16)
  --pool-size N          connections in the pool (default 8)
  --database-url URL     postgres://… or sqlite:PATH (default: DATABASE_URL, else SQLite in a temp dir)
  --device DEVICE        auto | cpu | cuda | cuda:N for the models (default auto)
  --plain                plain lines even on a terminal`

interface Options {
  durationS: number
  concurrency: number
  poolSize: number
  databaseUrl?: string
  device: string
  plain: boolean
}

class UsageError extends Error {}

function options(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      duration: { type: 'string', default: '10' },
      concurrency: { type: 'string', default: '16' },
      'pool-size': { type: 'string', default: '8' },
      'database-url': { type: 'string' },
      device: { type: 'string', default: 'auto' },
      plain: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  })
  if (values.help) {
    console.log(USAGE)
    process.exit(0)
  }
  const num = (name: string, raw: string, min: number, max: number) => {
    const n = Number(raw)
    if (!Number.isFinite(n) || n < min || n > max) throw new UsageError(`--${name} must be a number from ${min} to ${max}, got '${raw}'`)
    return n
  }
  return {
    durationS: num('duration', values.duration!, 0.5, 86_400),
    concurrency: Math.floor(num('concurrency', values.concurrency!, 1, 10_000)),
    poolSize: Math.floor(num('pool-size', values['pool-size']!, 1, 10_000)),
    databaseUrl: values['database-url'] ?? (process.env.DATABASE_URL || undefined),
    device: values.device!,
    plain: values.plain!,
  }
}

/** Host and database for the header, without credentials. */
function describe(url: string, backend: string, tmp: string | null): string {
  if (tmp) return 'SQLite (temp file, removed at exit)'
  if (backend === 'sqlite') return `SQLite ${url.slice('sqlite:'.length)}`
  try {
    const u = new URL(url)
    return `PostgreSQL ${u.hostname}:${u.port || 5432}${u.pathname}`
  } catch {
    return backend
  }
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms))

async function main(): Promise<number> {
  let opts: Options
  try {
    opts = options(process.argv.slice(2))
  } catch (err) {
    console.error(`demo: ${(err as Error).message}\n${USAGE}`)
    return 2
  }
  const tty = Boolean(process.stdout.isTTY) && !opts.plain
  useColour(tty)

  const tmp = opts.databaseUrl ? null : mkdtempSync(path.join(os.tmpdir(), 'qm-demo-'))
  const url = opts.databaseUrl ?? `sqlite:${path.join(tmp!, 'trading.db')}`
  let pool: ConnectionPool | null = null
  let cache: ModelCache | null = null
  let tables: Tables | null = null
  let stopRequested = false
  let failed = false
  // First signal: stop the workload, report and clean up. A second one: remove the temp dir
  // and leave at once.
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopRequested) {
      if (tmp) rmSync(tmp, { recursive: true, force: true })
      process.exit(signal === 'SIGINT' ? 130 : 143)
    }
    stopRequested = true
  }
  const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP']
  for (const s of signals) process.on(s, onSignal)

  try {
    pool = new ConnectionPool({ url, maxSize: opts.poolSize, minIdle: Math.min(2, opts.poolSize), acquireTimeoutMs: 5000, name: 'demo-orders' })
    const target = describe(url, pool.backend, tmp)
    if (pool.backend === 'redis') throw new Error('--database-url must be a SQL database (postgres:// or sqlite:), not Redis')
    cache = new ModelCache({ device: opts.device, maxModels: 8, name: 'demo-models' })
    const metrics = Metrics.global()

    console.log(`quartermaster demo: ${target}, pool of ${opts.poolSize}, ${opts.concurrency} order-flow workers, ${opts.durationS} s`)
    tables = tableNames(pool.backend)
    await createSchema(pool, tables)
    const models = await loadModels(cache)
    const why = opts.device === 'auto' && cache.device === 'cpu' ? " ('auto': no usable CUDA GPU here)" : ` (device '${opts.device}')`
    console.log(
      `models: ${models.lstm.id} (${models.lstm.arch} ${models.lstm.sequenceLength}×${models.lstm.inputSize}→${models.lstm.outputSize}), ` +
        `${models.mlp.id} (${models.mlp.arch} ${models.mlp.inputSize}→${models.mlp.outputSize}) on ${cache.device}${why}`,
    )

    const tally = new Tally()
    await tick(pool, tables, models, tally) // warm: connections open, statements prepared
    global.gc?.()
    const rssStart = process.memoryUsage().rss
    const ctx: ViewContext = { pool, cache, metrics, tally, target, durationS: opts.durationS, rssStart }
    const view = new LiveView(ctx, tty)
    await view.start()

    const started = performance.now()
    const deadline = started + opts.durationS * 1000
    const over = () => stopRequested || performance.now() >= deadline
    const viewTimer = setInterval(() => view.update(), tty ? 200 : 250)
    const p = pool
    const t = tables
    const ticker = (async () => {
      while (!over()) {
        try {
          await tick(p, t, models, tally)
        } catch (err) {
          tally.fail(err)
        }
        await sleep(50)
      }
    })()
    await Promise.all([ticker, ...Array.from({ length: opts.concurrency }, () => orderFlow(p, t, tally, over))])
    const elapsedS = (performance.now() - started) / 1000
    clearInterval(viewTimer)
    view.stop()

    global.gc?.()
    const rssEnd = process.memoryUsage().rss
    const sorted = tally.allSorted()
    const operations = tally.total
    const inDb = await book(pool, tables)
    const report = {
      backend: target,
      durationS: elapsedS,
      operations,
      failures: tally.failures,
      successRate: operations + tally.failures === 0 ? 0 : operations / (operations + tally.failures),
      opsPerSec: operations / elapsedS,
      p50: percentile(sorted, 50),
      p99: percentile(sorted, 99),
      p99ByKind: tally.p99ByKind(),
      modelDevice: cache.device,
      predictions: tally.predictions,
      cacheHitRate: cache.stats().hitRate,
      rssStartMb: rssStart / 2 ** 20,
      rssEndMb: rssEnd / 2 ** 20,
      memoryGrowthMb: (rssEnd - rssStart) / 2 ** 20,
      ordersInDb: inDb.orders,
      filledInDb: inDb.filled,
    }
    printReport(report, ctx)
    if (stopRequested) console.log('\nstopped early by a signal')
    if (operations === 0) {
      console.error(`demo failed: no operation succeeded${tally.lastError ? ` (last error: ${tally.lastError})` : ''}`)
      return 1
    }
    if (report.successRate < 0.95) {
      console.error(`demo failed: success rate ${(report.successRate * 100).toFixed(2)} % is below 95 % (last error: ${tally.lastError})`)
      return 1
    }
    return 0
  } catch (err) {
    failed = true
    const e = err as Error & { code?: string }
    const hint =
      e.code === 'CONNECT_FAILED' || e.code === 'POOL_TIMEOUT'
        ? ' — is the database in --database-url / DATABASE_URL running and reachable?'
        : e.code === 'DEVICE_UNAVAILABLE'
          ? " — no usable GPU here; use --device auto or --device cpu"
          : e.code === 'MODEL_NOT_FOUND'
            ? ' — the sample models ship under models/ in the repository'
            : ''
    console.error(`\ndemo failed: ${e.code ? `${e.code}: ` : ''}${e.message}${hint}`)
    return 1
  } finally {
    try {
      if (pool && tables && pool.backend === 'postgres') await dropSchema(pool, tables)
    } catch (err) {
      if (!failed) console.error(`demo: could not drop the demo tables: ${(err as Error).message}`)
    }
    cache?.clear()
    await pool?.close({ timeoutMs: 5000 }).catch(() => {})
    if (tmp) rmSync(tmp, { recursive: true, force: true })
    for (const s of signals) process.off(s, onSignal)
  }
}

main().then(
  (code) => {
    process.exitCode = code
  },
  (err) => {
    console.error(`demo failed: ${err}`)
    process.exitCode = 1
  },
)
