#!/usr/bin/env node
// Consumer test (CI: .ci/run): the published form, installed the way an app installs it.
// `npm run pack`, then both tarballs into a fresh temporary app with no cargo or rustc on the
// PATH and no registry (npm --offline), then `tsc --strict` of tools/consumer-app/app.ts against
// the shipped index.d.ts, and a run of it on SQLite with the repository's sample model.
//   node tools/consumer-test.mjs [--keep]     --keep leaves the temporary app for a look
// Prints one line per check and `consumer: N passed, N failed`; exits 1 when any check failed.
import { execFileSync, spawnSync } from 'node:child_process'
import { accessSync, constants, cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

import { hostPlatform } from './pack.mjs'

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..')
const keep = process.argv.includes('--keep')
const pkg = JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8'))
const platform = hostPlatform()
const platformPkgName = `${pkg.name}-${platform}`
const binary = `${pkg.napi.binaryName}.${platform}.node`
const mainTgz = path.join(ROOT, 'dist', `${pkg.name}-${pkg.version}.tgz`)
const platformTgz = path.join(ROOT, 'dist', `${platformPkgName}-${pkg.version}.tgz`)

let passed = 0
let failed = 0
function check(name, fn) {
  try {
    const note = fn()
    passed++
    console.log(`ok - ${name}${note ? ` (${note})` : ''}`)
    return true
  } catch (e) {
    failed++
    console.log(`not ok - ${name}\n${String(e?.stack ?? e).replace(/^/gm, '    ')}`)
    return false
  }
}
function assert(ok, message) {
  if (!ok) throw new Error(message)
}
const sameSet = (actual, expected) => JSON.stringify([...actual].sort()) === JSON.stringify([...expected].sort())

/** PATH without any directory that holds cargo or rustc (~/.cargo/bin, a toolchain in /usr/bin…). */
function pathWithoutRust() {
  const exe = process.platform === 'win32' ? ['cargo.exe', 'rustc.exe'] : ['cargo', 'rustc']
  const runnable = (f) => {
    try {
      accessSync(f, constants.X_OK)
      return statSync(f).isFile()
    } catch {
      return false
    }
  }
  const current = Object.entries(process.env).find(([k]) => k.toUpperCase() === 'PATH')?.[1] ?? ''
  const kept = current.split(path.delimiter).filter((dir) => dir && !exe.some((e) => runnable(path.join(dir, e))))
  return kept.join(path.delimiter) // node and npm run by absolute path below
}

/** npm's own CLI script, run with this node: the app's PATH may lack npm's directory. */
function findNpmCli() {
  if (process.env.npm_execpath?.endsWith('.js')) return process.env.npm_execpath
  const dir = path.dirname(process.execPath)
  for (const f of [path.join(dir, 'node_modules/npm/bin/npm-cli.js'), path.join(dir, '../lib/node_modules/npm/bin/npm-cli.js')]) if (existsSync(f)) return f
  return null
}
const npmCli = findNpmCli()
function npm(args, options) {
  const [cmd, pre] = npmCli ? [process.execPath, [npmCli]] : ['npm', []]
  return spawnSync(cmd, [...pre, ...args], { encoding: 'utf8', shell: !npmCli && process.platform === 'win32', ...options })
}
function run(cmd, args, options) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', ...options })
  if (r.status !== 0) throw new Error(`${[cmd, ...args].join(' ')} exited ${r.status ?? r.error?.message}\n${r.stdout ?? ''}${r.stderr ?? ''}`)
  return r
}
const tarList = (tgz) => execFileSync('tar', ['tzf', tgz], { encoding: 'utf8' }).split('\n').filter(Boolean).map((f) => f.replace(/^package\//, ''))
const tarJson = (tgz, file) => JSON.parse(execFileSync('tar', ['xzf', tgz, '-O', `package/${file}`], { encoding: 'utf8' }))

/** Installed top-level package names, scoped ones as @scope/name. */
function installed(dir) {
  const nm = path.join(dir, 'node_modules')
  const names = []
  for (const entry of readdirSync(nm)) {
    if (entry.startsWith('.')) continue
    if (entry.startsWith('@')) for (const sub of readdirSync(path.join(nm, entry))) names.push(`${entry}/${sub}`)
    else names.push(entry)
  }
  return names
}
function dependencyClosure(dir, roots) {
  const seen = new Set()
  const visit = (name) => {
    if (seen.has(name)) return
    seen.add(name)
    const manifest = JSON.parse(readFileSync(path.join(dir, 'node_modules', name, 'package.json'), 'utf8'))
    for (const dep of Object.keys({ ...manifest.dependencies, ...manifest.optionalDependencies })) {
      if (existsSync(path.join(dir, 'node_modules', dep, 'package.json'))) visit(dep)
    }
  }
  roots.forEach(visit)
  return seen
}
function walk(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(path.join(dir, e.name)) : [path.join(dir, e.name)]))
}

