import { spawnSync } from 'node:child_process'
import path from 'node:path'

import { collectDefaultMetrics, Counter, type OpenMetricsContentType, Registry as PromRegistry } from 'prom-client'

import * as qm from '../index'
import { Metrics, type MetricsReport } from '../index'

// Real parsers for the exposition: promtool (Debian package `prometheus`) and the Python
// `prometheus_client` parsers (0.0.4 and the strict OpenMetrics one). Under CI both must be
// present; elsewhere a missing one is skipped loudly.
const inCi = process.env.CI === 'true'
const promtool = findPromtool()
const python = findPythonParser()

function findPromtool(): string | null {
  const candidates = [process.env.PROMTOOL, 'promtool'].filter(Boolean) as string[]
  for (const bin of candidates) {
    if (spawnSync(bin, ['--version']).status === 0) return bin
  }
  return null
}

function findPythonParser(): string | null {
  for (const bin of [process.env.PYTHON, 'python3', 'python'].filter(Boolean) as string[]) {
    if (spawnSync(bin, ['-c', 'import prometheus_client']).status === 0) return bin
  }
  return null
}

function requireTool(name: string, found: string | null, install: string): boolean {
  if (found) return true
  if (inCi) throw new Error(`CI: ${name} not found (${install})`)
  process.stderr.write(`\n*** SKIPPED: ${name} checks — not installed (${install}) ***\n`)
  return false
}

/** promtool's parse and lint; with `onlyOurs`, lint findings about other series (prom-client's
 * default `nodejs_*_total` gauges) are ignored, parse errors never are. */
function promtoolCheck(text: string, onlyOurs = false): void {
  const out = spawnSync(promtool!, ['check', 'metrics'], { input: text, encoding: 'utf8' })
  if (out.status === 0) return
  const findings = `${out.stdout}${out.stderr}`.split('\n').filter(Boolean)
  const relevant = onlyOurs ? findings.filter((l) => !/^(nodejs|process)_\w+ /.test(l)) : findings
  if (relevant.length > 0) throw new Error(`promtool check metrics failed:\n${findings.join('\n')}`)
}

interface ParsedSample {
  name: string
  labels: Record<string, string>
  value: number
}
interface ParsedFamily {
  name: string
  type: string
  samples: ParsedSample[]
}

const PY_PARSE = `
import json, sys
from prometheus_client.parser import text_string_to_metric_families as prom
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
text = sys.stdin.read()
parse = om if sys.argv[1] == 'om' else prom
out = []
for f in parse(text):
    out.append({'name': f.name, 'type': f.type,
                'samples': [{'name': s.name, 'labels': s.labels, 'value': s.value} for s in f.samples]})
def finite(v):
    return v if v == v and v not in (float('inf'), float('-inf')) else str(v)
for f in out:
    for s in f['samples']:
        s['value'] = finite(s['value'])
print(json.dumps(out))
`

function pythonParse(text: string, format: 'prom' | 'om'): ParsedFamily[] {
  const out = spawnSync(python!, ['-c', PY_PARSE, format], { input: text, encoding: 'utf8' })
  if (out.status !== 0) throw new Error(`prometheus_client rejected the ${format} exposition:\n${out.stderr}`)
  return JSON.parse(out.stdout)
}

/** Every `name{labels}` of a 0.0.4 / OpenMetrics text, for duplicate checks. */
function seriesKeys(text: string): string[] {
  return text
    .split('\n')
    .filter((l) => l && !l.startsWith('#'))
    .map((l) => l.slice(0, l.lastIndexOf(' ')))
}

function typeNames(text: string): string[] {
  return text
    .split('\n')
    .filter((l) => l.startsWith('# TYPE '))
    .map((l) => l.split(' ')[2])
}

