// Shared plumbing for the server helpers (pg-cluster, pgbouncer, redis-cluster): running
// commands, waiting for ports, running as the `postgres` OS user, and a reaper that kills
// what a test process started when that process dies.
import { execFile, execFileSync, spawn, type ChildProcess, type SpawnOptions } from 'node:child_process'
import { chownSync, mkdtempSync, rmSync } from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'

export function waitForPort(port: number, timeoutMs: number, host = '127.0.0.1'): Promise<void> {
  const deadline = Date.now() + timeoutMs
  return new Promise((resolve, reject) => {
    const attempt = () => {
      const sock = net.connect(port, host)
      sock.once('connect', () => {
        sock.destroy()
        resolve()
      })
      sock.once('error', () => {
        sock.destroy()
        if (Date.now() > deadline) reject(new Error(`nothing listened on ${host}:${port} within ${timeoutMs} ms`))
        else setTimeout(attempt, 25)
      })
    }
    attempt()
  })
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms))

/** Polls `probe` until it returns a value other than undefined, or throws after `timeoutMs`. */
export async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs
  let last: unknown
  for (;;) {
    try {
      const v = await probe()
      if (v !== undefined) return v
    } catch (err) {
      last = err
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last}` : ''}`)
    await sleep(50)
  }
}

export interface Identity {
  uid: number
  gid: number
}

/** The `postgres` OS user when we are root (initdb, postgres and pgbouncer refuse root), else none. */
export function serverIdentity(): Identity | undefined {
  if (process.getuid?.() !== 0) return undefined
  const [uid, gid] = ['-u', '-g'].map((flag) => Number(execFileSync('id', [flag, 'postgres'], { encoding: 'utf8' }).trim()))
  return { uid, gid }
}

/** A fresh temporary directory, owned by `owner` when given, removed by the reaper if we die. */
export function tempDir(prefix: string, owner?: Identity): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), prefix))
  if (owner) chownSync(dir, owner.uid, owner.gid)
  reaper().dir(dir)
  return dir
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true })
  reaper().undir(dir)
}

/** Environment without libpq variables that would redirect the tools we run. */
export function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {}
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('PG')) env[k] = v
  return { ...env, LC_ALL: 'C', ...extra }
}

/** Runs a command to completion; rejects with its output when it fails. */
export function run(cmd: string, args: string[], opts: { as?: Identity; cwd?: string; timeoutMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      cmd,
      args,
      { uid: opts.as?.uid, gid: opts.as?.gid, cwd: opts.cwd ?? os.tmpdir(), env: cleanEnv(), timeout: opts.timeoutMs ?? 60_000, encoding: 'utf8' },
      (err, stdout, stderr) => {
        if (err) reject(new Error(`${path.basename(cmd)} ${args.join(' ')} failed: ${err.message}\n${stdout}${stderr}`.trim()))
        else resolve(stdout)
      },
    )
  })
}

/** A long-running server process, guarded by the reaper; its output is kept for error messages. */
export interface Server {
  child: ChildProcess
  exited: Promise<void>
  output(): string
  /** Signals the process and resolves when it has exited (SIGKILL after `timeoutMs`). */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<void>
}

export function spawnServer(cmd: string, args: string[], opts: { as?: Identity; cwd?: string; reapSignal?: NodeJS.Signals } = {}): Server {
  const spawnOpts: SpawnOptions = { uid: opts.as?.uid, gid: opts.as?.gid, cwd: opts.cwd ?? os.tmpdir(), env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] }
  const child = spawn(cmd, args, spawnOpts)
  let out = ''
  const keep = (chunk: Buffer) => {
    out = (out + chunk.toString()).slice(-8000)
  }
  child.stdout!.on('data', keep)
  child.stderr!.on('data', keep)
  let done = false
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => {
      done = true
      if (child.pid) reaper().unguard(child.pid)
      resolve()
    })
    child.once('error', (err) => {
      out += String(err)
      done = true
      resolve()
    })
  })
  if (child.pid) reaper().guard(child.pid, opts.reapSignal ?? 'SIGKILL')
  return {
    child,
    exited,
    output: () => out,
    stop: async (signal = 'SIGTERM', timeoutMs = 10_000) => {
      if (done) return
      child.kill(signal)
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
      await exited
      clearTimeout(timer)
    },
  }
}

interface Reaper {
  guard(pid: number, signal: NodeJS.Signals): void
  unguard(pid: number): void
  dir(dir: string): void
  undir(dir: string): void
}

let theReaper: Reaper | undefined

/** One reaper child per test process, which does not keep that process alive. */
function reaper(): Reaper {
  if (theReaper) return theReaper
  const child = spawn(process.execPath, [path.join(__dirname, 'reaper.mjs')], { stdio: ['pipe', 'ignore', 'inherit'] })
  child.unref()
  const stdin = child.stdin!
  ;(stdin as unknown as net.Socket).unref()
  stdin.on('error', () => {})
  const send = (msg: object) => {
    if (!stdin.destroyed) stdin.write(JSON.stringify(msg) + '\n')
  }
  theReaper = {
    guard: (pid, signal) => send({ guard: pid, signal }),
    unguard: (pid) => send({ unguard: pid }),
    dir: (dir) => send({ dir }),
    undir: (dir) => send({ undir: dir }),
  }
  return theReaper
}
