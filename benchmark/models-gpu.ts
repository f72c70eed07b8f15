// The short GPU benchmark of `npm run gpu:check`: an MLP and an LSTM at batch 1 and 4096, CPU
// and GPU in the same run (same weights, outputs compared), and device memory (cuMemGetInfo)
// before the load, after it and after evict. Without a GPU it runs the CPU half and says so.
//   npx tsx benchmark/models-gpu.ts [--quick]
// Needs nothing beyond the built addon (no Python, no ORT).
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { performance } from 'node:perf_hooks'

import { denseStack, lstmLayers, type RefModel, writeModel } from '../__test__/gpu/reference'
import { ModelCache } from '../index'
import { closeness, randomInput } from './models-support'
import { median, printTable, type Row } from './support'

const quick = process.argv.includes('--quick')
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qm-bench-gpu-'))
const MiB = 2 ** 20

function probeGpu(): string | null {
  try {
    return new ModelCache({ device: 'cuda', cleanupIntervalMs: 0 }).device
  } catch {
    return null
  }
}

const models: Array<[string, RefModel]> = [
  ['MLP 64→256→256→1', { arch: 'mlp', dense: denseStack(1, [64, 256, 256, 1], ['relu', 'relu', 'none'], true) }],
  ['LSTM 8 in, 2×64 hidden, 32 steps → 1', { arch: 'lstm', layers: lstmLayers(2, 8, [64, 64], [true, true]), sequenceLength: 32, head: denseStack(3, [64, 1], ['none'], true) }],
]

/** Awaited one by one for `ms`: per-call times in µs. */
async function timed(fn: () => Promise<unknown>, ms: number): Promise<number[]> {
  for (let i = 0; i < 5; i++) await fn()
  const times: number[] = []
  const end = performance.now() + ms
  while (performance.now() < end || times.length < 5) {
    const t0 = performance.now()
    await fn()
    times.push((performance.now() - t0) * 1000)
  }
  return times
}

const settle = async () => {
  for (let i = 0; i < 3; i++) {
    global.gc?.()
    await new Promise((r) => setImmediate(r))
  }
}

async function main(): Promise<void> {
  const device = probeGpu()
  console.log(`GPU benchmark${quick ? ' (quick)' : ''}: ${device ?? 'NO GPU (CPU rows only)'}, ${os.cpus().length} CPUs, node ${process.version}`)
  const ms = quick ? 300 : 1000
  const rows: Row[] = []
  const memory: Row[] = []
  try {
    for (const [name, m] of models) {
      const file = writeModel(path.join(tmp, `${name.replace(/\W+/g, '-')}.safetensors`), m)
      const cpu = await new ModelCache({ device: 'cpu', cleanupIntervalMs: 0 }).load('m', file)
      const gpuCache = device ? new ModelCache({ device, cleanupIntervalMs: 0, maxBytes: 16 * 2 ** 30 }) : null
      const before = gpuCache?.deviceMemory()?.free
      const gpu = gpuCache ? await gpuCache.load('m', file) : null
      for (const batch of [1, 4096]) {
        const x = randomInput(batch * cpu.inputSize * cpu.sequenceLength, batch)
        const want = cpu.predictSync(x)
        if (gpu) closeness(await gpu.predict(x, { batch }), want)
        for (const [where, model] of [['cpu', cpu], ['gpu', gpu]] as const) {
          if (!model) continue
          const t = await timed(() => model.predict(x, { batch }), ms)
          const p50 = median(t)
          rows.push({ model: name, batch, device: where === 'gpu' ? device! : 'cpu', 'predict p50 µs': +p50.toFixed(1), 'samples/s': Math.round((batch * 1e6) / p50) })
        }
      }
      if (gpuCache && gpu) {
        const loaded = gpuCache.deviceMemory()!.free
        const gpuBytes = gpu.memoryUsage().gpuBytes
        gpuCache.evict('m')
        gpu.release()
        await settle()
        const after = gpuCache.deviceMemory()!.free
        memory.push({
          model: name,
          'free before load MiB': +(before! / MiB).toFixed(1),
          'free loaded MiB': +(loaded / MiB).toFixed(1),
          'free after evict MiB': +(after / MiB).toFixed(1),
          'before − loaded MiB': +((before! - loaded) / MiB).toFixed(2),
          'gpuBytes MiB': +(gpuBytes / MiB).toFixed(2),
          'before − loaded ≥ gpuBytes': String(before! - loaded >= gpuBytes),
          'returned after evict': String(Math.abs(after - before!) <= MiB),
        })
      }
    }
    printTable('GPU benchmark: predict awaited one by one, CPU and GPU in the same run', rows)
    if (memory.length > 0) printTable('GPU benchmark: device memory (cuMemGetInfo)', memory)
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true })
  }
}

void main()
