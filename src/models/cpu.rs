//! CPU inference: batched GEMMs ([`matmul`](crate::models::matmul)) for dense layers and LSTM
//! projections. A forward pass allocates nothing: every intermediate lives in a caller-provided
//! workspace whose size [`workspace_len`] computes. A large batch is split across up to
//! `threads` of rayon's pool; a small one runs wholly on the calling thread.

use crate::error::{Error, Result};
use crate::models::format::{
    Activation, Architecture, DenseSpec, LstmLayerSpec, ModelSpec, TensorId, Weights,
};
use crate::models::matmul::{matmul, matmul_fused, matmul_packed, Epilogue, Packed, Shape};

/// A GEMM this large, in a batch too small to split, may use rayon's pool by itself.
const PARALLEL_MACS: usize = 1 << 21;

fn too_large(batch: usize) -> Error {
    Error::invalid_argument(format!(
        "batch {batch} is too large for this model's workspace"
    ))
}

/// Below this many multiply-adds per part, a batch is not split across threads.
const MIN_PART_MACS: usize = 1 << 19;

/// Multiply-adds for one sample.
fn sample_macs(spec: &ModelSpec) -> usize {
    let dense = |layers: &[DenseSpec]| layers.iter().map(|d| d.inputs * d.outputs).sum::<usize>();
    match &spec.arch {
        Architecture::Mlp { dense: layers } => dense(layers),
        Architecture::Lstm { layers, head } => {
            let per_step: usize = layers
                .iter()
                .map(|l| 4 * l.hidden * (l.inputs + l.hidden))
                .sum();
            per_step
                .saturating_mul(spec.sequence_length)
                .saturating_add(dense(head))
        }
    }
}

/// Threads a cache's forward passes may use: `0` means every thread of rayon's pool (one per
/// core unless `RAYON_NUM_THREADS` says otherwise).
pub fn threads(requested: usize) -> usize {
    let pool = rayon::current_num_threads();
    if requested == 0 {
        pool
    } else {
        requested.min(pool)
    }
}

/// How many parts a batch is split into, each run on its own thread (samples are independent).
fn parts(spec: &ModelSpec, batch: usize, threads: usize) -> usize {
    let by_work = batch.saturating_mul(sample_macs(spec)) / MIN_PART_MACS;
    threads.min(batch).min(by_work).max(1)
}

/// Floats of scratch space a forward pass over `batch` samples on `threads` needs.
pub fn workspace_len(spec: &ModelSpec, batch: usize, threads: usize) -> Result<usize> {
    split_len(spec, batch, parts(spec, batch, threads))
}

fn split_len(spec: &ModelSpec, batch: usize, parts: usize) -> Result<usize> {
    if parts <= 1 {
        return part_len(spec, batch);
    }
    let left = batch / 2;
    let (a, b) = (
        split_len(spec, left, parts / 2)?,
        split_len(spec, batch - left, parts - parts / 2)?,
    );
    a.checked_add(b).ok_or_else(|| too_large(batch))
}

fn part_len(spec: &ModelSpec, batch: usize) -> Result<usize> {
    let widest = |layers: &[DenseSpec]| layers.iter().map(|d| d.outputs).max().unwrap_or(0);
    let len = match &spec.arch {
        Architecture::Mlp { dense } => batch
            .checked_mul(widest(dense))
            .and_then(|n| n.checked_mul(2)),
        Architecture::Lstm { layers, head } => {
            let hidden = layers.iter().map(|l| l.hidden).max().unwrap_or(0);
            let steps = batch.checked_mul(spec.sequence_length);
            let proj = steps.and_then(|s| s.checked_mul(4 * hidden));
            let seq = steps
                .and_then(|s| s.checked_mul(hidden))
                .and_then(|n| n.checked_mul(2));
            let state = batch.checked_mul(hidden).and_then(|n| n.checked_mul(2));
            let head = batch
                .checked_mul(widest(head))
                .and_then(|n| n.checked_mul(2));
            [proj, seq, state, head]
                .into_iter()
                .try_fold(0usize, |acc, n| n.and_then(|n| acc.checked_add(n)))
        }
    };
    len.ok_or_else(|| too_large(batch))
}

/// Each GEMM weight's packed copy, by tensor, where the AVX-512 kernel runs it (see
/// [`Packed::new`]: on such CPUs, layers of at least 64 outputs). Built once when a model is
/// loaded onto the CPU; its bytes count as the model's.
#[derive(Default)]
pub struct PackedWeights {
    by_tensor: Vec<Option<Packed>>,
}

