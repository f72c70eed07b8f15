import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { closeness, randomInput, rng, ROOT } from '../benchmark/models-support'
import { Metrics, type Model, ModelCache } from '../index'
import { bytesOf, FIXTURE, loadReference, modelFile, sha256, writeSeededModel } from './model-fixtures'

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qm-models-'))
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }))

/** A seeded MLP written in JavaScript (mulberry32 weights; no Python). */
const exportMlp = (name: string, seed: number, dims: number[], acts: string[]) =>
  writeSeededModel(path.join(tmp, `${name}.safetensors`), { generate: 'mlp', seed, dims, activations: acts })
const expectClose = (actual: Float32Array, expected: ArrayLike<number>) => closeness(actual, expected)

async function collect(): Promise<void> {
  for (let i = 0; i < 3; i++) {
    global.gc!()
    await new Promise((r) => setImmediate(r))
  }
}

async function codeOf(p: Promise<unknown> | (() => unknown)): Promise<string | undefined> {
  try {
    await (typeof p === 'function' ? p() : p)
  } catch (e: any) {
    return e.code
  }
  return undefined
}

const cpu = (options: ConstructorParameters<typeof ModelCache>[0] = {}) => new ModelCache({ device: 'cpu', cleanupIntervalMs: 0, ...options })

// Against NumPy outputs committed in __test__/fixtures/model-reference.json (tools/model_fixtures.py,
// which records its seeds and command); __test__/models.numpy.spec.ts re-runs NumPy live.
describe('ModelCache: CPU inference matches the NumPy reference to 1e-5', () => {
  const reference = loadReference()
  const regenerate = `regenerate ${path.relative(ROOT, FIXTURE)} with: ${reference.command}`
  it.each(reference.cases.map((c) => [c.name, c] as const))('%s at batch 1 and 64', async (_name, c) => {
    const file = modelFile(c, tmp)
    const modelSha = sha256(fs.readFileSync(file))
    if (modelSha !== c.modelSha256) throw new Error(`${path.basename(file)} has sha256 ${modelSha}, not the fixture's ${c.modelSha256}: not the model NumPy ran; ${regenerate}`)
    const cache = cpu()
    const model = await cache.load('m', file)
    expect([model.inputSize, model.sequenceLength, model.outputSize]).toEqual([c.inputSize, c.sequenceLength, c.outputSize])
    expect(c.runs.map((r) => r.batch)).toEqual([1, 64])
    for (const run of c.runs) {
      const x = randomInput(run.inputLength, run.inputSeed)
      expect(x.length).toBe(run.batch * model.inputSize * model.sequenceLength)
      const inputSha = sha256(bytesOf(x))
      if (inputSha !== run.inputSha256) throw new Error(`input (seed ${run.inputSeed}) has sha256 ${inputSha}, not the fixture's ${run.inputSha256}; ${regenerate}`)
      const worst = expectClose(await model.predict(x, { batch: run.batch }), run.expected)
      expectClose(model.predictSync(x), run.expected)
      expect(worst).toBeLessThanOrEqual(1)
    }
    model.release()
  })

  it('reads a model from a Buffer the same as from its path', async () => {
    const file = path.join(ROOT, 'models/sample-lstm.safetensors')
    const cache = cpu()
    const a = await cache.load('path', file)
    const b = await cache.load('buffer', fs.readFileSync(file))
    const x = randomInput(3 * a.inputSize * a.sequenceLength, 9)
    expect(Buffer.from(b.predictSync(x).buffer)).toEqual(Buffer.from(a.predictSync(x).buffer))
    expect(a.sequenceLength).toBe(10)
    expect(a.arch).toBe('lstm')
  })
})

