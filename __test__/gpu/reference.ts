// The GPU suite's own models, beyond the committed NumPy fixture: written here from seeded
// weights, with a float64 forward pass in JavaScript as their reference (relu / tanh / sigmoid /
// none; the fixture covers gelu). The CPU backend is checked against this reference on every
// machine (__test__/gpu/models.gpu.spec.ts), so the reference is itself tested without a GPU.

import { rng } from '../../benchmark/models-support'
import { writeSafetensors } from '../model-fixtures'

export type Act = 'relu' | 'tanh' | 'sigmoid' | 'none'
export interface Dense {
  weight: Float32Array // [outputs, inputs], row-major
  bias?: Float32Array
  inputs: number
  outputs: number
  act: Act
}
export interface LstmLayer {
  weightIh: Float32Array // [4·hidden, inputs]
  weightHh: Float32Array // [4·hidden, hidden]
  biasIh?: Float32Array
  biasHh?: Float32Array
  inputs: number
  hidden: number
}
export type RefModel =
  | { arch: 'mlp'; dense: Dense[] }
  | { arch: 'lstm'; layers: LstmLayer[]; sequenceLength: number; head: Dense[] }

function uniform(r: () => number, n: number, bound: number): Float32Array {
  return Float32Array.from({ length: n }, () => (r() * 2 - 1) * bound)
}

/** Seeded dense layers `widths[0] → widths[1] → …`, with or without biases. */
export function denseStack(seed: number, widths: number[], acts: Act[], bias: boolean): Dense[] {
  const r = rng(seed)
  return widths.slice(1).map((outputs, i) => {
    const inputs = widths[i]
    const bound = 1 / Math.sqrt(inputs)
    return { weight: uniform(r, outputs * inputs, bound), bias: bias ? uniform(r, outputs, bound) : undefined, inputs, outputs, act: acts[i] }
  })
}

/** Seeded LSTM layers of the given hidden sizes (they may differ), `bias[k]` per layer. */
export function lstmLayers(seed: number, input: number, hidden: number[], bias: boolean[]): LstmLayer[] {
  const r = rng(seed)
  return hidden.map((h, k) => {
    const inputs = k === 0 ? input : hidden[k - 1]
    const bound = 1 / Math.sqrt(h)
    return {
      weightIh: uniform(r, 4 * h * inputs, bound),
      weightHh: uniform(r, 4 * h * h, bound),
      biasIh: bias[k] ? uniform(r, 4 * h, bound) : undefined,
      biasHh: bias[k] ? uniform(r, 4 * h, bound) : undefined,
      inputs,
      hidden: h,
    }
  })
}

/** Writes `model` as a safetensors file in the layout of docs/model-format.md. */
export function writeModel(file: string, model: RefModel): string {
  const tensors: Array<[string, number[], Float32Array]> = []
  const dense = (layers: Dense[]) =>
    layers.forEach((d, i) => {
      tensors.push([`dense.${i}.weight`, [d.outputs, d.inputs], d.weight])
      if (d.bias) tensors.push([`dense.${i}.bias`, [d.outputs], d.bias])
    })
  const metadata: Record<string, string> = { arch: model.arch }
  if (model.arch === 'lstm') {
    metadata.sequence_length = String(model.sequenceLength)
    model.layers.forEach((l, k) => {
      tensors.push([`weight_ih_l${k}`, [4 * l.hidden, l.inputs], l.weightIh])
      tensors.push([`weight_hh_l${k}`, [4 * l.hidden, l.hidden], l.weightHh])
      if (l.biasIh) tensors.push([`bias_ih_l${k}`, [4 * l.hidden], l.biasIh])
      if (l.biasHh) tensors.push([`bias_hh_l${k}`, [4 * l.hidden], l.biasHh])
    })
  }
  const head = model.arch === 'mlp' ? model.dense : model.head
  dense(head)
  if (head.length > 0) metadata.activations = head.map((d) => d.act).join(',')
  writeSafetensors(file, tensors, metadata)
  return file
}

const sigmoid = (v: number) => 1 / (1 + Math.exp(-v))
const activate = (act: Act, v: number) => (act === 'relu' ? Math.max(v, 0) : act === 'tanh' ? Math.tanh(v) : act === 'sigmoid' ? sigmoid(v) : v)

function denseForward(layers: Dense[], x: Float64Array): Float64Array {
  let h = x
  for (const d of layers) {
    const y = new Float64Array(d.outputs)
    for (let j = 0; j < d.outputs; j++) {
      let s = d.bias ? d.bias[j] : 0
      for (let k = 0; k < d.inputs; k++) s += d.weight[j * d.inputs + k] * h[k]
      y[j] = activate(d.act, s)
    }
    h = y
  }
  return h
}

/** The float64 forward pass of sample `sample` of `input` (sample-major, then step-major). */
export function referenceSample(model: RefModel, input: Float32Array, sample: number): Float64Array {
  if (model.arch === 'mlp') {
    const n = model.dense[0].inputs
    return denseForward(model.dense, Float64Array.from(input.subarray(sample * n, (sample + 1) * n)))
  }
  const steps = model.sequenceLength
  const n0 = model.layers[0].inputs
  let seq: Float64Array[] = Array.from({ length: steps }, (_, t) => Float64Array.from(input.subarray((sample * steps + t) * n0, (sample * steps + t + 1) * n0)))
  for (const l of model.layers) {
    const H = l.hidden
    let h = new Float64Array(H)
    const c = new Float64Array(H)
    const out: Float64Array[] = []
    for (const x of seq) {
      const g = new Float64Array(4 * H)
      for (let r = 0; r < 4 * H; r++) {
        let s = (l.biasIh ? l.biasIh[r] : 0) + (l.biasHh ? l.biasHh[r] : 0)
        for (let k = 0; k < l.inputs; k++) s += l.weightIh[r * l.inputs + k] * x[k]
        for (let k = 0; k < H; k++) s += l.weightHh[r * H + k] * h[k]
        g[r] = s
      }
      const next = new Float64Array(H)
      for (let j = 0; j < H; j++) {
        c[j] = sigmoid(g[H + j]) * c[j] + sigmoid(g[j]) * Math.tanh(g[2 * H + j])
        next[j] = sigmoid(g[3 * H + j]) * Math.tanh(c[j])
      }
      h = next
      out.push(next)
    }
    seq = out
  }
  return denseForward(model.head, seq[steps - 1])
}

/** The reference for every sample of `input`. */
export function reference(model: RefModel, input: Float32Array, batch: number): Float64Array {
  const rows = Array.from({ length: batch }, (_, s) => referenceSample(model, input, s))
  const out = new Float64Array(rows.reduce((n, r) => n + r.length, 0))
  let at = 0
  for (const r of rows) {
    out.set(r, at)
    at += r.length
  }
  return out
}
