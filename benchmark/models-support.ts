// Model tooling shared by the model tests and benchmarks: the Python exporters and the NumPy
// reference (python3 with `pip install -r tools/requirements.txt`), and a seeded PRNG.
import { spawnSync } from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

export const ROOT = path.join(__dirname, '..')
const TOOLS = path.join(ROOT, 'tools')

/** Runs a tools/ script, throwing with its stderr when it fails. */
export function python(script: string, args: string[]): void {
  const r = spawnSync('python3', [path.join(TOOLS, script), ...args], { cwd: TOOLS, encoding: 'utf8' })
  if (r.status !== 0) {
    throw new Error(`python3 ${script} ${args.join(' ')} failed (pip install -r tools/requirements.txt?):\n${r.stderr ?? r.error}`)
  }
}

/** A seeded MLP (`dims` = widths, input first) written to `file`. */
export function exportMlp(file: string, seed: number, dims: number[], acts: string[]): string {
  python('export_safetensors.py', ['mlp', file, String(seed), dims.join(','), acts.join(',')])
  return file
}

/** A seeded LSTM (`layers` × `hidden` units over `seq` steps) plus a dense head, written to `file`. */
export function exportLstm(file: string, seed: number, input: number, hidden: number, layers: number, seq: number, head: number[], acts: string[]): string {
  python('export_safetensors.py', ['lstm', file, String(seed), String(input), String(hidden), String(layers), String(seq), head.join(','), acts.join(',')])
  return file
}

/** The NumPy (float64) forward pass on the same weights. `scratch` is a directory for files. */
export function reference(model: string, input: Float32Array, batch: number, scratch: string): Float64Array {
  const inFile = path.join(scratch, `in-${process.pid}-${process.hrtime.bigint()}.f32`)
  const outFile = `${inFile}.out`
  fs.writeFileSync(inFile, Buffer.from(input.buffer, input.byteOffset, input.byteLength))
  python('reference_numpy.py', [model, inFile, outFile, String(batch)])
  const raw = fs.readFileSync(outFile)
  fs.rmSync(inFile)
  fs.rmSync(outFile)
  return new Float64Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength))
}

/** Deterministic PRNG (mulberry32) in [0, 1). */
export function rng(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

export function randomInput(n: number, seed: number): Float32Array {
  const r = rng(seed)
  return Float32Array.from({ length: n }, () => r() * 4 - 2)
}

/**
 * The worst error as a fraction of the allowance (1e-5 relative, 1e-6 absolute near zero);
 * throws naming the first output over it.
 */
export function closeness(actual: Float32Array, expected: ArrayLike<number>): number {
  if (actual.length !== expected.length) throw new Error(`length ${actual.length}, expected ${expected.length}`)
  let worst = 0
  for (let i = 0; i < actual.length; i++) {
    const err = Math.abs(actual[i] - expected[i])
    const allowed = Math.max(1e-5 * Math.abs(expected[i]), 1e-6)
    worst = Math.max(worst, err / allowed)
    if (err > allowed) throw new Error(`output ${i}: ${actual[i]} vs ${expected[i]} (error ${err}, allowed ${allowed})`)
  }
  return worst
}