describe('ModelCache: bounds, LRU, TTL, sweep', () => {
  const mlp = () => fs.readFileSync(path.join(ROOT, 'models/sample-mlp.safetensors'))

  it('evicts in exact LRU order under the count bound', async () => {
    const cache = cpu({ maxModels: 3 })
    const handles: Record<string, Model> = {}
    for (const id of ['a', 'b', 'c']) handles[id] = await cache.load(id, mlp())
    expect(cache.get('a')).not.toBeNull() // a becomes most recent
    await cache.load('d', mlp())
    expect(cache.ids()).toEqual(['d', 'a', 'c'])
    expect(await codeOf(() => handles.b.predictSync(new Float32Array(8)))).toBe('MODEL_EVICTED')
    handles.c.predictSync(new Float32Array(8)) // using a model counts as use
    await cache.load('e', mlp())
    expect(cache.ids()).toEqual(['e', 'c', 'd'])
    for (let i = 0; i < 10; i++) await cache.load(`x${i}`, mlp())
    expect(cache.stats()).toMatchObject({ models: 3, evictions: 12 })
  })

  it('evicts least recently used models until the byte bound holds', async () => {
    const probe = cpu()
    const one = (await probe.load('p', mlp())).memoryUsage().modelDataBytes
    const cache = cpu({ maxBytes: Math.floor(one * 2.5) })
    for (const id of ['a', 'b', 'c', 'd']) await cache.load(id, mlp())
    expect(cache.ids()).toEqual(['d', 'c'])
    expect(cache.memoryUsage().modelDataBytes).toBe(2 * one)
    expect(await codeOf(cpu({ maxBytes: 100 }).load('big', mlp()))).toBe('INVALID_ARGUMENT')
  })

  it('expires models unused for ttlMs, on access and on cleanup()', async () => {
    const cache = cpu({ ttlMs: 40 })
    await cache.load('a', mlp())
    await cache.load('b', mlp())
    await new Promise((r) => setTimeout(r, 70))
    expect(cache.get('a')).toBeNull()
    expect(cache.cleanup()).toBe(1)
    expect(cache.stats()).toMatchObject({ models: 0, expirations: 2, bytes: 0 })
  })

  it('sweeps expired models in the background every cleanupIntervalMs', async () => {
    const cache = new ModelCache({ device: 'cpu', ttlMs: 30, cleanupIntervalMs: 10 })
    const m = await cache.load('a', mlp())
    await new Promise((r) => setTimeout(r, 150))
    expect(cache.stats()).toMatchObject({ models: 0, expirations: 1 })
    expect(m.resident).toBe(false)
    expect(m.memoryUsage().totalBytes).toBe(0)
  })

  it('loads one id once under concurrent loads', async () => {
    const cache = cpu()
    const models = await Promise.all(Array.from({ length: 20 }, () => cache.load('same', mlp())))
    const one = models[0].memoryUsage().modelDataBytes
    expect(cache.memoryUsage().modelDataBytes).toBe(one)
    expect(cache.stats().models).toBe(1)
  })

  it('reports the hit rate of a seeded Zipf workload (50 models, capacity 20) and matches an exact LRU', async () => {
    const cache = cpu({ maxModels: 20 })
    const bytes = mlp()
    const r = rng(50)
    const weights = Array.from({ length: 50 }, (_, i) => 1 / (i + 1))
    const total = weights.reduce((a, b) => a + b)
    const pick = () => {
      let u = r() * total
      for (let i = 0; i < 50; i++) if ((u -= weights[i]) <= 0) return i
      return 49
    }
    const lru: string[] = []
    let simulatedHits = 0
    for (let i = 0; i < 5000; i++) {
      const id = `m${pick()}`
      const at = lru.indexOf(id)
      if (at >= 0) {
        simulatedHits++
        lru.splice(at, 1)
      } else if (lru.length === 20) lru.pop()
      lru.unshift(id)
      ;(await cache.load(id, bytes)).release()
    }
    const stats = cache.stats()
    console.log(`Zipf(s=1) over 50 models, capacity 20, 5000 requests, seed 50: hit rate ${(stats.hitRate * 100).toFixed(2)} % (${stats.hits} hits, ${stats.misses} misses, ${stats.evictions} evictions)`)
    expect(stats.hits).toBe(simulatedHits)
    expect(cache.ids()).toEqual(lru)
  })
})