impl PackedWeights {
    pub fn new(spec: &ModelSpec, weights: &Weights) -> PackedWeights {
        let mut by_tensor: Vec<Option<Packed>> = Vec::new();
        by_tensor.resize_with(weights.tensor_count(), || None);
        let mut pack = |id: TensorId, cols: usize, depth: usize| {
            by_tensor[id] = Packed::new(weights.tensor(id), cols, depth);
        };
        let dense = |layers: &[DenseSpec], pack: &mut dyn FnMut(TensorId, usize, usize)| {
            for d in layers {
                pack(d.weight, d.outputs, d.inputs);
            }
        };
        match &spec.arch {
            Architecture::Mlp { dense: layers } => dense(layers, &mut pack),
            Architecture::Lstm { layers, head } => {
                for l in layers {
                    pack(l.weight_ih, 4 * l.hidden, l.inputs);
                    pack(l.weight_hh, 4 * l.hidden, l.hidden);
                }
                dense(head, &mut pack);
            }
        }
        PackedWeights { by_tensor }
    }

    /// Bytes of every packed copy.
    pub fn bytes(&self) -> usize {
        self.by_tensor.iter().flatten().map(Packed::bytes).sum()
    }

    fn get(&self, id: TensorId) -> Option<&Packed> {
        self.by_tensor.get(id).and_then(Option::as_ref)
    }
}

/// Runs the model on `batch` samples of `input`, writing `batch × output_size` floats to `out`.
/// `input`, `out` and `workspace` (see [`workspace_len`], same `threads`) must have the lengths
/// the spec implies. Large batches are split in halves run on rayon's pool (at most `threads`
/// parts); a sample's result does not depend on the other samples, and a given batch size
/// always splits the same way. `packed` is [`PackedWeights::new`] of these weights, or empty.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    spec: &ModelSpec,
    weights: &Weights,
    packed: &PackedWeights,
    input: &[f32],
    batch: usize,
    threads: usize,
    workspace: &mut [f32],
    out: &mut [f32],
) {
    assert_eq!(input.len(), batch * spec.sample_len(), "input length");
    assert_eq!(out.len(), batch * spec.output_size, "output length");
    let parts = parts(spec, batch, threads);
    // One part on a caller outside the pool: a large layer may still use the pool by itself.
    let wide = parts == 1 && threads > 1 && rayon::current_thread_index().is_none();
    let layers = Layers {
        weights,
        packed,
        wide,
    };
    forward_split(spec, layers, input, batch, workspace, out, parts);
}

#[allow(clippy::too_many_arguments)]
fn forward_split(
    spec: &ModelSpec,
    layers: Layers,
    input: &[f32],
    batch: usize,
    workspace: &mut [f32],
    out: &mut [f32],
    parts: usize,
) {
    if parts <= 1 {
        return forward_part(spec, layers, input, batch, workspace, out);
    }
    // Split: no GEMM of a part uses the pool by itself.
    let layers = Layers {
        wide: false,
        ..layers
    };
    let left = batch / 2;
    let (in_a, in_b) = input.split_at(left * spec.sample_len());
    let (out_a, out_b) = out.split_at_mut(left * spec.output_size);
    let ws_left = split_len(spec, left, parts / 2).unwrap_or(0);
    let (ws_a, ws_b) = workspace.split_at_mut(ws_left);
    let mut first = move || forward_split(spec, layers, in_a, left, ws_a, out_a, parts / 2);
    let rest = parts - parts / 2;
    let mut second = move || forward_split(spec, layers, in_b, batch - left, ws_b, out_b, rest);
    if rayon::current_thread_index().is_some() {
        rayon::join(first, second);
    } else {
        // A caller outside the pool (predictSync) computes one half itself: one pool thread
        // to wake instead of two.
        rayon::in_place_scope(|s| {
            s.spawn(move |_| second());
            first();
        });
    }
}

/// The weights, their packed copies and whether one GEMM may use rayon's pool by itself.
#[derive(Clone, Copy)]
struct Layers<'w> {
    weights: &'w Weights,
    packed: &'w PackedWeights,
    wide: bool,
}

