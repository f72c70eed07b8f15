// The parts of the API that are plain JavaScript over native calls, installed on the
// native classes once per environment: AbortSignal wiring, the variadic `command`, and
// `transaction`. Evaluated by src/binding/pool.rs at module load; returns the installer.
(function install(ConnectionPool, PooledConnection, Cancellation, shapeKey, leaseBare) {
  const isOptions = (v) =>
    v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof Uint8Array)

  function abortError(signal) {
    const err = new Error('The operation was aborted')
    err.name = 'AbortError'
    err.code = 'ABORT_ERR'
    err.cause = signal.reason
    return err
  }

  function typeError(message) {
    const err = new TypeError(message)
    err.code = 'INVALID_ARGUMENT'
    return err
  }

  // A Cancellation tied to `signal` until `release()` is called.
  function link(signal) {
    const cancellation = new Cancellation()
    const onAbort = () => cancellation.cancel()
    signal.addEventListener('abort', onAbort, { once: true })
    return { cancellation, release: () => signal.removeEventListener('abort', onAbort) }
  }

  // Calls native(...args, options, cancellation) with options.signal wired to the native
  // cancellation; an AbortError carries the signal's reason as `cause`, as Node's do.
  function bounded(self, native, args, options) {
    const signal = options.signal
    if (signal == null) return native.call(self, ...args, options)
    if (signal.aborted) return Promise.reject(abortError(signal))
    const { cancellation, release } = link(signal)
    return native.call(self, ...args, options, cancellation).then(
      (value) => {
        release()
        return value
      },
      (err) => {
        release()
        if (err && err.code === 'ABORT_ERR') err.cause = signal.reason
        throw err
      },
    )
  }

  // Rows arrive packed (src/binding/values.rs `Packed`): [column list, rowCount, rows,
  // ...cells row-major], the column list by number (its key learnt once from
  // `shapeKey(number)`) or, past the native book's size, by key. Each column list gets a row
  // constructor compiled once, so a row is one object literal with a stable shape instead of
  // a property definition per cell.
  const shapes = new Map()
  const SHAPES_MAX = 1024
  const shapesById = [] // at most values.rs SHAPES_MAX

  // A fresh copy of `fields` per result: an array literal (its elements shared
  // copy-on-write until changed) where code can be generated, else a slice.
  function compileFields(fields) {
    try {
      return new Function(`return ${JSON.stringify(fields)}`)
    } catch (_) {
      return () => fields.slice()
    }
  }

  function compileRow(fields) {
    // A literal key, except __proto__, which as a literal key would set the prototype.
    const entries = fields.map((f, i) => {
      const key = f === '__proto__' ? `[${JSON.stringify(f)}]` : JSON.stringify(f)
      return `${key}: p[o + ${i}]`
    })
    try {
      return new Function('p', 'o', `return { ${entries.join(', ')} }`)
    } catch (_) {
      // Code generation from strings is off (--disallow-code-generation-from-strings).
      return (p, o) => {
        const row = {}
        for (let i = 0; i < fields.length; i++) {
          Object.defineProperty(row, fields[i], { value: p[o + i], writable: true, enumerable: true, configurable: true })
        }
        return row
      }
    }
  }

  function shapeOf(key) {
    let shape = shapes.get(key)
    if (shape === undefined) {
      if (shapes.size >= SHAPES_MAX) shapes.clear()
      // `<column count>\0name\0name…`: the count tells one column named "" from none.
      const parts = key.split('\0')
      const fields = parts[0] === '0' ? [] : parts.slice(1)
      shape = { fields, row: compileRow(fields), copyFields: compileFields(fields) }
      shapes.set(key, shape)
    }
    return shape
  }

  // Small results arrive shaped already: native code calls `shapeArgs` (returned by this
  // installer) with the packed values as its arguments.
  const shapeArgs = (...p) => unpack(p)
  const shaped = (r) => (Array.isArray(r) ? unpack(r) : r)

  function unpack(p) {
    const id = p[0]
    const shape = typeof id === 'number' ? (shapesById[id] ?? (shapesById[id] = shapeOf(shapeKey(id)))) : shapeOf(id)
    const width = shape.fields.length
    const count = p[2]
    const rows = new Array(count)
    for (let i = 0, o = 3; i < count; i++, o += width) rows[i] = shape.row(p, o)
    return { rows, rowCount: p[1], fields: shape.copyFields() }
  }

  // A statement run on the calling thread comes back as its result (packed rows for a
  // query); one sent comes back as a promise of it.
  // (Not `instanceof Promise`: an app may replace the global Promise, e.g. zone.js.)
  const isThenable = (r) => r !== null && typeof r === 'object' && typeof r.then === 'function'
  const direct = (r, shape) => (isThenable(r) ? r.then(shape) : Promise.resolve(shape(r)))
  const same = (r) => r

  // SQLite statements issued together. In one turn of the event loop (until its microtasks
  // run), a pool's first `query` and first `execute` go straight to the native side as ever;
  // the ones after them are held and offered as a group when the turn's microtasks run:
  // reads in one read transaction (`_queryGroup`: one snapshot, one lock round), writes in
  // one transaction (`_executeGroup`: one commit), on the calling thread when each is cheap
  // and a connection is idle. Declined (`null`), each runs on its own as before.
  const GROUP_MAX = 64 // src/pool/mod.rs MAX_GROUP
  // The turn: a number that moves on once the microtasks queued in it run (one microtask per
  // turn, whatever the pools).
  let turn = 0
  let turnEnds = false
  const endTurn = () => {
    turn++
    turnEnds = false
  }

  // A pool's grouping state, under one symbol (null: not a SQLite pool): per kind, the turn
  // of its last call and the group open in it.
  const grouping = Symbol('quartermaster.grouping')
  function groupState(pool) {
    let state = pool[grouping]
    if (state === undefined) {
      const sqlite = pool.backend === 'sqlite'
      state = pool[grouping] = sqlite ? { query: { turn: -1, open: undefined }, execute: { turn: -1, open: undefined } } : null
    }
    return state
  }

  // Parameters a group may hold until its microtask: none, or an array of immutable values
  // (copied, so the caller may reuse the array at once). A Buffer, Date or object could change
  // before the group runs: such a statement runs at once instead.
  const CANNOT_WAIT = Symbol('cannot wait')
  function heldParams(params) {
    if (params === undefined || params === null) return params
    if (!Array.isArray(params)) return CANNOT_WAIT
    for (let i = 0; i < params.length; i++) {
      const v = params[i]
      if ((v !== null && typeof v === 'object') || typeof v === 'function' || typeof v === 'symbol') return CANNOT_WAIT
    }
    return params.slice()
  }

  // `eager(sql, params)`: the native call (a result when it ran here, else a promise);
  // `together(items)`: the group call; `shape(r)`: a native result as the caller sees it.
  function coalesced(kind, pool, eager, together, shape, sql, params) {
    if (!turnEnds) {
      turnEnds = true
      queueMicrotask(endTurn)
    }
    const held = kind.turn === turn ? heldParams(params) : CANNOT_WAIT
    if (held === CANNOT_WAIT) {
      kind.turn = turn // the first of its kind this turn, or parameters that cannot wait: at once
      return direct(eager.call(pool, sql, params), shape)
    }
    let group = kind.open
    if (group === undefined || group.items.length >= GROUP_MAX * 2) {
      group = kind.open = { kind, pool, eager, together, shape, items: [], settle: [], done: false }
      queueMicrotask(() => runGroup(group))
    }
    return new Promise((resolve, reject) => {
      group.items.push(sql, held)
      group.settle.push(resolve, reject)
    })
  }

  // Runs the groups held for `pool` now (before it closes: they were issued before close()).
  function runHeld(pool) {
    const state = pool[grouping]
    if (!state) return
    for (const kind of [state.query, state.execute]) if (kind.open !== undefined) runGroup(kind.open)
  }

  function runGroup(group) {
    if (group.done) return
    group.done = true
    const { kind, pool, eager, together, shape, items, settle } = group
    if (kind.open === group) kind.open = undefined // its parameters are not kept past the run
    let results = null
    if (items.length > 2) {
      try {
        results = together.call(pool, items)
      } catch (err) {
        // The group may have run: never run it again.
        for (let i = 1; i < settle.length; i += 2) settle[i](err)
        return
      }
    }
    for (let i = 0; i < settle.length; i += 2) {
      const r = results === null ? null : results[i / 2]
      if (r === undefined) {
        settle[i + 1](new Error('quartermaster: a grouped statement lost its outcome (a bug); it may or may not have run'))
        continue
      }
      if (r !== null) {
        if (r instanceof Error) settle[i + 1](r)
        else settle[i](shape(r))
        continue
      }
      // Not run in the group (declined, or past the part it took): on its own.
      let one
      try {
        one = eager.call(pool, items[i], items[i + 1])
      } catch (err) {
        settle[i + 1](err)
        continue
      }
      if (isThenable(one)) one.then(shape).then(settle[i], settle[i + 1])
      else settle[i](shape(one))
    }
  }

  // Bare functions (src/binding/pool.rs `bare_functions`): query, execute, querySync and
  // executeSync of (receiver, sql, params) without napi-rs's per-call work, the pool or lease
  // passed first. A pool's hold its native object's address, so they must never outlive
  // it: `_bare` is taken off the prototype here, and what it makes is kept only in this
  // WeakMap, keyed by its pool — no other code can reach it, and it goes with its pool.
  // Leases share one set (`leaseBare`), which checks each call's receiver natively: a lease
  // lives briefly, and functions made for each one cost the garbage collector dearly.
  const bareFunctions = new WeakMap()
  const makePoolBare = ConnectionPool.prototype._bare
  delete ConnectionPool.prototype._bare
  function poolBare(self) {
    let bare = bareFunctions.get(self)
    if (bare === undefined) {
      bare = makePoolBare.call(self) // napi-rs checks that `self` is one of its objects
      bareFunctions.set(self, bare)
    }
    return bare
  }
  const sharedLeaseBare = () => leaseBare

  // Parameters go as separate arguments when there are none or a short array of them (the
  // `…Spread` bare functions): cheaper than reading an array's elements natively one by one.
  // Up to three are passed one by one, as a call of a fixed length stays on V8's fast path
  // into native code (a spread call does not); longer lists up to SPREAD_MAX are spread.
  const SPREAD_MAX = 16 // src/binding/pool.rs SPREAD_MAX
  const spreads = (params) => params == null || (Array.isArray(params) && params.length <= SPREAD_MAX)

  for (const cls of [ConnectionPool, PooledConnection]) {
    const proto = cls.prototype
    const bareOf = cls === ConnectionPool ? poolBare : sharedLeaseBare
    const { query: packedQuery } = proto
    proto.querySync = function querySync(sql, params) {
      const bare = bareOf(this)
      if (!spreads(params)) return shaped(bare.querySync(this, sql, params))
      switch (params == null ? 0 : params.length) {
        case 0: return shaped(bare.querySyncSpread(this, sql))
        case 1: return shaped(bare.querySyncSpread(this, sql, params[0]))
        case 2: return shaped(bare.querySyncSpread(this, sql, params[0], params[1]))
        case 3: return shaped(bare.querySyncSpread(this, sql, params[0], params[1], params[2]))
        default: return shaped(bare.querySyncSpread(this, sql, ...params))
      }
    }
    proto.executeSync = function executeSync(sql, params) {
      const bare = bareOf(this)
      if (!spreads(params)) return bare.executeSync(this, sql, params)
      switch (params == null ? 0 : params.length) {
        case 0: return bare.executeSyncSpread(this, sql)
        case 1: return bare.executeSyncSpread(this, sql, params[0])
        case 2: return bare.executeSyncSpread(this, sql, params[0], params[1])
        case 3: return bare.executeSyncSpread(this, sql, params[0], params[1], params[2])
        default: return bare.executeSyncSpread(this, sql, ...params)
      }
    }
    // The native call without options: a result when it ran on the calling thread, else a
    // promise. (Options come with a cancellation: the method itself.)
    const eagerQuery = function eagerQuery(sql, params) {
      const bare = bareOf(this)
      if (!spreads(params)) return bare.query(this, sql, params)
      switch (params == null ? 0 : params.length) {
        case 0: return bare.querySpread(this, sql)
        case 1: return bare.querySpread(this, sql, params[0])
        case 2: return bare.querySpread(this, sql, params[0], params[1])
        case 3: return bare.querySpread(this, sql, params[0], params[1], params[2])
        default: return bare.querySpread(this, sql, ...params)
      }
    }
    const query = function query(sql, params, options, cancellation) {
      const r = options === undefined ? eagerQuery.call(this, sql, params) : packedQuery.call(this, sql, params, options, cancellation)
      return direct(r, shaped)
    }
    // Likewise `execute`.
    const { execute: nativeExecute, command, pipeline } = proto
    const eagerExecute = function eagerExecute(sql, params) {
      const bare = bareOf(this)
      if (!spreads(params)) return bare.execute(this, sql, params)
      switch (params == null ? 0 : params.length) {
        case 0: return bare.executeSpread(this, sql)
        case 1: return bare.executeSpread(this, sql, params[0])
        case 2: return bare.executeSpread(this, sql, params[0], params[1])
        case 3: return bare.executeSpread(this, sql, params[0], params[1], params[2])
        default: return bare.executeSpread(this, sql, ...params)
      }
    }
    const execute = function execute(sql, params, options, cancellation) {
      const r = options === undefined ? eagerExecute.call(this, sql, params) : nativeExecute.call(this, sql, params, options, cancellation)
      return direct(r, same)
    }
    if (cls === ConnectionPool) {
      // A pool's statements may be grouped (a lease's keep their order instead).
      const { _queryGroup, _executeGroup, close } = proto
      // Statements held for a group were issued before close(): they run first, as queued
      // work does.
      proto.close = function close_(...args) {
        runHeld(this)
        return close.apply(this, args)
      }
      proto.query = function query_(sql, params, options) {
        if (options !== undefined) return bounded(this, query, [sql, params], options)
        const state = groupState(this)
        if (state === null) return query.call(this, sql, params)
        return coalesced(state.query, this, eagerQuery, _queryGroup, shaped, sql, params)
      }
      proto.execute = function execute_(sql, params, options) {
        if (options !== undefined) return bounded(this, execute, [sql, params], options)
        const state = groupState(this)
        if (state === null) return execute.call(this, sql, params)
        return coalesced(state.execute, this, eagerExecute, _executeGroup, same, sql, params)
      }
    } else {
      proto.query = function query_(sql, params, options) {
        return options === undefined ? query.call(this, sql, params) : bounded(this, query, [sql, params], options)
      }
      proto.execute = function execute_(sql, params, options) {
        return options === undefined ? execute.call(this, sql, params) : bounded(this, execute, [sql, params], options)
      }
    }
    proto.pipeline = function pipeline_(commands, options) {
      return options === undefined ? pipeline.call(this, commands) : bounded(this, pipeline, [commands], options)
    }
    // command(name, ...args[, options]); a single array argument is the argument list
    // (never a valid Redis argument itself).
    proto.command = function command_(name, ...args) {
      const options = args.length > 0 && isOptions(args[args.length - 1]) ? args.pop() : undefined
      const list = args.length === 1 && Array.isArray(args[0]) ? args[0] : args
      return options === undefined ? command.call(this, name, list) : bounded(this, command, [name, list], options)
    }
  }

  // listen(channel, onNotify, { onListen, pattern }): each callback is guarded, so one that
  // throws (or rejects) is counted on the listener and the others carry on.
  const listen = ConnectionPool.prototype.listen
  ConnectionPool.prototype.listen = async function listen_(channel, onNotify, options) {
    if (typeof channel !== 'string') throw typeError('listen(channel, onNotify) needs a channel name string')
    if (typeof onNotify !== 'function') throw typeError('listen(channel, onNotify) needs a function')
    if (options !== undefined && !isOptions(options)) throw typeError('listen options must be an object')
    const onListen = options && options.onListen
    if (onListen != null && typeof onListen !== 'function') throw typeError('options.onListen must be a function')
    let listener
    let early = 0
    const failed = () => (listener ? listener._reportError() : early++)
    const guard = (fn, ...args) => {
      try {
        const out = fn(...args)
        if (out && typeof out.then === 'function') out.then(undefined, failed)
      } catch (_) {
        failed()
      }
    }
    const deliver = (kind, payload, name) => {
      if (kind === 0) guard(onNotify, payload, name)
      else if (onListen) guard(onListen)
    }
    listener = await listen.call(this, channel, deliver, { pattern: Boolean(options && options.pattern) })
    for (; early > 0; early--) listener._reportError()
    return listener
  }

  // cursor(sql, params, { batchSize, timeoutMs, signal }): an async iterable of row batches,
  // each fetched only when the loop asks. `break`, a throw or the bound closes it.
  let cursors = 0
  function batchSizeOf(sql, options) {
    if (typeof sql !== 'string') throw typeError('cursor(sql) needs a SQL string')
    if (options !== undefined && !isOptions(options)) throw typeError('cursor options must be an object')
    const size = options && options.batchSize !== undefined ? options.batchSize : 1000
    if (!Number.isInteger(size) || size < 1 || size > 1000000) {
      throw typeError('options.batchSize must be an integer in 1..1000000')
    }
    return size
  }

  // The bound of a whole iteration: what is left of timeoutMs for the next call, and the signal.
  function iterationBound(options) {
    const timeoutMs = options && options.timeoutMs
    const signal = options && options.signal
    const started = Date.now()
    return (call) => {
      if (signal != null && signal.aborted) throw abortError(signal)
      const next = signal != null ? { signal } : {}
      if (timeoutMs === undefined) return call(next)
      const left = timeoutMs - (Date.now() - started)
      if (left <= 0) {
        const err = new Error(`cursor timed out after timeoutMs (${timeoutMs} ms); it was closed`)
        err.code = 'QUERY_TIMEOUT'
        err.timeoutMs = timeoutMs
        throw err
      }
      return call({ ...next, timeoutMs: left })
    }
  }

  // PostgreSQL: DECLARE … FETCH n on `tx`. A pool cursor owns its lease (a transaction of its
  // own, ended by the release); on a caller's lease it joins the open transaction or opens one.
  async function* postgresBatches(tx, owned, sql, params, size, within) {
    const name = `qm_cursor_${++cursors}`
    const declare = `DECLARE ${name} NO SCROLL CURSOR FOR ${sql}`
    let began = false
    try {
      if (owned) {
        await within((o) => tx.query('BEGIN', [], o))
        began = true
        await within((o) => tx.query(declare, params, o))
      } else {
        try {
          await within((o) => tx.query(declare, params, o))
        } catch (err) {
          if (!err || err.sqlstate !== '25P01') throw err // 25P01: not in a transaction
          await within((o) => tx.query('BEGIN', [], o))
          began = true
          await within((o) => tx.query(declare, params, o))
        }
      }
      for (;;) {
        const { rows } = await within((o) => tx.query(`FETCH ${size} FROM ${name}`, [], o))
        if (rows.length > 0) yield rows
        if (rows.length < size) return
      }
    } finally {
      if (owned) tx.release() // rolled back on release: the cursor ends with its transaction
      else if (began) await tx.query('ROLLBACK').catch(() => {})
      else await tx.query(`CLOSE ${name}`).catch(() => {})
    }
  }

  async function* sqliteBatches(pool, sql, params, size, within) {
    const cursor = await within((o) => bounded(pool, pool._sqliteCursor, [sql, params, size], o))
    try {
      for (;;) {
        const batch = await within((o) => bounded(cursor, cursor.next, [], o))
        if (batch === null) return
        yield batch.rows
      }
    } finally {
      cursor.close()
    }
  }

  ConnectionPool.prototype.cursor = function cursor(sql, params, options) {
    const size = batchSizeOf(sql, options)
    const pool = this
    return {
      async *[Symbol.asyncIterator]() {
        const within = iterationBound(options)
        if (pool.backend === 'sqlite') return yield* sqliteBatches(pool, sql, params, size, within)
        if (pool.backend !== 'postgres') throw typeError('cursor() needs a SQL database')
        const tx = await within((o) => pool.acquire(o))
        return yield* postgresBatches(tx, true, sql, params, size, within)
      },
    }
  }

  PooledConnection.prototype.cursor = function cursor(sql, params, options) {
    const size = batchSizeOf(sql, options)
    const tx = this
    return {
      async *[Symbol.asyncIterator]() {
        return yield* postgresBatches(tx, false, sql, params, size, iterationBound(options))
      },
    }
  }

  // copyFrom / copyTo: Node streams over the native COPY handles, with backpressure: a
  // write completes when the connection took the chunk, a read asks for the next chunk.
  const { Readable, Writable } = process.getBuiltinModule('node:stream')
  function checkCopy(pool, sql, options) {
    if (typeof sql !== 'string') throw typeError('copy needs a COPY statement string')
    if (options !== undefined && !isOptions(options)) throw typeError('copy options must be an object')
    if (pool.backend !== 'postgres') throw typeError(`COPY needs PostgreSQL; this pool is ${pool.backend}`)
  }

  ConnectionPool.prototype.copyFrom = async function copyFrom(sql, options) {
    checkCopy(this, sql, options)
    const handle = await bounded(this, this._copyIn, [sql], options || {})
    let done = false
    const writable = new Writable({
      highWaterMark: 256 * 1024,
      write(chunk, encoding, callback) {
        const data = typeof chunk === 'string' ? Buffer.from(chunk, encoding) : chunk
        handle.write(data).then(() => callback(), callback)
      },
      final(callback) {
        handle.finish().then(
          (rows) => {
            done = true
            writable.rowCount = rows
            callback()
          },
          callback,
        )
      },
      destroy(err, callback) {
        if (!done) handle.abort()
        callback(err)
      },
    })
    return writable
  }

  ConnectionPool.prototype.copyTo = async function copyTo(sql, options) {
    checkCopy(this, sql, options)
    const handle = await bounded(this, this._copyOut, [sql], options || {})
    let done = false
    return new Readable({
      highWaterMark: 256 * 1024,
      read() {
        handle.read().then(
          (chunk) => {
            if (chunk === null) done = true
            this.push(chunk)
          },
          (err) => this.destroy(err),
        )
      },
      destroy(err, callback) {
        if (!done) handle.close()
        callback(err)
      },
    })
  }

  const acquire = ConnectionPool.prototype.acquire
  ConnectionPool.prototype.acquire = function acquire_(options) {
    return options === undefined ? acquire.call(this) : bounded(this, acquire, [], options)
  }

  // BEGIN … COMMIT on one lease, ROLLBACK on throw. `options` bound the whole transaction:
  // the wait for a connection, every statement (a running one is cancelled on the server),
  // and `fn` itself; past the bound it is rolled back and rejects.
  ConnectionPool.prototype.transaction = async function transaction(fn, options) {
    if (typeof fn !== 'function') throw typeError('transaction(fn) needs a function')
    if (options !== undefined && !isOptions(options)) throw typeError('transaction options must be an object')
    const backend = this.backend
    const redis = backend === 'redis'
    const timeoutMs = options && options.timeoutMs
    const signal = options && options.signal
    if (signal != null && signal.aborted) throw abortError(signal)
    const started = Date.now()
    const bound = () => (timeoutMs === undefined ? {} : { timeoutMs: Math.max(1, timeoutMs - (Date.now() - started)) })
    const linked = signal != null ? link(signal) : undefined
    const cancellation = linked && linked.cancellation
    let tx
    try {
      tx = await this._acquireForWrite(timeoutMs === undefined ? undefined : bound(), cancellation).catch((err) => {
        if (err && err.code === 'ABORT_ERR') err.cause = signal.reason
        throw err
      })
    } catch (err) {
      if (linked) linked.release()
      throw err
    }
    if (timeoutMs !== undefined || cancellation) tx._bound(bound(), cancellation)
    const run = (sql) => (redis ? tx.command(sql) : tx.query(sql))
    // SQLite's BEGIN IMMEDIATE and COMMIT run on the calling thread when they can at once.
    const control = (sql) => {
      if (backend === 'sqlite') {
        try {
          if (tx._transactionControlNow(sql)) return Promise.resolve()
        } catch (err) {
          return Promise.reject(err)
        }
      }
      return run(sql)
    }
    // Rejects when the bound fires, even while `fn` is between statements.
    let stop
    const stopped = new Promise((_, reject) => {
      const timer =
        timeoutMs === undefined
          ? undefined
          : setTimeout(() => {
              const err = new Error(`transaction timed out after timeoutMs (${timeoutMs} ms); it was rolled back`)
              err.code = 'QUERY_TIMEOUT'
              err.timeoutMs = timeoutMs
              reject(err)
            }, Math.max(0, timeoutMs - (Date.now() - started)))
      const onAbort = () => reject(abortError(signal))
      if (signal != null) signal.addEventListener('abort', onAbort, { once: true })
      stop = () => {
        if (timer) clearTimeout(timer)
        if (signal != null) signal.removeEventListener('abort', onAbort)
      }
    })
    stopped.catch(() => {})
    try {
      await Promise.race([control(redis ? 'MULTI' : backend === 'sqlite' ? 'BEGIN IMMEDIATE' : 'BEGIN'), stopped])
      let result
      try {
        result = await Promise.race([fn(tx), stopped])
      } catch (err) {
        // Past the bound the lease refuses new statements; its release rolls back instead.
        try {
          await run(redis ? 'DISCARD' : 'ROLLBACK')
        } catch (_) {}
        if (err && err.code === 'ABORT_ERR' && signal != null) err.cause = signal.reason
        throw err
      }
      // Session changes made inside are undone inside it: behind a transaction pooler the
      // server session is ours only until COMMIT.
      if (backend === 'postgres') await tx._resetSession()
      // Not raced: a COMMIT reports what the server did (the lease's bound still applies).
      const committed = await control(redis ? 'EXEC' : 'COMMIT')
      return redis && result === undefined ? committed : result
    } finally {
      stop()
      tx.release()
      if (linked) linked.release()
    }
  }

  return shapeArgs
})
