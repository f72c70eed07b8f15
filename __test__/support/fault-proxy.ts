// A TCP proxy in front of a real server that injects network faults on command (latency,
// silence, resets, refused connects, lost answers), for fault tests of the connection pools.
// Mode switches are synchronous: every byte is judged by the mode when it arrives and again
// when it is due to leave, so a switch takes effect for the next byte.
import net from 'node:net'

export type FaultMode =
  /** Forward both ways. */
  | 'pass'
  /**
   * Accept and read, discard both ways, never answer (nor pass on RST). A FIN is held, as
   * TCP retransmits it, and delivered if its flow resumes. Open flows resume under the next
   * mode; flows accepted meanwhile stay silent for good.
   */
  | 'blackholeAll'
  /** The open flows go silent for good (a NAT that forgot them); new flows pass. */
  | 'blackholeExisting'
  /** RST every open flow, both sides, and every new one on arrival, until another mode. */
  | 'resetAll'
  /** The listener closes: connects fail with ECONNREFUSED. Open flows carry on. */
  | 'refuse'
  /** Client→server bytes are forwarded, server→client bytes (and FIN/RST) are lost. */
  | 'dropAnswers'
  /** Forward, after a delay before connecting upstream and/or before each chunk, in order. */
  | { connectDelayMs?: number; perChunkDelayMs?: number }

export interface FaultProxy {
  port: number
  /** The same URL with its host:port swapped for the proxy's (single-host URLs). */
  url(base: string): string
  set(mode: FaultMode): void
  mode(): FaultMode
  /** One-shot: RST every open flow, both sides; the mode stays as it is. */
  resetAll(): void
  /** One-shot: the open flows go silent for good; the mode stays as it is. */
  blackholeExisting(): void
  /** Client connections open now. */
  connections(): number
  /** Client connections accepted since start. */
  accepted(): number
  close(): Promise<void>
}

const END = Symbol('end')
type Item = { data: Buffer | typeof END; due: number }
type Direction = 'up' | 'down'

interface Flow {
  client: net.Socket
  upstream?: net.Socket
  upstreamReady: boolean
  /** Blackholed for good: nothing more goes either way. */
  silent: boolean
  queues: Record<Direction, Item[]>
  timers: Record<Direction, NodeJS.Timeout | undefined>
  connectTimer?: NodeJS.Timeout
  /** A FIN that arrived while this way was blackholed, delivered when it opens again. */
  heldFin: Record<Direction, boolean>
}