impl Layers<'_> {
    fn wide(&self, s: Shape) -> bool {
        self.wide && s.rows.saturating_mul(s.cols).saturating_mul(s.depth) >= PARALLEL_MACS
    }

    fn tensor(&self, id: TensorId) -> &[f32] {
        self.weights.tensor(id)
    }

    /// `dst = relu?(lhs · wᵀ + bias)`: `false` (nothing written) where no fused kernel runs
    /// (the caller runs the separate passes).
    fn gemm_fused(
        &self,
        s: Shape,
        lhs: &[f32],
        w: TensorId,
        dst: &mut [f32],
        e: Epilogue<'_>,
    ) -> bool {
        let wide = self.wide(s);
        match self.packed.get(w) {
            Some(p) if !wide => {
                matmul_packed(s, lhs, p, dst, false, e);
                true
            }
            _ => matmul_fused(s, lhs, self.tensor(w), dst, e, wide),
        }
    }

    fn gemm(&self, s: Shape, lhs: &[f32], w: TensorId, dst: &mut [f32], accumulate: bool) {
        let wide = self.wide(s);
        match self.packed.get(w) {
            Some(p) if !wide => matmul_packed(s, lhs, p, dst, accumulate, Epilogue::default()),
            _ => matmul(s, lhs, self.tensor(w), dst, accumulate, wide),
        }
    }
}

fn forward_part(
    spec: &ModelSpec,
    weights: Layers,
    input: &[f32],
    batch: usize,
    workspace: &mut [f32],
    out: &mut [f32],
) {
    match &spec.arch {
        Architecture::Mlp { dense } => dense_stack(weights, dense, input, batch, workspace, out),
        Architecture::Lstm { layers, head } => {
            let hidden = layers.iter().map(|l| l.hidden).max().unwrap_or(0);
            let steps = batch * spec.sequence_length;
            let (proj, rest) = workspace.split_at_mut(steps * 4 * hidden);
            let (seq_a, rest) = rest.split_at_mut(steps * hidden);
            let (seq_b, rest) = rest.split_at_mut(steps * hidden);
            let (h, rest) = rest.split_at_mut(batch * hidden);
            let (c, head_ws) = rest.split_at_mut(batch * hidden);
            let mut seq_in: &[f32] = input;
            let (mut write, mut spare) = (seq_a, seq_b);
            for (k, layer) in layers.iter().enumerate() {
                let top = k + 1 == layers.len();
                let seq_out = if top {
                    None
                } else {
                    Some(&mut write[..steps * layer.hidden])
                };
                lstm_layer(
                    weights,
                    layer,
                    seq_in,
                    batch,
                    spec.sequence_length,
                    proj,
                    h,
                    c,
                    seq_out,
                );
                if !top {
                    std::mem::swap(&mut write, &mut spare);
                    seq_in = &spare[..steps * layer.hidden];
                }
            }
            let last = layers.last().map_or(0, |l| l.hidden);
            let h = &h[..batch * last];
            if head.is_empty() {
                out.copy_from_slice(h);
            } else {
                dense_stack(weights, head, h, batch, head_ws, out);
            }
        }
    }
}

fn dense_stack(
    weights: Layers,
    layers: &[DenseSpec],
    input: &[f32],
    batch: usize,
    workspace: &mut [f32],
    out: &mut [f32],
) {
    let widest = layers.iter().map(|d| d.outputs).max().unwrap_or(0);
    let (mut a, mut b) = workspace.split_at_mut(batch * widest);
    let mut current: &[f32] = input;
    for (i, layer) in layers.iter().enumerate() {
        if i + 1 == layers.len() {
            dense(weights, layer, current, batch, out);
        } else {
            let dst = &mut a[..batch * layer.outputs];
            dense(weights, layer, current, batch, dst);
            std::mem::swap(&mut a, &mut b);
            current = &b[..batch * layer.outputs];
        }
    }
}

/// `out = act(x · Wᵀ + b)` for `rows` rows.
fn dense(weights: Layers, layer: &DenseSpec, x: &[f32], rows: usize, out: &mut [f32]) {
    let w = layer.weight;
    let bias = layer.bias.map(|b| weights.tensor(b));
    let shape = Shape {
        rows,
        cols: layer.outputs,
        depth: layer.inputs,
        lhs_stride: layer.inputs,
        dst_stride: layer.outputs,
    };
    // Bias and ReLU in the kernel's store where it can; the same bits as the passes below.
    let relu = matches!(layer.activation, Activation::Relu);
    if matches!(layer.activation, Activation::Relu | Activation::Identity)
        && weights.gemm_fused(shape, x, w, out, Epilogue { bias, relu })
    {
        return;
    }
    if let Some(bias) = bias {
        for row in out.chunks_exact_mut(layer.outputs) {
            row.copy_from_slice(bias);
        }
    }
    weights.gemm(shape, x, w, out, bias.is_some());
    activate(layer.activation, out);
}

