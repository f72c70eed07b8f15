import { ConnectionPool } from '../index'

describe('errors are typed, never crash, and hide secrets', () => {
  it.each([
    [{ url: 'mysql://root:hunter2@db/x' }, /scheme/],
    [{ url: 'postgres://u:hunter2@host:notaport/db' }, /url/],
    [{ url: 'nonsense' }, /url/],
    [{ url: 'sqlite::memory:', maxSize: 0 }, /maxSize/],
    [{ url: 'sqlite::memory:', maxSize: 10001 }, /maxSize/],
    [{ url: 'sqlite::memory:', maxSize: 2.5 }, /maxSize/],
    [{ url: 'sqlite::memory:', minIdle: 3, maxSize: 2 }, /minIdle/],
    [{ url: 'sqlite::memory:', acquireTimeoutMs: -1 }, /acquireTimeoutMs/],
    [{ url: 'sqlite::memory:', idleTimeoutMs: Number.NaN }, /idleTimeoutMs/],
    [{ url: 'sqlite::memory:', int8: 'float' }, /int8/],
    [{ url: 'postgres://localhost/db', tls: { mode: 'sometimes' } }, /tls.mode/],
    [{ url: 'postgres://localhost/db', tls: { mode: 'verify-full', ca: 'not a pem' } }, /tls.ca/],
  ])('rejects %j with INVALID_ARGUMENT naming the option', (options, pattern) => {
    let err: any
    try {
      new ConnectionPool(options as any)
    } catch (e) {
      err = e
    }
    expect(Object.prototype.toString.call(err)).toBe('[object Error]')
    expect(err.code).toBe('INVALID_ARGUMENT')
    expect(err.message).toMatch(pattern)
    expect(err.message).not.toContain('hunter2')
  })

  it('refuses use after close with POOL_CLOSED while other pools keep serving', async () => {
    const closed = new ConnectionPool({ url: 'sqlite::memory:' })
    const open = new ConnectionPool({ url: 'sqlite::memory:' })
    await closed.close()
    await expect(closed.query('select 1')).rejects.toMatchObject({ code: 'POOL_CLOSED' })
    await expect(closed.acquire()).rejects.toMatchObject({ code: 'POOL_CLOSED' })
    expect(() => closed.resize(3)).toThrow(expect.objectContaining({ code: 'POOL_CLOSED' }))
    expect((await open.query('select 1 as one')).rows).toEqual([{ one: 1 }])
    await open.close()
  })

  it('rejects parameters of unsupported types without losing the pool', async () => {
    const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 1 })
    for (const bad of [[() => 1], [Symbol('s')], [new Float64Array(2)], 'not-an-array', [2n ** 70n]]) {
      const err = await pool.query('select ?1', bad as any).catch((e) => e)
      expect(err.code).toBe('INVALID_ARGUMENT')
    }
    expect(pool.status().inUse).toBe(0)
    expect((await pool.query('select 1 as ok')).rows).toEqual([{ ok: 1 }])
    await pool.close()
  })

  it('a released lease refuses further work with POOL_CLOSED', async () => {
    const pool = new ConnectionPool({ url: 'sqlite::memory:', maxSize: 1 })
    const conn = await pool.acquire()
    conn.release()
    conn.release()
    expect(conn.released).toBe(true)
    await expect(conn.query('select 1')).rejects.toMatchObject({ code: 'POOL_CLOSED' })
    await pool.close()
  })
})
