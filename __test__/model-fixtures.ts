// The committed NumPy reference (__test__/fixtures/model-reference.json, from
// tools/model_fixtures.py) and the seeded models it was computed on, written here in
// JavaScript so that `npm test` needs no Python. The weights come from mulberry32 (`rng` of
// benchmark/models-support.ts) in the order tools/model_fixtures.py draws them, and the file
// layout is export_safetensors.write_safetensors's, byte for byte: the fixture's sha256 of each
// model and input catches any drift between the two sides.
import { createHash } from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'

import { rng, ROOT } from '../benchmark/models-support'

export type SeededModel =
  | { generate: 'mlp'; seed: number; dims: number[]; activations: string[] }
  | { generate: 'lstm'; seed: number; input: number; hidden: number; layers: number; sequenceLength: number; head: number[]; activations: string[] }

export interface ReferenceRun {
  batch: number
  inputSeed: number
  inputLength: number
  inputSha256: string
  expected: number[]
}

export interface ReferenceCase {
  name: string
  model: SeededModel | { file: string }
  modelSha256: string
  inputSize: number
  sequenceLength: number
  outputSize: number
  runs: ReferenceRun[]
}

export interface Reference {
  command: string
  generatedWith: { python: string; numpy: string }
  cases: ReferenceCase[]
}

export const FIXTURE = path.join(__dirname, 'fixtures', 'model-reference.json')

export function loadReference(): Reference {
  return JSON.parse(fs.readFileSync(FIXTURE, 'utf8'))
}

export const sha256 = (bytes: Uint8Array): string => createHash('sha256').update(bytes).digest('hex')

export const bytesOf = (a: Float32Array): Buffer => Buffer.from(a.buffer, a.byteOffset, a.byteLength)

/** The safetensors layout of tools/export_safetensors.py: JSON header padded to 8, float32 LE data. */
export function writeSafetensors(file: string, tensors: Array<[string, number[], Float32Array]>, metadata: Record<string, string>): void {
  const header: Record<string, unknown> = { __metadata__: metadata }
  let offset = 0
  for (const [name, shape, data] of tensors) {
    header[name] = { dtype: 'F32', shape, data_offsets: [offset, offset + data.byteLength] }
    offset += data.byteLength
  }
  let json = JSON.stringify(header)
  json += ' '.repeat((8 - (json.length % 8)) % 8)
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(BigInt(json.length))
  fs.writeFileSync(file, Buffer.concat([len, Buffer.from(json), ...tensors.map(([, , data]) => bytesOf(data))]))
}

/** Writes a seeded model of the fixture to `file` and returns the path. */
export function writeSeededModel(file: string, model: SeededModel): string {
  const r = rng(model.seed)
  const uniform = (bound: number, n: number) => Float32Array.from({ length: n }, () => (r() * 2 - 1) * bound)
  const tensors: Array<[string, number[], Float32Array]> = []
  const dense = (widths: number[], bound: (fanIn: number) => number) => {
    for (let i = 0; i + 1 < widths.length; i++) {
      const [fanIn, out] = [widths[i], widths[i + 1]]
      tensors.push([`dense.${i}.weight`, [out, fanIn], uniform(bound(fanIn), out * fanIn)])
      tensors.push([`dense.${i}.bias`, [out], uniform(bound(fanIn), out)])
    }
  }
  if (model.generate === 'mlp') {
    dense(model.dims, (fanIn) => 1 / Math.sqrt(fanIn))
    writeSafetensors(file, tensors, { arch: 'mlp', activations: model.activations.join(','), format_version: '1' })
    return file
  }
  const { hidden } = model
  const bound = 1 / Math.sqrt(hidden)
  for (let k = 0; k < model.layers; k++) {
    const fanIn = k === 0 ? model.input : hidden
    tensors.push([`weight_ih_l${k}`, [4 * hidden, fanIn], uniform(bound, 4 * hidden * fanIn)])
    tensors.push([`weight_hh_l${k}`, [4 * hidden, hidden], uniform(bound, 4 * hidden * hidden)])
    tensors.push([`bias_ih_l${k}`, [4 * hidden], uniform(bound, 4 * hidden)])
    tensors.push([`bias_hh_l${k}`, [4 * hidden], uniform(bound, 4 * hidden)])
  }
  dense([hidden, ...model.head], () => bound)
  const metadata: Record<string, string> = { arch: 'lstm', sequence_length: String(model.sequenceLength), format_version: '1' }
  if (model.head.length > 0) metadata.activations = model.activations.join(',')
  writeSafetensors(file, tensors, metadata)
  return file
}

/** The model file of a fixture case: the committed sample, or the seeded model written into `dir`. */
export function modelFile(c: ReferenceCase, dir: string): string {
  if ('file' in c.model) return path.join(ROOT, c.model.file)
  return writeSeededModel(path.join(dir, `${c.name.replace(/[^\w]+/g, '-')}.safetensors`), c.model)
}
