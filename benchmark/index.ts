// `npm run bench`: every benchmark against its peers in one run — pool.query (pg, postgres.js),
// models (onnxruntime-node), metrics (prom-client), the lease cycle (generic-pool, tarn) — and
// the seed scenarios; then benchmark/RESULTS.md, benchmark/results.svg and README's headline table.
//   npm run bench                          full run; writes the results
//   npm run bench -- --quick --no-write    CI short form (.ci/short-benchmarks): writes nothing
//   npm run bench -- --only lease,metrics  a subset (README left alone)
//   npm run bench -- --chart-only          redraw results.svg from RESULTS.md
// PostgreSQL from DATABASE_URL, else one throwaway embedded server shared by every benchmark.
import { execFileSync, spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { performance } from 'node:perf_hooks'

import { ConnectionPool } from '../index'
import { chartSvg, type Ratio } from './chart'
import { resolveDatabaseUrl, type Row } from './support'

const ROOT = path.join(__dirname, '..')
const quick = process.argv.includes('--quick')
const write = !process.argv.includes('--no-write')
const onlyArg = process.argv.indexOf('--only')
const only = onlyArg > 0 ? process.argv[onlyArg + 1].split(',') : null

interface Bench {
  name: string
  file: string
  what: string
}

const BENCHES: Bench[] = [
  {
    name: 'pool',
    file: 'pool.ts',
    what:
      '`pool.query(\'select 1\')` with N calls in flight at once against node-postgres (`pg.Pool`) and postgres.js, each with the same pool size on the same server; q/s over the whole batch, latency per call measured in JS. 5 rounds (quick: 1), each client every round.',
  },
  {
    name: 'lease',
    file: 'lease.ts',
    what:
      'Checkout + return with nothing run on the connection, against generic-pool and tarn. On SQLite the peers pool a trivial JS object (they pay nothing for their resource — their best case); on PostgreSQL every pool holds 8 real open connections (peers: `pg.Client`). Peers have no synchronous try-acquire, so `tryAcquire + release` compares ours with their `await acquire()`. 5 rounds of 1 s (quick: 2 × 250 ms), order rotated each round.',
  },
  {
    name: 'metrics',
    file: 'metrics.ts',
    what: 'Recording cost inside Rust, `snapshot()` cost, and `prometheus()` render time against prom-client `register.metrics()` holding the same series. 7 rounds (quick: 3).',
  },
  {
    name: 'models',
    file: 'models.ts',
    what: 'Load time against file size, and an MLP 64→256→256→1 on the CPU against onnxruntime-node running the same weights (outputs compared first): latency p50 and samples/s with 4 calls in flight.',
  },
  {
    name: 'dispatch',
    file: 'dispatch.ts',
    what:
      'Cost-aware dispatch. SQLite (file, WAL) point reads and single-row inserts against better-sqlite3 ^12 (synchronous, WAL, synchronous=NORMAL: its best configuration), awaited one by one, through `querySync`, and with 64 concurrent callers on a pool of 4. PostgreSQL: 64 workers of `select $1::int` plus a 50 ms report every 25 ms on a pool of 8, against pg and postgres.js. A spike of 50 callers on 5 warm connections through a proxy adding 150 ms to every connect, against pg-pool.',
  },
  {
    name: 'streams',
    file: 'streams.ts',
    what:
      'COPY of 1 000 000 CSV rows in (`copyFrom`) and out (`copyTo`) against postgres.js `.writable()` / `.readable()` (best of 3); and 4 `worker_threads` × 32 queries in flight on one `ConnectionPool.shared` pool of 8 against 4 workers each with its own pg / postgres.js pool of 2 (same total), with the server connections seen.',
  },
  {
    name: 'scenarios',
    file: 'scenarios.ts',
    what:
      "The seed's test scenarios on PostgreSQL, each with its target: 5000 concurrent operations, 5× overload, throughput over 10 s, 100 users × 50 requests, memory under load, latency percentiles, pool size scaling (PostgreSQL up to 50 connections to stay under the local server's `max_connections` 100; SQLite up to 200).",
  },
]

interface Table {
  bench: string
  title: string
  rows: Row[]
}

interface Outcome {
  bench: Bench
  code: number
  seconds: number
  tables: Table[]
  notes: string[]
}

/** Runs one benchmark in its own process, streaming its output, collecting its tables. */
function run(bench: Bench, env: NodeJS.ProcessEnv, scratch: string): Promise<Outcome> {
  const jsonFile = path.join(scratch, `${bench.name}.jsonl`)
  const args = ['--expose-gc', '--import', 'tsx', path.join(__dirname, bench.file), ...(quick ? ['--quick'] : [])]
  const started = performance.now()
  console.log(`\n=== ${bench.name}: node ${args.slice(3).map((a) => path.relative(ROOT, a) || a).join(' ')} ===`)
  return new Promise((resolve) => {
    const child = spawn(process.execPath, args, {
      cwd: ROOT,
      env: { ...env, QM_BENCH_JSON: jsonFile, QM_BENCH_NAME: bench.name },
      stdio: ['ignore', 'pipe', 'inherit'],
    })
    let out = ''
    child.stdout.on('data', (d: Buffer) => {
      out += d
      process.stdout.write(d)
    })
    child.on('close', (code, signal) => {
      let tables: Table[] = []
      try {
        tables = readFileSync(jsonFile, 'utf8')
          .split('\n')
          .filter(Boolean)
          .map((l) => JSON.parse(l) as Table)
      } catch {
        // no table written: the benchmark failed before printing one
      }
      // Verdict lines a benchmark prints after its tables (e.g. "render speed-up vs prom-client: …").
      const notes = out.split('\n').filter((l) => /(target|favour|met their|FAILED|warning)/i.test(l) && !l.startsWith('│'))
      resolve({ bench, code: code ?? (signal ? 128 : 1), seconds: (performance.now() - started) / 1000, tables, notes })
    })
  })
}

// ---- headline ------------------------------------------------------------------------------

interface Headline {
  comparison: string
  unit: string
  ours: string
  peer: string
  theirs: string
  ratio: number
}

const num = (v: string | number | undefined) => (typeof v === 'number' ? v : Number.parseFloat(String(v ?? 'NaN')))
const fmt = (n: number) => (n >= 100 ? Math.round(n).toLocaleString('en-US') : n >= 10 ? n.toFixed(1) : n.toFixed(2))
const fmtRange = (r: string | number | undefined) =>
  typeof r === 'string' && r.includes('–')
    ? ` (${r
        .split('–')
        .map((x) => fmt(Number(x)))
        .join('–')})`
    : ''

/** One row per (comparison, peer): quartermaster's figure, the peer's, and ours ÷ theirs (higher favours us). */
function headline(tables: Table[]): Headline[] {
  const out: Headline[] = []
  const byTitle = (bench: string, prefix: string) => tables.filter((t) => t.bench === bench && t.title.startsWith(prefix))

  for (const t of byTitle('pool', 'pool.query vs peers')) {
    const scenarios = [...new Set(t.rows.map((r) => String(r.scenario)))]
    for (const s of scenarios) {
      const rows = t.rows.filter((r) => r.scenario === s)
      const ours = rows.find((r) => r.client === 'quartermaster')
      if (!ours) continue
      for (const peer of rows.filter((r) => r !== ours)) {
        out.push({
          comparison: `pool.query · ${s}`,
          unit: 'queries/s',
          ours: fmt(num(ours['q/s (median)'])) + fmtRange(ours['q/s min–max']),
          peer: String(peer.client),
          theirs: fmt(num(peer['q/s (median)'])) + fmtRange(peer['q/s min–max']),
          ratio: num(ours['q/s (median)']) / num(peer['q/s (median)']),
        })
      }
    }
  }

  for (const t of byTitle('lease', 'Lease cycle')) {
    const backend = t.title.includes('PostgreSQL') ? 'PostgreSQL' : 'SQLite'
    const cases = [...new Set(t.rows.map((r) => String(r.case)))]
    for (const c of cases) {
      const rows = t.rows.filter((r) => r.case === c)
      const ours = rows.find((r) => r.pool === 'quartermaster')
      if (!ours) continue
      for (const peer of rows.filter((r) => r !== ours)) {
        out.push({
          comparison: `lease · ${c} · ${backend}`,
          unit: 'cycles/s',
          ours: fmt(num(ours['cycles/s (median)'])) + fmtRange(ours['min–max']),
          peer: String(peer.pool),
          theirs: fmt(num(peer['cycles/s (median)'])) + fmtRange(peer['min–max']),
          ratio: num(ours['cycles/s (median)']) / num(peer['cycles/s (median)']),
        })
      }
    }
  }

  for (const t of byTitle('metrics', 'Render')) {
    const ours = t.rows.find((r) => String(r.renderer).startsWith('quartermaster'))
    const prom = t.rows.find((r) => String(r.renderer).startsWith('prom-client'))
    if (!ours || !prom) continue
    out.push({
      comparison: `metrics · Prometheus render, ${ours.series} series`,
      unit: 'ms per render',
      ours: String(ours['ms per render']),
      peer: 'prom-client',
      theirs: String(prom['ms per render']),
      ratio: num(prom['ms per render']) / num(ours['ms per render']),
    })
  }

  for (const t of byTitle('models', 'Predict')) {
    for (const r of t.rows) {
      const ours = num(r['qm samples/s (4 in flight)'])
      const theirs = num(r['ORT samples/s (4 in flight)'])
      if (!Number.isFinite(ours) || !Number.isFinite(theirs)) continue
      out.push({
        comparison: `models · MLP predict, batch ${r.batch}, 4 in flight`,
        unit: 'samples/s',
        ours: fmt(ours),
        peer: 'onnxruntime-node',
        theirs: fmt(theirs),
        ratio: ours / theirs,
      })
    }
    for (const r of t.rows) {
      const ours = num(r['qm predict p50 µs'])
      const theirs = num(r['ORT run p50 µs'])
      if (!Number.isFinite(ours) || !Number.isFinite(theirs)) continue
      out.push({
        comparison: `models · MLP predict latency p50, batch ${r.batch}`,
        unit: 'µs per call',
        ours: fmt(ours),
        peer: 'onnxruntime-node',
        theirs: fmt(theirs),
        ratio: theirs / ours,
      })
    }
  }
  for (const t of byTitle('dispatch', 'SQLite small work')) {
    for (const r of t.rows) {
      out.push({
        comparison: `SQLite · ${r.case}`,
        unit: 'ops/s',
        ours: String(r.quartermaster),
        peer: 'better-sqlite3',
        theirs: String(r['better-sqlite3']),
        ratio: num(r.ratio),
      })
    }
  }
  for (const t of byTitle('dispatch', 'PostgreSQL mixed')) {
    const ours = t.rows.find((r) => r.client === 'quartermaster')
    if (!ours) continue
    for (const peer of t.rows.filter((r) => r !== ours)) {
      out.push({
        comparison: 'PG mixed · fast-query p99.9 beside 50 ms reports, pool 8',
        unit: 'ms (lower wins)',
        ours: String(ours['fast p99.9 ms']),
        peer: String(peer.client),
        theirs: String(peer['fast p99.9 ms']),
        ratio: num(peer['fast p99.9 ms']) / num(ours['fast p99.9 ms']),
      })
      out.push({
        comparison: 'PG mixed · fast-query throughput beside 50 ms reports, pool 8',
        unit: 'queries/s',
        ours: String(ours['fast q/s']),
        peer: String(peer.client),
        theirs: String(peer['fast q/s']),
        ratio: num(String(ours['fast q/s']).replace(/,/g, '')) / num(String(peer['fast q/s']).replace(/,/g, '')),
      })
    }
  }
  for (const t of byTitle('streams', 'COPY')) {
    for (const r of t.rows) {
      out.push({
        comparison: `COPY · ${r.copy}`,
        unit: 'rows/s',
        ours: String(r['quartermaster rows/s']),
        peer: 'postgres.js',
        theirs: String(r['postgres.js rows/s']),
        ratio: num(r.ratio),
      })
    }
  }
  return out
}

/** A shorter label for the chart's axis (vega estimates text width generously without a canvas). */
function chartLabel(comparison: string): string {
  return comparison
    .replace('tryAcquire + release', 'tryAcquire')
    .replace('acquire + release', 'acquire')
    .replace(/ on (\d+) connections/, '/$1 conns')
    .replace('PostgreSQL', 'PG')
    .replace(/(\w+) concurrent select 1/, 'select 1 ×$1')
    .replace(/^(metrics|models) · /, '')
    .replace(', 4 in flight', '')
}

function headlineMarkdown(rows: Headline[]): string {
  const lines = [
    '| comparison | unit | quartermaster | peer | peer figure | quartermaster ÷ peer |',
    '|---|---|--:|---|--:|--:|',
    ...rows.map((h) => `| ${h.comparison} | ${h.unit} | ${h.ours} | ${h.peer} | ${h.theirs} | **${h.ratio.toFixed(2)}×** |`),
  ]
  return lines.join('\n')
}

// ---- RESULTS.md ----------------------------------------------------------------------------

function markdownTable(rows: Row[]): string {
  if (rows.length === 0) return '_(empty)_'
  const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))]
  const esc = (v: unknown) => String(v ?? '').replace(/\|/g, '\\|')
  return [`| ${cols.map(esc).join(' | ')} |`, `|${cols.map((c) => (typeof rows[0][c] === 'number' ? '--:' : '---')).join('|')}|`, ...rows.map((r) => `| ${cols.map((c) => esc(r[c])).join(' | ')} |`)].join('\n')
}

