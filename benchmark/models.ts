// Models: load time against file size, and predict latency / throughput for an MLP
// 64→256→256→1 against onnxruntime-node (CPU) running the same weights, in the same run, with
// ORT in its best latency configuration at 1 and 2 intra-op threads (sequential execution, all
// graph optimisations, spinning on). Per contender and batch (1, 256): p50 and p99 of calls
// awaited one by one, samples/s awaited one by one, and with 4 (and, at batch 1, 64) in flight.
//   npm run bench:models             full
//   npm run bench:models -- --quick  short form for CI
// Needs python3 with numpy and onnx (pip install -r tools/requirements.txt) to export the
// weights to ONNX, and onnxruntime-node (benchmark/package.json, installed on first use).
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { performance } from 'node:perf_hooks'

import * as ort from 'onnxruntime-node'

import { ModelCache } from '../index'
import { exportMlp, python, rng } from './models-support'
import { median, printTable, type Row } from './support'

const quick = process.argv.includes('--quick')
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qm-bench-models-'))

/** Calls `fn` (sequentially) until `ms` have passed; returns per-call times in ms. */
async function sample(fn: () => unknown, ms: number): Promise<number[]> {
  for (let i = 0; i < 20; i++) await fn()
  const times: number[] = []
  const end = performance.now() + ms
  while (performance.now() < end) {
    const t0 = performance.now()
    await fn()
    times.push(performance.now() - t0)
  }
  return times
}

/** Samples per second with `concurrency` calls in flight for `ms`. */
async function throughput(fn: () => Promise<unknown>, batch: number, concurrency: number, ms: number): Promise<number> {
  for (let i = 0; i < 10; i++) await fn()
  let calls = 0
  const started = performance.now()
  const end = started + ms
  const worker = async () => {
    while (performance.now() < end) {
      await fn()
      calls++
    }
  }
  await Promise.all(Array.from({ length: concurrency }, worker))
  return (calls * batch) / ((performance.now() - started) / 1000)
}

async function loadTimes(): Promise<Row[]> {
  const rows: Row[] = []
  const sizes: Array<[string, number[]]> = [
    ['64 KiB', [64, 128, 64, 1]],
    ['1 MiB', [256, 512, 256, 1]],
    ['16 MiB', [1024, 2048, 1024, 1]],
    ...(quick ? [] : ([['64 MiB', [2048, 4096, 2048, 1]]] as Array<[string, number[]]>)),
  ]
  const cache = new ModelCache({ device: 'auto', cleanupIntervalMs: 0 })
  for (const [label, dims] of sizes) {
    const file = path.join(tmp, `load-${label.replace(' ', '')}.safetensors`)
    exportMlp(file, 1, dims, ['relu', 'relu', 'none'])
    const bytes = fs.statSync(file).size
    const buffer = fs.readFileSync(file)
    const rounds = quick ? 5 : 15
    const timeLoad = async (source: string | Buffer) => {
      const times: number[] = []
      for (let i = 0; i < rounds; i++) {
        const t0 = performance.now()
        const m = await cache.load('load', source)
        times.push(performance.now() - t0)
        m.release()
        cache.evict('load')
      }
      return median(times)
    }
    const fromPath = await timeLoad(file)
    const fromBuffer = await timeLoad(buffer)
    let ortMs = NaN
    if (dims.length === 4) {
      const onnxFile = file.replace(/\.safetensors$/, '.onnx')
      python('export_onnx.py', [file, onnxFile])
      const times: number[] = []
      for (let i = 0; i < rounds; i++) {
        const t0 = performance.now()
        const s = await ort.InferenceSession.create(onnxFile)
        times.push(performance.now() - t0)
        await s.release()
      }
      ortMs = median(times)
    }
    rows.push({
      'file size': label,
      bytes,
      'qm load, path (mmap) ms': +fromPath.toFixed(3),
      'qm load, Buffer ms': +fromBuffer.toFixed(3),
      'ORT session create ms': +ortMs.toFixed(3),
      'qm path MB/s': Math.round(bytes / 1e6 / (fromPath / 1000)),
    })
  }
  return rows
}

/** The `q`-quantile (0..1) of `xs`. */
function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.floor(q * s.length))]
}

// onnxruntime-node in its best latency configuration: intra-op threads 1 or 2 (spinning on,
// ORT's default), one inter-op thread, sequential execution, every graph optimisation.
const ORT_THREADS = [1, 2] as const
const ortOptions = (threads: number): ort.InferenceSession.SessionOptions => ({
  executionProviders: ['cpu'],
  intraOpNumThreads: threads,
  interOpNumThreads: 1,
  executionMode: 'sequential',
  graphOptimizationLevel: 'all',
})

const ortName = (threads: number) => `ORT ${threads} thread${threads > 1 ? 's' : ''}`

