//! CUDA backend on cudarc with dynamic loading: the addon builds without a CUDA toolkit and
//! finds the driver, cuBLAS and NVRTC at run time. Dense layers are cuBLAS SGEMMs; bias +
//! activation and the LSTM cell are NVRTC kernels.
//!
//! Every entry point checks that the libraries are present before the first driver call and
//! runs inside `catch_unwind`: cudarc panics when a library is missing, and a panic must
//! never reach Node.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock, Weak};

use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::{cublasOperation_t, cublasStatus_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::result::DriverError;
use cudarc::driver::sys::CUresult;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use parking_lot::Mutex;

use crate::error::{Error, ErrorCode, Result};
use crate::models::format::{Activation, Architecture, DenseSpec, ModelFile, ModelSpec};
use crate::models::memory::{Bucket, Ledger};

const KERNELS: &str = r#"
extern "C" __global__ void bias_act(float* y, const float* bias, int has_bias, int rows, int cols, int act) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    float v = y[i];
    if (has_bias) v += bias[i % cols];
    if (act == 1) v = fmaxf(v, 0.0f);
    else if (act == 2) v = tanhf(v);
    else if (act == 3) v = 1.0f / (1.0f + expf(-v));
    else if (act == 4) v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    y[i] = v;
}

__device__ float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

// One LSTM step for every (sample, unit): gates i, f, g, o from proj row b*steps+t plus bias.
extern "C" __global__ void lstm_cell(const float* proj, const float* bias, float* h, float* c, float* seq,
                                     int batch, int steps, int hidden, int t, int write_seq) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= batch * hidden) return;
    int b = i / hidden, j = i % hidden;
    const float* g = proj + ((size_t)b * steps + t) * 4 * hidden;
    float ig = sigm(g[j] + bias[j]);
    float fg = sigm(g[hidden + j] + bias[hidden + j]);
    float gg = tanhf(g[2 * hidden + j] + bias[2 * hidden + j]);
    float og = sigm(g[3 * hidden + j] + bias[3 * hidden + j]);
    float cn = fg * c[i] + ig * gg;
    c[i] = cn;
    float hn = og * tanhf(cn);
    h[i] = hn;
    if (write_seq) seq[((size_t)b * steps + t) * hidden + j] = hn;
}
"#;

fn unavailable(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::DeviceUnavailable, message)
}

fn driver_error(what: &str, err: DriverError) -> Error {
    if err.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::new(
            ErrorCode::DeviceOutOfMemory,
            format!("{what}: device out of memory"),
        )
    } else {
        unavailable(format!("{what}: {err:?}"))
    }
}

fn blas_error(what: &str, err: CublasError) -> Error {
    if err.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED {
        Error::new(
            ErrorCode::DeviceOutOfMemory,
            format!("{what}: device out of memory"),
        )
    } else {
        unavailable(format!("{what}: {err:?}"))
    }
}

/// Runs `f`, turning a panic (a missing CUDA symbol, for one) into `DEVICE_UNAVAILABLE`.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(unavailable(format!("{what}: the CUDA library failed"))))
}

/// True when the CUDA driver library can be loaded. Checked (once per process) before any
/// driver call.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to open the shared library.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

fn libraries_present() -> Result<()> {
    if !driver_present() {
        return Err(unavailable(
            "no CUDA driver found (libcuda is not loadable)",
        ));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(unavailable("CUDA driver found but cuBLAS is not loadable"));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unavailable("CUDA driver found but NVRTC is not loadable"));
    }
    Ok(())
}

/// One CUDA device with its stream, cuBLAS handle and compiled kernels.
pub struct Gpu {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    bias_act: CudaFunction,
    lstm_cell: CudaFunction,
    /// cuBLAS handles are not safe to use from two threads at once; calls are serialized.
    serial: Mutex<()>,
}

