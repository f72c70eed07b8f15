// Models: load time against file size, and predict latency / throughput for an MLP
// 64→256→256→1 against onnxruntime-node (CPU) running the same weights, in the same run.
//   npm run bench:models             full
//   npm run bench:models -- --quick  short form for CI
// Needs python3 with numpy and onnx (pip install -r tools/requirements.txt) to export the
// weights to ONNX, and onnxruntime-node (a devDependency).
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

async function predictVsOrt(): Promise<Row[]> {
  const file = path.join(tmp, 'mlp-64-256-256-1.safetensors')
  const onnxFile = path.join(tmp, 'mlp-64-256-256-1.onnx')
  exportMlp(file, 42, [64, 256, 256, 1], ['relu', 'relu', 'none'])
  python('export_onnx.py', [file, onnxFile])
  const cache = new ModelCache({ device: 'auto', cleanupIntervalMs: 0 })
  const model = await cache.load('mlp', file)
  const session = await ort.InferenceSession.create(onnxFile, { executionProviders: ['cpu'] })
  const rows: Row[] = []
  const ms = quick ? 400 : 2000
  for (const batch of [1, 256]) {
    const r = rng(batch)
    const x = Float32Array.from({ length: batch * 64 }, () => r() * 2 - 1)
    const tensor = new ort.Tensor('float32', x, [batch, 64])
    // Same weights, same answer (ORT accumulates in a different order: compare loosely).
    const ours = await model.predict(x, { batch })
    const theirs = (await session.run({ x: tensor })).y.data as Float32Array
    const maxDiff = ours.reduce((m, v, i) => Math.max(m, Math.abs(v - theirs[i])), 0)
    if (maxDiff > 1e-3) throw new Error(`quartermaster and ORT disagree by ${maxDiff}`)

    // Rounds alternate between the contenders so background load hits both alike.
    const rounds = quick ? 3 : 7
    const lat = { qmAsync: [] as number[], qmSync: [] as number[], ort: [] as number[] }
    const tput = { qmAsync: [] as number[], qmSync: [] as number[], ort: [] as number[] }
    const concurrency = 4
    const slice = ms / rounds
    // ORT's intra-op threads spin after each run; a pause lets each phase start on idle cores.
    const pause = () => new Promise((r) => setTimeout(r, 50))
    for (let round = 0; round < rounds; round++) {
      await pause()
      lat.qmAsync.push(...(await sample(() => model.predict(x, { batch }), slice)))
      await pause()
      lat.ort.push(...(await sample(() => session.run({ x: tensor }), slice)))
      await pause()
      lat.qmSync.push(...(await sample(() => model.predictSync(x, { batch }), slice)))
      await pause()
      tput.qmAsync.push(await throughput(() => model.predict(x, { batch }), batch, concurrency, slice))
      await pause()
      tput.ort.push(await throughput(() => session.run({ x: tensor }), batch, concurrency, slice))
      await pause()
      const calls = await sample(() => model.predictSync(x, { batch }), slice)
      tput.qmSync.push((calls.length * batch) / (calls.reduce((a, b) => a + b, 0) / 1000))
    }
    const qmAsync = median(lat.qmAsync) * 1000
    const qmSync = median(lat.qmSync) * 1000
    const ortLat = median(lat.ort) * 1000
    const qmTput = median(tput.qmAsync)
    const ortTput = median(tput.ort)
    const qmSyncTput = median(tput.qmSync)
    rows.push({
      batch,
      'qm predict p50 µs': +qmAsync.toFixed(1),
      'qm predictSync p50 µs': +qmSync.toFixed(1),
      'ORT run p50 µs': +ortLat.toFixed(1),
      'latency qm/ORT (async)': +(qmAsync / ortLat).toFixed(2),
      'latency qm/ORT (sync)': +(qmSync / ortLat).toFixed(2),
      'qm samples/s (4 in flight)': Math.round(qmTput),
      'qm predictSync samples/s': Math.round(qmSyncTput),
      'ORT samples/s (4 in flight)': Math.round(ortTput),
      'throughput qm/ORT (async)': +(qmTput / ortTput).toFixed(2),
      'throughput qm/ORT (sync)': +(qmSyncTput / ortTput).toFixed(2),
    })
  }
  await session.release()
  return rows
}

async function main(): Promise<void> {
  console.log(`models benchmark${quick ? ' (quick)' : ''}: ${os.cpus().length} CPUs, node ${process.version}, onnxruntime-node ${ort.env.versions.node}`)
  try {
    printTable('Load time against file size (median; MLP safetensors, F32)', await loadTimes())
    printTable('Predict: MLP 64→256→256→1, quartermaster vs onnxruntime-node (CPU), same weights', await predictVsOrt())
    console.log('latency ratio < 1 and throughput ratio > 1 favour quartermaster')
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true })
  }
}

void main()
