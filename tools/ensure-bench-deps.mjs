#!/usr/bin/env node
// Installs benchmark/package.json (the benchmark peers and chart tooling: pg, postgres.js,
// onnxruntime-node, generic-pool, tarn, vega, the @xterm packages…) into benchmark/node_modules
// on first use, so a plain `npm install` of the repository stays small.
//   node tools/ensure-bench-deps.mjs               install if benchmark/node_modules lacks a declared package
//   node tools/ensure-bench-deps.mjs --run CMD …   then run CMD with benchmark/node_modules on NODE_PATH
//                                                  (for files outside benchmark/, e.g. demo/screenshot.ts)
import { spawnSync } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..')
const BENCH = path.join(ROOT, 'benchmark')
const installed = path.join(BENCH, 'node_modules', '.package-lock.json')

function stale() {
  if (!existsSync(installed)) return true
  const deps = JSON.parse(readFileSync(path.join(BENCH, 'package.json'), 'utf8')).devDependencies ?? {}
  return Object.keys(deps).some((name) => !existsSync(path.join(BENCH, 'node_modules', name, 'package.json')))
}

if (stale()) {
  console.error('benchmark dependencies: npm install --prefix benchmark (first use; see benchmark/package.json)')
  const npm = process.env.npm_execpath
  const [cmd, args] = npm && npm.endsWith('.js') ? [process.execPath, [npm]] : ['npm', []]
  const useCi = existsSync(path.join(BENCH, 'package-lock.json')) && !existsSync(path.join(BENCH, 'node_modules'))
  const r = spawnSync(cmd, [...args, useCi ? 'ci' : 'install', '--prefix', BENCH, '--no-audit', '--no-fund'], {
    stdio: 'inherit',
    shell: process.platform === 'win32' && cmd === 'npm',
    // onnxruntime-node's install script would download CUDA execution providers; the
    // benchmark uses its CPU build only (benchmark/package.json also denies the script).
    env: { ...process.env, ONNXRUNTIME_NODE_INSTALL: process.env.ONNXRUNTIME_NODE_INSTALL ?? 'skip' },
  })
  if (r.status !== 0) {
    console.error(`benchmark dependencies: npm install --prefix benchmark failed (${r.error?.message ?? `exit ${r.status}`})`)
    process.exit(r.status || 1)
  }
}

const run = process.argv.indexOf('--run')
if (run >= 0) {
  const [cmd, ...args] = process.argv.slice(run + 1)
  if (!cmd) {
    console.error('ensure-bench-deps: --run needs a command')
    process.exit(2)
  }
  const nodePath = [path.join(BENCH, 'node_modules'), process.env.NODE_PATH].filter(Boolean).join(path.delimiter)
  const r = spawnSync(cmd, args, { stdio: 'inherit', shell: process.platform === 'win32', env: { ...process.env, NODE_PATH: nodePath } })
  if (r.error) console.error(`ensure-bench-deps: ${cmd}: ${r.error.message}`)
  process.exit(r.status ?? 1)
}