function version(pkg: string): string {
  for (const dir of [path.join(__dirname, 'node_modules'), path.join(ROOT, 'node_modules')]) {
    try {
      return JSON.parse(readFileSync(path.join(dir, pkg, 'package.json'), 'utf8')).version
    } catch {
      // not installed there
    }
  }
  return '?'
}

function sh(cmd: string, args: string[]): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim()
  } catch {
    return '?'
  }
}

const loadAtStart = os.loadavg()[0]

async function machine(url: string, dbSource: string): Promise<Row[]> {
  let server = '?'
  try {
    const pool = new ConnectionPool({ url, maxSize: 1, name: 'bench-version' })
    server = String((await pool.query('show server_version')).rows[0].server_version)
    await pool.close()
  } catch {
    // reported as '?'
  }
  const own = JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8'))
  const peers = ['pg', 'postgres', 'better-sqlite3', 'generic-pool', 'tarn', 'prom-client', 'onnxruntime-node', 'vega', 'vega-lite']
  return [
    { what: 'date (UTC)', value: new Date().toISOString().replace(/\.\d+Z$/, 'Z') },
    { what: 'CPUs (nproc)', value: sh('nproc', []) },
    { what: 'CPU model', value: os.cpus()[0]?.model ?? '?' },
    { what: 'memory', value: `${(os.totalmem() / 2 ** 30).toFixed(1)} GiB` },
    { what: 'load average (1 min)', value: `${loadAtStart.toFixed(2)} at start, ${os.loadavg()[0].toFixed(2)} at end (other work shares this machine)` },
    { what: 'OS', value: `${os.type()} ${os.release()} ${os.arch()}` },
    { what: 'Node.js', value: process.version },
    { what: 'Rust', value: sh('rustc', ['--version']) },
    { what: 'PostgreSQL', value: `${server} (${dbSource}, same host)` },
    { what: 'quartermaster', value: `${own.version} (${sh('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD'])}${sh('git', ['-C', ROOT, 'status', '--porcelain', '--untracked-files=no']) ? ', uncommitted changes' : ''})` },
    { what: 'peers', value: peers.map((p) => `${p} ${version(p)}`).join(', ') },
  ]
}