describe('ModelCache: concurrency, ownership and GC', () => {
  it('100 concurrent predicts succeed and are bit-identical to sequential ones', async () => {
    const file = exportMlp('conc', 5, [64, 256, 256, 1], ['relu', 'relu', 'none'])
    const cache = cpu()
    const model = await cache.load('m', file)
    const inputs = Array.from({ length: 100 }, (_, i) => randomInput(8 * 64, 1000 + i))
    const sequential = inputs.map((x) => Buffer.from(model.predictSync(x).buffer))
    const concurrent = await Promise.all(inputs.map((x) => model.predict(x, { batch: 8 })))
    concurrent.forEach((y, i) => expect(Buffer.from(y.buffer).equals(sequential[i])).toBe(true))
    expect(model.memoryUsage().tempBufferBytes).toBe(0)
  })

  it('checks the input length, saying expected vs got', async () => {
    const model = await cpu().load('m', path.join(ROOT, 'models/sample-mlp.safetensors'))
    let err: any
    try {
      model.predictSync(new Float32Array(24), { batch: 2 })
    } catch (e) {
      err = e
    }
    expect(err.code).toBe('INVALID_ARGUMENT')
    expect(err.message).toMatch(/24 floats; expected 16/)
    expect(await codeOf(model.predict(new Float32Array(7)))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(model.predict(new Float32Array(0)))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(model.predict(new Float32Array(8), { batch: 0 }))).toBe('INVALID_ARGUMENT')
  })

  it('wrong argument types are INVALID_ARGUMENT, never a crash', async () => {
    const cache = cpu()
    const model = await cache.load('m', path.join(ROOT, 'models/sample-mlp.safetensors'))
    const any = (v: unknown) => v as any
    expect(await codeOf(() => model.predictSync(any([1, 2, 3, 4, 5, 6, 7, 8])))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(() => model.predictSync(any(new Float64Array(8))))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(model.predict(any('x')))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(model.predict(new Float32Array(8), { batch: -1 }))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(model.predict(new Float32Array(8), { batch: 1.5 }))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(cache.load(any(5), 'x'))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(cache.load('', 'x'))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(cache.load('x', any({})))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(() => cache.get(any(null)))).toBe('INVALID_ARGUMENT')
    expect(await codeOf(() => cache.evict(any(1)))).toBe('INVALID_ARGUMENT')
  })

  it('a released handle fails; [Symbol.dispose] releases', async () => {
    const cache = cpu()
    const m = await cache.load('m', path.join(ROOT, 'models/sample-mlp.safetensors'))
    m[Symbol.dispose]()
    m.release()
    expect(await codeOf(m.predict(new Float32Array(8)))).toBe('INVALID_ARGUMENT')
    expect(cache.stats().models).toBe(1) // the cache still holds the model for others
  })

  it('a dropped handle is collected and released; the model stays cached', async () => {
    const cache = cpu()
    const live = () => Metrics.global().snapshot().liveResources
    await collect() // handles left unreachable by earlier tests go first
    const before = live()
    const collected: string[] = []
    const registry = new FinalizationRegistry<string>((id) => collected.push(id))
    await (async () => {
      const m = await cache.load('dropped', path.join(ROOT, 'models/sample-mlp.safetensors'))
      registry.register(m, 'dropped')
      m.predictSync(new Float32Array(8))
      expect(live()).toBe(before + 1)
    })()
    for (let i = 0; i < 10 && collected.length === 0; i++) await collect()
    expect(collected).toEqual(['dropped'])
    expect(live()).toBe(before)
    expect(cache.stats().models).toBe(1)
    expect(cache.stats().collectedHandles).toBe(1)
    expect(cache.get('dropped')!.predictSync(new Float32Array(8)).length).toBe(1)
  })

  it('a handle keeps its cache alive: the cache object collected, the model still runs', async () => {
    const collected: string[] = []
    const registry = new FinalizationRegistry<string>((what) => collected.push(what))
    const model = await (async () => {
      const cache = cpu()
      registry.register(cache, 'cache')
      return cache.load('orphan', path.join(ROOT, 'models/sample-mlp.safetensors'))
    })()
    const expected = Buffer.from(model.predictSync(new Float32Array(8)).buffer)
    for (let i = 0; i < 10 && collected.length === 0; i++) await collect()
    expect(collected).toEqual(['cache']) // the JS object is gone…
    expect(model.resident).toBe(true) // …its models are not
    expect(Buffer.from((await model.predict(new Float32Array(8))).buffer).equals(expected)).toBe(true)
    expect(model.memoryUsage().modelDataBytes).toBeGreaterThan(0)
    model.release()
    expect(model.resident).toBe(false)
  })

  it('an evicted model with a handle held: in-flight call finishes, memory goes to zero, then MODEL_EVICTED', async () => {
    const file = exportMlp('evict', 6, [64, 256, 256, 1], ['relu', 'relu', 'none'])
    const cache = cpu()
    const model = await cache.load('m', file)
    const x = randomInput(256 * 64, 7)
    const expected = model.predictSync(x)
    const running = model.predict(x, { batch: 256 })
    expect(cache.evict('m')).toBe(true)
    expect(Buffer.from((await running).buffer).equals(Buffer.from(expected.buffer))).toBe(true)
    await collect()
    expect(model.memoryUsage().totalBytes).toBe(0)
    expect(cache.memoryUsage().totalBytes).toBe(0)
    expect(cache.stats().bytes).toBe(0)
    expect(model.resident).toBe(false)
    expect(await codeOf(model.predict(x))).toBe('MODEL_EVICTED')
    expect(await codeOf(() => model.predictSync(x))).toBe('MODEL_EVICTED')
    // Asked to, an evicted handle reloads from its file.
    const again = await model.reload()
    expect(Buffer.from(again.predictSync(x).buffer).equals(Buffer.from(expected.buffer))).toBe(true)
    const fromBytes = await cache.load('bytes', fs.readFileSync(file))
    expect(await codeOf(fromBytes.reload())).toBe('INVALID_ARGUMENT')
  })

  it('memoryUsage is exact and returns to zero after clear()', async () => {
    const cache = cpu({ tensorCacheBytes: 1 << 20 })
    const m = await cache.load('m', path.join(ROOT, 'models/sample-mlp.safetensors'))
    const weights = (8 * 32 + 32 + 32 * 16 + 16 + 16 + 1) * 4
    expect(m.memoryUsage()).toEqual({ modelDataBytes: weights, cacheBytes: 0, tempBufferBytes: 0, gpuBytes: 0, totalBytes: weights })
    await m.predict(new Float32Array(8 * 4))
    const u = m.memoryUsage()
    expect(u.cacheBytes).toBeGreaterThan(0)
    expect(u.totalBytes).toBe(weights + u.cacheBytes)
    expect(cache.clear()).toBe(1)
    expect(cache.memoryUsage().totalBytes).toBe(0)
  })
})

