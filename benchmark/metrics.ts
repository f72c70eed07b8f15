// Metrics: recording cost inside Rust, snapshot() cost, and prometheus() render time against
// prom-client's register.metrics() for the same series, in the same run.
//   npm run bench:metrics             full
//   npm run bench:metrics -- --quick  short form for CI
import { performance } from 'node:perf_hooks'

import { Counter, Gauge, Histogram, Registry as PromRegistry } from 'prom-client'

import { ConnectionPool, Metrics, ModelCache } from '../index'
import { median, printTable, type Row } from './support'

const quick = process.argv.includes('--quick')
const POOLS = 10
const MODELS = quick ? 200 : 1000
const ROUNDS = quick ? 3 : 7

/** A one-layer MLP in safetensors format (4 → 2). */
function mlpSafetensors(): Buffer {
  const weight = new Float32Array(8).map((_, i) => i / 10)
  const bias = new Float32Array(2).fill(0.5)
  const header = {
    __metadata__: { arch: 'mlp', activations: 'none' },
    'dense.0.weight': { dtype: 'F32', shape: [2, 4], data_offsets: [0, 32] },
    'dense.0.bias': { dtype: 'F32', shape: [2], data_offsets: [32, 40] },
  }
  let json = JSON.stringify(header)
  while ((8 + json.length) % 8 !== 0) json += ' '
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(BigInt(json.length))
  return Buffer.concat([len, Buffer.from(json), Buffer.from(weight.buffer), Buffer.from(bias.buffer)])
}

/** Runs `fn` until `minMs` has passed (at least `minIters` times); returns ms per call. */
async function timePerCall(fn: () => unknown, minMs: number, minIters = 5): Promise<number> {
  for (let i = 0; i < 3; i++) await fn() // warm-up
  let iters = 0
  const started = performance.now()
  while (iters < minIters || performance.now() - started < minMs) {
    await fn()
    iters++
  }
  return (performance.now() - started) / iters
}

interface ParsedFamily {
  name: string
  type: string
  help: string
  samples: Array<{ name: string; labels: Record<string, string>; value: number }>
}

/** Parses quartermaster's own 0.0.4 output (plain label values only) to mirror it in prom-client. */
function parseExposition(text: string): ParsedFamily[] {
  const families: ParsedFamily[] = []
  let help = ''
  for (const line of text.split('\n')) {
    if (line.startsWith('# HELP ')) help = line.slice(7 + line.split(' ')[2].length + 1)
    else if (line.startsWith('# TYPE ')) {
      const [, , name, type] = line.split(' ')
      families.push({ name, type, help, samples: [] })
    } else if (line) {
      const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (.+)$/.exec(line)!
      const labels: Record<string, string> = {}
      for (const pair of m[2] ? m[2].match(/[a-z_]+="[^"]*"/g)! : []) {
        const eq = pair.indexOf('=')
        labels[pair.slice(0, eq)] = pair.slice(eq + 2, -1)
      }
      families[families.length - 1].samples.push({ name: m[1], labels, value: Number(m[3]) })
    }
  }
  return families
}

/** A prom-client registry holding the same families and label sets as `families`. */
function mirrorInPromClient(families: ParsedFamily[]): PromRegistry {
  const registry = new PromRegistry()
  for (const f of families) {
    const labelNames = [...new Set(f.samples.flatMap((s) => Object.keys(s.labels)).filter((l) => l !== 'le'))]
    if (f.type === 'counter') {
      const c = new Counter({ name: f.name, help: f.help, labelNames, registers: [registry] })
      for (const s of f.samples) c.inc(s.labels, s.value)
    } else if (f.type === 'gauge') {
      const g = new Gauge({ name: f.name, help: f.help, labelNames, registers: [registry] })
      for (const s of f.samples) g.set(s.labels, s.value)
    } else {
      const bounds = [...new Set(f.samples.filter((s) => s.labels.le && s.labels.le !== '+Inf').map((s) => Number(s.labels.le)))]
      const h = new Histogram({ name: f.name, help: f.help, labelNames, buckets: bounds, registers: [registry] })
      for (const s of f.samples.filter((x) => x.name.endsWith('_count'))) {
        // At least one observation per label set: prom-client prints only observed ones.
        for (let i = 0; i < Math.max(1, Math.min(s.value, 3)); i++) h.observe(s.labels, 0.003 * (i + 1))
      }
    }
  }
  return registry
}

