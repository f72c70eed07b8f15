// `npm run soak`: the long soak. 10M `pool.query` on PostgreSQL and on SQLite (64 in flight),
// 100k model load/evict cycles, 1M lease cycles with 1 % of the leases dropped to the GC.
// RSS, the V8 heap and the native bytes V8 is told about are sampled 100 times per phase (after
// a GC, so JS garbage does not count); the drift printed is the RSS at the end of the phase against the RSS once warm
// (at 20 % of it), medians of a few samples each. The bound: ≤ 5 MiB drift per phase.
// `npm run soak` pins V8's young generation at full size (--min/--max-semi-space-size=16):
// left to grow, it doubles twice at query counts that come late in a PostgreSQL phase
// (about 1.5M and 6.7M here: +16 MiB committed), which reads as a native leak that is not one.
// The committed V8 heap's drift is printed beside the RSS drift to tell the two apart.
//   npm run soak                                   full run (about 15 min on 2 cores)
//   npm run soak -- --quick                        CI short form: 200k queries per backend, 2k model
//                                                  cycles, 20k lease cycles; fails only on errors and
//                                                  gross leaks (> 16 MiB), as the warm-up is short
//   npm run soak -- --only postgres,sqlite         a subset (postgres, sqlite, models, leases)
//   NAPI_RS_NATIVE_LIBRARY_PATH=/path/to/x.node npm run soak -- --label jemalloc
//                                                  another build of the addon (the allocator comparison)
// PostgreSQL from DATABASE_URL, else a throwaway embedded server. Each phase's figures are
// appended as one JSON line to .tmp/soak.json.
import { appendFileSync, mkdirSync } from 'node:fs'
import path from 'node:path'
import { performance } from 'node:perf_hooks'

import { ConnectionPool, Metrics, ModelCache, type PooledConnection } from '../index'
import { median, resolveDatabaseUrl } from './support'

const ROOT = path.join(__dirname, '..')
const quick = process.argv.includes('--quick')
const arg = (name: string) => {
  const i = process.argv.indexOf(name)
  return i > 0 ? process.argv[i + 1] : undefined
}
const only = arg('--only')?.split(',')
const label = arg('--label') ?? (process.env.NAPI_RS_NATIVE_LIBRARY_PATH ? path.basename(process.env.NAPI_RS_NATIVE_LIBRARY_PATH) : 'default build')
const BOUND_MIB = quick ? 16 : 5
const SAMPLES = 100
const CONCURRENCY = 64
const QUERIES = quick ? 200_000 : 10_000_000
const MODEL_CYCLES = quick ? 2_000 : 100_000
const LEASE_CYCLES = quick ? 20_000 : 1_000_000

const MiB = 1 << 20
const mib = (bytes: number) => bytes / MiB

interface Sample {
  done: number
  rss: number
  /** Native memory V8 is told about (`external`: addon-reported bytes and Buffers). */
  external: number
  /** V8 heap in use after the GC: growth here is JavaScript's, not native. */
  heapUsed: number
  /** V8's committed heap, young generation included: RSS that is V8's, not ours. */
  heapTotal: number
  /** OS threads: a new thread brings a new allocator arena, a step in RSS. */
  threads: number
  /** Bytes the phase's own accounting reports (model cache bytes; 0 elsewhere). */
  accounted: number
}

interface PhaseResult {
  phase: string
  label: string
  operations: number
  seconds: number
  perSecond: number
  rssStartMb: number
  rssWarmMb: number
  rssEndMb: number
  rssPeakAfterWarmMb: number
  driftMb: number
  externalDriftMb: number
  heapDriftMb: number
  heapTotalDriftMb: number
  accountedEnd: number
  errors: number
  quick: boolean
  /** Every RSS sample in MiB, in order. */
  rssSeriesMb: number[]
  heapTotalSeriesMb: number[]
  threadsStart: number
  threadsEnd: number
}

async function collect(): Promise<void> {
  for (let i = 0; i < 3; i++) {
    global.gc?.()
    await new Promise((r) => setImmediate(r))
  }
}

async function sample(done: number, accounted = 0): Promise<Sample> {
  await collect()
  const m = process.memoryUsage()
  const threads = Metrics.global().snapshot().process?.threads ?? 0
  return { done, rss: m.rss, external: m.external, heapUsed: m.heapUsed, heapTotal: m.heapTotal, threads, accounted }
}