impl Gpu {
    /// Device `ordinal`, shared by every cache using it (one stream, cuBLAS handle and kernel
    /// build per device), or `DEVICE_UNAVAILABLE` saying what is missing.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        static OPEN: OnceLock<Mutex<HashMap<usize, Weak<Gpu>>>> = OnceLock::new();
        let mut open = OPEN.get_or_init(Default::default).lock();
        if let Some(gpu) = open.get(&ordinal).and_then(Weak::upgrade) {
            return Ok(gpu);
        }
        let gpu = Gpu::create(ordinal)?;
        open.insert(ordinal, Arc::downgrade(&gpu));
        Ok(gpu)
    }

    fn create(ordinal: usize) -> Result<Arc<Gpu>> {
        libraries_present()?;
        guarded("opening the CUDA device", || {
            let count = CudaContext::device_count()
                .map_err(|e| driver_error("counting CUDA devices", e))?;
            if ordinal >= count.max(0) as usize {
                return Err(unavailable(format!(
                    "cuda:{ordinal} requested but {count} CUDA device(s) present"
                )));
            }
            let ctx = CudaContext::new(ordinal)
                .map_err(|e| driver_error("creating a CUDA context", e))?;
            let stream = ctx
                .new_stream()
                .map_err(|e| driver_error("creating a CUDA stream", e))?;
            let blas = CudaBlas::new(Arc::clone(&stream))
                .map_err(|e| blas_error("creating a cuBLAS handle", e))?;
            let ptx = cudarc::nvrtc::compile_ptx(KERNELS)
                .map_err(|e| unavailable(format!("compiling kernels with NVRTC: {e:?}")))?;
            let module = ctx
                .load_module(ptx)
                .map_err(|e| driver_error("loading kernels", e))?;
            let bias_act = module
                .load_function("bias_act")
                .map_err(|e| driver_error("loading bias_act", e))?;
            let lstm_cell = module
                .load_function("lstm_cell")
                .map_err(|e| driver_error("loading lstm_cell", e))?;
            Ok(Arc::new(Gpu {
                ordinal,
                ctx,
                stream,
                blas,
                bias_act,
                lstm_cell,
                serial: Mutex::new(()),
            }))
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// `(free, total)` device memory after the stream has drained.
    pub fn mem_get_info(&self) -> Result<(usize, usize)> {
        guarded("reading device memory", || {
            self.stream
                .synchronize()
                .map_err(|e| driver_error("synchronizing", e))?;
            self.ctx
                .mem_get_info()
                .map_err(|e| driver_error("reading device memory", e))
        })
    }

    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| driver_error("copying weights to the device", e))
    }

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(len.max(1))
            .map_err(|e| driver_error("allocating a device buffer", e))
    }

    /// `y[rows, w.rows] = x[rows, w.cols] · wᵀ` (row-major), with `y` at element offset `y_at`
    /// and row stride `ldy`; accumulates into `y` when `accumulate`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        rows: usize,
        outputs: usize,
        inputs: usize,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        y_at: usize,
        ldy: usize,
        accumulate: bool,
    ) -> Result<()> {
        let as_int = |v: usize| {
            i32::try_from(v).map_err(|_| Error::invalid_argument("matrix too large for cuBLAS"))
        };
        // Column-major view: yᵀ[outputs, rows] = w[outputs, inputs] · xᵀ[inputs, rows].
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: as_int(outputs)?,
            n: as_int(rows)?,
            k: as_int(inputs)?,
            alpha: 1.0f32,
            lda: as_int(inputs)?,
            ldb: as_int(inputs)?,
            beta: if accumulate { 1.0f32 } else { 0.0 },
            ldc: as_int(ldy)?,
        };
        let mut view = y.slice_mut(y_at..);
        // SAFETY: the buffers were sized by the caller for these dimensions and strides.
        unsafe { self.blas.gemm(cfg, w, x, &mut view) }.map_err(|e| blas_error("cuBLAS sgemm", e))
    }

    fn bias_act(
        &self,
        y: &mut CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        rows: usize,
        cols: usize,
        act: Activation,
    ) -> Result<()> {
        let n = rows * cols;
        let code: i32 = match act {
            Activation::Identity => 0,
            Activation::Relu => 1,
            Activation::Tanh => 2,
            Activation::Sigmoid => 3,
            Activation::Gelu => 4,
        };
        if code == 0 && bias.is_none() {
            return Ok(());
        }
        let (rows_i, cols_i, has_bias) = (rows as i32, cols as i32, i32::from(bias.is_some()));
        let dummy;
        let bias = match bias {
            Some(b) => b,
            None => {
                dummy = self.zeros(1)?;
                &dummy
            }
        };
        let mut launch = self.stream.launch_builder(&self.bias_act);
        launch
            .arg(y)
            .arg(bias)
            .arg(&has_bias)
            .arg(&rows_i)
            .arg(&cols_i)
            .arg(&code);
        // SAFETY: the kernel reads and writes `rows × cols` elements of `y` and `cols` of `bias`.
        unsafe { launch.launch(LaunchConfig::for_num_elems(n as u32)) }
            .map(|_| ())
            .map_err(|e| driver_error("launching bias_act", e))
    }
}

struct GpuDense {
    weight: CudaSlice<f32>,
    bias: Option<CudaSlice<f32>>,
    spec: DenseSpec,
}

struct GpuLstm {
    weight_ih: CudaSlice<f32>,
    weight_hh: CudaSlice<f32>,
    /// `bias_ih + bias_hh`, zeros when the file has neither.
    bias: CudaSlice<f32>,
    inputs: usize,
    hidden: usize,
}

