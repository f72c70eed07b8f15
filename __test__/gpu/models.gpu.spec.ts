// GPU suite (`npm run test:gpu`, `npm run gpu:check`; also part of `npm test`). No Python: the
// models are the committed NumPy fixture's (__test__/fixtures, __test__/model-fixtures.ts) and
// this suite's own (./reference.ts, a float64 forward pass in JavaScript). Without a CUDA driver
// and device it says loudly that it skipped, checks that asking for CUDA fails cleanly, and
// still checks its reference against the CPU backend. QM_GPU_REQUIRED=1 (set by gpu:check on
// a machine with a GPU) turns "no usable device" into a failure.
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { closeness, randomInput } from '../../benchmark/models-support'
import { type Model, ModelCache } from '../../index'
import { loadReference, modelFile } from '../model-fixtures'
import { denseStack, lstmLayers, type RefModel, reference, referenceSample, writeModel } from './reference'

function probe(): { device: string; reason?: string } {
  try {
    return { device: new ModelCache({ device: 'cuda', cleanupIntervalMs: 0 }).device }
  } catch (e: any) {
    return { device: 'none', reason: `${e.code}: ${e.message}` }
  }
}

const gpu = probe()
const hasGpu = gpu.device.startsWith('cuda')
const GiB = 2 ** 30

if (!hasGpu) {
  const banner = '*'.repeat(78)
  process.stderr.write(`\n${banner}\n*** GPU model suite SKIPPED: no usable CUDA device (${gpu.reason})\n${banner}\n`)
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qm-gpu-'))
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }))

const settle = async () => {
  for (let i = 0; i < 3; i++) {
    global.gc?.()
    await new Promise((r) => setImmediate(r))
  }
}

// The suite's own models: no biases, LSTM layers of different widths, and a layer whose output
// at batch 524 289 is 2³¹ + 4096 floats (past a 32-bit index).
const own: Array<[string, RefModel]> = [
  ['MLP without biases', { arch: 'mlp', dense: denseStack(21, [12, 40, 24, 3], ['relu', 'tanh', 'none'], false) }],
  [
    'LSTM 16 then 8 hidden units, no bias on layer 1, sigmoid head',
    { arch: 'lstm', layers: lstmLayers(22, 5, [16, 8], [true, false]), sequenceLength: 7, head: denseStack(23, [8, 3], ['sigmoid'], true) },
  ],
]
const wide: RefModel = { arch: 'mlp', dense: denseStack(24, [1, 4096, 1], ['relu', 'none'], true) }
const WIDE_BATCH = 524_289

describe('GPU availability', () => {
  it(hasGpu ? `runs on ${gpu.device}` : 'without a GPU, device cuda fails with DEVICE_UNAVAILABLE and auto uses the CPU', () => {
    if (process.env.QM_GPU_REQUIRED === '1') expect(gpu.reason).toBeUndefined()
    if (hasGpu) {
      expect(new ModelCache({ device: 'auto', cleanupIntervalMs: 0 }).device).toBe(gpu.device)
    } else {
      expect(gpu.reason).toMatch(/^DEVICE_UNAVAILABLE: /)
      expect(new ModelCache({ device: 'auto', cleanupIntervalMs: 0 }).device).toBe('cpu')
    }
  })
})

describe("the GPU suite's float64 reference agrees with the CPU backend (runs everywhere)", () => {
  it.each(own)('%s at batch 1 and 33', async (name, m) => {
    const model = await new ModelCache({ device: 'cpu', cleanupIntervalMs: 0 }).load('m', writeModel(path.join(tmp, `${name.replace(/\W+/g, '-')}.safetensors`), m))
    for (const batch of [1, 33]) {
      const x = randomInput(batch * model.inputSize * model.sequenceLength, batch)
      closeness(model.predictSync(x), reference(m, x, batch))
    }
  })

  it('the 1→4096→1 model of the size-limit test, on sample rows', async () => {
    const model = await new ModelCache({ device: 'cpu', cleanupIntervalMs: 0 }).load('wide', writeModel(path.join(tmp, 'wide-cpu.safetensors'), wide))
    const x = randomInput(64, 5)
    closeness(model.predictSync(x), reference(wide, x, 64))
  })
})

const gpuDescribe = hasGpu ? describe : describe.skip