function sampleValue(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `))
  return line === undefined ? undefined : Number(line.slice(series.length + 1))
}

/** A tiny MLP in safetensors format: one dense layer, `inputs` → `outputs`. */
function mlpSafetensors(inputs: number, outputs: number): Buffer {
  const weight = new Float32Array(inputs * outputs).map((_, i) => (i % 7) / 10)
  const bias = new Float32Array(outputs).fill(0.5)
  const header = {
    __metadata__: { arch: 'mlp', activations: 'none' },
    'dense.0.weight': { dtype: 'F32', shape: [outputs, inputs], data_offsets: [0, weight.byteLength] },
    'dense.0.bias': { dtype: 'F32', shape: [outputs], data_offsets: [weight.byteLength, weight.byteLength + bias.byteLength] },
  }
  let json = JSON.stringify(header)
  while ((8 + json.length) % 8 !== 0) json += ' '
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(BigInt(json.length))
  return Buffer.concat([len, Buffer.from(json), Buffer.from(weight.buffer), Buffer.from(bias.buffer)])
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

// Names with every character that needs escaping in a label value.
const WEIRD = 'desk "A"\\east\nline'

describe('Metrics registry', () => {
  it('new Metrics() starts empty, with every seed field', () => {
    const a = Metrics.global().snapshot()
    const fresh = new Metrics().snapshot()
    expect(fresh.pools).toEqual([])
    expect(fresh.caches).toEqual([])
    expect(fresh.models).toEqual([])
    for (const key of [
      'poolGets',
      'poolTimeouts',
      'poolErrors',
      'neuralAllocations',
      'neuralDeallocations',
      'neuralMemoryBytes',
      'neuralCacheHits',
      'neuralCacheMisses',
      'poolSuccessRate',
      'neuralMemoryMb',
      'neuralCacheHitRate',
      'uptimeSeconds',
    ] as const) {
      expect(typeof fresh[key]).toBe('number')
      expect(typeof a[key]).toBe('number')
    }
    expect(fresh.poolSuccessRate).toBe(1)
    expect(fresh.neuralCacheHitRate).toBe(0)
  })

  it('reports the process: memory, descriptors against their limit, threads, growth verdicts', () => {
    const p = new Metrics().snapshot().process
    if (process.platform !== 'linux') {
      expect(p).toBeUndefined()
      return
    }
    expect(p).toBeDefined()
    // Same reading as Node's own, within what the process allocates between the two calls.
    expect(Math.abs(p!.residentBytes - process.memoryUsage.rss()) / process.memoryUsage.rss()).toBeLessThan(0.2)
    expect(p!.openFds).toBeGreaterThan(2)
    expect(p!.threads).toBeGreaterThan(1)
    expect(['ok', 'warning', 'error', 'critical']).toContain(p!.memoryLevel)
    expect(p!.memoryGrowth.suspectedLeak).toBe(false)
  })

  it('alert thresholds are configurable and validated', () => {
    const m = new Metrics()
    expect(m.alertThresholds().memoryPercent).toEqual({ warning: 70, error: 85, critical: 95 })
    expect(m.alertThresholds().fdPercent).toEqual({ warning: 70, error: 85, critical: 95 })
    if (process.platform === 'linux') {
      // Any resident memory is "critical" at 0 %.
      m.setAlertThresholds({ memoryPercent: { warning: 0, error: 0, critical: 0 } })
      expect(m.snapshot().process!.memoryLevel).toBe('critical')
      const health = m.health()
      expect(health.status).toBe('unhealthy')
      expect(health.checks.find((c) => c.name === 'process.memory')!.level).toBe('critical')
    }
    let err: any
    try {
      m.setAlertThresholds({ fdPercent: { warning: 90, error: 80, critical: 95 } })
    } catch (e) {
      err = e
    }
    expect(Object.prototype.toString.call(err)).toBe('[object Error]') // a native Error (another realm than jest's)
    expect(err.code).toBe('INVALID_ARGUMENT')
    expect(err.message).toMatch(/fdPercent/)
    expect(m.alertThresholds().fdPercent).toEqual({ warning: 70, error: 85, critical: 95 })
  })

  it('an empty registry is healthy and renders valid, nearly empty exposition', () => {
    const m = new Metrics()
    const h = m.health()
    expect(h.status).toBe('healthy')
    expect(h.score).toBe(100)
    const text = m.prometheus({ includeProcess: false })
    expect(typeNames(text)).toEqual(['qm_resources_overdue'])
    expect(m.prometheus({ openMetrics: true, includeProcess: false }).endsWith('# EOF\n')).toBe(true)
    expect(m.contentType()).toBe('text/plain; version=0.0.4; charset=utf-8')
    expect(m.contentType({ openMetrics: true })).toBe('application/openmetrics-text; version=1.0.0; charset=utf-8')
  })
})

describe('Metrics with real pool work (SQLite in memory)', () => {
  const m = Metrics.global()
  let pool: qm.ConnectionPool

  beforeAll(async () => {
    pool = new qm.ConnectionPool({ url: 'sqlite::memory:', maxSize: 3, name: WEIRD, leakDetectionMs: 50 })
    await pool.execute('create table fills(id integer primary key, qty integer)')
  })
  afterAll(async () => {
    await pool.close()
  })

  const mine = () => m.snapshot().pools.find((p) => p.name === pool.name)!

  it('pools report into Metrics.global(), not into a separate new Metrics()', () => {
    expect(Metrics.global().snapshot().pools.map((p) => p.name)).toContain(pool.name)
    expect(new Metrics().snapshot().pools).toEqual([])
  })

  it('counts acquires and queries, with latency percentiles, and re-baselines on reset', async () => {
    m.reset()
    const zero = m.snapshot()
    expect(zero.poolGets).toBe(0)
    expect(zero.poolTimeouts).toBe(0)
    expect(mine().gets).toBe(0)

    for (let i = 0; i < 40; i++) await pool.execute('insert into fills(qty) values (?1)', [i])
    await Promise.all(Array.from({ length: 20 }, () => pool.query('select count(*) as n from fills')))

    const s = m.snapshot()
    const p = mine()
    expect(p.gets).toBe(60)
    expect(p.successfulGets).toBe(60)
    expect(p.queries).toBe(60)
    expect(p.successRate).toBe(1)
    expect(p.backend).toBe('sqlite')
    expect(p.maxSize).toBe(3)
    expect(p.queryLatency.p50).toBeGreaterThan(0)
    expect(p.queryLatency.max).toBeGreaterThanOrEqual(p.queryLatency.p99)
    expect(p.queryLatency.p99).toBeGreaterThanOrEqual(p.queryLatency.p50)
    // Registry-wide seed fields include this pool (other suites' pools may add to them).
    expect(s.poolGets).toBeGreaterThanOrEqual(60)
    expect(s.poolSuccessRate).toBe(1)

    // Exported counters before and after a reset: monotonic.
    const series = `qm_pool_acquires_total{pool="${WEIRD.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')}"}`
    const before = sampleValue(m.prometheus(), series)
    expect(before).toBeGreaterThanOrEqual(60)
    m.reset()
    expect(mine().gets).toBe(0)
    expect(mine().queryLatency.max).toBe(0)
    expect(sampleValue(m.prometheus(), series)).toBe(before)
    await pool.query('select 1 as one')
    expect(mine().gets).toBe(1)
    expect(sampleValue(m.prometheus(), series)).toBe(before! + 1)
  })

  it('rates are events over the elapsed time between calls', async () => {
    m.rates()
    const started = performance.now()
    for (let i = 0; i < 50; i++) await pool.query('select ?1 as v', [i])
    await sleep(200)
    const r = m.rates()
    const elapsed = (performance.now() - started) / 1000
    expect(r.intervalSeconds).toBeGreaterThan(0.2)
    expect(Math.abs(r.intervalSeconds - elapsed) / elapsed).toBeLessThan(0.1)
    // Other suites share the global registry but are not running now (--runInBand).
    expect(r.poolGetsPerSec * r.intervalSeconds).toBeCloseTo(50, 0)
    expect(r.poolQueriesPerSec * r.intervalSeconds).toBeCloseTo(50, 0)
    expect(r.poolTimeoutsPerSec).toBe(0)
    // The next call covers only what happened since this one.
    await sleep(50)
    const idle = m.rates()
    expect(idle.poolGetsPerSec).toBe(0)
    expect(idle.intervalSeconds).toBeGreaterThan(0.04)
  })

  it('shows occupancy while leases are held and lists overdue ones with their stack', async () => {
    const a = await pool.acquire()
    const b = await pool.acquire()
    try {
      const p = mine()
      expect(p.inUse).toBe(2)
      expect(p.utilizationPercent).toBeCloseTo((2 / 3) * 100, 5)
      await sleep(120)
      const leaks = m.leaks().filter((l) => l.name === pool.name)
      expect(leaks).toHaveLength(2)
      expect(leaks[0].kind).toBe('lease')
      expect(leaks[0].ageMs).toBeGreaterThanOrEqual(100)
      expect(leaks[0].thresholdMs).toBe(50)
      if (leaks[0].stack !== undefined) expect(leaks[0].stack).toContain('metrics.spec')
      const h = m.health()
      expect(h.checks.find((c) => c.name === 'leaks')!.level).toBe('warning')
      expect(h.status).not.toBe('healthy')
      expect(h.score).toBeLessThan(100)
      expect(m.snapshot().liveResources).toBeGreaterThanOrEqual(2)
    } finally {
      a.release()
      b.release()
    }
    expect(mine().inUse).toBe(0)
    expect(m.leaks().filter((l) => l.name === pool.name)).toEqual([])
  })

  it('a released lease leaves leaks() at once, without waiting for GC', async () => {
    const overdue = () => m.leaks().filter((l) => l.name === pool.name).length
    const before = overdue()
    const lease = await pool.acquire()
    try {
      await sleep(70)
      expect(overdue()).toBe(before + 1)
    } finally {
      lease.release()
    }
    expect(overdue()).toBe(before)
  })

  it('renders exposition that promtool and prometheus_client accept, labels round-tripping', () => {
    const text = m.prometheus()
    expect(text).toContain('# TYPE qm_pool_connections_active gauge')
    expect(text).toContain('# TYPE qm_pool_connection_timeout_total counter')
    expect(text).toContain('# TYPE qm_pool_acquire_seconds histogram')
    expect(text).toContain('qm_pool_connections_pending{pool=')
    expect(new Set(seriesKeys(text)).size).toBe(seriesKeys(text).length)
    expect(new Set(typeNames(text)).size).toBe(typeNames(text).length)
    if (process.platform === 'linux') expect(text).toContain('qm_process_resident_memory_bytes ')

    if (requireTool('promtool', promtool, 'apt-get install prometheus, or set PROMTOOL')) {
      promtoolCheck(text)
    }
    if (requireTool('prometheus_client', python, 'pip install prometheus_client')) {
      for (const [format, body] of [
        ['prom', text],
        ['om', m.prometheus({ openMetrics: true })],
      ] as const) {
        const families = pythonParse(body, format)
        const acquires = families.find((f) => f.name === 'qm_pool_acquires')!
        expect(acquires.type).toBe('counter')
        const mineSample = acquires.samples.find((s) => s.labels.pool === WEIRD)
        expect(mineSample).toBeDefined() // quotes, backslash and newline survived the round trip
        const hist = families.find((f) => f.name === 'qm_pool_query_seconds')!
        expect(hist.type).toBe('histogram')
        const buckets = hist.samples.filter((s) => s.name.endsWith('_bucket') && s.labels.pool === WEIRD)
        const counts = buckets.map((s) => s.value)
        expect(counts).toEqual([...counts].sort((x, y) => x - y)) // cumulative
        const count = hist.samples.find((s) => s.name.endsWith('_count') && s.labels.pool === WEIRD)!.value
        expect(counts[counts.length - 1]).toBe(count)
        expect(buckets[buckets.length - 1].labels.le).toMatch(/^\+Inf$|^inf$/i)
      }
    }
  })

  it('health reflects a saturated pool with waiters', async () => {
    const held = await Promise.all([pool.acquire(), pool.acquire(), pool.acquire()])
    const waiter = pool.acquire()
    try {
      await sleep(20)
      const h = m.health()
      const util = h.checks.find((c) => c.name === 'pool.utilization' && c.target === pool.name)!
      expect(util.level).toBe('critical')
      expect(util.value).toBe(100)
      const waiting = h.checks.find((c) => c.name === 'pool.waiting' && c.target === pool.name)!
      expect(waiting.value).toBe(1)
      expect(waiting.level).toBe('warning')
      expect(h.status).toBe('unhealthy')
      expect(m.snapshot().pools.find((p) => p.name === pool.name)!.waiting).toBe(1)
    } finally {
      held.forEach((l) => l.release())
      ;(await waiter).release()
    }
  })
})

describe('Metrics with real model-cache work', () => {
  const m = Metrics.global()

  it('counts loads, hits, misses, allocations, bytes and predictions per model', async () => {
    const cache = new qm.ModelCache({ device: 'cpu', name: `cache ${WEIRD}` })
    const weights = mlpSafetensors(4, 2)
    m.reset()
    const loaded = await cache.load('btc "mlp"\\v1', weights)
    await cache.load('btc "mlp"\\v1', weights) // a hit
    const eth = await cache.load('eth-mlp', weights)
    for (let i = 0; i < 25; i++) await loaded.predict(new Float32Array([1, 2, 3, 4]))
    eth.predictSync(new Float32Array([1, 2, 3, 4, 5, 6, 7, 8]))

    const s = m.snapshot()
    const c = s.caches.find((x) => x.name === `cache ${WEIRD}`)!
    expect(c).toBeDefined()
    expect(c.models).toBe(2)
    expect(c.loads).toBe(2)
    expect(c.hits).toBe(1)
    expect(c.misses).toBe(2)
    expect(c.hitRate).toBeCloseTo(1 / 3, 10)
    expect(c.allocations).toBeGreaterThan(0)
    expect(c.hostBytes).toBeGreaterThan(0)
    expect(s.neuralMemoryBytes).toBeGreaterThanOrEqual(c.hostBytes + c.gpuBytes)
    expect(s.neuralMemoryMb).toBeCloseTo(s.neuralMemoryBytes / 2 ** 20, 10)
    expect(s.neuralCacheHits).toBeGreaterThanOrEqual(1)
    const btc = s.models.find((x) => x.cache === c.name && x.name === 'btc "mlp"\\v1')!
    expect(btc.predictions).toBe(25)
    expect(btc.device).toBe('cpu')
    expect(btc.predictLatency.max).toBeGreaterThan(0)
    expect(s.models.find((x) => x.cache === c.name && x.name === 'eth-mlp')!.predictions).toBe(1)

    // Eviction and deallocations show up, and the model's series stays (counters are monotonic).
    const deallocBefore = m.snapshot().neuralDeallocations
    loaded.release?.()
    eth.release?.()
    expect(cache.evict('eth-mlp')).toBe(true)
    const after = m.snapshot().caches.find((x) => x.name === c.name)!
    expect(after.evictionsExplicit).toBe(1)
    expect(after.models).toBe(1)
    expect(m.snapshot().neuralDeallocations).toBeGreaterThanOrEqual(deallocBefore)

    const text = m.prometheus({ includeProcess: false })
    expect(text).toMatch(/qm_model_predictions_total\{cache="cache desk \\"A\\"\\\\east\\nline",model="btc \\"mlp\\"\\\\v1"\} 25\n/)
    if (promtool) promtoolCheck(text)
    if (python) {
      const families = pythonParse(m.prometheus({ openMetrics: true, includeProcess: false }), 'om')
      const preds = families.find((f) => f.name === 'qm_model_predictions')!
      expect(preds.samples.find((x) => x.labels.model === 'btc "mlp"\\v1' && x.labels.cache === c.name)!.value).toBe(25)
    }
    cache.clear()
  })
})

describe('Reporter', () => {
  it('reports periodically, survives throwing and rejecting callbacks, and stops', async () => {
    const m = new Metrics()
    const reports: MetricsReport[] = []
    let calls = 0
    const reporter = m.startReporter({
      intervalMs: 20,
      onReport: (report) => {
        calls++
        if (calls === 2) throw new Error('dashboard down')
        if (calls === 3) return Promise.reject(new Error('async dashboard down'))
        reports.push(report)
        return undefined
      },
    })
    expect(reporter.running).toBe(true)
    const deadline = Date.now() + 5000
    while (calls < 6 && Date.now() < deadline) await sleep(10)
    expect(calls).toBeGreaterThanOrEqual(6)
    await sleep(0)
    expect(reporter.errors).toBe(2)
    expect(reporter.reports).toBeGreaterThanOrEqual(6)
    const r = reports[reports.length - 1]
    expect(typeof r.snapshot.poolGets).toBe('number')
    expect(r.rates.intervalSeconds).toBeGreaterThan(0.005)
    expect(r.rates.intervalSeconds).toBeLessThan(1)
    expect(['healthy', 'degraded', 'unhealthy']).toContain(r.health.status)
    expect(Array.isArray(r.leaks)).toBe(true)
    reporter.stop()
    reporter.stop()
    expect(reporter.running).toBe(false)
    const stoppedAt = calls
    await sleep(100)
    expect(calls).toBe(stoppedAt)
  })

  it('does not disturb the app’s own rates() baseline', async () => {
    const m = new Metrics()
    m.rates()
    const reporter = m.startReporter({ intervalMs: 10, onReport: () => undefined })
    await sleep(120)
    reporter.stop()
    expect(m.rates().intervalSeconds).toBeGreaterThan(0.1)
  })

  it('rejects a too-short interval with INVALID_ARGUMENT', () => {
    expect(() => new Metrics().startReporter({ intervalMs: 1, onReport: () => undefined })).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT' }),
    )
  })

  it('ends without harm when the worker that started it is terminated', async () => {
    const { Worker } = await import('node:worker_threads')
    const worker = new Worker(
      `const { parentPort } = require('node:worker_threads')
       const { Metrics } = require(${JSON.stringify(path.join(__dirname, '..', 'index.js'))})
       Metrics.global().startReporter({ intervalMs: 10, onReport: () => parentPort.postMessage('tick') })
       setInterval(() => {}, 1000) // the reporter alone would let the worker exit`,
      { eval: true },
    )
    await new Promise((resolve) => worker.once('message', resolve))
    await worker.terminate()
    await sleep(100) // the reporter's next ticks meet a closed environment
    expect(new Metrics().health().status).toBe('healthy')
  })

  it('never keeps the process alive', () => {
    const script = `
      const { Metrics } = require(${JSON.stringify(path.join(__dirname, '..', 'index.js'))})
      Metrics.global().startReporter({ intervalMs: 20, onReport() { globalThis.seen = (globalThis.seen || 0) + 1 } })
      setTimeout(() => { if (!globalThis.seen) { console.error('no report'); process.exitCode = 2 } }, 300)
    `
    const started = Date.now()
    const out = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 10_000 })
    expect(out.stderr).toBe('')
    expect(out.status).toBe(0)
    expect(Date.now() - started).toBeLessThan(5000)
  })
})