async function main(): Promise<void> {
  const m = Metrics.global()
  console.log(`quartermaster metrics benchmark (${quick ? 'quick' : 'full'}): ${POOLS} pools, ${MODELS} model series, node ${process.version}`)

  // 1. Recording cost inside Rust.
  const costs = Array.from({ length: ROUNDS }, () => Metrics.benchmarkRecording(quick ? 200_000 : 2_000_000))
  const cost = (k: 'counterNs' | 'histogramNs' | 'poolQueryNs' | 'poolQueryContendedNs') => median(costs.map((c) => c[k]))

  // 2. Real series: pools doing queries, a cache with many models doing predictions.
  const pools = Array.from({ length: POOLS }, (_, i) => new ConnectionPool({ url: 'sqlite::memory:', maxSize: 4, name: `pool-${i}` }))
  for (const pool of pools) {
    await Promise.all(Array.from({ length: 20 }, (_, i) => pool.query('select ?1 as v', [i])))
  }
  const cache = new ModelCache({ device: 'cpu', maxModels: MODELS + 10, name: 'bench' })
  const weights = mlpSafetensors()
  const input = new Float32Array([1, 2, 3, 4])
  for (let i = 0; i < MODELS; i++) {
    const model = await cache.load(`model-${i}`, weights)
    model.predictSync(input)
    model.predictSync(input)
  }

  // pool.query throughput, to put the recording cost per query in proportion.
  const queryMs = await timePerCall(() => pools[0].query('select 1 as one'), quick ? 300 : 1500, 200)

  // 3. snapshot() and rates() cost (one call returns one whole object).
  const snapshotRounds: number[] = []
  const ratesRounds: number[] = []
  for (let r = 0; r < ROUNDS; r++) {
    snapshotRounds.push(await timePerCall(() => m.snapshot(), quick ? 200 : 600))
    ratesRounds.push(await timePerCall(() => m.rates(), 100))
  }
  const snapshotMs = median(snapshotRounds)
  const ratesUs = median(ratesRounds) * 1000

  // 4. Render: quartermaster vs prom-client for the same series.
  const ours = m.prometheus({ includeProcess: false })
  const families = parseExposition(ours)
  const prom = mirrorInPromClient(families)
  const theirs = await prom.metrics()
  const seriesOurs = ours.split('\n').filter((l) => l && !l.startsWith('#')).length
  const seriesTheirs = theirs.split('\n').filter((l) => l && !l.startsWith('#')).length

  const renderOurs: number[] = []
  const renderTheirs: number[] = []
  for (let r = 0; r < ROUNDS; r++) {
    renderOurs.push(await timePerCall(() => m.prometheus({ includeProcess: false }), quick ? 200 : 800))
    renderTheirs.push(await timePerCall(() => prom.metrics(), quick ? 200 : 800))
  }
  const oursMs = median(renderOurs)
  const theirsMs = median(renderTheirs)

  printTable('Recording inside Rust (ns per event, median of rounds)', [
    { event: 'counter increment', ns: +cost('counterNs').toFixed(1) },
    { event: 'histogram record', ns: +cost('histogramNs').toFixed(1) },
    { event: 'one pool.query (3 counters + 3 histograms)', ns: +cost('poolQueryNs').toFixed(1) },
    { event: 'one pool.query, 2 threads on one pool', ns: +cost('poolQueryContendedNs').toFixed(1) },
  ])
  const share = (cost('poolQueryNs') / (queryMs * 1e6)) * 100
  printTable('Recording share of pool.query (SQLite in memory, sequential)', [
    { 'pool.query µs': +(queryMs * 1000).toFixed(2), 'recording ns': +cost('poolQueryNs').toFixed(1), 'share %': +share.toFixed(3) },
  ])
  printTable('snapshot() / rates()', [
    {
      call: 'snapshot()',
      'µs per call': +(snapshotMs * 1000).toFixed(1),
      detail: `${POOLS} pools, ${MODELS} models, process read from /proc`,
    },
    { call: 'rates()', 'µs per call': +ratesUs.toFixed(2), detail: '' },
  ])
  const rows: Row[] = [
    { renderer: 'quartermaster prometheus()', 'ms per render': +oursMs.toFixed(3), series: seriesOurs, bytes: ours.length },
    { renderer: 'prom-client register.metrics()', 'ms per render': +theirsMs.toFixed(3), series: seriesTheirs, bytes: theirs.length },
  ]
  printTable(`Render, same ${families.length} families (median of ${ROUNDS} rounds)`, rows)
  const ratio = theirsMs / oursMs
  console.log(`\nrender speed-up vs prom-client: ${ratio.toFixed(1)}× (target ≥ 5×) ${ratio >= 5 ? 'OK' : 'BELOW TARGET'}`)
  if (seriesOurs !== seriesTheirs) console.log(`warning: series differ (${seriesOurs} vs ${seriesTheirs})`)
  console.log(`recording share of pool.query: ${share.toFixed(3)} % (target ≤ 2 %) ${share <= 2 ? 'OK' : 'ABOVE TARGET'}`)

  cache.clear()
  await Promise.all(pools.map((p) => p.close()))
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