/// Device buffers for one batch capacity.
struct GpuWorkspace {
    batch: usize,
    bytes: usize,
    input: CudaSlice<f32>,
    ping: CudaSlice<f32>,
    pong: CudaSlice<f32>,
    proj: CudaSlice<f32>,
    seq_a: CudaSlice<f32>,
    seq_b: CudaSlice<f32>,
    h: CudaSlice<f32>,
    c: CudaSlice<f32>,
}

/// A model whose weights live wholly in device memory.
pub struct CudaModel {
    gpu: Arc<Gpu>,
    spec: ModelSpec,
    dense: Vec<GpuDense>,
    lstm: Vec<GpuLstm>,
    workspace: Mutex<Option<GpuWorkspace>>,
    weight_bytes: usize,
    ledger: Arc<Ledger>,
}

impl CudaModel {
    /// Copies every tensor to the device. On failure (`DEVICE_OUT_OF_MEMORY`) whatever was
    /// uploaded is freed before returning.
    pub fn upload(gpu: &Arc<Gpu>, file: &ModelFile, ledger: Arc<Ledger>) -> Result<CudaModel> {
        let mut model = CudaModel {
            gpu: Arc::clone(gpu),
            spec: file.spec.clone(),
            dense: Vec::new(),
            lstm: Vec::new(),
            workspace: Mutex::new(None),
            weight_bytes: 0,
            ledger,
        };
        guarded("uploading a model", || {
            let _serial = gpu.serial.lock();
            let w = &file.weights;
            let dense_specs = match &file.spec.arch {
                Architecture::Mlp { dense } => dense.clone(),
                Architecture::Lstm { layers, head } => {
                    for layer in layers {
                        let mut bias = vec![0.0f32; 4 * layer.hidden];
                        for b in [layer.bias_ih, layer.bias_hh].into_iter().flatten() {
                            bias.iter_mut().zip(w.tensor(b)).for_each(|(s, v)| *s += v);
                        }
                        let entry = GpuLstm {
                            weight_ih: model.account(gpu.upload(w.tensor(layer.weight_ih))?),
                            weight_hh: model.account(gpu.upload(w.tensor(layer.weight_hh))?),
                            bias: model.account(gpu.upload(&bias)?),
                            inputs: layer.inputs,
                            hidden: layer.hidden,
                        };
                        model.lstm.push(entry);
                    }
                    head.clone()
                }
            };
            for spec in dense_specs {
                let weight = model.account(gpu.upload(w.tensor(spec.weight))?);
                let bias = match spec.bias {
                    Some(b) => Some(model.account(gpu.upload(w.tensor(b))?)),
                    None => None,
                };
                model.dense.push(GpuDense { weight, bias, spec });
            }
            gpu.stream
                .synchronize()
                .map_err(|e| driver_error("uploading weights", e))
        })?;
        Ok(model)
    }