/// One LSTM layer over the whole sequence. Leaves the last hidden state in `h`; writes every
/// step's hidden state to `seq_out` when the next layer needs it.
#[allow(clippy::too_many_arguments)]
fn lstm_layer(
    weights: Layers,
    layer: &LstmLayerSpec,
    x: &[f32],
    batch: usize,
    steps: usize,
    proj: &mut [f32],
    h: &mut [f32],
    c: &mut [f32],
    mut seq_out: Option<&mut [f32]>,
) {
    let hidden = layer.hidden;
    let gates = 4 * hidden;
    let rows = batch * steps;
    let proj = &mut proj[..rows * gates];
    let h = &mut h[..batch * hidden];
    let c = &mut c[..batch * hidden];
    let tensor = |id| weights.tensor(id);
    let b_ih = layer.bias_ih.map(tensor);
    let b_hh = layer.bias_hh.map(tensor);
    let has_bias = b_ih.is_some() || b_hh.is_some();
    if has_bias {
        for row in proj.chunks_exact_mut(gates) {
            for (j, v) in row.iter_mut().enumerate() {
                *v = b_ih.map_or(0.0, |b| b[j]) + b_hh.map_or(0.0, |b| b[j]);
            }
        }
    }
    // Input projection for every (sample, step) row at once: [B·T, In] · W_ihᵀ.
    let shape = Shape {
        rows,
        cols: gates,
        depth: layer.inputs,
        lhs_stride: layer.inputs,
        dst_stride: gates,
    };
    weights.gemm(shape, x, layer.weight_ih, proj, has_bias);
    h.fill(0.0);
    c.fill(0.0);
    let recurrent = Shape {
        rows: batch,
        cols: gates,
        depth: hidden,
        lhs_stride: hidden,
        dst_stride: steps * gates,
    };
    for t in 0..steps {
        let step = &mut proj[t * gates..];
        if t > 0 {
            // Recurrent term for step t of every sample: rows b·T + t, stride T·4H.
            weights.gemm(recurrent, h, layer.weight_hh, step, true);
        }
        for b in 0..batch {
            let g = &step[b * steps * gates..b * steps * gates + gates];
            let (hb, cb) = (
                &mut h[b * hidden..(b + 1) * hidden],
                &mut c[b * hidden..(b + 1) * hidden],
            );
            for j in 0..hidden {
                let i = sigmoid(g[j]);
                let f = sigmoid(g[hidden + j]);
                let cand = g[2 * hidden + j].tanh();
                let o = sigmoid(g[3 * hidden + j]);
                cb[j] = f * cb[j] + i * cand;
                hb[j] = o * cb[j].tanh();
            }
            if let Some(seq) = seq_out.as_deref_mut() {
                let at = (b * steps + t) * hidden;
                seq[at..at + hidden].copy_from_slice(hb);
            }
        }
    }
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn activate(act: Activation, values: &mut [f32]) {
    match act {
        Activation::Identity => {}
        Activation::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Tanh => values.iter_mut().for_each(|v| *v = v.tanh()),
        Activation::Sigmoid => values.iter_mut().for_each(|v| *v = sigmoid(*v)),
        Activation::Gelu => values.iter_mut().for_each(|v| {
            *v = (0.5 * f64::from(*v) * (1.0 + libm::erf(f64::from(*v) / std::f64::consts::SQRT_2)))
                as f32
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::format::tests::{mlp, write};
    use crate::models::format::ModelFile;

    fn run(m: &ModelFile, input: &[f32], batch: usize) -> Vec<f32> {
        run_with(m, &PackedWeights::new(&m.spec, &m.weights), input, batch)
    }

    fn run_with(m: &ModelFile, packed: &PackedWeights, input: &[f32], batch: usize) -> Vec<f32> {
        let threads = threads(0);
        let mut ws = vec![0.0; workspace_len(&m.spec, batch, threads).unwrap()];
        let mut out = vec![0.0; batch * m.spec.output_size];
        forward(
            &m.spec, &m.weights, packed, input, batch, threads, &mut ws, &mut out,
        );
        out
    }

    /// Straightforward f64 reference, independent of the GEMM path.
    fn reference_dense(
        w: &[f32],
        b: &[f32],
        x: &[f32],
        inputs: usize,
        act: Activation,
    ) -> Vec<f64> {
        b.iter()
            .enumerate()
            .map(|(j, bj)| {
                let s: f64 = (0..inputs)
                    .map(|k| f64::from(w[j * inputs + k]) * f64::from(x[k]))
                    .sum::<f64>()
                    + f64::from(*bj);
                match act {
                    Activation::Relu => s.max(0.0),
                    Activation::Tanh => s.tanh(),
                    Activation::Identity => s,
                    Activation::Sigmoid => 1.0 / (1.0 + (-s).exp()),
                    Activation::Gelu => 0.5 * s * (1.0 + libm::erf(s / std::f64::consts::SQRT_2)),
                }
            })
            .collect()
    }

    #[test]
    fn mlp_matches_reference_and_batches_agree() {
        let m = ModelFile::from_bytes(&mlp(&[5, 7, 3], "gelu,tanh", 9)).unwrap();
        let batch = 9;
        let input: Vec<f32> = (0..batch * 5).map(|i| (i as f32 * 0.37).sin()).collect();
        let out = run(&m, &input, batch);
        for s in 0..batch {
            let x = &input[s * 5..(s + 1) * 5];
            let h = reference_dense(
                m.weights.tensor(0),
                m.weights.tensor(1),
                x,
                5,
                Activation::Gelu,
            );
            let h: Vec<f32> = h.iter().map(|v| *v as f32).collect();
            let y = reference_dense(
                m.weights.tensor(2),
                m.weights.tensor(3),
                &h,
                7,
                Activation::Tanh,
            );
            for (a, b) in out[s * 3..(s + 1) * 3].iter().zip(&y) {
                assert!(
                    (f64::from(*a) - b).abs() <= 1e-5 * b.abs().max(0.1),
                    "{a} vs {b}"
                );
            }
            for (a, b) in run(&m, x, 1).iter().zip(&out[s * 3..(s + 1) * 3]) {
                assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn packed_layers_agree_with_the_dot_kernel_and_a_sample_has_one_result_in_any_batch() {
        let m = ModelFile::from_bytes(&mlp(&[64, 256, 100, 1], "relu,tanh,none", 3)).unwrap();
        let packed = PackedWeights::new(&m.spec, &m.weights);
        if packed.bytes() == 0 {
            return; // no AVX-512 here: every layer runs the dot-product kernel
        }
        // The two wide layers are packed (100 outputs pad to 7 panels); the last is not.
        assert_eq!(packed.bytes(), (64 * 256 + 256 * 112) * 4);
        let batch = 37;
        let input: Vec<f32> = (0..batch * 64).map(|i| (i as f32 * 0.13).sin()).collect();
        let ours = run_with(&m, &packed, &input, batch);
        let dot = run_with(&m, &PackedWeights::default(), &input, batch);
        for (a, b) in ours.iter().zip(&dot) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        for s in [0, 5, 36] {
            let one = run_with(&m, &packed, &input[s * 64..(s + 1) * 64], 1);
            assert_eq!(one[0].to_bits(), ours[s].to_bits(), "sample {s}");
        }
    }

    #[test]
    fn lstm_two_layers_run_and_batch_rows_are_independent() {
        let (inp, hid, steps) = (3usize, 4usize, 5usize);
        let v = |n: usize, s: f32| {
            (0..n)
                .map(|i| ((i as f32 + s) * 0.71).sin() * 0.5)
                .collect::<Vec<f32>>()
        };
        let meta = [("arch", "lstm"), ("sequence_length", "5")];
        let bytes = write(
            &meta,
            &[
                ("weight_ih_l0", vec![4 * hid, inp], v(4 * hid * inp, 1.0)),
                ("weight_hh_l0", vec![4 * hid, hid], v(4 * hid * hid, 2.0)),
                ("bias_ih_l0", vec![4 * hid], v(4 * hid, 3.0)),
                ("bias_hh_l0", vec![4 * hid], v(4 * hid, 4.0)),
                ("weight_ih_l1", vec![4 * hid, hid], v(4 * hid * hid, 5.0)),
                ("weight_hh_l1", vec![4 * hid, hid], v(4 * hid * hid, 6.0)),
                ("bias_ih_l1", vec![4 * hid], v(4 * hid, 7.0)),
                ("bias_hh_l1", vec![4 * hid], v(4 * hid, 8.0)),
                ("dense.0.weight", vec![2, hid], v(2 * hid, 9.0)),
                ("dense.0.bias", vec![2], v(2, 10.0)),
            ],
        );
        let m = ModelFile::from_bytes(&bytes).unwrap();
        assert_eq!(
            (
                m.spec.input_size,
                m.spec.output_size,
                m.spec.sequence_length
            ),
            (3, 2, 5)
        );
        let batch = 4;
        let input = v(batch * steps * inp, 11.0);
        let out = run(&m, &input, batch);
        for s in 0..batch {
            let one = run(&m, &input[s * steps * inp..(s + 1) * steps * inp], 1);
            for (a, b) in one.iter().zip(&out[s * 2..(s + 1) * 2]) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
        }
        assert!(out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn workspace_size_overflow_is_an_error() {
        let m = ModelFile::from_bytes(&mlp(&[2, 3], "none", 1)).unwrap();
        assert!(workspace_len(&m.spec, usize::MAX / 2, 1).is_err());
    }
}
