#!/usr/bin/env node
// `npm run pack`: the published form, offline. Writes
//   dist/quartermaster-<version>.tgz                   the main package (loader + types, no binary)
//   dist/quartermaster-<platform>-<version>.tgz        this host's platform package (npm/<platform>/ + its .node)
// from the release binary that `npm install` (prepare) or `npm run build` left in the repository
// root. Builds nothing: no cargo here. Installing both tarballs together into an app is what
// `npm install quartermaster` gives on this platform once released (where `napi prepublish`
// also wires the platform packages in as optionalDependencies).
import { execFileSync } from 'node:child_process'
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..')
const DIST = path.join(ROOT, 'dist')

function die(message) {
  console.error(`npm run pack: ${message}`)
  process.exit(1)
}

/** The napi platform name of this host, as in npm/<name>/ and quartermaster.<name>.node. */
export function hostPlatform() {
  const base = `${process.platform}-${process.arch}`
  if (process.platform === 'win32') return `${base}-msvc`
  if (process.platform !== 'linux') return base
  return `${base}-${process.report.getReport().header.glibcVersionRuntime ? 'gnu' : 'musl'}`
}

const readJson = (file) => JSON.parse(readFileSync(file, 'utf8'))

/** `npm pack` of `dir` into dist/, scripts off (the root's `prepare` would build Rust). */
function npmPack(dir) {
  const npm = process.env.npm_execpath
  const [cmd, pre] = npm && npm.endsWith('.js') ? [process.execPath, [npm]] : ['npm', []]
  const out = execFileSync(cmd, [...pre, 'pack', '--ignore-scripts', '--json', '--pack-destination', DIST], {
    cwd: dir,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
    shell: process.platform === 'win32' && cmd === 'npm',
  })
  const [info] = JSON.parse(out)
  return { file: path.join(DIST, info.filename), files: info.files.map((f) => f.path).sort() }
}

function main() {
  const pkg = readJson(path.join(ROOT, 'package.json'))
  const platform = hostPlatform()
  const platformDir = path.join(ROOT, 'npm', platform)
  if (!existsSync(path.join(platformDir, 'package.json'))) {
    die(`no npm/${platform}/ package: ${platform} is not in package.json napi.targets (then run npx napi create-npm-dirs)`)
  }
  const platformPkg = readJson(path.join(platformDir, 'package.json'))
  const binary = platformPkg.main
  const built = path.join(ROOT, binary)
  if (!existsSync(built)) {
    die(`${binary} is missing in the repository root. Build it first: \`npm install\` (its prepare script) or \`npm run build\` (napi build --platform --release). This script builds nothing.`)
  }
  for (const f of pkg.files) if (!existsSync(path.join(ROOT, f))) die(`${f} (package.json "files") is missing; \`npm run build\` regenerates binding.js and index.d.ts`)
  if (platformPkg.version !== pkg.version) {
    die(`npm/${platform}/package.json is version ${platformPkg.version}, package.json ${pkg.version}: run \`npx napi version\` (npm version runs it)`)
  }

  mkdirSync(DIST, { recursive: true })
  const main = npmPack(ROOT)

  // The platform package from npm/<platform>/ with the binary copied in, staged so that the
  // committed npm/ folder stays as `napi create-npm-dirs` wrote it (`napi artifacts` does the
  // same copy at release time).
  const stage = mkdtempSync(path.join(os.tmpdir(), `qm-pack-${platform}-`))
  let native
  try {
    for (const f of ['package.json', 'README.md']) copyFileSync(path.join(platformDir, f), path.join(stage, f))
    copyFileSync(built, path.join(stage, binary))
    native = npmPack(stage)
  } finally {
    rmSync(stage, { recursive: true, force: true })
  }

  const mb = (f) => (statSync(f).size >= 1e6 ? `${(statSync(f).size / 1e6).toFixed(1)} MB` : `${(statSync(f).size / 1e3).toFixed(1)} kB`)
  console.log(`${path.relative(ROOT, main.file)} (${mb(main.file)}): ${main.files.join(', ')}`)
  console.log(`${path.relative(ROOT, native.file)} (${mb(native.file)}): ${native.files.join(', ')}`)
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) main()