describe('prom-client interop', () => {
  it('one prom-client registry serves the app’s metrics and quartermaster’s, no duplicates', async () => {
    const appRegistry = new PromRegistry()
    collectDefaultMetrics({ register: appRegistry })
    const orders = new Counter({ name: 'app_orders_total', help: 'Orders placed.', registers: [appRegistry] })
    orders.inc(3)

    const pool = new qm.ConnectionPool({ url: 'sqlite::memory:', maxSize: 2, name: 'interop' })
    await pool.query('select 1 as one')

    // prom-client exports process_* itself, so leave quartermaster's process series out.
    const collector = Metrics.global().prometheusCollector({ includeProcess: false })
    expect(collector.contentType).toBe(PromRegistry.PROMETHEUS_CONTENT_TYPE)
    const merged = PromRegistry.merge([appRegistry, collector as unknown as PromRegistry])
    const text = await merged.metrics()

    expect(text).toContain('app_orders_total 3')
    expect(text).toContain('process_resident_memory_bytes')
    expect(text).not.toContain('qm_process_')
    expect(sampleValue(text, 'qm_pool_acquires_total{pool="interop"}')).toBe(1)
    expect(text).toMatch(/qm_pool_query_seconds_bucket\{pool="interop",le="\+Inf"\} 1/)
    const names = typeNames(text)
    expect(new Set(names).size).toBe(names.length)
    const keys = seriesKeys(text)
    expect(new Set(keys).size).toBe(keys.length)
    // quartermaster renders the same qm_ series itself.
    const ownSeries = seriesKeys(Metrics.global().prometheus({ includeProcess: false }))
    for (const k of ownSeries) expect(keys).toContain(k)
    if (promtool) promtoolCheck(text, true)
    if (python) pythonParse(text, 'prom')

    // registerMetric works too, in an OpenMetrics registry with an OpenMetrics collector.
    const om = new PromRegistry<OpenMetricsContentType>()
    om.setContentType(PromRegistry.OPENMETRICS_CONTENT_TYPE)
    const omCollector = Metrics.global().prometheusCollector({ openMetrics: true, includeProcess: false })
    expect(omCollector.contentType).toBe(PromRegistry.OPENMETRICS_CONTENT_TYPE)
    for (const metric of omCollector.getMetricsAsArray()) om.registerMetric(metric as any)
    const omText = await om.metrics()
    expect(omText).toContain('qm_pool_acquires_total{pool="interop"} 1')
    expect(omText).toContain('# TYPE qm_pool_acquires counter')
    expect(omText.endsWith('# EOF\n')).toBe(true)
    if (python) pythonParse(omText, 'om')
    await pool.close()
  })
})
