//! `dst (+)= lhs · wᵀ` with `w` row-major `[cols, depth]`, PyTorch's `nn.Linear` layout.
//!
//! Three kernels, chosen per layer and CPU (the one exception: `wide`, below):
//! - AVX-512F, a layer of at least 64 outputs: an outer-product kernel over a packed copy of the
//!   weights ([`Packed`], panels of 16 outputs made once at load): 6 rows × 64 outputs at a time
//!   (1 × 128 for a single row), each output one multiply-add chain over the depth in order.
//! - AVX2 and FMA: a register-blocked dot-product kernel reading the weights in place (from the
//!   file mapping, too): 3 rows × 4 outputs at a time (1 × 8 for a single row), 8 lanes over the
//!   depth, weights tiled to stay in L1 and input rows blocked to stay in L2.
//! - Elsewhere, the `gemm` crate; also for `wide` calls (a layer of 2²¹ or more
//!   multiply-adds in a batch too small to split across threads, which then uses rayon's pool
//!   by itself).
//!
//! Within either of our kernels every output is summed in the same order whatever the batch or
//! the blocking, so a sample's result does not depend on the batch it came in — except where a
//! `wide` call at one batch size and our kernel at another meet (such layers only).

use gemm::Parallelism;

/// One GEMM call: `rows × cols` outputs over `depth`, with the strides of `lhs` and `dst`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub rows: usize,
    pub cols: usize,
    pub depth: usize,
    pub lhs_stride: usize,
    pub dst_stride: usize,
}

/// What the kernel does with each finished sum before storing it: add a bias (`bias[j]` for
/// output `j`) and clamp at zero (ReLU). Done in the store, it saves three passes over the
/// output (bias copy, accumulate read, activation); the bits are those of the separate passes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'b> {
    pub bias: Option<&'b [f32]>,
    pub relu: bool,
}

impl Epilogue<'_> {
    fn is_empty(&self) -> bool {
        self.bias.is_none() && !self.relu
    }
}

/// [`matmul`] with the bias and activation applied as each output is stored:
/// `dst = relu?(lhs · wᵀ + bias)`. `false` (nothing written) where the fused kernel is not
/// available (no AVX2/FMA, or `wide`): the caller runs the separate passes.
pub fn matmul_fused(
    s: Shape,
    lhs: &[f32],
    w: &[f32],
    dst: &mut [f32],
    epilogue: Epilogue<'_>,
    wide: bool,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if !wide && avx2::available() {
        if s.rows == 0 || s.cols == 0 {
            return true;
        }
        check(s, lhs, w, dst);
        if let Some(bias) = epilogue.bias {
            assert!(bias.len() >= s.cols, "bias length");
        }
        // SAFETY: the CPU has AVX2 and FMA; `check` bounds every index the kernel reads or
        // writes, and the bias covers every output column.
        unsafe {
            avx2::matmul(
                s,
                lhs.as_ptr(),
                w.as_ptr(),
                dst.as_mut_ptr(),
                false,
                epilogue,
            )
        };
        return true;
    }
    let _ = (s, lhs, w, dst, epilogue, wide);
    false
}

fn check(s: Shape, lhs: &[f32], w: &[f32], dst: &[f32]) {
    assert!(w.len() >= s.cols * s.depth, "weight length");
    assert!(
        lhs.len() >= (s.rows - 1) * s.lhs_stride + s.depth,
        "lhs length"
    );
    assert!(
        dst.len() >= (s.rows - 1) * s.dst_stride + s.cols,
        "dst length"
    );
}

