// GPU suite (`npm run test:gpu`; also part of `npm test`). Without a CUDA driver and device it
// says loudly that it skipped, and checks only that asking for CUDA fails cleanly.
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { closeness, exportLstm, exportMlp, randomInput, reference, ROOT } from '../../benchmark/models-support'
import { ModelCache } from '../../index'

function probe(): { device: string; reason?: string } {
  try {
    return { device: new ModelCache({ device: 'cuda', cleanupIntervalMs: 0 }).device }
  } catch (e: any) {
    return { device: 'none', reason: `${e.code}: ${e.message}` }
  }
}

const gpu = probe()
const hasGpu = gpu.device.startsWith('cuda')

if (!hasGpu) {
  const banner = '*'.repeat(78)
  console.warn(`\n${banner}\n*** GPU model suite SKIPPED: no usable CUDA device (${gpu.reason})\n${banner}\n`)
}

describe('GPU availability', () => {
  it(hasGpu ? `runs on ${gpu.device}` : 'without a GPU, device cuda fails with DEVICE_UNAVAILABLE and auto uses the CPU', () => {
    if (hasGpu) {
      expect(new ModelCache({ device: 'auto', cleanupIntervalMs: 0 }).device).toBe(gpu.device)
    } else {
      expect(gpu.reason).toMatch(/^DEVICE_UNAVAILABLE: /)
      expect(new ModelCache({ device: 'auto', cleanupIntervalMs: 0 }).device).toBe('cpu')
    }
  })
})

const gpuDescribe = hasGpu ? describe : describe.skip

gpuDescribe('ModelCache on CUDA', () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qm-gpu-'))
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }))
  const settle = async () => {
    for (let i = 0; i < 3; i++) {
      global.gc?.()
      await new Promise((r) => setImmediate(r))
    }
  }

  const models: Array<[string, () => string]> = [
    ['MLP 64→256→256→1', () => exportMlp(path.join(tmp, 'mlp.safetensors'), 1, [64, 256, 256, 1], ['relu', 'relu', 'none'])],
    ['MLP gelu/tanh/sigmoid', () => exportMlp(path.join(tmp, 'acts.safetensors'), 2, [16, 32, 32, 8, 4], ['gelu', 'tanh', 'sigmoid', 'none'])],
    ['LSTM 2 layers + head', () => exportLstm(path.join(tmp, 'lstm.safetensors'), 3, 5, 16, 2, 12, [8, 3], ['relu', 'none'])],
    ['sample-lstm', () => path.join(ROOT, 'models/sample-lstm.safetensors')],
  ]

  it.each(models)('%s: GPU agrees with the CPU and NumPy at batch 1 and 64', async (_name, make) => {
    const file = make()
    const onGpu = await new ModelCache({ device: gpu.device, cleanupIntervalMs: 0 }).load('m', file)
    const onCpu = await new ModelCache({ device: 'cpu', cleanupIntervalMs: 0 }).load('m', file)
    expect(onGpu.device).toBe(gpu.device)
    expect(onGpu.memoryUsage().gpuBytes).toBeGreaterThan(0)
    expect(onGpu.memoryUsage().modelDataBytes).toBe(0)
    for (const batch of [1, 64]) {
      const x = randomInput(batch * onGpu.inputSize * onGpu.sequenceLength, batch)
      const want = reference(file, x, batch, tmp)
      closeness(await onGpu.predict(x, { batch }), want)
      closeness(onGpu.predictSync(x), want)
      closeness(onCpu.predictSync(x), want)
    }
  })

  it('free device memory returns to its pre-load value after evict', async () => {
    const file = exportMlp(path.join(tmp, 'mem.safetensors'), 4, [256, 1024, 1024, 1], ['relu', 'relu', 'none'])
    const cache = new ModelCache({ device: gpu.device, cleanupIntervalMs: 0 })
    // Warm-up: cuBLAS and the kernels allocate their own state on first use.
    const warm = await cache.load('warm', file)
    await warm.predict(randomInput(64 * 256, 1))
    cache.evict('warm')
    warm.release()
    await settle()
    const before = cache.deviceMemory()!.free
    const model = await cache.load('m', file)
    await model.predict(randomInput(64 * 256, 2))
    const loaded = cache.deviceMemory()!.free
    expect(loaded).toBeLessThan(before)
    cache.evict('m')
    await settle()
    const after = cache.deviceMemory()!.free
    console.log(`device free: before ${before}, loaded ${loaded}, after evict ${after} (model gpuBytes were ${before - loaded} by mem_get_info)`)
    expect(model.memoryUsage().gpuBytes).toBe(0)
    expect(cache.stats().gpuBytes).toBe(0)
    // Another process on the same GPU can move `free`; allow 1 MiB for that.
    expect(Math.abs(after - before)).toBeLessThanOrEqual(1 << 20)
  })

  it('100 concurrent GPU predicts are bit-identical to sequential ones', async () => {
    const file = exportMlp(path.join(tmp, 'conc.safetensors'), 5, [64, 256, 256, 1], ['relu', 'relu', 'none'])
    const model = await new ModelCache({ device: gpu.device, cleanupIntervalMs: 0 }).load('m', file)
    const inputs = Array.from({ length: 100 }, (_, i) => randomInput(8 * 64, 100 + i))
    const sequential = inputs.map((x) => Buffer.from(model.predictSync(x).buffer))
    const concurrent = await Promise.all(inputs.map((x) => model.predict(x, { batch: 8 })))
    concurrent.forEach((y, i) => expect(Buffer.from(y.buffer).equals(sequential[i])).toBe(true))
  })
})