gpuDescribe('ModelCache on CUDA', () => {
  const onGpu = (options: ConstructorParameters<typeof ModelCache>[0] = {}) => new ModelCache({ device: gpu.device, cleanupIntervalMs: 0, ...options })
  const onCpu = () => new ModelCache({ device: 'cpu', cleanupIntervalMs: 0 })

  it('says how its kernels were built (the device architecture, CUBIN or PTX, the NVRTC version)', () => {
    const info = onGpu().deviceInfo()!
    console.log(`${gpu.device}: ${info}`)
    expect(info).toMatch(/sm_\d+.*(CUBIN|PTX).*NVRTC \d+\.\d+/)
  })

  const fixture = loadReference()
  it.each(fixture.cases.map((c) => [c.name, c] as const))('%s: GPU agrees with the NumPy fixture and the CPU at batch 1 and 64', async (_name, c) => {
    const file = modelFile(c, tmp)
    const g = await onGpu().load('m', file)
    const cpu = await onCpu().load('m', file)
    expect(g.device).toBe(gpu.device)
    expect(g.memoryUsage().gpuBytes).toBeGreaterThan(0)
    expect(g.memoryUsage().modelDataBytes).toBe(0)
    for (const run of c.runs) {
      const x = randomInput(run.inputLength, run.inputSeed)
      closeness(await g.predict(x, { batch: run.batch }), run.expected)
      closeness(g.predictSync(x), run.expected)
      closeness(cpu.predictSync(x), run.expected)
    }
  })

  it.each(own)('%s: GPU agrees with the float64 reference at batch 1 and 64', async (name, m) => {
    const g = await onGpu().load('m', writeModel(path.join(tmp, `${name.replace(/\W+/g, '-')}-gpu.safetensors`), m))
    for (const batch of [1, 64]) {
      const x = randomInput(batch * g.inputSize * g.sequenceLength, 40 + batch)
      closeness(await g.predict(x, { batch }), reference(m, x, batch))
    }
  })

  it(`a layer output of 2³¹ + 4096 floats (1→4096→1 at batch ${WIDE_BATCH}): every row right, the workspace freed after`, async () => {
    const cache = onGpu({ maxBytes: 64 * GiB })
    const model = await cache.load('wide', writeModel(path.join(tmp, 'wide.safetensors'), wide))
    const { free } = cache.deviceMemory()!
    const need = 2 * 4096 * WIDE_BATCH * 4 + 2 * WIDE_BATCH * 4
    if (free < need + 2 * GiB) {
      process.stderr.write(`\n*** size-limit test SKIPPED: it needs ${(need / GiB).toFixed(1)} GiB of device memory, ${(free / GiB).toFixed(1)} GiB free\n`)
      return
    }
    const weights = model.memoryUsage().gpuBytes
    const x = randomInput(WIDE_BATCH, 77)
    const y = await model.predict(x, { batch: WIDE_BATCH })
    expect(y.length).toBe(WIDE_BATCH)
    // The rows past element 2³¹ of the hidden layer are the ones a 32-bit index got wrong.
    const rows = [0, 1, 262_144, 524_286, 524_287, 524_288]
    closeness(Float32Array.from(rows, (r) => y[r]), rows.map((r) => referenceSample(wide, x, r)[0]))
    // Every row against the CPU, in slices it computes without a multi-GiB workspace.
    const cpu = await onCpu().load('wide', writeModel(path.join(tmp, 'wide-cpu-all.safetensors'), wide))
    for (let at = 0; at < WIDE_BATCH; at += 16_384) {
      const end = Math.min(at + 16_384, WIDE_BATCH)
      closeness(y.subarray(at, end), cpu.predictSync(x.subarray(at, end)))
    }
    // 16 GiB of workspace is far over tensorCacheBytes: freed once the call ended.
    expect(model.memoryUsage().gpuBytes).toBe(weights)
  })

  it('device memory: before − loaded ≥ gpuBytes, and free memory returns to its pre-load value after evict', async () => {
    const file = writeModel(path.join(tmp, 'mem.safetensors'), { arch: 'mlp', dense: denseStack(4, [256, 1024, 1024, 1], ['relu', 'relu', 'none'], true) })
    const cache = onGpu()
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
    const { gpuBytes } = model.memoryUsage()
    expect(cache.stats().gpuBytes).toBe(gpuBytes)
    console.log(`device free: before ${before}, loaded ${loaded} (Δ ${before - loaded}, gpuBytes ${gpuBytes})`)
    // The driver allocates in pages: what it took is at least what the cache counts.
    expect(before - loaded).toBeGreaterThanOrEqual(gpuBytes)
    cache.evict('m')
    await settle()
    const after = cache.deviceMemory()!.free
    console.log(`device free after evict: ${after}`)
    expect(model.memoryUsage().gpuBytes).toBe(0)
    expect(cache.stats().gpuBytes).toBe(0)
    // Another process on the same GPU can move `free`; allow 1 MiB for that.
    expect(Math.abs(after - before)).toBeLessThanOrEqual(1 << 20)
  })

  it('a GPU workspace counts against maxBytes: a large batch evicts the least recently used model', async () => {
    const file = writeModel(path.join(tmp, 'budget.safetensors'), { arch: 'mlp', dense: denseStack(6, [64, 256, 1], ['relu', 'none'], true) })
    const probeCache = onGpu()
    const weights = (await probeCache.load('p', file)).memoryUsage().gpuBytes
    // The device workspace of batch 8192 (input, two dense buffers, five unused one-float
    // LSTM buffers) fits beside one model's weights, not two.
    const workspace = 4 * (8192 * 64 + 2 * 8192 * 256 + 5)
    const cache = onGpu({ maxBytes: weights + workspace + Math.floor(weights / 2) })
    const a: Model = await cache.load('a', file)
    await cache.load('b', file)
    expect(cache.ids()).toEqual(['b', 'a'])
    await a.predict(randomInput(8192 * 64, 3), { batch: 8192 })
    expect(cache.ids()).toEqual(['a']) // b made room for a's workspace
    expect(cache.stats().evictions).toBe(1)
    const tiny = onGpu({ maxBytes: weights + 1024 })
    const alone = await tiny.load('x', file)
    let code: string | undefined
    try {
      await alone.predict(randomInput(8192 * 64, 3), { batch: 8192 })
    } catch (e: any) {
      code = e.code
    }
    expect(code).toBe('DEVICE_OUT_OF_MEMORY')
  })

  it('100 concurrent GPU predicts are bit-identical to sequential ones', async () => {
    const file = writeModel(path.join(tmp, 'conc.safetensors'), { arch: 'mlp', dense: denseStack(5, [64, 256, 256, 1], ['relu', 'relu', 'none'], true) })
    const model = await onGpu().load('m', file)
    const inputs = Array.from({ length: 100 }, (_, i) => randomInput(8 * 64, 100 + i))
    const sequential = inputs.map((x) => Buffer.from(model.predictSync(x).buffer))
    const concurrent = await Promise.all(inputs.map((x) => model.predict(x, { batch: 8 })))
    concurrent.forEach((y, i) => expect(Buffer.from(y.buffer).equals(sequential[i])).toBe(true))
  })
})
