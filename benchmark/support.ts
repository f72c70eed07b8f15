// Shared by the benchmarks: a database to run against, medians, tables.
import { appendFileSync } from 'node:fs'

import { startPostgres } from '../__test__/support/servers'

export type Row = Record<string, string | number>

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const mid = Math.floor(s.length / 2)
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2
}

/**
 * Prints a table. When QM_BENCH_JSON names a file (set by `npm run bench`), also appends it
 * there as one JSON line `{ bench, title, rows }` for benchmark/RESULTS.md and the chart.
 */
export function printTable(title: string, rows: Row[]): void {
  console.log(`\n${title}`)
  console.table(rows)
  const out = process.env.QM_BENCH_JSON
  if (out) appendFileSync(out, `${JSON.stringify({ bench: process.env.QM_BENCH_NAME ?? '', title, rows })}\n`)
}

/** DATABASE_URL when set, else a throwaway embedded PostgreSQL. */
export async function resolveDatabaseUrl(): Promise<{ url: string; source: string; stop: () => Promise<void> }> {
  if (process.env.DATABASE_URL) return { url: process.env.DATABASE_URL, source: 'from DATABASE_URL', stop: async () => {} }
  const pg = await startPostgres()
  return { url: pg.url, source: 'embedded', stop: pg.stop }
}
