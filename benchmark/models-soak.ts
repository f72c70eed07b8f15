// Model memory soak: load/evict cycles and predictions, then checks that every native byte
// came back and that the process's resident memory did not drift.
//   npm run soak:models                      10,000 load/evict cycles + 100,000 predicts
//   QM_SOAK_CYCLES=1000 npm run soak:models  shorter (predicts scale with cycles × 10)
// Needs --expose-gc for exact RSS figures (the npm script passes it).
import fs from 'node:fs'
import path from 'node:path'

import { ModelCache } from '../index'

export interface SoakResult {
  cycles: number
  predicts: number
  /** RSS after warm-up and at the end, in MiB. */
  rssWarmMb: number
  rssEndMb: number
  rssDriftMb: number
  /** Bytes the cache reports after the last evict: must be zero. */
  cacheBytesEnd: number
  modelBytesEnd: number
  seconds: number
}

async function settle(): Promise<void> {
  for (let i = 0; i < 4; i++) {
    global.gc?.()
    await new Promise((r) => setImmediate(r))
  }
}

const mib = (n: number) => n / (1 << 20)

export async function soak(cycles: number, predicts = cycles * 10): Promise<SoakResult> {
  const root = path.join(__dirname, '..')
  const mlpPath = path.join(root, 'models/sample-mlp.safetensors')
  const lstmBytes = fs.readFileSync(path.join(root, 'models/sample-lstm.safetensors'))
  const cache = new ModelCache({ device: 'auto', maxModels: 8, cleanupIntervalMs: 0 })
  const started = performance.now()
  // glibc grows per-thread arenas (libuv pool, tokio, rayon) during the first cycles.
  const warmup = Math.max(1, Math.floor(cycles / 4))
  let rssWarm = 0
  const rss: number[] = []
  const checkpoint = Math.max(1, Math.floor((cycles - warmup) / 20))
  const x = new Float32Array(8 * 4).fill(0.25)
  const xs = new Float32Array(40).fill(0.1)
  const predictsPerCycle = Math.max(1, Math.floor(predicts / cycles))
  let done = 0
  let lastModelBytes = 0
  for (let c = 0; c < cycles; c++) {
    // Alternate path (memory-mapped) and Buffer (owned) loads of both architectures.
    const id = `soak-${c % 4}`
    const model = c % 2 === 0 ? await cache.load(id, mlpPath) : await cache.load(id, lstmBytes)
    const input = model.arch === 'mlp' ? x : xs
    const inFlight: Array<Promise<Float32Array>> = []
    for (let p = 0; p < predictsPerCycle && done < predicts; p++, done++) {
      if (p % 2 === 0) inFlight.push(model.predict(input))
      else model.predictSync(input)
    }
    await Promise.all(inFlight)
    cache.evict(id)
    lastModelBytes = model.memoryUsage().totalBytes
    model.release()
    if (c + 1 >= warmup && (c + 1 - warmup) % checkpoint === 0) {
      await settle()
      rss.push(process.memoryUsage().rss)
    }
  }
  cache.clear()
  await settle()
  rss.push(process.memoryUsage().rss)
  // Drift: the median of the last checkpoints against the median of the first ones, so one
  // allocator hiccup at either end does not decide it.
  const mid = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
  const span = Math.max(1, Math.floor(rss.length / 4))
  rssWarm = mid(rss.slice(0, span))
  const rssEnd = mid(rss.slice(-span))
  return {
    cycles,
    predicts: done,
    rssWarmMb: mib(rssWarm),
    rssEndMb: mib(rssEnd),
    rssDriftMb: mib(rssEnd - rssWarm),
    cacheBytesEnd: cache.memoryUsage().totalBytes + cache.stats().bytes,
    modelBytesEnd: lastModelBytes,
    seconds: (performance.now() - started) / 1000,
  }
}

async function main(): Promise<void> {
  if (!global.gc) console.warn('run with node --expose-gc for exact RSS figures')
  const cycles = Number(process.env.QM_SOAK_CYCLES ?? 10_000)
  const r = await soak(cycles, cycles * 10)
  console.log(
    `models soak: ${r.cycles} load/evict cycles, ${r.predicts} predicts in ${r.seconds.toFixed(1)} s\n` +
      `  cache bytes after clear: ${r.cacheBytesEnd}, last model memoryUsage after evict: ${r.modelBytesEnd}\n` +
      `  RSS after warm-up ${r.rssWarmMb.toFixed(1)} MiB, at end ${r.rssEndMb.toFixed(1)} MiB, drift ${r.rssDriftMb.toFixed(2)} MiB (limit 5)`,
  )
  if (r.cacheBytesEnd !== 0 || r.modelBytesEnd !== 0 || r.rssDriftMb > 5) {
    console.error('models soak FAILED')
    process.exitCode = 1
  }
}

if (require.main === module) void main()
