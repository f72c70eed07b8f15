// A real Redis Cluster (3 masters + 3 replicas, redis-server 7 --cluster-enabled) on free
// ports in throwaway directories, for cluster routing and failover tests.
import { existsSync, mkdirSync } from 'node:fs'
import net from 'node:net'
import path from 'node:path'
import { removeDir, run, spawnServer, tempDir, until, type Server } from './processes'

export interface RedisClusterNode {
  port: number
  role: 'master' | 'replica'
  /** The cluster node id (40 hex digits). */
  id: string
  /** For a replica: its master's port. */
  masterPort?: number
  /** False after failover(…, 'kill') until restartNode(). */
  running: boolean
}

export interface RedisCluster {
  /** Refreshed in place by failover() and restartNode(). */
  nodes: RedisClusterNode[]
  /** redis://127.0.0.1:p1,127.0.0.1:p2,... (every node, masters first). */
  url: string
  startupMs: number
  /**
   * Promotes `masterPort`'s replica: 'manual' = CLUSTER FAILOVER on the replica (the old master
   * becomes its replica), 'kill' = SIGKILL the master (the cluster detects it after the node
   * timeout). Resolves when the replica is master and every running node says cluster_state:ok.
   */
  failover(masterPort: number, mode?: 'manual' | 'kill'): Promise<void>
  /** Starts a killed node again; it rejoins as a replica. */
  restartNode(port: number): Promise<void>
  /** One redis-cli command against a node, e.g. cli(port, 'set', 'k', 'v'). */
  cli(port: number, ...args: string[]): Promise<string>
  stop(): Promise<void>
}

const REDIS_SERVER = ['/usr/bin/redis-server', '/usr/local/bin/redis-server'].find(existsSync) ?? 'redis-server'
const REDIS_CLI = ['/usr/bin/redis-cli', '/usr/local/bin/redis-cli'].find(existsSync) ?? 'redis-cli'

function portIsFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = net.createServer()
    srv.unref()
    srv.once('error', () => resolve(false))
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)))
  })
}

/** `count` ports p in 30000–45535 whose cluster bus ports p + 10000 are free too. */
async function clusterPorts(count: number): Promise<number[]> {
  const taken = new Set<number>()
  const ports: number[] = []
  for (let tries = 0; ports.length < count; tries++) {
    if (tries > 500) throw new Error('no free port pairs for a Redis Cluster')
    const p = 30000 + Math.floor(Math.random() * 15536)
    if (taken.has(p) || taken.has(p + 10000)) continue
    if (!(await portIsFree(p)) || !(await portIsFree(p + 10000))) continue
    ports.push(p)
    for (const q of [p, p + 10000, p - 10000]) taken.add(q)
  }
  return ports
}

interface NodeLine {
  id: string
  port: number
  flags: string[]
  masterId: string
}

function parseClusterNodes(text: string): NodeLine[] {
  return text
    .trim()
    .split('\n')
    .filter(Boolean)
    .map((line) => {
      const [id, addr, flags, masterId] = line.split(' ')
      return { id, port: Number(/:(\d+)@/.exec(addr)?.[1]), flags: flags.split(','), masterId }
    })
}