// --- the package as published ---------------------------------------------------------------

const packed = check('npm run pack writes both tarballs', () => {
  const r = npm(['run', '--silent', 'pack'], { cwd: ROOT })
  assert(r.status === 0, `npm run pack exited ${r.status}:\n${r.stdout}${r.stderr}`)
  assert(existsSync(mainTgz) && existsSync(platformTgz), `missing ${path.relative(ROOT, mainTgz)} or ${path.relative(ROOT, platformTgz)}`)
  return r.stdout.trim().split('\n').join('; ')
})

if (packed) {
  check('main tarball: loader, types, README and package.json only (no .node, Rust, tests)', () => {
    const files = tarList(mainTgz)
    assert(sameSet(files, ['package.json', 'README.md', ...pkg.files]), `contents: ${files.join(', ')}`)
    const manifest = tarJson(mainTgz, 'package.json')
    const consumerScripts = ['preinstall', 'install', 'postinstall'].filter((s) => manifest.scripts?.[s])
    assert(consumerScripts.length === 0, `install-time scripts in the published package.json: ${consumerScripts.join(', ')}`)
    assert(!manifest.dependencies && !manifest.peerDependencies, 'the main package has runtime dependencies')
    assert(manifest.main === 'main.js' && manifest.types === 'index.d.ts', `main ${manifest.main}, types ${manifest.types}`)
    return files.join(', ')
  })

  check(`platform tarball: exactly ${binary}, package.json and README.md`, () => {
    const files = tarList(platformTgz)
    assert(sameSet(files, ['package.json', 'README.md', binary]), `contents: ${files.join(', ')}`)
    const manifest = tarJson(platformTgz, 'package.json')
    assert(manifest.name === platformPkgName && manifest.version === pkg.version, `${manifest.name}@${manifest.version}`)
    assert(manifest.main === binary && sameSet(manifest.files, [binary]), `main ${manifest.main}, files ${manifest.files}`)
    assert(manifest.os?.[0] === process.platform && manifest.cpu?.[0] === process.arch, `os ${manifest.os}, cpu ${manifest.cpu}`)
    if (process.platform === 'linux') assert(manifest.libc?.[0] === (platform.endsWith('-musl') ? 'musl' : 'glibc'), `libc ${manifest.libc}`)
    return `os ${manifest.os}, cpu ${manifest.cpu}${manifest.libc ? `, libc ${manifest.libc}` : ''}`
  })
}

