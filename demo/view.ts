// The demo's live terminal view (log-update on a TTY, one plain line a second otherwise) and its
// final report.
import type { ConnectionPool, Metrics, ModelCache } from '../index'
import { percentile, type Tally } from './workload'

export interface ViewContext {
  pool: ConnectionPool
  cache: ModelCache
  metrics: Metrics
  tally: Tally
  target: string
  durationS: number
  rssStart: number
}

const MiB = 1024 * 1024
const fmt = (n: number, digits = 0) => n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits })
let colour = false
/** Colour only on a terminal (and not under NO_COLOR). */
export function useColour(on: boolean): void {
  colour = on && !process.env.NO_COLOR
}
const sgr = (on: number, off: number) => (s: string) => (colour ? `\x1b[${on}m${s}\x1b[${off}m` : s)
const bold = sgr(1, 22)
const dim = sgr(2, 22)
const green = sgr(32, 39)
const yellow = sgr(33, 39)
const red = sgr(31, 39)
const cyan = sgr(36, 39)

function bar(fraction: number, width = 20): string {
  const full = Math.round(Math.max(0, Math.min(1, fraction)) * width)
  const s = '█'.repeat(full) + '░'.repeat(width - full)
  return fraction >= 0.9 ? yellow(s) : green(s)
}

function levelColour(status: string): (s: string) => string {
  return status === 'healthy' ? green : status === 'degraded' ? yellow : red
}

interface Frame {
  elapsedS: number
  opsPerSec: number
  p50: number
  p99: number
  inUse: number
  size: number
  maxSize: number
  waiting: number
  utilisation: number
  hits: number
  misses: number
  hitRate: number
  rssMb: number
  heapMb: number
  modelBytes: number
}

/** Samples the live figures since the previous frame. */
export class LiveView {
  private lastTotal = 0
  private lastAt = performance.now()
  private render: ((text: string) => void) | null = null
  private done: (() => void) | null = null
  private plainEvery = 1000
  private lastPlain = 0

  constructor(private readonly ctx: ViewContext, private readonly tty: boolean) {}

  async start(): Promise<void> {
    if (!this.tty) return
    // log-update is ESM-only; this file is CommonJS.
    const { default: logUpdate } = await import('log-update')
    this.render = (text) => logUpdate(text)
    this.done = () => logUpdate.done()
  }

  private frame(): Frame {
    const { pool, cache, tally } = this.ctx
    const now = performance.now()
    const total = tally.total
    const opsPerSec = ((total - this.lastTotal) / (now - this.lastAt)) * 1000
    this.lastTotal = total
    this.lastAt = now
    const recent = tally.takeRecent()
    const status = pool.status()
    const stats = cache.stats()
    const mem = process.memoryUsage()
    return {
      elapsedS: (now - tally.startedAt) / 1000,
      opsPerSec,
      p50: percentile(recent, 50),
      p99: percentile(recent, 99),
      inUse: status.inUse,
      size: status.size,
      maxSize: status.maxSize,
      waiting: status.waiting,
      utilisation: status.inUse / status.maxSize,
      hits: stats.hits,
      misses: stats.misses,
      hitRate: stats.hitRate,
      rssMb: mem.rss / MiB,
      heapMb: mem.heapUsed / MiB,
      modelBytes: stats.bytes + stats.gpuBytes,
    }
  }