/** Drift: the median of the last 10 % of samples against the median of those at 20–30 %. */
function summarize(phase: string, samples: Sample[], operations: number, seconds: number, errors: number): PhaseResult {
  const at = (from: number, to: number) => samples.slice(Math.floor(samples.length * from), Math.max(Math.floor(samples.length * from) + 1, Math.floor(samples.length * to)))
  const warm = at(0.2, 0.3)
  const end = at(0.9, 1)
  const rssWarm = median(warm.map((s) => s.rss))
  const rssEnd = median(end.map((s) => s.rss))
  const afterWarm = samples.slice(Math.floor(samples.length * 0.2))
  return {
    phase,
    label,
    operations,
    seconds,
    perSecond: Math.round(operations / seconds),
    rssStartMb: mib(samples[0].rss),
    rssWarmMb: mib(rssWarm),
    rssEndMb: mib(rssEnd),
    rssPeakAfterWarmMb: mib(Math.max(...afterWarm.map((s) => s.rss))),
    driftMb: mib(rssEnd - rssWarm),
    externalDriftMb: mib(median(end.map((s) => s.external)) - median(warm.map((s) => s.external))),
    heapDriftMb: mib(median(end.map((s) => s.heapUsed)) - median(warm.map((s) => s.heapUsed))),
    heapTotalDriftMb: mib(median(end.map((s) => s.heapTotal)) - median(warm.map((s) => s.heapTotal))),
    accountedEnd: samples[samples.length - 1].accounted,
    errors,
    quick,
    rssSeriesMb: samples.map((s) => Math.round(mib(s.rss) * 10) / 10),
    heapTotalSeriesMb: samples.map((s) => Math.round(mib(s.heapTotal) * 10) / 10),
    threadsStart: samples[0].threads,
    threadsEnd: samples[samples.length - 1].threads,
  }
}

/** `total` calls of `call`, `CONCURRENCY` in flight, in SAMPLES slices with a sample after each. */
async function queries(phase: string, pool: ConnectionPool, call: (n: number) => Promise<unknown>, total: number): Promise<PhaseResult> {
  const samples = [await sample(0)]
  let errors = 0
  let next = 0
  const started = performance.now()
  for (let slice = 1; slice <= SAMPLES; slice++) {
    const end = Math.floor((total * slice) / SAMPLES)
    const worker = async () => {
      while (next < end) {
        const n = next++
        try {
          await call(n)
        } catch (err) {
          if (errors++ === 0) console.error(`${phase}: first error at call ${n}:`, err)
        }
      }
    }
    await Promise.all(Array.from({ length: CONCURRENCY }, worker))
    samples.push(await sample(end))
  }
  const seconds = (performance.now() - started) / 1000
  return summarize(phase, samples, total, seconds, errors + pool.metrics().errors)
}

async function postgresPhase(): Promise<PhaseResult> {
  const db = await resolveDatabaseUrl()
  const pool = new ConnectionPool({ url: db.url, maxSize: 8, name: 'soak-postgres' })
  try {
    return await queries(`${QUERIES / 1e6}M pool.query, PostgreSQL`, pool, (n) => pool.query('select $1::int as n', [n & 0xffff]), QUERIES)
  } finally {
    await pool.close()
    await db.stop()
  }
}

async function sqlitePhase(): Promise<PhaseResult> {
  const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 8, name: 'soak-sqlite' })
  try {
    return await queries(`${QUERIES / 1e6}M pool.query, SQLite`, pool, (n) => pool.query('select cast($1 as integer) as n', [n & 0xffff]), QUERIES)
  } finally {
    await pool.close()
  }
}

