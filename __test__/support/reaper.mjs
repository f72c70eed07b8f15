// Kills the servers a test process started when that process goes away, even by a crash or
// SIGKILL: its stdin is a pipe from that process, and the pipe's end is the signal.
// Input lines (JSON): {guard: pid, signal}, {unguard: pid}, {dir: path}, {undir: path}.
import { rmSync } from 'node:fs'
import { createInterface } from 'node:readline'

const pids = new Map()
const dirs = new Set()

const alive = (pid) => {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

let reaping = false
async function reap() {
  if (reaping) return
  reaping = true
  for (const [pid, signal] of pids) {
    try { process.kill(pid, signal) } catch {}
  }
  const deadline = Date.now() + 5000
  while ([...pids.keys()].some(alive) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50))
  for (const pid of pids.keys()) {
    try { process.kill(pid, 'SIGKILL') } catch {}
  }
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true })
  process.exit(0)
}

// Ctrl-C reaches the whole process group: outlive the parent, then clean up after it.
process.on('SIGINT', () => {})
process.on('SIGTERM', reap)
createInterface({ input: process.stdin })
  .on('line', (line) => {
    const msg = JSON.parse(line)
    if (msg.guard) pids.set(msg.guard, msg.signal ?? 'SIGKILL')
    if (msg.unguard) pids.delete(msg.unguard)
    if (msg.dir) dirs.add(msg.dir)
    if (msg.undir) dirs.delete(msg.undir)
  })
  .on('close', reap)
