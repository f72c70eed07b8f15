import { ConnectionPool } from '../index'
import { collectGarbage, describeWithRedis, eventually, trackedPools, redisUrl } from './support/env'

describeWithRedis('ConnectionPool on Redis', () => {
  // Every pool a test opens is closed after it, pass or fail.
  const open = trackedPools()

  const key = (k: string) => `qm:test:${process.pid}:${k}`

  it('runs commands and pipelines in one native call each', async () => {
    const pool = open({ url: redisUrl!, maxSize: 4, name: 'cache' })
    expect(pool.backend).toBe('redis')
    expect(await pool.command('SET', key('a'), 'v1')).toBe('OK')
    expect(await pool.command('GET', key('a'))).toBe('v1')
    expect(await pool.command('INCRBY', [key('n'), 5])).toBe(5) // the arguments as one array work too
    expect(await pool.command('GET', key('missing'))).toBeNull()
    await pool.command('SET', key('bin'), Buffer.from([0xff, 0x00, 0xfe]))
    expect(await pool.command('GET', key('bin'))).toEqual(Buffer.from([0xff, 0x00, 0xfe]))
    const replies = await pool.pipeline([
      ['SET', key('p'), '1'],
      ['INCR', key('p')],
      ['LRANGE', key('none'), 0, -1],
    ])
    expect(replies).toEqual(['OK', 2, []])
    await pool.command('DEL', key('a'), key('n'), key('bin'), key('p'))
    await pool.close()
  })

  it('runs MULTI/EXEC through transaction and discards on throw', async () => {
    const pool = open({ url: redisUrl!, maxSize: 2 })
    const exec = await pool.transaction(async (tx) => {
      await tx.command('SET', key('tx'), 'a')
      await tx.command('APPEND', key('tx'), 'b')
    })
    expect(exec).toEqual(['OK', 2])
    await expect(
      pool.transaction(async (tx) => {
        await tx.command('SET', key('tx'), 'zzz')
        throw new Error('no')
      }),
    ).rejects.toThrow('no')
    expect(await pool.command('GET', key('tx'))).toBe('ab')
    await pool.command('DEL', key('tx'))
    await pool.close()
  })

  it('lets blocking commands wait longer than a short response timeout', async () => {
    const pool = open({ url: redisUrl!, maxSize: 2 })
    const started = Date.now()
    const waiting = pool.command('BLPOP', key('queue'), 1)
    await new Promise((r) => setTimeout(r, 100))
    await pool.command('RPUSH', key('queue'), 'order-1')
    expect(await waiting).toEqual([key('queue'), 'order-1'])
    expect(await pool.command('BLPOP', key('queue'), 1)).toBeNull() // waited its full second
    expect(Date.now() - started).toBeGreaterThanOrEqual(1000)
  })

  it('reports server errors as QUERY_FAILED and keeps serving', async () => {
    const pool = open({ url: redisUrl!, maxSize: 1 })
    await pool.command('SET', key('str'), 'x')
    const err: any = await pool.command('LPUSH', key('str'), 'y').catch((e) => e)
    expect(err.code).toBe('QUERY_FAILED')
    expect(err.message).toMatch(/WRONGTYPE/)
    await expect(pool.command('NOT A COMMAND')).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    await expect(pool.command('SET', [key('k'), null as any])).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    await expect(pool.query('select 1')).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' })
    expect(await pool.command('PING')).toBe('PONG')
    await pool.command('DEL', key('str'))
    await pool.close()
  })

  it('never hands on a connection left in MULTI or on another database', async () => {
    const pool = open({ url: redisUrl!, maxSize: 1 })
    await (async () => {
      const conn = await pool.acquire()
      await conn.command('MULTI')
      await conn.command('SET', key('queued'), '1')
    })()
    await collectGarbage()
    await eventually(() => pool.status(), (s) => s.inUse === 0)
    expect(await pool.command('SET', key('after'), '2')).toBe('OK')
    expect(await pool.command('EXISTS', key('queued'))).toBe(0)
    const conn = await pool.acquire()
    await conn.command('SELECT', 1)
    conn.release()
    expect(await pool.command('EXISTS', key('after'))).toBe(1)
    await pool.command('DEL', key('after'))
    expect(pool.metrics().leakedLeases).toBe(1)
    await pool.close()
  })
})