describe('ModelCache: where predict runs (inlineMicros, threads)', () => {
  /** True when `p` settled within a few microtasks: it ran on the calling thread (a result from
   * the compute pool needs the event loop to come round). */
  async function ranInline(p: Promise<unknown>): Promise<boolean> {
    let done = false
    void p.then(() => (done = true))
    for (let i = 0; i < 5; i++) await Promise.resolve()
    const inline = done
    await p
    return inline
  }
  const sample = () => path.join(ROOT, 'models/sample-mlp.safetensors')

  it('a tiny model runs on the calling thread once its forward pass is measured under inlineMicros', async () => {
    const model = await cpu().load('m', sample())
    const x = randomInput(8, 11)
    expect(await ranInline(model.predict(x))).toBe(false) // the first call is measured on the pool
    for (let i = 0; i < 50; i++) model.predictSync(x) // every run feeds the estimate
    const runs = await Promise.all(Array.from({ length: 20 }, () => ranInline(model.predict(x))))
    expect(runs.filter(Boolean).length).toBeGreaterThanOrEqual(18)
    expect(Buffer.from((await model.predict(x)).buffer)).toEqual(Buffer.from(model.predictSync(x).buffer))
    // Another batch size is its own estimate: measured on the pool first.
    expect(await ranInline(model.predict(randomInput(8 * 3, 12)))).toBe(false)
  })

  it('inlineMicros 0 keeps predict off the calling thread; so does a forward pass over the bound', async () => {
    const never = await cpu({ inlineMicros: 0 }).load('m', sample())
    const x = randomInput(8, 13)
    for (let i = 0; i < 20; i++) never.predictSync(x)
    expect(await ranInline(never.predict(x))).toBe(false)
    const big = await cpu().load('big', exportMlp('inline-big', 7, [64, 256, 256, 1], ['relu', 'relu', 'none']))
    const batch = randomInput(1024 * 64, 14) // ~1–3 ms of work, far over the 20 µs default
    for (let i = 0; i < 3; i++) big.predictSync(batch)
    expect(await ranInline(big.predict(batch))).toBe(false)
  })

  it('threads: 1 gives the same bits as the default split across cores', async () => {
    const file = exportMlp('threads', 8, [64, 256, 256, 1], ['relu', 'relu', 'none'])
    const one = await cpu({ threads: 1 }).load('m', file)
    const all = await cpu().load('m', file)
    for (const batch of [1, 7, 256, 1000]) {
      const x = randomInput(batch * 64, 100 + batch)
      const a = Buffer.from((await one.predict(x)).buffer)
      expect(Buffer.from((await all.predict(x)).buffer).equals(a)).toBe(true)
      expect(Buffer.from(all.predictSync(x).buffer).equals(a)).toBe(true)
    }
  })

  it('a bad threads or inlineMicros is INVALID_ARGUMENT', async () => {
    for (const options of [{ threads: -1 }, { threads: 1.5 }, { inlineMicros: -5 }, { inlineMicros: Number.NaN }]) {
      expect(await codeOf(() => cpu(options))).toBe('INVALID_ARGUMENT')
    }
  })
})