function results(outcomes: Outcome[], machineRows: Row[], head: Headline[], totalS: number): string {
  const parts = [
    '# Benchmark results',
    '',
    `Generated by \`npm run bench\`${quick ? ' --quick' : ''} (benchmark/index.ts) in ${totalS.toFixed(0)} s. Every peer ran in the same process run as quartermaster, on the same machine and server. This is a **2-core shared machine**: expect run-to-run noise of ±20 % or more and read the ratios rather than the absolute figures.`,
    '',
    'Reproduce: `DATABASE_URL=postgres://… npm run bench` (or no `DATABASE_URL` for a throwaway embedded PostgreSQL). Python 3 with `pip install -r tools/requirements.txt` is needed for the models benchmark (it exports the ONNX model).',
    '',
    '## Machine',
    '',
    markdownTable(machineRows),
    '',
    '## Headline',
    '',
    'quartermaster ÷ peer: throughput ratio (for times — Prometheus render, predict latency — the peer\'s time ÷ ours), so **> 1 favours quartermaster and < 1 favours the peer**. Medians; min–max over rounds in parentheses where the benchmark keeps them.',
    '',
    headlineMarkdown(head),
    '',
    '![benchmark](results.svg)',
  ]
  for (const o of outcomes) {
    parts.push('', `## ${o.bench.name} (\`benchmark/${o.bench.file}\`, ${o.seconds.toFixed(0)} s${o.code ? `, **exit ${o.code}**` : ''})`, '', o.bench.what)
    for (const t of o.tables) parts.push('', `### ${t.title}`, '', markdownTable(t.rows))
    if (o.notes.length) parts.push('', ...o.notes.map((n) => `> ${n.trim()}  `))
  }
  return `${parts.join('\n')}\n`
}