async function modelsPhase(): Promise<PhaseResult> {
  const mlpPath = path.join(ROOT, 'models/sample-mlp.safetensors')
  const cache = new ModelCache({ device: 'cpu', maxModels: 4, cleanupIntervalMs: 0 })
  const input = new Float32Array(8 * 4).fill(0.25)
  const samples = [await sample(0, cache.memoryUsage().totalBytes)]
  let errors = 0
  const started = performance.now()
  for (let c = 0; c < MODEL_CYCLES; c++) {
    try {
      const model = await cache.load(`soak-${c % 4}`, mlpPath)
      model.predictSync(input.subarray(0, model.inputSize))
      cache.evict(model.id)
      model.release()
    } catch (err) {
      if (errors++ === 0) console.error('models: first error:', err)
    }
    if ((c + 1) % (MODEL_CYCLES / SAMPLES) === 0) samples.push(await sample(c + 1, cache.memoryUsage().totalBytes))
  }
  const seconds = (performance.now() - started) / 1000
  cache.clear()
  const r = summarize(`${MODEL_CYCLES / 1000}k model load/evict cycles`, samples, MODEL_CYCLES, seconds, errors)
  r.accountedEnd = cache.memoryUsage().totalBytes + cache.stats().bytes
  return r
}

async function leasesPhase(): Promise<PhaseResult> {
  const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 16, name: 'soak-leases' })
  let dropped = 0
  let errors = 0
  const samples = [await sample(0)]
  const started = performance.now()
  try {
    for (let c = 0; c < LEASE_CYCLES; c++) {
      try {
        const lease: PooledConnection = await pool.acquire()
        // 1 % are dropped without release(): the GC must give them back.
        if (c % 100 === 99) dropped++
        else lease.release()
      } catch (err) {
        if (errors++ === 0) console.error('leases: first error:', err)
      }
      // Collect before the dropped leases hold every connection.
      if (c % 1000 === 999) await collect()
      if ((c + 1) % (LEASE_CYCLES / SAMPLES) === 0) samples.push(await sample(c + 1))
    }
    await collect()
    const seconds = (performance.now() - started) / 1000
    const r = summarize(`${LEASE_CYCLES / 1e6}M lease cycles, 1 % dropped to the GC`, samples, LEASE_CYCLES, seconds, errors)
    const leaked = pool.metrics().leakedLeases
    if (leaked !== dropped) {
      console.error(`leases: ${dropped} dropped but ${leaked} counted as collected`)
      r.errors++
    }
    r.accountedEnd = leaked
    return r
  } finally {
    await pool.close()
  }
}

const PHASES: Record<string, () => Promise<PhaseResult>> = {
  postgres: postgresPhase,
  sqlite: sqlitePhase,
  models: modelsPhase,
  leases: leasesPhase,
}

async function main(): Promise<void> {
  if (!global.gc) throw new Error('run with node --expose-gc (npm run soak does)')
  const out = path.join(ROOT, '.tmp', 'soak.json')
  mkdirSync(path.dirname(out), { recursive: true })
  console.log(`soak (${quick ? 'quick' : 'full'}), addon: ${label}; bound ${BOUND_MIB} MiB RSS drift after warm-up per phase`)
  let failed = false
  for (const [name, run] of Object.entries(PHASES)) {
    if (only && !only.includes(name)) continue
    const r = await run()
    appendFileSync(out, JSON.stringify(r) + '\n')
    const ok = r.errors === 0 && r.driftMb <= BOUND_MIB && (name !== 'models' || r.accountedEnd === 0)
    failed ||= !ok
    console.log(
      `soak: ${r.phase} [${label}]: ${r.operations} in ${r.seconds.toFixed(0)} s (${r.perSecond}/s), errors ${r.errors}; ` +
        `RSS start ${r.rssStartMb.toFixed(1)} MiB, warm (20 %) ${r.rssWarmMb.toFixed(1)} MiB, end ${r.rssEndMb.toFixed(1)} MiB, ` +
        `peak after warm-up ${r.rssPeakAfterWarmMb.toFixed(1)} MiB → drift ${r.driftMb >= 0 ? '+' : ''}${r.driftMb.toFixed(2)} MiB; ` +
        `threads ${r.threadsStart}→${r.threadsEnd}, V8 heap drift ${r.heapDriftMb.toFixed(2)} MiB (committed ${r.heapTotalDriftMb.toFixed(2)} MiB), external drift ${r.externalDriftMb.toFixed(2)} MiB${name === 'models' ? `, cache bytes after clear ${r.accountedEnd}` : ''}` +
        `${name === 'leases' ? `, collected leases ${r.accountedEnd}` : ''} ${ok ? 'PASS' : 'FAIL'}`,
    )
  }
  if (failed) {
    console.error('soak FAILED')
    process.exitCode = 1
  }
}

void main()