async function predictVsOrt(): Promise<Row[]> {
  const file = path.join(tmp, 'mlp-64-256-256-1.safetensors')
  const onnxFile = path.join(tmp, 'mlp-64-256-256-1.onnx')
  exportMlp(file, 42, [64, 256, 256, 1], ['relu', 'relu', 'none'])
  python('export_onnx.py', [file, onnxFile])
  const cache = new ModelCache({ device: 'cpu', cleanupIntervalMs: 0 })
  const model = await cache.load('mlp', file)
  const sessions = await Promise.all(ORT_THREADS.map((t) => ort.InferenceSession.create(onnxFile, ortOptions(t))))
  const rows: Row[] = []
  const ms = quick ? 600 : 3000
  for (const batch of [1, 256]) {
    const r = rng(batch)
    const x = Float32Array.from({ length: batch * 64 }, () => r() * 2 - 1)
    const tensor = new ort.Tensor('float32', x, [batch, 64])
    // Same weights, same answer (ORT accumulates in a different order: compare loosely).
    const ours = await model.predict(x, { batch })
    for (const s of sessions) {
      const theirs = (await s.run({ x: tensor })).y.data as Float32Array
      const maxDiff = ours.reduce((m, v, i) => Math.max(m, Math.abs(v - theirs[i])), 0)
      if (maxDiff > 1e-3) throw new Error(`quartermaster and ORT disagree by ${maxDiff}`)
    }

    type Contender = { name: string; call: () => unknown; inFlight: boolean }
    const contenders: Contender[] = [
      { name: 'qm predict', call: () => model.predict(x, { batch }), inFlight: true },
      { name: 'qm predictSync', call: () => model.predictSync(x, { batch }), inFlight: false },
      ...sessions.map((s, i) => ({ name: ortName(ORT_THREADS[i]), call: () => s.run({ x: tensor }), inFlight: true })),
    ]
    const flights = batch === 1 ? [4, 64] : [4]
    const lat = new Map<string, number[]>(contenders.map((c) => [c.name, []]))
    const awaited = new Map<string, number[]>(contenders.map((c) => [c.name, []]))
    const tput = new Map<string, number[]>()
    // Rounds alternate between the contenders so background load hits each alike; ORT's
    // intra-op threads spin after each run, so a pause lets each phase start on idle cores.
    const rounds = quick ? 3 : 7
    const slice = ms / rounds
    const pause = () => new Promise((r) => setTimeout(r, 50))
    for (let round = 0; round < rounds; round++) {
      for (const c of contenders) {
        await pause()
        const times = await sample(c.call, slice)
        lat.get(c.name)!.push(...times)
        awaited.get(c.name)!.push((times.length * batch) / (times.reduce((a, b) => a + b, 0) / 1000))
        if (!c.inFlight) continue
        for (const n of flights) {
          await pause()
          const key = `${c.name}|${n}`
          if (!tput.has(key)) tput.set(key, [])
          tput.get(key)!.push(await throughput(c.call as () => Promise<unknown>, batch, n, slice))
        }
      }
    }
    const p = (name: string, q: number) => +(quantile(lat.get(name)!, q) * 1000).toFixed(1)
    const ortNames = contenders.slice(2).map((c) => c.name)
    const bestOrt = (f: (name: string) => number, pick: (a: number, b: number) => number) => ortNames.map(f).reduce((a, b) => pick(a, b))
    const row: Row = { batch }
    for (const c of contenders) {
      row[`${c.name} p50 µs`] = p(c.name, 0.5)
      row[`${c.name} p99 µs`] = p(c.name, 0.99)
    }
    for (const c of contenders) row[`${c.name} samples/s (awaited)`] = Math.round(median(awaited.get(c.name)!))
    for (const n of flights) {
      for (const c of contenders) if (c.inFlight) row[`${c.name} samples/s (${n} in flight)`] = Math.round(median(tput.get(`${c.name}|${n}`)!))
    }
    // The columns benchmark/index.ts reads for the headline: ORT at its best of 1 and 2 threads.
    row['qm predict p50 µs'] = p('qm predict', 0.5)
    row['ORT run p50 µs'] = bestOrt((n) => p(n, 0.5), Math.min)
    row['qm samples/s (4 in flight)'] = row['qm predict samples/s (4 in flight)']
    row['ORT samples/s (4 in flight)'] = bestOrt((n) => row[`${n} samples/s (4 in flight)`] as number, Math.max)
    row['p50 best ORT ÷ qm predict'] = +((row['ORT run p50 µs'] as number) / p('qm predict', 0.5)).toFixed(2)
    row['p99 best ORT ÷ qm predict'] = +(bestOrt((n) => p(n, 0.99), Math.min) / p('qm predict', 0.99)).toFixed(2)
    row['awaited samples/s qm predict ÷ best ORT'] = +(
      (row['qm predict samples/s (awaited)'] as number) / bestOrt((n) => row[`${n} samples/s (awaited)`] as number, Math.max)
    ).toFixed(2)
    rows.push(row)
  }
  await Promise.all(sessions.map((s) => s.release()))
  return rows
}

/** One row per contender and batch: the wide row of `predictVsOrt` is hard to read in a terminal. */
function byContender(rows: Row[]): Row[] {
  const out: Row[] = []
  for (const r of rows) {
    const names = ['qm predict', 'qm predictSync', ...ORT_THREADS.map(ortName)]
    for (const name of names) {
      const get = (suffix: string) => r[`${name} ${suffix}`] ?? ''
      out.push({
        batch: r.batch,
        contender: name,
        'p50 µs': get('p50 µs'),
        'p99 µs': get('p99 µs'),
        'samples/s awaited one by one': get('samples/s (awaited)'),
        'samples/s 4 in flight': get('samples/s (4 in flight)'),
        'samples/s 64 in flight': get('samples/s (64 in flight)'),
      })
    }
  }
  return out
}

async function main(): Promise<void> {
  console.log(`models benchmark${quick ? ' (quick)' : ''}: ${os.cpus().length} CPUs, node ${process.version}, onnxruntime-node ${ort.env.versions.node}`)
  try {
    printTable('Load time against file size (median; MLP safetensors, F32)', await loadTimes())
    const rows = await predictVsOrt()
    printTable('Predict: MLP 64→256→256→1, quartermaster vs onnxruntime-node (CPU, latency-configured, 1 and 2 intra-op threads), same weights', rows)
    console.log('\nThe same run, one row per contender:')
    console.table(byContender(rows))
    console.log('ratios > 1 favour quartermaster')
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true })
  }
}

void main()
