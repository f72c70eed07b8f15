#!/usr/bin/env node
// `npm run gpu:check`: the ten-minute check for a machine with an NVIDIA GPU. It builds nothing
// (it uses the addon already built in the repository: `npm install` or `npm run build`), runs
// the GPU jest suite (__test__/gpu) and the short GPU benchmark (benchmark/models-gpu.ts), and
// prints one summary. Safe unattended: every step has a hard timeout and is killed with its
// children past it; the suite checks free device memory before its large allocations; nothing
// is written outside the OS temp directory. Without a usable GPU it says so loudly and exits 0.
// Exit status: 0 when every step passed (or there is no GPU), 1 otherwise.
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..')
const banner = (lines) => {
  const bar = '*'.repeat(78)
  console.log(`\n${bar}\n${lines.map((l) => `*** ${l}`).join('\n')}\n${bar}\n`)
}

/** Runs a step with a hard timeout; returns its status and output. */
function run(label, cmd, args, timeoutMs, env = {}) {
  console.log(`\n=== ${label} ===`)
  const started = Date.now()
  const r = spawnSync(cmd, args, {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
    encoding: 'utf8',
    timeout: timeoutMs,
    killSignal: 'SIGKILL',
    maxBuffer: 64 << 20,
    env: { ...process.env, ...env },
  })
  process.stdout.write(r.stdout ?? '')
  process.stderr.write(r.stderr ?? '')
  const seconds = ((Date.now() - started) / 1000).toFixed(1)
  const timedOut = r.error?.code === 'ETIMEDOUT' || r.signal === 'SIGKILL'
  return { ok: r.status === 0, status: timedOut ? `timed out after ${timeoutMs / 1000} s` : `exit ${r.status ?? r.signal}`, seconds, stdout: r.stdout ?? '' }
}

const addon = path.join(ROOT, 'index.js')
if (!existsSync(addon)) {
  banner(['gpu:check: no built addon (index.js missing).', 'Build it first: npm install (or npm run build). gpu:check builds nothing.'])
  process.exit(1)
}

// The probe runs in a child: a driver that hangs or crashes must not take this script with it.
const probe = run(
  'probe: new ModelCache({ device: "cuda" })',
  process.execPath,
  [
    '-e',
    `const { ModelCache } = require(${JSON.stringify(addon)});
     try { const c = new ModelCache({ device: 'cuda', cleanupIntervalMs: 0 });
           console.log(JSON.stringify({ device: c.device, info: c.deviceInfo(), memory: c.deviceMemory() })) }
     catch (e) { console.log(JSON.stringify({ error: e.code + ': ' + e.message })) }`,
  ],
  120_000,
)
let found
try {
  found = JSON.parse(probe.stdout.trim().split('\n').pop())
} catch {
  found = { error: `the probe did not answer (${probe.status})` }
}
const smi = spawnSync('nvidia-smi', ['--query-gpu=name,driver_version,memory.total,memory.used', '--format=csv,noheader'], { encoding: 'utf8', timeout: 30_000 })
const smiLine = smi.status === 0 ? smi.stdout.trim() : `nvidia-smi: ${smi.error?.code === 'ENOENT' ? 'not installed' : (smi.stderr || smi.error?.message || `exit ${smi.status}`).trim()}`

if (!found.device) {
  banner([
    'gpu:check: NO GPU on this machine — nothing to check.',
    `device 'cuda' fails: ${found.error}`,
    smiLine,
    'The GPU suite and benchmark need an NVIDIA GPU with its driver; run this there.',
  ])
  process.exit(0)
}

const scratch = mkdtempSync(path.join(os.tmpdir(), 'qm-gpu-check-'))
const jestJson = path.join(scratch, 'jest.json')
const benchJson = path.join(scratch, 'bench.jsonl')
const suite = run(
  'GPU jest suite (__test__/gpu)',
  process.execPath,
  ['--expose-gc', path.join(ROOT, 'node_modules/jest/bin/jest.js'), '--runInBand', '--json', `--outputFile=${jestJson}`, '__test__/gpu'],
  6 * 60_000,
  { QM_GPU_REQUIRED: '1' },
)
const bench = run('GPU benchmark (benchmark/models-gpu.ts)', process.execPath, ['--expose-gc', '--import', 'tsx', path.join(ROOT, 'benchmark/models-gpu.ts'), '--quick'], 3 * 60_000, {
  QM_BENCH_JSON: benchJson,
})

let tests = 'no jest report'
if (existsSync(jestJson)) {
  const r = JSON.parse(readFileSync(jestJson, 'utf8'))
  tests = `${r.numPassedTests} passed, ${r.numFailedTests} failed, ${r.numPendingTests} skipped`
  for (const file of r.testResults ?? [])
    for (const t of file.assertionResults ?? []) if (t.status === 'failed') tests += `\n      FAILED: ${t.fullName}`
}
const tables = existsSync(benchJson)
  ? readFileSync(benchJson, 'utf8')
      .trim()
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l))
  : []
rmSync(scratch, { recursive: true, force: true })

const ok = suite.ok && bench.ok
console.log(`\n${'='.repeat(78)}\ngpu:check summary — ${ok ? 'PASS' : 'FAIL'}`)
console.log(`  device:     ${found.device}: ${found.info}`)
console.log(`  nvidia-smi: ${smiLine}`)
console.log(`  memory:     ${(found.memory.free / 2 ** 30).toFixed(1)} GiB free of ${(found.memory.total / 2 ** 30).toFixed(1)} GiB at start`)
console.log(`  GPU suite:  ${suite.status} in ${suite.seconds} s — ${tests}`)
console.log(`  benchmark:  ${bench.status} in ${bench.seconds} s`)
for (const t of tables) {
  console.log(`\n  ${t.title}`)
  for (const row of t.rows) console.log(`    ${Object.entries(row).map(([k, v]) => `${k}: ${v}`).join(' | ')}`)
}
console.log('='.repeat(78))
process.exit(ok ? 0 : 1)
