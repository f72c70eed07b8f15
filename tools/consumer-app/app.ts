// A consumer of the published package: tools/consumer-test.mjs installs the packed tarballs
// into a temporary app, type-checks this file with `tsc --strict` against the shipped
// index.d.ts and runs it. It touches every class: ConnectionPool, PooledConnection,
// ModelCache, Model and Metrics.
//   node out/app.js MODEL.safetensors
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import {
  ConnectionPool,
  type ExecuteResult,
  Metrics,
  type MetricsSnapshot,
  type Model,
  ModelCache,
  type ModelCacheStats,
  type PooledConnection,
  type PoolOptions,
  type QueryResult,
} from 'quartermaster'

function check(ok: boolean, what: string): void {
  if (!ok) throw new Error(`consumer app: ${what}`)
}

async function pools(dir: string): Promise<void> {
  const options: PoolOptions = { url: `sqlite:${path.join(dir, 'fills.db')}`, maxSize: 4, acquireTimeoutMs: 5000, name: 'consumer' }
  const pool = new ConnectionPool(options)
  check(pool.backend === 'sqlite' && pool.name === 'consumer', `backend ${pool.backend}, name ${pool.name}`)
  await pool.execute('create table fills(id integer primary key, sym text not null, qty integer not null)')
  const inserted: ExecuteResult = await pool.transaction(async (tx: PooledConnection) => {
    await tx.execute('insert into fills(sym, qty) values ($1, $2)', ['BTC', 3])
    return tx.execute('insert into fills(sym, qty) values ($1, $2)', ['ETH', 5])
  })
  check(inserted.rowCount === 1, `rowCount ${inserted.rowCount}`)
  {
    await using conn = await pool.acquire()
    const result: QueryResult = await conn.query('select sym, sum(qty) as qty from fills group by sym order by sym')
    check(result.rowCount === 2 && result.fields.join() === 'sym,qty', `query: ${JSON.stringify(result)}`)
    const first = result.rows[0]
    check(first !== undefined && first.sym === 'BTC' && Number(first.qty) === 3, `first row ${JSON.stringify(first)}`)
  }
  const lease: PooledConnection | null = pool.tryAcquire()
  if (lease) {
    lease.release()
    check(lease.released, 'released lease')
  }
  const m = pool.metrics()
  check(m.totalGets >= 3 && m.errors === 0, `pool metrics ${JSON.stringify({ gets: m.totalGets, errors: m.errors })}`)
  check(pool.status().inUse === 0, 'no lease left in use')
  await pool.close()
}

async function models(file: string): Promise<void> {
  const cache = new ModelCache({ device: 'cpu', maxModels: 4, cleanupIntervalMs: 0 })
  const byPath: Model = await cache.load('sample-mlp', file)
  const byBuffer: Model = await cache.load('sample-mlp-bytes', readFileSync(file))
  check(byPath.arch === 'mlp' && byPath.device === 'cpu', `arch ${byPath.arch} on ${byPath.device}`)
  const batch = 3
  const input = Float32Array.from({ length: batch * byPath.inputSize * byPath.sequenceLength }, (_, i) => Math.sin(i))
  const a: Float32Array = await byPath.predict(input, { batch })
  const b: Float32Array = byBuffer.predictSync(input)
  check(a.length === batch * byPath.outputSize, `output length ${a.length}`)
  check(
    a.every((v, i) => Number.isFinite(v) && v === b[i]),
    'path and Buffer loads predict the same finite outputs',
  )
  check(byPath.memoryUsage().modelDataBytes > 0, 'model memory reported')
  const stats: ModelCacheStats = cache.stats()
  check(stats.models === 2 && stats.device === 'cpu', `cache stats ${JSON.stringify(stats)}`)
  byBuffer.release()
  check(cache.evict('sample-mlp'), 'evict')
  check(!byPath.resident, 'an evicted model is not resident')
  cache.clear()
}

function metrics(): void {
  const global = Metrics.global()
  const snap: MetricsSnapshot = global.snapshot()
  check(snap.poolGets >= 3 && snap.models.length >= 1, `snapshot ${JSON.stringify({ gets: snap.poolGets, models: snap.models.length })}`)
  const text = global.prometheus()
  check(text.includes('# TYPE qm_pool_acquires_total counter') || text.includes('qm_pool_acquires_total'), 'prometheus text has qm_pool_acquires_total')
  const om = global.prometheus({ openMetrics: true, includeProcess: false })
  check(om.endsWith('# EOF\n'), 'OpenMetrics ends with # EOF')
  check(global.contentType({ openMetrics: true }).startsWith('application/openmetrics-text'), 'OpenMetrics content type')
  const own = new Metrics()
  check(own.snapshot().poolGets === 0, 'a new registry starts at zero')
  console.log(`metrics: ${snap.poolGets} acquires, ${snap.models.length} models, ${text.split('\n').length} exposition lines, health ${global.health().status}`)
}

async function main(): Promise<void> {
  const file = process.argv[2]
  if (!file) throw new Error('usage: node out/app.js MODEL.safetensors')
  const dir = mkdtempSync(path.join(os.tmpdir(), 'qm-consumer-'))
  try {
    await pools(dir)
    await models(file)
    metrics()
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
  console.log('consumer app OK')
}

main().catch((e: unknown) => {
  console.error(e)
  process.exit(1)
})
