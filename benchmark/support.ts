// Shared by the benchmarks: a database to run against, medians, tables.
import { startPostgres } from '../__test__/support/servers'

export type Row = Record<string, string | number>

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const mid = Math.floor(s.length / 2)
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2
}

export function printTable(title: string, rows: Row[]): void {
  console.log(`\n${title}`)
  console.table(rows)
}

/** DATABASE_URL when set, else a throwaway embedded PostgreSQL. */
export async function resolveDatabaseUrl(): Promise<{ url: string; source: string; stop: () => Promise<void> }> {
  if (process.env.DATABASE_URL) return { url: process.env.DATABASE_URL, source: 'from DATABASE_URL', stop: async () => {} }
  const pg = await startPostgres()
  return { url: pg.url, source: 'embedded', stop: pg.stop }
}
