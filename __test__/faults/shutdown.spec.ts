// Shutdown under load (HikariCP's ShutdownTest): close({ timeoutMs }) with 1000 statements
// queued. Each settles, served or POOL_CLOSED; no backend is left on the server; and the
// process exits on its own, with code 0, in a child of its own.
import { spawn } from 'node:child_process'
import path from 'node:path'
import { databaseUrl, describeWithPostgres } from '../support/env'
import { report } from '../support/faults'

const STATEMENTS = 1000
const CLOSE_MS = 250
const EXIT_WITHIN_MS = 5000

interface ChildRun {
  code: number | null
  signal: NodeJS.Signals | null
  /** From the start of close() to the process's exit. */
  exitMs: number | null
  result?: { served: number; closed: number; other: Record<string, number>; before: number; left: number; closeMs: number; settledMs: number }
  stderr: string
}

function runChild(): Promise<ChildRun> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [path.join(__dirname, 'shutdown-child.js')], {
      env: { ...process.env, QM_URL: databaseUrl!, QM_APP: `qm_faults_shutdown_${process.pid}`, QM_STATEMENTS: String(STATEMENTS), QM_CLOSE_MS: String(CLOSE_MS) },
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    let out = ''
    let stderr = ''
    child.stdout.on('data', (d) => (out += d))
    child.stderr.on('data', (d) => (stderr += d))
    // A child that does not exit on its own is killed, and the test fails on its signal.
    const killer = setTimeout(() => child.kill('SIGKILL'), 30_000)
    child.on('exit', (code, signal) => {
      clearTimeout(killer)
      const lines = out.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l))
      const closingAt = lines[0]?.closingAt as number | undefined
      resolve({ code, signal, exitMs: closingAt ? Date.now() - closingAt : null, result: lines[1], stderr })
    })
  })
}

describeWithPostgres('fault: shutdown under load', () => {
  it('settles every queued statement, leaves nothing on the server, and lets the process exit', async () => {
    const run = await runChild()
    const r = run.result
    report({
      scenario: `shutdown: close({ timeoutMs: ${CLOSE_MS} }) with ${STATEMENTS} statements queued (child process)`,
      backend: 'postgres',
      calls: STATEMENTS,
      errors: r ? { ...(r.closed ? { POOL_CLOSED: r.closed } : {}), ...r.other } : {},
      firstSuccessMs: null,
      maxSettleMs: r?.settledMs ?? Infinity,
      deadlineMs: null,
      bound: 'close({ timeoutMs })',
      notes: r
        ? `served ${r.served}, POOL_CLOSED ${r.closed}; close() resolved in ${r.closeMs} ms; backends before ${r.before}, after ${r.left}; exit code ${run.code} ${run.exitMs} ms after close() began`
        : `no result: exit ${run.code ?? run.signal}; ${run.stderr.slice(0, 300)}`,
    })
    expect(run.stderr).toBe('')
    expect(r).toBeDefined()
    expect(r!.before).toBe(4)
    expect(r!.served + r!.closed).toBe(STATEMENTS)
    expect(r!.other).toEqual({})
    expect(r!.closed).toBeGreaterThan(0) // the bound really cut the queue short
    expect(r!.left).toBe(0)
    expect(run.signal).toBeNull()
    expect(run.code).toBe(0)
    expect(run.exitMs!).toBeLessThan(EXIT_WITHIN_MS)
  })
})
