// `npm run demo` end to end: the demo runs for ~3 s in a child process (plain output), exits 0,
// leaves no temp dir behind, and its report holds real, non-zero figures.
import { spawn } from 'node:child_process'
import { readdirSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { ConnectionPool } from '../index'
import { databaseUrl, describeWithPostgres } from './support/env'

const ROOT = path.join(__dirname, '..')
const TSX = path.join(ROOT, 'node_modules', '.bin', process.platform === 'win32' ? 'tsx.cmd' : 'tsx')

interface Run {
  code: number | null
  stdout: string
  stderr: string
}

function runDemo(args: string[], env: NodeJS.ProcessEnv): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(TSX, ['demo/index.ts', '--plain', ...args], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => (stderr += d))
    const killer = setTimeout(() => child.kill('SIGKILL'), 45_000)
    child.on('error', reject)
    child.on('close', (code) => {
      clearTimeout(killer)
      resolve({ code, stdout, stderr })
    })
  })
}

/** `  key                 value` lines of the final report. */
function report(stdout: string): Map<string, string> {
  const at = stdout.indexOf('== quartermaster demo report ==')
  expect(at).toBeGreaterThanOrEqual(0)
  const lines = stdout.slice(at).split('\n').slice(1)
  return new Map(lines.filter((l) => /^ {2}\S/.test(l)).map((l) => [l.slice(2, 22).trim(), l.slice(22).trim()]))
}

const num = (s: string | undefined) => Number.parseFloat(s ?? 'NaN')

function expectRealFigures(r: Map<string, string>): void {
  expect(num(r.get('ops/s'))).toBeGreaterThan(0)
  expect(num(r.get('operations'))).toBeGreaterThan(0)
  expect(num(r.get('success rate'))).toBeGreaterThanOrEqual(95)
  expect(num(r.get('latency p50'))).toBeGreaterThan(0)
  expect(num(r.get('latency p99'))).toBeGreaterThan(0)
  expect(num(r.get('latency p99'))).toBeGreaterThanOrEqual(num(r.get('latency p50')))
  expect(num(r.get('predictions'))).toBeGreaterThan(0)
  expect(num(r.get('cache hit rate'))).toBeGreaterThan(0)
  expect(r.get('memory growth')).toMatch(/^[+-]\d+\.\d MiB \(rss \d+\.\d -> \d+\.\d MiB\)$/)
  expect(num(r.get('orders in database'))).toBeGreaterThan(0)
  expect(r.get('model device')).toMatch(/^(cpu|cuda:\d+)$/)
  expect(r.get('pool health')).toMatch(/^(healthy|degraded|unhealthy) \(score \d+/)
  expect(r.get('metrics health')).toMatch(/^(healthy|degraded|unhealthy) \(score \d+/)
}

const demoTempDirs = () => readdirSync(os.tmpdir()).filter((d) => d.startsWith('qm-demo-'))

it('runs on the embedded default (SQLite in a temp dir) and reports real figures', async () => {
  const before = new Set(demoTempDirs())
  const env = { ...process.env }
  delete env.DATABASE_URL
  const run = await runDemo(['--duration', '3', '--concurrency', '8'], env)
  if (run.code !== 0) console.error(run.stdout, run.stderr)
  expect(run.code).toBe(0)
  expect(run.stdout).toContain('SQLite (temp file, removed at exit)')
  expect(run.stdout).toMatch(/models: sample-lstm .* on (cpu|cuda:\d+)/)
  expect(run.stdout).toMatch(/ops\/s {2}p50 /) // the plain live lines
  expect(run.stdout).not.toContain('\x1b[') // no escape codes when not a TTY
  expectRealFigures(report(run.stdout))
  expect(demoTempDirs().filter((d) => !before.has(d))).toEqual([])
})

it('fails with a clear message and a non-zero exit on a bad option', async () => {
  const run = await runDemo(['--duration', 'soon'], { ...process.env })
  expect(run.code).toBe(2)
  expect(run.stderr).toContain("--duration must be a number from 0.5 to 86400, got 'soon'")
})

describeWithPostgres('demo on PostgreSQL', () => {
  it('runs against --database-url and drops its tables', async () => {
    const pool = new ConnectionPool({ url: databaseUrl!, maxSize: 1, name: 'demo-check' })
    const demoTables = async () =>
      ((await pool.query("select count(*)::int as n from pg_tables where tablename like 'qm\\_demo\\_%'")).rows as Array<{ n: number }>)[0].n
    try {
      const before = await demoTables()
      const run = await runDemo(['--duration', '3', '--concurrency', '8', '--database-url', databaseUrl!], { ...process.env })
      if (run.code !== 0) console.error(run.stdout, run.stderr)
      expect(run.code).toBe(0)
      expect(run.stdout).toContain('PostgreSQL ')
      expectRealFigures(report(run.stdout))
      expect(run.stdout).not.toMatch(/postgres:\/\/[^ ]*@/) // no credentials echoed
      expect(await demoTables()).toBeLessThanOrEqual(before) // its per-run tables are dropped
    } finally {
      await pool.close()
    }
  })
})