/// `dst[r·dst_stride + j] (+)= Σₖ lhs[r·lhs_stride + k] · w[j·depth + k]`. `wide` lets one call
/// use rayon's pool (a large layer at a batch too small to split across threads).
pub fn matmul(s: Shape, lhs: &[f32], w: &[f32], dst: &mut [f32], accumulate: bool, wide: bool) {
    if s.rows == 0 || s.cols == 0 {
        return;
    }
    check(s, lhs, w, dst);
    #[cfg(target_arch = "x86_64")]
    if !wide && avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA; `check` bounds every index the kernel reads or
        // writes.
        let none = Epilogue::default();
        unsafe {
            avx2::matmul(
                s,
                lhs.as_ptr(),
                w.as_ptr(),
                dst.as_mut_ptr(),
                accumulate,
                none,
            )
        };
        return;
    }
    let parallelism = if wide {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above bound every index the strides reach; `dst` does not alias.
    unsafe {
        gemm::gemm(
            s.rows,
            s.cols,
            s.depth,
            dst.as_mut_ptr(),
            1,
            s.dst_stride as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            s.lhs_stride as isize,
            w.as_ptr(),
            s.depth as isize,
            1,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Weights `[cols, depth]` rearranged for the AVX-512 kernel: panels of 16 outputs, each panel
/// `depth` rows of 16 lanes (lane `l` of row `k` is `w[(16p + l)·depth + k]`, zero past `cols`),
/// 64-byte aligned. Built once per weight tensor when a model is loaded.
pub struct Packed {
    panels: Vec<Lanes>,
    cols: usize,
    depth: usize,
}

/// One row of a panel: a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Lanes([f32; 16]);

/// Outputs a panel holds.
const PANEL: usize = 16;

/// Fewer outputs than this are summed by the dot-product kernel: an outer-product panel of
/// one or two 16-lane chains would wait on each multiply-add in turn.
const PACK_MIN_COLS: usize = 64;

impl Packed {
    /// The packed copy of `w`, or `None` where the AVX-512 kernel does not run (no AVX-512F,
    /// fewer than [`PACK_MIN_COLS`] outputs, or no memory for the copy). The choice depends on
    /// the layer and the CPU only, never on the batch.
    pub fn new(w: &[f32], cols: usize, depth: usize) -> Option<Packed> {
        #[cfg(target_arch = "x86_64")]
        if avx512::available() && cols >= PACK_MIN_COLS && depth > 0 && w.len() >= cols * depth {
            let count = cols.div_ceil(PANEL).checked_mul(depth)?;
            let mut panels = Vec::new();
            panels.try_reserve_exact(count).ok()?;
            for p in 0..cols.div_ceil(PANEL) {
                for k in 0..depth {
                    let mut row = Lanes([0.0; PANEL]);
                    for (l, lane) in row.0.iter_mut().enumerate() {
                        let j = p * PANEL + l;
                        if j < cols {
                            *lane = w[j * depth + k];
                        }
                    }
                    panels.push(row);
                }
            }
            return Some(Packed {
                panels,
                cols,
                depth,
            });
        }
        let _ = (w, cols, depth);
        None
    }

    /// Bytes of the packed copy.
    pub fn bytes(&self) -> usize {
        self.panels.len() * std::mem::size_of::<Lanes>()
    }
}

/// [`matmul`] over packed weights, with the epilogue applied as each output is stored:
/// `dst = relu?((dst +)? lhs · wᵀ + bias)`. Every output is one multiply-add chain over the
/// depth in order, whatever the batch.
pub fn matmul_packed(
    s: Shape,
    lhs: &[f32],
    w: &Packed,
    dst: &mut [f32],
    accumulate: bool,
    epilogue: Epilogue<'_>,
) {
    assert!(
        w.cols == s.cols && w.depth == s.depth,
        "packed weights' shape"
    );
    if s.rows == 0 {
        return;
    }
    assert!(
        lhs.len() >= (s.rows - 1) * s.lhs_stride + s.depth,
        "lhs length"
    );
    assert!(
        dst.len() >= (s.rows - 1) * s.dst_stride + s.cols,
        "dst length"
    );
    if let Some(bias) = epilogue.bias {
        assert!(bias.len() >= s.cols, "bias length");
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a `Packed` exists only where AVX-512F does (`Packed::new`); the asserts bound
        // every index of `lhs`, `dst` and the bias, and the panels cover `cols × depth`.
        unsafe { avx512::matmul(s, lhs.as_ptr(), w, dst.as_mut_ptr(), accumulate, epilogue) };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Epilogue, Packed, Shape, PANEL};

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// Bytes of panels one column tile may span: with a block of rows, within L2.
    const TILE_BYTES: usize = 256 << 10;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn matmul(
        s: Shape,
        lhs: *const f32,
        w: &Packed,
        dst: *mut f32,
        acc: bool,
        epilogue: Epilogue<'_>,
    ) {
        let store = Store {
            bias: epilogue.bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
            relu: epilogue.relu,
            acc,
        };
        let panels = s.cols.div_ceil(PANEL);
        let panel_bytes = s.depth * PANEL * 4;
        let tile = (TILE_BYTES / panel_bytes).max(4) / 4 * 4;
        let mut p0 = 0;
        while p0 < panels {
            let p1 = (p0 + tile).min(panels);
            let mut r = 0;
            while r + 6 <= s.rows {
                unsafe { panels_of::<6, 4>(s, r, p0, p1, lhs, w, dst, store) };
                r += 6;
            }
            match s.rows - r {
                5 => unsafe { panels_of::<5, 4>(s, r, p0, p1, lhs, w, dst, store) },
                4 => unsafe { panels_of::<4, 4>(s, r, p0, p1, lhs, w, dst, store) },
                3 => unsafe { panels_of::<3, 4>(s, r, p0, p1, lhs, w, dst, store) },
                2 => unsafe { panels_of::<2, 4>(s, r, p0, p1, lhs, w, dst, store) },
                1 => unsafe { panels_of::<1, 8>(s, r, p0, p1, lhs, w, dst, store) },
                _ => {}
            }
            p0 = p1;
        }
    }

    /// What a finished sum goes through on its way to `dst`.
    #[derive(Clone, Copy)]
    struct Store {
        /// `bias[j]` for output column `j`, or null.
        bias: *const f32,
        relu: bool,
        /// Added to what `dst` holds.
        acc: bool,
    }

    /// Rows `r..r + MR`, panels `p0..p1`: groups of NP (at most 8) panels, then the rest.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn panels_of<const MR: usize, const NP: usize>(
        s: Shape,
        r: usize,
        p0: usize,
        p1: usize,
        lhs: *const f32,
        w: &Packed,
        dst: *mut f32,
        store: Store,
    ) {
        let mut p = p0;
        while p + NP <= p1 {
            unsafe { block::<MR, NP>(s, r, p, lhs, w, dst, store) };
            p += NP;
        }
        // The rest as one block too: as many independent chains as the row count allows.
        // (Called, not through a pointer: inlined, the kernel keeps AVX-512.)
        unsafe {
            match p1 - p {
                0 => {}
                1 => block::<MR, 1>(s, r, p, lhs, w, dst, store),
                2 => block::<MR, 2>(s, r, p, lhs, w, dst, store),
                3 => block::<MR, 3>(s, r, p, lhs, w, dst, store),
                4 => block::<MR, 4>(s, r, p, lhs, w, dst, store),
                5 => block::<MR, 5>(s, r, p, lhs, w, dst, store),
                6 => block::<MR, 6>(s, r, p, lhs, w, dst, store),
                _ => block::<MR, 7>(s, r, p, lhs, w, dst, store),
            }
        }
    }

    /// `MR` rows × `NP` panels: each of the `MR · NP · 16` outputs one multiply-add chain over
    /// the depth (a broadcast input times a panel row), then the store.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // the register tile reads best as indices
    unsafe fn block<const MR: usize, const NP: usize>(
        s: Shape,
        r: usize,
        p: usize,
        lhs: *const f32,
        w: &Packed,
        dst: *mut f32,
        store: Store,
    ) {
        let d = s.depth;
        let x = unsafe { lhs.add(r * s.lhs_stride) };
        let rows = unsafe { w.panels.as_ptr().add(p * d).cast::<f32>() };
        let mut sums = [[_mm512_setzero_ps(); NP]; MR];
        for k in 0..d {
            let mut wv = [_mm512_setzero_ps(); NP];
            for (q, v) in wv.iter_mut().enumerate() {
                *v = unsafe { _mm512_load_ps(rows.add((q * d + k) * PANEL)) };
            }
            for i in 0..MR {
                let xv = _mm512_set1_ps(unsafe { *x.add(i * s.lhs_stride + k) });
                for q in 0..NP {
                    sums[i][q] = _mm512_fmadd_ps(xv, wv[q], sums[i][q]);
                }
            }
        }
        // A small loop body, fully unrolled: the tile stays in registers through the loop
        // above. A panel past the outputs has an empty mask and stores nothing.
        let mut masks = [0 as __mmask16; NP];
        for (q, m) in masks.iter_mut().enumerate() {
            let n = s.cols.saturating_sub((p + q) * PANEL).min(PANEL);
            *m = ((1u32 << n) - 1) as __mmask16;
        }
        // (Wrapping: a panel past the outputs may point past them, and is never accessed.)
        let y = dst.wrapping_add(r * s.dst_stride + p * PANEL);
        let mut store = store;
        if !store.bias.is_null() {
            store.bias = store.bias.wrapping_add(p * PANEL);
        }
        for i in 0..MR {
            for q in 0..NP {
                let c = q * PANEL;
                let out = y.wrapping_add(i * s.dst_stride + c);
                unsafe { put(sums[i][q], out, c, masks[q], store) };
            }
        }
    }

    /// Stores the lanes of `mask` of one finished sum at `out`, output `c` of the block.
    #[inline(always)]
    unsafe fn put(sum: __m512, out: *mut f32, c: usize, mask: __mmask16, store: Store) {
        unsafe {
            let mut v = sum;
            if store.acc {
                v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), v);
            }
            if !store.bias.is_null() {
                v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, store.bias.wrapping_add(c)), v);
            }
            if store.relu {
                // Like f32::max(v, 0): a NaN becomes 0.
                v = _mm512_max_ps(v, _mm512_setzero_ps());
            }
            _mm512_mask_storeu_ps(out, mask, v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Epilogue, Shape};

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Bytes of weights one column tile may span: half of a 32 KiB L1, the rest for the rows.
    const TILE_BYTES: usize = 16 << 10;
    /// Bytes of input rows one row block may span: with its outputs and the weights, within L2.
    const ROW_BLOCK_BYTES: usize = 64 << 10;

    /// The finishing touch of a group of outputs, as raw pointers for the kernel.
    #[derive(Clone, Copy)]
    struct Finish {
        /// `bias[j]` for output column `j`, or null.
        bias: *const f32,
        relu: bool,
        any: bool,
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matmul(
        s: Shape,
        lhs: *const f32,
        w: *const f32,
        dst: *mut f32,
        acc: bool,
        epilogue: Epilogue<'_>,
    ) {
        let finish = Finish {
            bias: epilogue.bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
            relu: epilogue.relu,
            any: !epilogue.is_empty(),
        };
        let row_bytes = s.depth.max(1) * 4;
        let tile = (TILE_BYTES / row_bytes).max(8) / 8 * 8;
        let block = (ROW_BLOCK_BYTES / row_bytes).max(3) / 3 * 3;
        let mut r0 = 0;
        while r0 < s.rows {
            let r1 = (r0 + block).min(s.rows);
            let mut c0 = 0;
            while c0 < s.cols {
                let c1 = (c0 + tile).min(s.cols);
                let mut r = r0;
                while r + 3 <= r1 {
                    unsafe { columns::<3, 4>(s, r, c0, c1, lhs, w, dst, acc) };
                    r += 3;
                }
                match r1 - r {
                    2 => unsafe { columns::<2, 4>(s, r, c0, c1, lhs, w, dst, acc) },
                    1 => unsafe { columns::<1, 8>(s, r, c0, c1, lhs, w, dst, acc) },
                    _ => {}
                }
                if finish.any {
                    // While the tile is in L1: one short pass instead of three over the output.
                    unsafe { finish_tile(s, r0, r1, c0, c1, dst, finish) };
                }
                c0 = c1;
            }
            r0 = r1;
        }
    }

    /// Rows `r..r + MR`, outputs `c0..c1`: blocks of NR outputs, then single outputs.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn columns<const MR: usize, const NR: usize>(
        s: Shape,
        r: usize,
        c0: usize,
        c1: usize,
        lhs: *const f32,
        w: *const f32,
        dst: *mut f32,
        acc: bool,
    ) {
        let x = unsafe { lhs.add(r * s.lhs_stride) };
        let y = unsafe { dst.add(r * s.dst_stride) };
        let mut c = c0;
        while c + NR <= c1 {
            unsafe { block::<MR, NR>(s, x, w.add(c * s.depth), y.add(c), acc) };
            c += NR;
        }
        while c < c1 {
            unsafe { block::<MR, 1>(s, x, w.add(c * s.depth), y.add(c), acc) };
            c += 1;
        }
    }

    /// Rows `r0..r1`, outputs `c0..c1` just stored: `relu?(bias + sum)`, the bits of the
    /// bias copied first and the sums accumulated onto it.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn finish_tile(
        s: Shape,
        r0: usize,
        r1: usize,
        c0: usize,
        c1: usize,
        dst: *mut f32,
        finish: Finish,
    ) {
        let zero = _mm256_setzero_ps();
        for r in r0..r1 {
            let y = unsafe { dst.add(r * s.dst_stride) };
            let mut c = c0;
            while c + 8 <= c1 {
                unsafe {
                    let mut v = _mm256_loadu_ps(y.add(c));
                    if !finish.bias.is_null() {
                        v = _mm256_add_ps(_mm256_loadu_ps(finish.bias.add(c)), v);
                    }
                    if finish.relu {
                        // Like f32::max(v, 0): a NaN becomes 0.
                        v = _mm256_max_ps(v, zero);
                    }
                    _mm256_storeu_ps(y.add(c), v);
                }
                c += 8;
            }
            for c in c..c1 {
                let out = unsafe { &mut *y.add(c) };
                if !finish.bias.is_null() {
                    *out += unsafe { *finish.bias.add(c) };
                }
                if finish.relu {
                    *out = out.max(0.0);
                }
            }
        }
    }

    /// `MR × NR` outputs: 8-lane partial sums over the depth, a fixed reduction, then the tail.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // the register tile reads best as indices
    unsafe fn block<const MR: usize, const NR: usize>(
        s: Shape,
        x: *const f32,
        w: *const f32,
        y: *mut f32,
        acc: bool,
    ) {
        let d = s.depth;
        let full = d / 8 * 8;
        let mut sums = [[_mm256_setzero_ps(); NR]; MR];
        let mut k = 0;
        while k < full {
            let mut xv = [_mm256_setzero_ps(); MR];
            for (r, v) in xv.iter_mut().enumerate() {
                *v = unsafe { _mm256_loadu_ps(x.add(r * s.lhs_stride + k)) };
            }
            for j in 0..NR {
                let wv = unsafe { _mm256_loadu_ps(w.add(j * d + k)) };
                for r in 0..MR {
                    sums[r][j] = _mm256_fmadd_ps(xv[r], wv, sums[r][j]);
                }
            }
            k += 8;
        }
        for (r, row) in sums.iter().enumerate() {
            let (xr, yr) = unsafe { (x.add(r * s.lhs_stride), y.add(r * s.dst_stride)) };
            let mut j = 0;
            while j < NR {
                // Four outputs reduced at once; a single one goes through the same tree.
                let n = if j + 4 <= NR { 4 } else { 1 };
                let group = if n == 4 {
                    [row[j], row[j + 1], row[j + 2], row[j + 3]]
                } else {
                    [row[j]; 4]
                };
                let totals = unsafe { hsum4(group) };
                if n == 4 && full == d {
                    let out = unsafe { yr.add(j) };
                    unsafe {
                        let v = if acc {
                            _mm_add_ps(_mm_loadu_ps(out), totals)
                        } else {
                            totals
                        };
                        _mm_storeu_ps(out, v);
                    }
                } else {
                    let mut lanes = [0.0f32; 4];
                    unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), totals) };
                    for (i, lane) in lanes.iter().take(n).enumerate() {
                        let (wj, mut total) = (unsafe { w.add((j + i) * d) }, *lane);
                        for t in full..d {
                            total = unsafe { (*xr.add(t)).mul_add(*wj.add(t), total) };
                        }
                        let out = unsafe { yr.add(j + i) };
                        unsafe { *out = if acc { *out + total } else { total } };
                    }
                }
                j += n;
            }
        }
    }

    /// Lane i: the sum of `v[i]`'s eight lanes, as ((0+1)+(2+3)) + ((4+5)+(6+7)).
    #[inline(always)]
    unsafe fn hsum4(v: [__m256; 4]) -> __m128 {
        unsafe {
            let t = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
            _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(s: Shape, lhs: &[f32], w: &[f32], dst: &mut [f32], accumulate: bool) {
        for r in 0..s.rows {
            for j in 0..s.cols {
                let sum: f64 = (0..s.depth)
                    .map(|k| f64::from(lhs[r * s.lhs_stride + k]) * f64::from(w[j * s.depth + k]))
                    .sum();
                let d = &mut dst[r * s.dst_stride + j];
                *d = if accumulate {
                    (f64::from(*d) + sum) as f32
                } else {
                    sum as f32
                };
            }
        }
    }

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.731).sin()).collect()
    }

    /// Runs `kernel` over `shapes` with strided rows and outputs, accumulating and not, and
    /// checks each output against a float64 reference and the stride's gaps untouched.
    fn against_reference(
        shapes: &[(usize, usize, usize)],
        mut kernel: impl FnMut(Shape, &[f32], &[f32], &mut [f32], bool),
    ) {
        for &(rows, cols, depth) in shapes {
            for accumulate in [false, true] {
                let s = Shape {
                    rows,
                    cols,
                    depth,
                    lhs_stride: depth + 3,
                    dst_stride: cols + 5,
                };
                let lhs = values(rows * s.lhs_stride, 1.0);
                let w = values(cols * depth, 2.0);
                let start = values(rows * s.dst_stride, 3.0);
                let (mut ours, mut want) = (start.clone(), start.clone());
                kernel(s, &lhs, &w, &mut ours, accumulate);
                reference(s, &lhs, &w, &mut want, accumulate);
                for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (depth as f32).sqrt() * b.abs().max(1.0);
                    assert!(
                        (a - b).abs() <= tol,
                        "{rows}×{cols}×{depth} acc={accumulate} [{i}]: {a} vs {b}"
                    );
                }
                for r in 0..rows {
                    let gap = r * s.dst_stride + cols..(r + 1) * s.dst_stride;
                    assert_eq!(ours[gap.clone()], start[gap], "row {r}'s gap");
                }
            }
        }
    }

    #[test]
    fn every_edge_of_the_blocking_matches_a_float64_reference() {
        let shapes = [
            (1, 1, 1),
            (1, 9, 7),
            (2, 5, 8),
            (3, 4, 16),
            (4, 13, 17),
            (7, 33, 64),
            (11, 70, 300),
            (5, 1, 4099),
        ];
        against_reference(&shapes, |s, lhs, w, dst, acc| {
            matmul(s, lhs, w, dst, acc, false)
        });
    }

    #[test]
    fn the_fused_bias_and_relu_give_the_bits_of_the_separate_passes() {
        for &(rows, cols, depth) in &[
            (1, 9, 7),
            (3, 4, 16),
            (4, 13, 17),
            (7, 33, 64),
            (11, 70, 300),
        ] {
            let s = Shape {
                rows,
                cols,
                depth,
                lhs_stride: depth,
                dst_stride: cols,
            };
            let lhs = values(rows * depth, 6.0);
            let w = values(cols * depth, 7.0);
            let bias = values(cols, 8.0);
            for (with_bias, relu) in [(true, true), (true, false), (false, true)] {
                let mut fused = vec![f32::NAN; rows * cols];
                let epilogue = Epilogue {
                    bias: with_bias.then_some(bias.as_slice()),
                    relu,
                };
                if !matmul_fused(s, &lhs, &w, &mut fused, epilogue, false) {
                    return; // no fused kernel on this CPU: dense() runs the passes itself
                }
                let mut passes: Vec<f32> = if with_bias {
                    bias.iter().copied().cycle().take(rows * cols).collect()
                } else {
                    vec![0.0; rows * cols]
                };
                matmul(s, &lhs, &w, &mut passes, with_bias, false);
                if relu {
                    passes.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                assert_eq!(
                    fused, passes,
                    "{rows}×{cols}×{depth} bias={with_bias} relu={relu}"
                );
            }
        }
    }

    #[test]
    fn packed_weights_match_a_float64_reference_at_every_edge() {
        if Packed::new(&values(64, 0.0), 64, 1).is_none() {
            return; // no AVX-512 here: the dot-product kernel runs every layer
        }
        let shapes = [
            (1, 64, 1),
            (1, 200, 33),
            (2, 64, 64),
            (5, 130, 17),
            (6, 256, 64),
            (7, 77, 256),
            (13, 300, 40),
            (4, 64, 5000),
        ];
        against_reference(&shapes, |s, lhs, w, dst, acc| {
            let packed = Packed::new(w, s.cols, s.depth).expect("packed");
            matmul_packed(s, lhs, &packed, dst, acc, Epilogue::default());
        });
    }

    #[test]
    fn packed_weights_give_a_row_the_same_bits_alone_and_in_a_batch() {
        let (cols, depth) = (150, 70);
        let w = values(cols * depth, 5.0);
        let Some(packed) = Packed::new(&w, cols, depth) else {
            return; // no AVX-512 here
        };
        let bias = values(cols, 9.0);
        let e = Epilogue {
            bias: Some(&bias),
            relu: true,
        };
        let lhs = values(13 * depth, 4.0);
        for rows in 1..=13 {
            let s = Shape {
                rows,
                cols,
                depth,
                lhs_stride: depth,
                dst_stride: cols,
            };
            let mut batch = vec![0.0; rows * cols];
            matmul_packed(s, &lhs, &packed, &mut batch, false, e);
            for r in 0..rows {
                let one = Shape { rows: 1, ..s };
                let mut alone = vec![0.0; cols];
                matmul_packed(one, &lhs[r * depth..], &packed, &mut alone, false, e);
                assert_eq!(alone, batch[r * cols..(r + 1) * cols], "row {r} of {rows}");
            }
            // The fused bias and ReLU are the separate passes' bits.
            let mut passes: Vec<f32> = bias.iter().copied().cycle().take(rows * cols).collect();
            matmul_packed(s, &lhs, &packed, &mut passes, true, Epilogue::default());
            passes.iter_mut().for_each(|v| *v = v.max(0.0));
            assert_eq!(batch, passes, "{rows} rows: fused vs passes");
        }
    }

    #[test]
    fn narrow_layers_and_cpus_without_avx512_are_not_packed() {
        assert!(Packed::new(&values(63 * 8, 0.0), 63, 8).is_none());
        assert!(
            Packed::new(&values(10, 0.0), 64, 8).is_none(),
            "short weights"
        );
        if let Some(p) = Packed::new(&values(65 * 3, 0.0), 65, 3) {
            assert_eq!(p.bytes(), 5 * 3 * 64, "5 panels of 3 rows of 64 bytes");
        }
    }

    /// `cargo test --release --lib models::matmul::tests::kernel_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "a benchmark: prints GFLOP/s"]
    fn kernel_speed() {
        for &(rows, cols, depth) in &[(128, 256, 64), (128, 256, 256), (1, 256, 64), (1, 256, 256)]
        {
            let s = Shape {
                rows,
                cols,
                depth,
                lhs_stride: depth,
                dst_stride: cols,
            };
            let lhs = values(rows * depth, 1.0);
            let w = values(cols * depth, 2.0);
            let mut dst = vec![0.0; rows * cols];
            let flops = 2.0 * (rows * cols * depth) as f64;
            let reps = (4e9 / flops) as usize + 1;
            let time = |f: &mut dyn FnMut()| {
                f();
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    f();
                }
                t.elapsed().as_secs_f64() / reps as f64
            };
            let dot = time(&mut || matmul(s, &lhs, &w, &mut dst, false, false));
            let line = format!(
                "{rows}×{cols}×{depth}: dot {:.1} GFLOP/s ({:.2} µs)",
                flops / dot / 1e9,
                dot * 1e6
            );
            match Packed::new(&w, cols, depth) {
                Some(p) => {
                    let e = Epilogue::default();
                    let t = time(&mut || matmul_packed(s, &lhs, &p, &mut dst, false, e));
                    println!(
                        "{line}, packed {:.1} GFLOP/s ({:.2} µs)",
                        flops / t / 1e9,
                        t * 1e6
                    );
                }
                None => println!("{line}, no AVX-512"),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        if !avx2::available() {
            return; // the promise is the kernel's; the gemm crate makes none
        }
        let (rows, cols, depth) = (7, 19, 70);
        let s = Shape {
            rows,
            cols,
            depth,
            lhs_stride: depth,
            dst_stride: cols,
        };
        let lhs = values(rows * depth, 4.0);
        let w = values(cols * depth, 5.0);
        let mut batch = vec![0.0; rows * cols];
        matmul(s, &lhs, &w, &mut batch, false, false);
        for r in 0..rows {
            let one = Shape { rows: 1, ..s };
            let mut alone = vec![0.0; cols];
            matmul(one, &lhs[r * depth..], &w, &mut alone, false, false);
            assert_eq!(alone, batch[r * cols..(r + 1) * cols], "row {r}");
        }
    }
}