describe('ModelCache: devices and bad input never crash', () => {
  it('falls back to the CPU with device auto, and says so', async () => {
    const cache = new ModelCache({ device: 'auto', cleanupIntervalMs: 0 })
    const m = await cache.load('m', path.join(ROOT, 'models/sample-mlp.safetensors'))
    expect(m.device).toBe(cache.device)
    expect(cache.stats().device).toBe(cache.device)
    if (cache.device === 'cpu') expect(cache.deviceMemory()).toBeNull()
  })

  it("device 'cuda' without a GPU is DEVICE_UNAVAILABLE; bad device names are INVALID_ARGUMENT", () => {
    const auto = new ModelCache({ device: 'auto', cleanupIntervalMs: 0 })
    if (auto.device === 'cpu') {
      expect(codeOfSync(() => new ModelCache({ device: 'cuda' }))).toBe('DEVICE_UNAVAILABLE')
      expect(codeOfSync(() => new ModelCache({ device: 'cuda:3' }))).toBe('DEVICE_UNAVAILABLE')
    }
    expect(codeOfSync(() => new ModelCache({ device: 'gpu' }))).toBe('INVALID_ARGUMENT')
    expect(codeOfSync(() => new ModelCache({ maxBytes: 4 << 30 }))).toBe('INVALID_ARGUMENT')
    expect(codeOfSync(() => new ModelCache({ ttlMs: -1 }))).toBe('INVALID_ARGUMENT')
    expect(codeOfSync(() => new ModelCache({ maxModels: 0 }))).toBe('INVALID_ARGUMENT')
  })

  function codeOfSync(f: () => unknown): string | undefined {
    try {
      f()
    } catch (e: any) {
      return e.code
    }
    return undefined
  }

  function file(header: object | string, data: Buffer = Buffer.alloc(0)): Buffer {
    const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header))
    const len = Buffer.alloc(8)
    len.writeBigUInt64LE(BigInt(json.length))
    return Buffer.concat([len, json, data])
  }

  const bad: Array<[string, Buffer, RegExp]> = [
    ['empty', Buffer.alloc(0), /8-byte header/],
    ['a header claiming terabytes', Buffer.concat([Buffer.from([0, 0, 0, 0, 0, 1, 0, 0]), Buffer.from('{}')]), /header claims/],
    ['a header longer than the file', Buffer.concat([Buffer.from([100, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('{}')]), /truncated/],
    ['invalid JSON', file('{"a":'), /not valid JSON/],
    ['no arch', file({ 'dense.0.weight': { dtype: 'F32', shape: [1, 1], data_offsets: [0, 4] } }, Buffer.alloc(4)), /arch/],
    ['an unknown arch', file({ __metadata__: { arch: 'transformer' } }), /transformer/],
    ['a wrong dtype', file({ __metadata__: { arch: 'mlp' }, 'dense.0.weight': { dtype: 'I64', shape: [1, 1], data_offsets: [0, 8] } }, Buffer.alloc(8)), /dtype I64/],
    ['an absurd shape', file({ __metadata__: { arch: 'mlp' }, 'dense.0.weight': { dtype: 'F32', shape: [1e15, 1e15], data_offsets: [0, 4] } }, Buffer.alloc(4)), /absurd shape/],
    ['a shape/size mismatch', file({ __metadata__: { arch: 'mlp' }, 'dense.0.weight': { dtype: 'F32', shape: [2, 2], data_offsets: [0, 4] } }, Buffer.alloc(4)), /spans 4 bytes/],
    ['offsets past the end', file({ __metadata__: { arch: 'mlp' }, 'dense.0.weight': { dtype: 'F32', shape: [1024, 1024], data_offsets: [0, 4194304] } }, Buffer.alloc(4)), /data section has 4 bytes/],
    ['an LSTM without sequence_length', file({ __metadata__: { arch: 'lstm' } }), /sequence_length/],
  ]
  it.each(bad)('%s is MODEL_FORMAT, from a Buffer and from a file', async (_name, bytes, message) => {
    const cache = cpu()
    let err: any
    try {
      await cache.load('bad', bytes)
    } catch (e) {
      err = e
    }
    expect(err?.code).toBe('MODEL_FORMAT')
    expect(err.message).toMatch(message)
    const onDisk = path.join(tmp, `bad-${Math.random()}.safetensors`)
    fs.writeFileSync(onDisk, bytes)
    expect(await codeOf(cache.load('bad', onDisk))).toBe('MODEL_FORMAT')
    expect(cache.stats().models).toBe(0)
  })

  it('every truncation and 500 fuzzed variants of a real file are MODEL_FORMAT or load cleanly', async () => {
    const good = fs.readFileSync(path.join(ROOT, 'models/sample-lstm.safetensors'))
    const cache = cpu({ maxModels: 1 })
    for (let len = 0; len < good.length; len += 7) {
      expect(await codeOf(cache.load('t', good.subarray(0, len)))).toBe('MODEL_FORMAT')
    }
    const r = rng(123)
    const codes = new Map<string, number>()
    for (let i = 0; i < 500; i++) {
      const b = Buffer.from(good)
      const flips = 1 + Math.floor(r() * 4)
      for (let f = 0; f < flips; f++) b[Math.floor(r() * Math.min(b.length, 700))] = Math.floor(r() * 256)
      cache.evict('f')
      const code = (await codeOf(cache.load('f', b))) ?? 'OK'
      codes.set(code, (codes.get(code) ?? 0) + 1)
    }
    expect([...codes.keys()].every((c) => c === 'OK' || c === 'MODEL_FORMAT')).toBe(true)
    expect(codes.get('MODEL_FORMAT')).toBeGreaterThan(0)
  })

  it('a missing file is MODEL_NOT_FOUND', async () => {
    expect(await codeOf(cpu().load('x', path.join(tmp, 'nope.safetensors')))).toBe('MODEL_NOT_FOUND')
  })
})