export async function startFaultProxy(target: { host: string; port: number }): Promise<FaultProxy> {
  let mode: FaultMode = 'pass'
  let server: net.Server | undefined
  let port = 0
  let accepted = 0
  let closed = false
  const flows = new Set<Flow>()
  const sockets = new Set<net.Socket>()

  const latency = () => (typeof mode === 'object' ? mode : {})
  /** Whether a byte (or FIN/RST) may travel this way now. */
  const allowed = (flow: Flow, dir: Direction) =>
    !flow.silent && mode !== 'blackholeAll' && !(dir === 'down' && mode === 'dropAnswers')

  const track = (sock: net.Socket) => {
    sockets.add(sock)
    sock.on('error', () => {}) // ECONNRESET, EPIPE…: the flow's 'close' handler deals with it
    sock.once('close', () => sockets.delete(sock))
  }

  const reset = (sock: net.Socket | undefined) => {
    if (!sock || sock.destroyed) return
    if (sock.connecting) sock.destroy()
    else sock.resetAndDestroy()
  }

  const silence = (flow: Flow) => {
    flow.silent = true
    for (const dir of ['up', 'down'] as const) {
      flow.queues[dir].length = 0
      clearTimeout(flow.timers[dir])
    }
  }

  const resetFlow = (flow: Flow) => {
    silence(flow)
    clearTimeout(flow.connectTimer)
    reset(flow.client)
    reset(flow.upstream)
  }

  const pump = (flow: Flow, dir: Direction) => {
    clearTimeout(flow.timers[dir])
    flow.timers[dir] = undefined
    const queue = flow.queues[dir]
    const out = dir === 'up' ? flow.upstream : flow.client
    if (dir === 'up' && !flow.upstreamReady) return // resumed on connect
    while (queue.length) {
      const wait = queue[0].due - Date.now()
      if (wait > 0) {
        flow.timers[dir] = setTimeout(() => pump(flow, dir), wait)
        return
      }
      const { data } = queue.shift()!
      if (!out || out.destroyed || !allowed(flow, dir)) continue
      if (data === END) out.end()
      else out.write(data)
    }
  }

  const push = (flow: Flow, dir: Direction, data: Buffer | typeof END) => {
    if (!allowed(flow, dir)) {
      if (data === END && !flow.silent) flow.heldFin[dir] = true
      return
    }
    flow.queues[dir].push({ data, due: Date.now() + (latency().perChunkDelayMs ?? 0) })
    if (!flow.timers[dir]) pump(flow, dir)
  }

  const connectUpstream = (flow: Flow) => {
    if (flow.client.destroyed || flow.silent) return
    const up = net.connect({ port: target.port, host: target.host, allowHalfOpen: true })
    flow.upstream = up
    track(up)
    up.setNoDelay(true)
    up.on('connect', () => {
      flow.upstreamReady = true
      pump(flow, 'up')
    })
    up.on('data', (chunk: Buffer) => push(flow, 'down', chunk))
    up.on('end', () => push(flow, 'down', END))
    up.on('close', (hadError) => {
      // A server-side reset (or a refused connect) reaches the client as a reset, if it may.
      if (hadError && allowed(flow, 'down')) reset(flow.client)
    })
  }

  const onConnection = (client: net.Socket) => {
    accepted++
    track(client)
    if (closed || mode === 'resetAll') return reset(client)
    client.setNoDelay(true)
    const flow: Flow = { client, upstreamReady: false, silent: mode === 'blackholeAll', queues: { up: [], down: [] }, timers: { up: undefined, down: undefined }, heldFin: { up: false, down: false } }
    flows.add(flow)
    client.on('data', (chunk: Buffer) => push(flow, 'up', chunk))
    client.on('end', () => push(flow, 'up', END))
    client.on('close', (hadError) => {
      flows.delete(flow)
      clearTimeout(flow.connectTimer)
      // A flow the client left: pass its reset on; else let the queued bytes and FIN drain.
      if (flow.silent || !flow.upstreamReady) flow.upstream?.destroy()
      else if (hadError) reset(flow.upstream)
      else if (!flow.queues.up.length) flow.upstream?.end()
    })
    // Born silent: a blackholed flow never reaches the server.
    if (flow.silent) return
    const delay = latency().connectDelayMs ?? 0
    if (delay > 0) flow.connectTimer = setTimeout(() => connectUpstream(flow), delay)
    else connectUpstream(flow)
  }

  const listen = (onListening?: () => void, onError?: (err: Error) => void) => {
    // Half-open both sides: a FIN travels like any byte, and answers after it still arrive.
    const srv = net.createServer({ allowHalfOpen: true }, onConnection)
    srv.on('error', (err) => {
      if (onError) onError(err)
      else process.stderr.write(`fault-proxy: cannot listen again on ${port}: ${err}\n`)
    })
    srv.listen(port, '127.0.0.1', onListening)
    server = srv
  }

  const stopListening = () => {
    server?.close()
    server = undefined
  }

  await new Promise<void>((resolve, reject) => listen(resolve, reject))
  port = (server!.address() as net.AddressInfo).port

  return {
    port,
    url: (base) => base.replace(/^([a-z][a-z0-9+.-]*:\/\/(?:[^@/?#]*@)?)[^/?#]*/i, (_, prefix: string) => `${prefix}127.0.0.1:${port}`),
    mode: () => mode,
    set: (next) => {
      if (closed) throw new Error('fault proxy is closed')
      if (next === 'blackholeExisting') {
        for (const flow of flows) silence(flow)
        next = 'pass'
      }
      if (next === 'resetAll') for (const flow of flows) resetFlow(flow)
      if (next === 'refuse' && server) stopListening()
      if (next !== 'refuse' && !server) listen()
      mode = next
      for (const flow of flows) {
        for (const dir of ['up', 'down'] as const) {
          if (flow.heldFin[dir] && allowed(flow, dir)) {
            flow.heldFin[dir] = false
            push(flow, dir, END)
          }
        }
      }
    },
    resetAll: () => {
      for (const flow of flows) resetFlow(flow)
    },
    blackholeExisting: () => {
      for (const flow of flows) silence(flow)
    },
    connections: () => flows.size,
    accepted: () => accepted,
    close: async () => {
      if (closed) return
      closed = true
      const srv = server
      server = undefined
      for (const flow of flows) {
        silence(flow)
        clearTimeout(flow.connectTimer)
      }
      flows.clear()
      for (const sock of sockets) sock.destroy()
      // Resolves once the destroyed connections are gone too.
      if (srv) await new Promise<void>((resolve) => srv.close(() => resolve()))
    },
  }
}