/** Replaces README's headline table between its markers (Performance section only). */
function updateReadme(head: Headline[]): boolean {
  const file = path.join(ROOT, 'README.md')
  const readme = readFileSync(file, 'utf8')
  const start = '<!-- bench:headline:start -->'
  const end = '<!-- bench:headline:end -->'
  const a = readme.indexOf(start)
  const b = readme.indexOf(end)
  if (a < 0 || b < a) return false
  writeFileSync(file, `${readme.slice(0, a + start.length)}\n${headlineMarkdown(head)}\n${readme.slice(b)}`)
  return true
}

/** `--chart-only`: redraws results.svg from the headline and machine tables of RESULTS.md. */
async function chartOnly(): Promise<void> {
  const md = readFileSync(path.join(__dirname, 'RESULTS.md'), 'utf8')
  const cells = (line: string) => line.split('|').slice(1, -1).map((c) => c.trim())
  const machineValue = (what: string) => cells(md.split('\n').find((l) => l.startsWith(`| ${what} |`)) ?? '| | ? |')[1]
  const headlineRows = md
    .slice(md.indexOf('## Headline'))
    .split('\n')
    .filter((l) => /^\| \S.* \| \*\*[\d.]+×\*\* \|$/.test(l))
    .map(cells)
  const ratios: Ratio[] = headlineRows.map((c) => ({ comparison: chartLabel(c[0]), peer: c[3].replace(/ \(await acquire\)$/, ''), ratio: Number.parseFloat(c[5].replace(/\*/g, '')) }))
  const svg = await chartSvg(ratios, subtitle(machineValue('date (UTC)'), machineValue('CPUs (nproc)'), machineValue('CPU model'), machineValue('Node.js')))
  writeFileSync(path.join(__dirname, 'results.svg'), svg)
  console.log(`wrote benchmark/results.svg from benchmark/RESULTS.md (${ratios.length} bars)`)
}