check('main.js is the hand-written entry, index.js the napi-generated loader; targets, npm/ and main.js agree', () => {
  const entry = readFileSync(path.join(ROOT, 'main.js'), 'utf8')
  const loader = readFileSync(path.join(ROOT, 'index.js'), 'utf8')
  assert(!entry.includes('auto-generated by NAPI-RS') && entry.includes("require('./index.js')"), 'main.js is not the hand-written entry')
  assert(loader.includes('auto-generated by NAPI-RS'), 'index.js is not the loader `napi build --platform` generates')
  const listed = JSON.parse(entry.match(/const PREBUILT = (\[[^\]]*\])/)[1].replace(/'/g, '"'))
  const dirs = readdirSync(path.join(ROOT, 'npm')).filter((d) => existsSync(path.join(ROOT, 'npm', d, 'package.json')))
  assert(sameSet(dirs, listed), `npm/: ${dirs.join(', ')}; main.js PREBUILT: ${listed.join(', ')}`)
  assert(dirs.length === pkg.napi.targets.length, `${pkg.napi.targets.length} napi.targets, ${dirs.length} npm/ packages`)
  for (const d of dirs) {
    const m = JSON.parse(readFileSync(path.join(ROOT, 'npm', d, 'package.json'), 'utf8'))
    assert(m.name === `${pkg.name}-${d}` && m.main === `${pkg.napi.binaryName}.${d}.node` && m.os && m.cpu, `npm/${d}/package.json: ${JSON.stringify(m)}`)
    assert(!d.startsWith('linux-') || m.libc, `npm/${d}/package.json has no libc`)
  }
  return listed.join(', ')
})

check('release wiring: napi prepublish adds every platform package as an optionalDependency', () => {
  const stage = mkdtempSync(path.join(os.tmpdir(), 'qm-prepublish-'))
  try {
    for (const f of ['package.json', 'README.md', ...pkg.files, 'npm']) cpSync(path.join(ROOT, f), path.join(stage, f), { recursive: true })
    // As after `napi artifacts`: a binary in every npm/<platform>/ (placeholders; nothing is published).
    for (const d of readdirSync(path.join(stage, 'npm'))) writeFileSync(path.join(stage, 'npm', d, `${pkg.napi.binaryName}.${d}.node`), 'placeholder')
    run(process.execPath, [path.join(ROOT, 'node_modules/@napi-rs/cli/dist/cli.js'), 'prepublish', '-t', 'npm', '--skip-optional-publish', '--no-gh-release'], { cwd: stage })
    const optional = JSON.parse(readFileSync(path.join(stage, 'package.json'), 'utf8')).optionalDependencies ?? {}
    const expected = readdirSync(path.join(ROOT, 'npm')).map((d) => `${pkg.name}-${d}`)
    assert(sameSet(Object.keys(optional), expected), `optionalDependencies: ${JSON.stringify(optional)}`)
    assert(Object.values(optional).every((v) => v === pkg.version), `versions: ${JSON.stringify(optional)}`)
    return Object.keys(optional).join(', ')
  } finally {
    rmSync(stage, { recursive: true, force: true })
  }
})

// --- an app that installs it -----------------------------------------------------------------

if (packed) {
  const app = mkdtempSync(path.join(os.tmpdir(), 'qm-consumer-app-'))
  // The parent's npm_* variables (npm run) stay out; the PATH variable keeps its own spelling (Path on Windows).
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('npm_') || k === 'npm_config_cache'))
  const pathKey = Object.keys(env).find((k) => k.toUpperCase() === 'PATH') ?? 'PATH'
  env[pathKey] = pathWithoutRust()
  env.npm_config_update_notifier = 'false'
  const lock = JSON.parse(readFileSync(path.join(ROOT, 'package-lock.json'), 'utf8')).packages
  const pinned = (name) => `${name}@${lock[`node_modules/${name}`].version}`
  const node = process.execPath
  try {
    for (const f of ['app.ts', 'esm.mjs', 'tsconfig.json', 'package.json']) cpSync(path.join(ROOT, 'tools/consumer-app', f), path.join(app, f))

    const rustFree = check('no cargo or rustc on the app PATH', () => {
      const which = process.platform === 'win32' ? 'where' : '/bin/sh'
      const args = process.platform === 'win32' ? ['cargo'] : ['-c', 'command -v cargo || command -v rustc']
      const r = spawnSync(which, args, { env, encoding: 'utf8' })
      assert(r.status !== 0, `found: ${r.stdout}`)
    })

    const installedOk =
      rustFree &&
      check('npm install --offline of both tarballs (no registry, no build)', () => {
        const r = npm(['install', '--offline', '--no-audit', '--no-fund', mainTgz, platformTgz], { cwd: app, env })
        assert(r.status === 0, `exit ${r.status}:\n${r.stdout}${r.stderr}`)
        return r.stdout.trim().split('\n').pop()
      }) &&
      check('npm install -D typescript @types/node (for the type check; --prefer-offline)', () => {
        const r = npm(['install', '--prefer-offline', '--no-audit', '--no-fund', '-D', pinned('typescript'), pinned('@types/node')], { cwd: app, env })
        assert(r.status === 0, `exit ${r.status}:\n${r.stdout}${r.stderr}`)
        return `${pinned('typescript')}, ${pinned('@types/node')}`
      })

    if (installedOk) {
      check('the app has only quartermaster, its platform package and the type-check tools', () => {
        const names = installed(app)
        const allowed = dependencyClosure(app, [pkg.name, platformPkgName, 'typescript', '@types/node'])
        const extra = names.filter((n) => !allowed.has(n))
        assert(names.includes(pkg.name) && names.includes(platformPkgName), `installed: ${names.join(', ')}`)
        assert(extra.length === 0, `unexpected packages: ${extra.join(', ')}`)
        const devDeps = Object.keys(pkg.devDependencies).filter((d) => names.includes(d) && d !== 'typescript' && d !== '@types/node')
        assert(devDeps.length === 0, `quartermaster devDependencies installed: ${devDeps.join(', ')}`)
        return names.join(', ')
      })

      check('installed quartermaster holds no .node and no Rust sources', () => {
        const files = walk(path.join(app, 'node_modules', pkg.name)).map((f) => path.relative(path.join(app, 'node_modules', pkg.name), f))
        const bad = files.filter((f) => /\.(node|rs)$/.test(f) || /^(src|target|npm|__test__|benchmark|tools)[/\\]/.test(f) || /^(Cargo\.(toml|lock)|build\.rs)$/.test(f))
        assert(bad.length === 0, `found: ${bad.join(', ')}`)
        return files.sort().join(', ')
      })

      const typed = check('tsc --strict of app.ts against the shipped index.d.ts', () => {
        run(node, [path.join(app, 'node_modules/typescript/bin/tsc'), '--strict', '-p', path.join(app, 'tsconfig.json')], { cwd: app, env })
      })

      if (typed) {
        check('the app runs on SQLite with models/sample-mlp.safetensors (path and Buffer), metrics and prometheus', () => {
          const r = run(node, [path.join(app, 'out/app.js'), path.join(ROOT, 'models/sample-mlp.safetensors')], { cwd: app, env, timeout: 60_000 })
          assert(r.stdout.includes('consumer app OK'), r.stdout)
          return r.stdout.trim().split('\n').join('; ')
        })
      }

      check('ESM named imports', () => {
        const r = run(node, [path.join(app, 'esm.mjs')], { cwd: app, env })
        assert(r.stdout.includes('esm import OK'), r.stdout)
      })

      check('without the platform package: an error naming the platform and how to build from source', () => {
        const nm = path.join(app, 'node_modules')
        renameSync(path.join(nm, platformPkgName), path.join(app, 'moved-platform-package'))
        try {
          const probe = "try { require('quartermaster'); console.log('LOADED') } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message, cause: !!e.cause })) }"
          const r = run(node, ['-e', probe], { cwd: app, env })
          assert(!r.stdout.includes('LOADED'), 'quartermaster loaded without its platform package')
          const err = JSON.parse(r.stdout)
          assert(err.code === 'NATIVE_BINDING_NOT_FOUND' && err.cause, `code ${err.code}, cause ${err.cause}`)
          for (const want of [platform, platformPkgName, 'napi build --platform --release', 'npm install']) {
            assert(err.message.includes(want), `the message does not say "${want}":\n${err.message}`)
          }
          return err.message.split('\n')[0]
        } finally {
          renameSync(path.join(app, 'moved-platform-package'), path.join(nm, platformPkgName))
        }
      })
    }
  } finally {
    if (keep) console.log(`app kept in ${app}`)
    else rmSync(app, { recursive: true, force: true })
  }
}

console.log(`consumer: ${passed} passed, ${failed} failed`)
process.exit(failed > 0 ? 1 : 0)