    fn account(&mut self, slice: CudaSlice<f32>) -> CudaSlice<f32> {
        let bytes = slice.len() * 4;
        self.weight_bytes += bytes;
        self.ledger.allocated(Bucket::Gpu, bytes);
        slice
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Runs `batch` samples; `input` and `out` are host slices of the spec's lengths.
    pub fn forward(&self, input: &[f32], batch: usize, out: &mut [f32]) -> Result<()> {
        guarded("running a model on the GPU", || {
            let _serial = self.gpu.serial.lock();
            let mut slot = self.workspace.lock();
            if slot.as_ref().is_none_or(|ws| ws.batch < batch) {
                if let Some(old) = slot.take() {
                    self.ledger.freed(Bucket::Gpu, old.bytes);
                }
                *slot = Some(self.alloc_workspace(batch)?);
            }
            let ws = slot
                .as_mut()
                .ok_or_else(|| Error::internal("GPU workspace missing"))?;
            self.run(ws, input, batch, out)
        })
    }

    fn alloc_workspace(&self, batch: usize) -> Result<GpuWorkspace> {
        let spec = &self.spec;
        let widest = self.dense.iter().map(|d| d.spec.outputs).max().unwrap_or(1);
        let hidden = self.lstm.iter().map(|l| l.hidden).max().unwrap_or(1);
        let steps = batch * spec.sequence_length;
        let mut bytes = 0;
        let mut alloc = |len: usize| {
            bytes += len.max(1) * 4;
            self.gpu.zeros(len)
        };
        let ws = GpuWorkspace {
            batch,
            bytes: 0,
            input: alloc(batch * spec.sample_len())?,
            ping: alloc(batch * widest)?,
            pong: alloc(batch * widest)?,
            proj: alloc(steps * 4 * hidden)?,
            seq_a: alloc(steps * hidden)?,
            seq_b: alloc(steps * hidden)?,
            h: alloc(batch * hidden)?,
            c: alloc(batch * hidden)?,
        };
        self.ledger.allocated(Bucket::Gpu, bytes);
        Ok(GpuWorkspace { bytes, ..ws })
    }

    fn run(
        &self,
        ws: &mut GpuWorkspace,
        input: &[f32],
        batch: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let gpu = &self.gpu;
        let GpuWorkspace {
            input: x,
            ping,
            pong,
            proj,
            seq_a,
            seq_b,
            h,
            c,
            ..
        } = ws;
        gpu.stream
            .memcpy_htod(input, &mut x.slice_mut(..input.len()))
            .map_err(|e| driver_error("copying input to the device", e))?;
        let steps = self.spec.sequence_length;
        for (k, layer) in self.lstm.iter().enumerate() {
            let top = k + 1 == self.lstm.len();
            let gates = 4 * layer.hidden;
            // Layer 0 reads the input; later layers read the sequence the previous one wrote.
            let src: &CudaSlice<f32> = if k == 0 { x } else { seq_a };
            gpu.gemm(
                batch * steps,
                gates,
                layer.inputs,
                src,
                &layer.weight_ih,
                proj,
                0,
                gates,
                false,
            )?;
            gpu.stream
                .memset_zeros(h)
                .map_err(|e| driver_error("clearing LSTM state", e))?;
            gpu.stream
                .memset_zeros(c)
                .map_err(|e| driver_error("clearing LSTM state", e))?;
            for t in 0..steps {
                if t > 0 {
                    gpu.gemm(
                        batch,
                        gates,
                        layer.hidden,
                        h,
                        &layer.weight_hh,
                        proj,
                        t * gates,
                        steps * gates,
                        true,
                    )?;
                }
                let ints = [
                    batch as i32,
                    steps as i32,
                    layer.hidden as i32,
                    t as i32,
                    i32::from(!top),
                ];
                let mut launch = gpu.stream.launch_builder(&gpu.lstm_cell);
                launch
                    .arg(&*proj)
                    .arg(&layer.bias)
                    .arg(&mut *h)
                    .arg(&mut *c)
                    .arg(&mut *seq_b)
                    .arg(&ints[0])
                    .arg(&ints[1])
                    .arg(&ints[2])
                    .arg(&ints[3])
                    .arg(&ints[4]);
                // SAFETY: the kernel touches `batch × hidden` cells of h and c, and rows of
                // proj and seq_b within the sizes allocated for this batch.
                unsafe {
                    launch.launch(LaunchConfig::for_num_elems((batch * layer.hidden) as u32))
                }
                .map_err(|e| driver_error("launching lstm_cell", e))?;
            }
            if !top {
                std::mem::swap(seq_a, seq_b);
            }
        }
        #[derive(Clone, Copy)]
        enum Src {
            First,
            Ping,
            Pong,
        }
        let mut src = Src::First;
        for layer in &self.dense {
            let s = &layer.spec;
            let (dst, from): (&mut CudaSlice<f32>, &CudaSlice<f32>) = match src {
                Src::First if self.lstm.is_empty() => (ping, x),
                Src::First => (ping, h),
                Src::Ping => (pong, ping),
                Src::Pong => (ping, pong),
            };
            gpu.gemm(
                batch,
                s.outputs,
                s.inputs,
                from,
                &layer.weight,
                dst,
                0,
                s.outputs,
                false,
            )?;
            gpu.bias_act(dst, layer.bias.as_ref(), batch, s.outputs, s.activation)?;
            src = match src {
                Src::First | Src::Pong => Src::Ping,
                Src::Ping => Src::Pong,
            };
        }
        let result: &CudaSlice<f32> = match src {
            Src::First if self.lstm.is_empty() => x,
            Src::First => h,
            Src::Ping => ping,
            Src::Pong => pong,
        };
        gpu.stream
            .memcpy_dtoh(&result.slice(..out.len()), out)
            .map_err(|e| driver_error("copying output to the host", e))?;
        gpu.stream
            .synchronize()
            .map_err(|e| driver_error("running the model", e))
    }
}

impl Drop for CudaModel {
    fn drop(&mut self) {
        if let Some(ws) = self.workspace.get_mut().take() {
            self.ledger.freed(Bucket::Gpu, ws.bytes);
        }
        self.ledger.freed(Bucket::Gpu, self.weight_bytes);
        // Device buffers are freed by their own Drop (cudarc binds the context).
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_open_is_device_unavailable_and_does_not_panic() {
        if driver_present() {
            return;
        }
        let err = Gpu::open(0).err().unwrap();
        assert_eq!(err.code, ErrorCode::DeviceUnavailable);
        assert!(err.message.contains("no CUDA driver"), "{}", err.message);
    }
}