  update(): void {
    const f = this.frame()
    const { tally, cache, target, durationS, rssStart } = this.ctx
    if (!this.render) {
      if (performance.now() - this.lastPlain < this.plainEvery) return
      this.lastPlain = performance.now()
      console.log(
        `[${f.elapsedS.toFixed(1)}s] ${fmt(f.opsPerSec)} ops/s  p50 ${f.p50.toFixed(2)} ms  p99 ${f.p99.toFixed(2)} ms  ` +
          `pool ${f.inUse}/${f.maxSize} in use, ${f.waiting} waiting  cache hits ${f.hits} (${(f.hitRate * 100).toFixed(1)} %)  ` +
          `rss ${f.rssMb.toFixed(1)} MiB  errors ${tally.failures}`,
      )
      return
    }
    const signals = [...tally.lastSignal.entries()].map(([s, v]) => `${s} ${v >= 0 ? green('▲') : red('▼')}${Math.abs(v).toFixed(2)}`).join('  ')
    const growth = f.rssMb - rssStart / MiB
    const lines = [
      `${bold('quartermaster demo')} ${dim('·')} ${target} ${dim('·')} models on ${cyan(cache.device)} ${dim('·')} ${f.elapsedS.toFixed(1)} / ${durationS} s`,
      '',
      `  ${bold('throughput')}  ${cyan(fmt(f.opsPerSec).padStart(8))} ops/s   ${dim(`query ${fmt(tally.ops.query)} · execute ${fmt(tally.ops.execute)} · transaction ${fmt(tally.ops.transaction)}`)}`,
      `  ${bold('latency   ')}  p50 ${f.p50.toFixed(2).padStart(6)} ms   p99 ${f.p99.toFixed(2).padStart(6)} ms`,
      `  ${bold('pool      ')}  ${bar(f.utilisation)} ${String(f.inUse).padStart(3)}/${f.maxSize} in use · ${f.size} open · ${f.waiting} waiting`,
      `  ${bold('models    ')}  cache hits ${fmt(f.hits)} · misses ${f.misses} · hit rate ${(f.hitRate * 100).toFixed(1)} % · ${fmt(tally.predictions)} predictions · ${fmt(f.modelBytes / 1024, 1)} KiB`,
      `  ${bold('signals   ')}  ${signals || dim('warming up')}`,
      `  ${bold('memory    ')}  rss ${f.rssMb.toFixed(1)} MiB (${growth >= 0 ? '+' : ''}${growth.toFixed(1)}) · heap ${f.heapMb.toFixed(1)} MiB`,
      `  ${bold('orders    ')}  ${fmt(tally.ordersPlaced)} placed · ${fmt(tally.ordersFilled)} filled · ${tally.failures ? red(`${tally.failures} errors`) : green('0 errors')}`,
    ]
    this.render(lines.join('\n'))
  }

  /** Leaves the last frame drawn while the workload ran on screen. */
  stop(): void {
    this.done?.()
  }
}

export interface Report {
  backend: string
  durationS: number
  operations: number
  failures: number
  successRate: number
  opsPerSec: number
  p50: number
  p99: number
  /** p99 of each kind of operation, ms. */
  p99ByKind: { query: number; execute: number; transaction: number }
  modelDevice: string
  predictions: number
  cacheHitRate: number
  rssStartMb: number
  rssEndMb: number
  memoryGrowthMb: number
  ordersInDb: number
  filledInDb: number
}

/** The final report: plain text a person reads and the jest test parses. */
export function printReport(r: Report, ctx: ViewContext): void {
  const health = ctx.pool.health()
  const overall = ctx.metrics.health()
  const failing = overall.checks.filter((c) => c.level !== 'ok')
  const line = (k: string, v: string) => console.log(`  ${k.padEnd(20)}${v}`)
  console.log('\n== quartermaster demo report ==')
  line('backend', r.backend)
  line('duration', `${r.durationS.toFixed(1)} s`)
  line('operations', `${r.operations} (failed ${r.failures})`)
  line('success rate', `${(r.successRate * 100).toFixed(2)} %`)
  line('ops/s', r.opsPerSec.toFixed(1))
  line('latency p50', `${r.p50.toFixed(3)} ms`)
  line('latency p99', `${r.p99.toFixed(3)} ms`)
  const k = r.p99ByKind
  line('p99 by kind', `query ${k.query.toFixed(3)} ms, execute ${k.execute.toFixed(3)} ms, transaction ${k.transaction.toFixed(3)} ms`)
  line('model device', r.modelDevice)
  line('predictions', String(r.predictions))
  line('cache hit rate', `${(r.cacheHitRate * 100).toFixed(2)} %`)
  line('memory growth', `${r.memoryGrowthMb >= 0 ? '+' : ''}${r.memoryGrowthMb.toFixed(1)} MiB (rss ${r.rssStartMb.toFixed(1)} -> ${r.rssEndMb.toFixed(1)} MiB)`)
  line('orders in database', `${r.ordersInDb} (${r.filledInDb} filled)`)
  line(
    'pool health',
    `${levelColour(health.status)(health.status)} (score ${health.healthScore}, utilisation ${health.utilizationPercent.toFixed(0)} %, available ${health.availableConnections}, waiting ${health.waitingRequests})`,
  )
  line('metrics health', `${levelColour(overall.status)(overall.status)} (score ${overall.score}, ${overall.checks.length} checks)`)
  for (const c of failing) line('', `${c.level} ${c.name} [${c.target}]: ${c.message}`)
}