export async function startRedisCluster(opts: { nodeTimeoutMs?: number; log?: (line: string) => void } = {}): Promise<RedisCluster> {
  const t0 = Date.now()
  const log = opts.log ?? ((line: string) => process.stderr.write(line + '\n'))
  const root = tempDir('qm-rc-')
  const ports = await clusterPorts(6)
  const servers = new Map<number, Server>()
  const cli = (port: number, ...args: string[]) => run(REDIS_CLI, ['-h', '127.0.0.1', '-p', String(port), ...args], { timeoutMs: 10_000 })

  const startNode = async (port: number) => {
    const dir = path.join(root, String(port))
    mkdirSync(dir, { recursive: true })
    const server = spawnServer(REDIS_SERVER, [
      '--port', String(port), '--bind', '127.0.0.1', '--dir', dir,
      '--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf',
      '--cluster-node-timeout', String(opts.nodeTimeoutMs ?? 1000),
      // A replica may take over however long it was cut off (tests kill masters at will).
      '--cluster-replica-validity-factor', '0',
      '--save', '', '--appendonly', 'no',
      // Replicas sync at once (the default waits 5 s for more replicas to share a diskless sync).
      '--repl-diskless-sync-delay', '0',
    ], { cwd: dir, reapSignal: 'SIGKILL' })
    servers.set(port, server)
    const died = server.exited.then(() => {
      throw new Error(`redis-server on port ${port} exited:\n${server.output()}`)
    })
    await Promise.race([died, until(`redis-server on port ${port}`, 10_000, async () => ((await cli(port, 'ping')).trim() === 'PONG') || undefined)])
  }

  const running = () => [...servers.keys()]
  /** Every running node reports cluster_state:ok and the same master set; replicas are linked. */
  const settled = (what: string, check?: (view: NodeLine[]) => boolean) =>
    until(what, 30_000, async () => {
      let reference: string | undefined
      for (const port of running()) {
        if (!/cluster_state:ok/.test(await cli(port, 'cluster', 'info'))) return undefined
        const view = parseClusterNodes(await cli(port, 'cluster', 'nodes'))
        const masters = view.filter((n) => n.flags.includes('master') && !n.flags.includes('fail')).map((n) => n.port).sort().join(',')
        if ((reference ??= masters) !== masters) return undefined
        if (check && !check(view)) return undefined
        const me = view.find((n) => n.flags.includes('myself'))
        if (me?.flags.includes('slave') && !/master_link_status:up/.test(await cli(port, 'info', 'replication'))) return undefined
      }
      return true
    })

  const cluster: RedisCluster = {
    nodes: [],
    url: '',
    startupMs: 0,
    cli,
    failover: async (masterPort, mode = 'manual') => {
      await refresh()
      const master = cluster.nodes.find((n) => n.port === masterPort && n.role === 'master' && n.running)
      const replica = cluster.nodes.find((n) => n.masterPort === masterPort && n.running)
      if (!master || !replica) throw new Error(`port ${masterPort} is not a running master with a running replica`)
      if (mode === 'manual') {
        const reply = await cli(replica.port, 'cluster', 'failover')
        if (!/OK/.test(reply)) throw new Error(`CLUSTER FAILOVER on ${replica.port}: ${reply}`)
      } else {
        await servers.get(masterPort)!.stop('SIGKILL')
        servers.delete(masterPort)
      }
      await settled(`replica ${replica.port} to replace master ${masterPort}`, (view) => {
        const promoted = view.find((n) => n.port === replica.port)
        const old = view.find((n) => n.port === masterPort)
        return !!promoted?.flags.includes('master') && (mode === 'kill' ? !!old?.flags.includes('fail') : !!old?.flags.includes('slave'))
      })
      await refresh()
    },
    restartNode: async (port) => {
      if (servers.has(port)) throw new Error(`redis node ${port} is running`)
      await startNode(port)
      await settled(`node ${port} to rejoin`, (view) => view.every((n) => !n.flags.includes('fail') && !n.flags.includes('fail?')))
      await refresh()
    },
    stop: async () => {
      await Promise.all([...servers.values()].map((s) => s.stop('SIGTERM', 3000)))
      servers.clear()
      removeDir(root)
    },
  }

  const refresh = async () => {
    const view = parseClusterNodes(await cli(running()[0], 'cluster', 'nodes'))
    const byId = new Map(view.map((n) => [n.id, n]))
    const nodes: RedisClusterNode[] = view.map((n) => ({
      port: n.port,
      role: n.flags.includes('master') ? 'master' : 'replica',
      id: n.id,
      masterPort: byId.get(n.masterId)?.port,
      running: servers.has(n.port),
    }))
    nodes.sort((a, b) => (a.role === b.role ? a.port - b.port : a.role === 'master' ? -1 : 1))
    cluster.nodes.splice(0, cluster.nodes.length, ...nodes)
  }

  try {
    await Promise.all(ports.map(startNode))
    await run(REDIS_CLI, ['--cluster', 'create', ...ports.map((p) => `127.0.0.1:${p}`), '--cluster-replicas', '1', '--cluster-yes'], { timeoutMs: 30_000 })
    await settled('the new cluster to agree', (view) => view.length === 6)
    await refresh()
  } catch (err) {
    await cluster.stop().catch(() => {})
    throw err
  }
  cluster.url = 'redis://' + cluster.nodes.map((n) => `127.0.0.1:${n.port}`).join(',')
  cluster.startupMs = Date.now() - t0
  log(`redis-cluster: 3 masters + 3 replicas ok in ${(cluster.startupMs / 1000).toFixed(1)} s`)
  return cluster
}
