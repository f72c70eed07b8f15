// Plumbing for the fault suite (`npm run test:faults`): a closed-loop load of callers that
// records how every call settled, the figures each scenario prints and appends to
// .tmp/faults.json (tools/faults-table.ts turns them into RELIABILITY.md's table), and CPU use.
import { appendFileSync, mkdirSync } from 'node:fs'
import path from 'node:path'
import { performance } from 'node:perf_hooks'

/** CI's short form: every scenario, smaller (QM_FAULTS_SHORT=1). */
export const short = process.env.QM_FAULTS_SHORT === '1'
/** Picks the full or the short figure. */
export const size = <T>(full: T, small: T): T => (short ? small : full)

export const FIGURES_FILE = path.join(__dirname, '..', '..', '.tmp', 'faults.json')

export const now = () => performance.now()
export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms))

/** How one call settled, times in ms on the `now()` clock. */
export interface Outcome {
  start: number
  end: number
  ok: boolean
  /** `CODE`, with the phase or `sent` where the error has one: `POOL_TIMEOUT/connect`, `CONNECTION_LOST/sent`. */
  kind?: string
  code?: string
  message?: string
}

/** Every code the addon documents (README "Errors"); anything else is not a typed error. */
export const CODES = new Set([
  'INVALID_ARGUMENT', 'POOL_TIMEOUT', 'POOL_EXHAUSTED', 'POOL_CLOSED', 'CONNECT_FAILED', 'QUERY_FAILED',
  'QUERY_TIMEOUT', 'ABORT_ERR', 'CONNECTION_LOST', 'INTERNAL',
])

export function kindOf(err: any): string {
  const code = String(err?.code ?? 'UNTYPED')
  if (code === 'POOL_TIMEOUT' && err.phase) return `${code}/${err.phase}`
  if (code === 'CONNECTION_LOST' || code === 'QUERY_TIMEOUT') return err.sent === true ? `${code}/sent` : err.sent === false ? `${code}/unsent` : code
  if (code === 'QUERY_FAILED' && err.sqlstate) return `${code}/${err.sqlstate}`
  return code
}

/** Times one call. */
export async function timed(call: () => Promise<unknown>): Promise<Outcome> {
  const start = now()
  try {
    await call()
    return { start, end: now(), ok: true }
  } catch (err: any) {
    return { start, end: now(), ok: false, kind: kindOf(err), code: err?.code, message: String(err?.message ?? err) }
  }
}

/**
 * `concurrency` callers, each issuing its next call as soon as the previous one settled (no
 * pause after an error: a pool that fails fast would show as a spin), until `stop()`.
 */
export function startLoad(call: (n: number) => Promise<unknown>, concurrency: number) {
  const outcomes: Outcome[] = []
  let running = true
  let n = 0
  const worker = async () => {
    while (running) outcomes.push(await timed(() => call(n++)))
  }
  const workers = Array.from({ length: concurrency }, worker)
  return {
    outcomes,
    /** Stops issuing and resolves once every call in flight has settled. */
    stop: async () => {
      running = false
      await Promise.all(workers)
      return outcomes
    },
  }
}

/** Counts of every error kind. */
export function errorsByKind(outcomes: Outcome[]): Record<string, number> {
  const counts: Record<string, number> = {}
  for (const o of outcomes) if (!o.ok) counts[o.kind!] = (counts[o.kind!] ?? 0) + 1
  return counts
}

export const untyped = (outcomes: Outcome[]) => outcomes.filter((o) => !o.ok && !CODES.has(o.code ?? ''))

export const maxSettle = (outcomes: Outcome[]) => outcomes.reduce((m, o) => Math.max(m, o.end - o.start), 0)

/** The `p` quantile (0..1) of the settle times. */
export function settleQuantile(outcomes: Outcome[], p: number): number {
  const times = outcomes.map((o) => o.end - o.start).sort((a, b) => a - b)
  return times.length ? times[Math.min(times.length - 1, Math.ceil(p * times.length) - 1)] : 0
}

/** Ms from `since` to the first call that succeeded after it (null if none did). */
export function firstSuccessAfter(outcomes: Outcome[], since: number): number | null {
  let first = Infinity
  for (const o of outcomes) if (o.ok && o.end >= since) first = Math.min(first, o.end)
  return first === Infinity ? null : first - since
}

/** Share of one core the process used between two `process.cpuUsage()` readings over `wallMs`. */
export function cpuShare(start: NodeJS.CpuUsage, end: NodeJS.CpuUsage, wallMs: number): number {
  return (end.user - start.user + end.system - start.system) / 1000 / wallMs
}

/** One row of RELIABILITY.md's table. */
export interface Figures {
  scenario: string
  backend: 'postgres' | 'redis'
  calls: number
  errors: Record<string, number>
  /** Ms from recovery (server accepting again, traffic flowing again, fault over) to the first success. */
  firstSuccessMs: number | null
  maxSettleMs: number
  /** The bound every call had to settle within, when the scenario states one. */
  deadlineMs: number | null
  /** What bounded the statements: `timeoutMs`, `statementTimeoutMs`, `acquireTimeoutMs`, `none`. */
  bound: string
  /** Scenario-specific readings, e.g. `cpu while down 0.4 %`. */
  notes: string
}

const fmt = (ms: number | null) => (ms === null ? 'n/a' : `${Math.round(ms)} ms`)

/** Prints the scenario's figures on one line and appends them to .tmp/faults.json. */
export function report(f: Figures): void {
  const errors = Object.entries(f.errors).map(([k, v]) => `${k} ${v}`).join(', ') || 'none'
  const line =
    `faults: ${f.scenario} → calls ${f.calls}, errors ${errors}, first success after recovery ${fmt(f.firstSuccessMs)}, ` +
    `max settle ${fmt(f.maxSettleMs)} vs deadline ${fmt(f.deadlineMs)} (${f.bound})${f.notes ? `; ${f.notes}` : ''}`
  process.stdout.write(line + '\n')
  mkdirSync(path.dirname(FIGURES_FILE), { recursive: true })
  // The test's full name lets tools/faults-table.ts show whether its assertions held.
  const test = (globalThis as any).expect?.getState?.().currentTestName
  appendFileSync(FIGURES_FILE, JSON.stringify({ ...f, test, short, at: new Date().toISOString() }) + '\n')
}

/** A URL with `application_name` set, so pg_stat_activity shows the pool's backends. */
export function withAppName(url: string, name: string): string {
  const u = new URL(url)
  u.searchParams.set('application_name', name)
  return u.toString()
}

export function hostPort(url: string): { host: string; port: number } {
  const u = new URL(url)
  return { host: u.hostname, port: Number(u.port || (u.protocol.startsWith('redis') ? 6379 : 5432)) }
}