function subtitle(date: string, cpus: string, model: string, node: string): string {
  return `${date.slice(0, 10)} · ${cpus} CPUs (${model}), shared machine · medians · Node ${node}`
}

async function main(): Promise<void> {
  if (process.argv.includes('--chart-only')) return chartOnly()
  const started = performance.now()
  const scratch = mkdtempSync(path.join(os.tmpdir(), 'qm-bench-'))
  const db = await resolveDatabaseUrl()
  const outcomes: Outcome[] = []
  try {
    const env = { ...process.env, DATABASE_URL: db.url }
    for (const bench of BENCHES) {
      if (only && !only.includes(bench.name)) continue
      outcomes.push(await run(bench, env, scratch))
    }
    const totalS = (performance.now() - started) / 1000
    const tables = outcomes.flatMap((o) => o.tables)
    const head = headline(tables)
    console.log('\n=== headline (quartermaster ÷ peer; > 1 favours quartermaster) ===')
    console.log(headlineMarkdown(head))
    const machineRows = await machine(db.url, db.source)
    const ratios: Ratio[] = head.map((h) => ({ comparison: chartLabel(h.comparison), peer: h.peer.replace(/ \(await acquire\)$/, ''), ratio: h.ratio }))
    const svg = await chartSvg(ratios, subtitle(String(machineRows[0].value), String(machineRows[1].value), String(machineRows[2].value), process.version))
    if (write) {
      writeFileSync(path.join(__dirname, 'RESULTS.md'), results(outcomes, machineRows, head, totalS))
      writeFileSync(path.join(__dirname, 'results.svg'), svg)
      const readme = !only && updateReadme(head)
      console.log(`\nwrote benchmark/RESULTS.md, benchmark/results.svg${readme ? ' and README.md\'s headline table' : ''}`)
    } else {
      console.log(`\n--no-write: RESULTS.md, results.svg and README left as they are (chart rendered: ${svg.length} bytes)`)
    }
    const failed = outcomes.filter((o) => o.code !== 0)
    console.log(`\nbenchmarks: ${outcomes.length - failed.length} passed, ${failed.length} failed in ${((performance.now() - started) / 1000).toFixed(1)} s`)
    for (const f of failed) console.log(`  ${f.bench.name} exited ${f.code}`)
    process.exitCode = failed.length ? 1 : 0
  } finally {
    await db.stop()
    rmSync(scratch, { recursive: true, force: true })
  }
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
