//! CUDA backend on cudarc with dynamic loading: the addon builds without a CUDA toolkit and
//! finds the driver, cuBLAS and NVRTC at run time. Dense layers are cuBLAS SGEMMs; bias +
//! activation and the LSTM cell are NVRTC kernels ([`nvrtc`], `kernels.cu`).
//!
//! Every entry point checks that the libraries are present before the first driver call and
//! runs inside `catch_unwind`: cudarc panics when a library is missing, and a panic must
//! never reach Node. A device, once opened, lives for the rest of the process (cudarc's cuBLAS
//! handle unwraps in its `Drop`, and the kernels are compiled once); a sticky CUDA error
//! retires it, and the next cache or load opens a fresh context.

pub mod nvrtc;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::{cublasOperation_t, cublasStatus_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::result::DriverError;
use cudarc::driver::sys::CUresult;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use parking_lot::Mutex;

use crate::error::{Error, ErrorCode, Result};
use crate::models::device::Devices;
use crate::models::format::{Activation, Architecture, DenseSpec, ModelFile, ModelSpec};
use crate::models::memory::{Bucket, Ledger};

pub(crate) fn unavailable(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::DeviceUnavailable, message)
}

fn out_of_memory(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::DeviceOutOfMemory, message)
}

fn driver_error(what: &str, err: DriverError) -> Error {
    if err.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        out_of_memory(format!("{what}: device out of memory"))
    } else {
        unavailable(format!("{what}: {err:?}"))
    }
}

fn blas_error(what: &str, err: CublasError) -> Error {
    if err.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED {
        out_of_memory(format!("{what}: device out of memory"))
    } else {
        unavailable(format!("{what}: {err:?}"))
    }
}

/// Errors after which the context is unusable for the rest of the process ("sticky" in the
/// CUDA documentation): every later call in it fails the same way.
pub fn is_sticky(code: CUresult) -> bool {
    use CUresult::*;
    matches!(
        code,
        CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUDA_ERROR_INVALID_PC
            | CUDA_ERROR_LAUNCH_FAILED
            | CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUDA_ERROR_ECC_UNCORRECTABLE
            | CUDA_ERROR_CONTEXT_IS_DESTROYED
    )
}

/// Runs `f`, turning a panic (a missing CUDA symbol, for one) into `DEVICE_UNAVAILABLE`.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
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

/// Threads per block of every launch.
const BLOCK: u32 = 256;
/// Most blocks per launch; the kernels' grid-stride loops cover the rest.
const MAX_BLOCKS: u64 = 1 << 20;

/// The launch of a grid-stride kernel over `elements`; `None` when there is nothing to do.
/// The element count itself goes to the kernel as a 64-bit argument.
pub fn launch_config(elements: u64) -> Option<LaunchConfig> {
    if elements == 0 {
        return None;
    }
    let blocks = elements.div_ceil(u64::from(BLOCK)).min(MAX_BLOCKS) as u32;
    Some(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Floats of each device workspace buffer for `batch` samples, or `None` on overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceLayout {
    pub input: usize,
    /// Each of the two dense ping-pong buffers.
    pub dense: usize,
    pub proj: usize,
    /// Each of the two LSTM sequence buffers.
    pub seq: usize,
    /// Each of the LSTM state buffers `h` and `c`.
    pub state: usize,
}

impl WorkspaceLayout {
    pub fn new(spec: &ModelSpec, batch: usize) -> Option<WorkspaceLayout> {
        let (dense, lstm): (&[DenseSpec], usize) = match &spec.arch {
            Architecture::Mlp { dense } => (dense, 0),
            Architecture::Lstm { layers, head } => {
                (head, layers.iter().map(|l| l.hidden).max().unwrap_or(0))
            }
        };
        let widest = dense.iter().map(|d| d.outputs).max().unwrap_or(0);
        let steps = batch.checked_mul(spec.sequence_length)?;
        Some(WorkspaceLayout {
            input: batch.checked_mul(spec.sample_len())?,
            dense: batch.checked_mul(widest)?,
            proj: steps.checked_mul(lstm)?.checked_mul(4)?,
            seq: steps.checked_mul(lstm)?,
            state: batch.checked_mul(lstm)?,
        })
    }

    /// Device bytes of the whole workspace (every buffer at least one float).
    pub fn bytes(&self) -> Option<usize> {
        [
            self.input, self.dense, self.dense, self.proj, self.seq, self.seq, self.state,
            self.state,
        ]
        .into_iter()
        .try_fold(0usize, |acc, n| acc.checked_add(n.max(1).checked_mul(4)?))
    }
}

/// Checks that `batch` samples of `spec` fit every limit of the GPU path: cuBLAS takes `int`
/// dimensions and leading dimensions (the kernels index in 64 bits), and the workspace size
/// must not overflow. `INVALID_ARGUMENT` naming the limit otherwise.
pub fn check_batch(spec: &ModelSpec, batch: usize) -> Result<usize> {
    let limit = i32::MAX as usize;
    let too_large = |what: String| {
        Error::invalid_argument(format!(
            "batch {batch} is too large for the GPU: {what} exceeds cuBLAS's limit of {limit}"
        ))
    };
    let steps = spec.sequence_length;
    if let Architecture::Lstm { layers, .. } = &spec.arch {
        let rows = batch.saturating_mul(steps);
        if rows > limit {
            return Err(too_large(format!(
                "batch × sequence length ({rows} rows of the input projection)"
            )));
        }
        for layer in layers {
            let ld = steps.saturating_mul(4 * layer.hidden);
            if ld > limit {
                return Err(too_large(format!(
                    "sequence length × 4 × hidden ({ld}, the recurrent GEMM's leading dimension)"
                )));
            }
        }
    }
    if batch > limit {
        return Err(too_large("the batch (rows of every dense layer)".into()));
    }
    WorkspaceLayout::new(spec, batch)
        .and_then(|w| w.bytes())
        .ok_or_else(|| Error::invalid_argument(format!("batch {batch} is too large")))
}

/// The process's open devices, by ordinal.
static DEVICES: Devices<Gpu> = Devices::new();

/// One CUDA device with its stream, cuBLAS handle and compiled kernels.
pub struct Gpu {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _module: Arc<CudaModule>,
    bias_act: CudaFunction,
    lstm_cell: CudaFunction,
    /// Passed as `bias` to `bias_act` for a layer without one (the kernel never reads it).
    no_bias: CudaSlice<f32>,
    /// The device and how its kernels were built, e.g. "NVIDIA H200, sm_90, kernels: sm_90
    /// CUBIN, NVRTC 12.9".
    description: String,
    /// cuBLAS handles are not safe to use from two threads at once; calls are serialized.
    serial: Mutex<()>,
    /// The sticky error that retired this context, once one happened.
    broken: OnceLock<String>,
}

impl Gpu {
    /// Device `ordinal`, shared by every cache using it and kept for the process (one stream,
    /// cuBLAS handle and kernel build per device), or `DEVICE_UNAVAILABLE` saying what is
    /// missing. After a sticky error, a fresh context.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        DEVICES.open(ordinal, |replacing| Gpu::create(ordinal, replacing))
    }

    fn create(ordinal: usize, replacing: bool) -> Result<Arc<Gpu>> {
        libraries_present()?;
        guarded("opening the CUDA device", || {
            let count = CudaContext::device_count()
                .map_err(|e| driver_error("counting CUDA devices", e))?;
            if ordinal >= count.max(0) as usize {
                return Err(unavailable(format!(
                    "cuda:{ordinal} requested but {count} CUDA device(s) present"
                )));
            }
            if replacing {
                // The primary context hit a sticky error: only a reset makes it usable again.
                let device = cudarc::driver::result::device::get(ordinal as i32)
                    .map_err(|e| driver_error("finding the CUDA device", e))?;
                // SAFETY: a valid device; the retired context's buffers are never freed after
                // this (see `CudaModel::drop`).
                unsafe { cudarc::driver::sys::cuDevicePrimaryCtxReset_v2(device) }
                    .result()
                    .map_err(|e| driver_error("resetting the CUDA context", e))?;
            }
            let ctx = CudaContext::new(ordinal)
                .map_err(|e| driver_error("creating a CUDA context", e))?;
            // One stream, used by one thread at a time (`serial`): cudarc's per-allocation
            // events (a record and a wait per launch argument) would only cost.
            // SAFETY: no buffer of this context is ever used on another stream.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx
                .new_stream()
                .map_err(|e| driver_error("creating a CUDA stream", e))?;
            let blas = CudaBlas::new(Arc::clone(&stream))
                .map_err(|e| blas_error("creating a cuBLAS handle", e))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(|e| driver_error("reading the compute capability", e))?;
            let arch = (major * 10 + minor).max(0) as u32;
            let (module, kernels) = load_kernels(&ctx, arch)?;
            let name = ctx.name().unwrap_or_else(|_| "an unnamed device".into());
            let description = format!("{name}, sm_{arch}, kernels: {kernels}");
            let bias_act = module
                .load_function("bias_act")
                .map_err(|e| driver_error("loading bias_act", e))?;
            let lstm_cell = module
                .load_function("lstm_cell")
                .map_err(|e| driver_error("loading lstm_cell", e))?;
            let no_bias = stream
                .alloc_zeros::<f32>(1)
                .map_err(|e| driver_error("allocating a device buffer", e))?;
            Ok(Arc::new(Gpu {
                ordinal,
                ctx,
                stream,
                blas,
                _module: module,
                bias_act,
                lstm_cell,
                no_bias,
                description,
                serial: Mutex::new(()),
                broken: OnceLock::new(),
            }))
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device and how its kernels were built, e.g. "NVIDIA H200, sm_90, kernels: sm_90
    /// CUBIN, NVRTC 12.9".
    pub fn describe(&self) -> &str {
        &self.description
    }

    fn usable(&self) -> Result<()> {
        match self.broken.get() {
            None => Ok(()),
            Some(why) => Err(unavailable(format!(
                "cuda:{} hit a sticky CUDA error ({why}); models loaded before it must be loaded again",
                self.ordinal
            ))),
        }
    }

    /// Turns a driver error into ours; a sticky one retires this context for good.
    fn failed(self: &Arc<Self>, what: &str, err: DriverError) -> Error {
        if is_sticky(err.0) {
            let _ = self.broken.set(format!("{err:?} while {what}"));
            DEVICES.retire(self.ordinal, self);
        }
        driver_error(what, err)
    }

    /// `(free, total)` device memory after the stream has drained.
    pub fn mem_get_info(self: &Arc<Self>) -> Result<(usize, usize)> {
        self.usable()?;
        guarded("reading device memory", || {
            self.stream
                .synchronize()
                .map_err(|e| self.failed("synchronizing", e))?;
            self.ctx
                .mem_get_info()
                .map_err(|e| driver_error("reading device memory", e))
        })
    }

    /// `DEVICE_OUT_OF_MEMORY` unless `bytes` more fit in what `cuMemGetInfo` reports free.
    fn check_free(self: &Arc<Self>, bytes: usize, what: &str) -> Result<()> {
        let (free, total) = self.mem_get_info()?;
        if bytes > free {
            return Err(out_of_memory(format!(
                "{what} needs {bytes} device bytes; cuda:{} has {free} of {total} free",
                self.ordinal
            )));
        }
        Ok(())
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
        self: &Arc<Self>,
        y: &mut CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        rows: usize,
        cols: usize,
        act: Activation,
    ) -> Result<()> {
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
        let elements = (rows as u64).saturating_mul(cols as u64);
        let Some(config) = launch_config(elements) else {
            return Ok(());
        };
        let (rows, cols, has_bias) = (rows as u64, cols as u64, i32::from(bias.is_some()));
        let mut launch = self.stream.launch_builder(&self.bias_act);
        launch
            .arg(y)
            .arg(bias.unwrap_or(&self.no_bias))
            .arg(&has_bias)
            .arg(&rows)
            .arg(&cols)
            .arg(&code);
        // SAFETY: the kernel reads and writes `rows × cols` elements of `y` and `cols` of `bias`.
        unsafe { launch.launch(config) }
            .map(|_| ())
            .map_err(|e| self.failed("launching bias_act", e))
    }
}

/// Builds the kernels for architecture `arch` (e.g. 90) and loads them: CUBIN, else PTX.
fn load_kernels(ctx: &Arc<CudaContext>, arch: u32) -> Result<(Arc<CudaModule>, String)> {
    let version = nvrtc::version()?;
    let supported = nvrtc::supported_archs()?;
    let mut failures = Vec::new();
    for target in nvrtc::targets(arch, &supported) {
        let built = nvrtc::compile(nvrtc::KERNELS, target).and_then(|bytes| {
            let image = match target {
                nvrtc::Target::Cubin(_) => Ptx::from_binary(bytes),
                nvrtc::Target::Ptx(_) => Ptx::from_src(String::from_utf8_lossy(&bytes)),
            };
            ctx.load_module(image)
                .map_err(|e| driver_error(&format!("loading the {target}"), e))
        });
        match built {
            Ok(module) => return Ok((module, format!("{target}, {version}"))),
            Err(e) => failures.push(e.message),
        }
    }
    if failures.is_empty() {
        failures.push(format!(
            "it supports none at or below sm_{arch} ({supported:?})"
        ));
    }
    Err(unavailable(format!(
        "{version} built no kernels this sm_{arch} device loads: {}",
        failures.join("; ")
    )))
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

/// What a model's device workspace is counted against: the cache's byte bound.
pub trait Budget {
    /// Makes room for `bytes` more (evicting other models), or fails saying why.
    fn reserve(&self, bytes: usize) -> Result<()>;
    /// `bytes` reserved before are freed.
    fn release(&self, bytes: usize);
}

/// Host→device copies are made in pieces of this many floats, each under the device lock, so
/// predictions of other models interleave with a large upload.
const UPLOAD_CHUNK: usize = 8 << 20;

/// A model whose weights live wholly in device memory.
pub struct CudaModel {
    gpu: Arc<Gpu>,
    spec: ModelSpec,
    dense: Vec<GpuDense>,
    lstm: Vec<GpuLstm>,
    workspace: Mutex<Option<GpuWorkspace>>,
    /// A workspace larger than this is freed after its call (the cache's `tensorCacheBytes`).
    keep_workspace: usize,
    weight_bytes: usize,
    ledger: Arc<Ledger>,
}

impl CudaModel {
    /// Copies every tensor to the device after checking it has room. On failure
    /// (`DEVICE_OUT_OF_MEMORY`) whatever was uploaded is freed before returning.
    pub fn upload(
        gpu: &Arc<Gpu>,
        file: &ModelFile,
        ledger: Arc<Ledger>,
        keep_workspace: usize,
    ) -> Result<CudaModel> {
        gpu.usable()?;
        check_batch(&file.spec, 1)?;
        gpu.check_free(file.weights.bytes(), "uploading the model")?;
        let mut model = CudaModel {
            gpu: Arc::clone(gpu),
            spec: file.spec.clone(),
            dense: Vec::new(),
            lstm: Vec::new(),
            workspace: Mutex::new(None),
            keep_workspace,
            weight_bytes: 0,
            ledger,
        };
        guarded("uploading a model", || {
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
                            weight_ih: model.copy(w.tensor(layer.weight_ih))?,
                            weight_hh: model.copy(w.tensor(layer.weight_hh))?,
                            bias: model.copy(&bias)?,
                            inputs: layer.inputs,
                            hidden: layer.hidden,
                        };
                        model.lstm.push(entry);
                    }
                    head.clone()
                }
            };
            for spec in dense_specs {
                let weight = model.copy(w.tensor(spec.weight))?;
                let bias = match spec.bias {
                    Some(b) => Some(model.copy(w.tensor(b))?),
                    None => None,
                };
                model.dense.push(GpuDense { weight, bias, spec });
            }
            let _serial = gpu.serial.lock();
            gpu.stream
                .synchronize()
                .map_err(|e| gpu.failed("uploading weights", e))
        })?;
        Ok(model)
    }

    /// One tensor to the device, counted in the ledger.
    fn copy(&mut self, host: &[f32]) -> Result<CudaSlice<f32>> {
        let gpu = Arc::clone(&self.gpu);
        // SAFETY: every element is written by the copies below before any read.
        let mut slice = unsafe { gpu.stream.alloc::<f32>(host.len().max(1)) }
            .map_err(|e| gpu.failed("allocating device memory for weights", e))?;
        let bytes = slice.len() * 4;
        self.weight_bytes += bytes;
        self.ledger.allocated(Bucket::Gpu, bytes);
        for (i, piece) in host.chunks(UPLOAD_CHUNK).enumerate() {
            let at = i * UPLOAD_CHUNK;
            let _serial = gpu.serial.lock();
            gpu.stream
                .memcpy_htod(piece, &mut slice.slice_mut(at..at + piece.len()))
                .map_err(|e| gpu.failed("copying weights to the device", e))?;
        }
        Ok(slice)
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Runs `batch` samples; `input` and `out` are host slices of the spec's lengths. A
    /// workspace for a larger batch than the last is reserved in `budget` and checked against
    /// the device's free memory first; one over `keep_workspace` bytes is freed afterwards.
    pub fn forward(
        &self,
        input: &[f32],
        batch: usize,
        out: &mut [f32],
        budget: &dyn Budget,
    ) -> Result<()> {
        self.gpu.usable()?;
        let bytes = check_batch(&self.spec, batch)?;
        guarded("running a model on the GPU", || {
            let mut slot = self.workspace.lock();
            if slot.as_ref().is_none_or(|ws| ws.batch < batch) {
                if let Some(old) = slot.take() {
                    self.free_workspace(old, budget);
                }
                budget.reserve(bytes)?;
                match self.alloc_workspace(batch, bytes) {
                    Ok(ws) => *slot = Some(ws),
                    Err(e) => {
                        budget.release(bytes);
                        return Err(e);
                    }
                }
            }
            let ws = slot
                .as_mut()
                .ok_or_else(|| Error::internal("GPU workspace missing"))?;
            let ran = {
                let _serial = self.gpu.serial.lock();
                self.run(ws, input, batch, out)
            };
            if ws.bytes > self.keep_workspace {
                if let Some(ws) = slot.take() {
                    self.free_workspace(ws, budget);
                }
            }
            ran
        })
    }

    fn free_workspace(&self, ws: GpuWorkspace, budget: &dyn Budget) {
        let bytes = ws.bytes;
        let _ = self.gpu.ctx.bind_to_thread();
        drop(ws);
        self.ledger.freed(Bucket::Gpu, bytes);
        budget.release(bytes);
    }

    fn alloc_workspace(&self, batch: usize, bytes: usize) -> Result<GpuWorkspace> {
        self.gpu
            .check_free(bytes, &format!("a workspace for batch {batch}"))?;
        let layout = WorkspaceLayout::new(&self.spec, batch)
            .ok_or_else(|| Error::invalid_argument(format!("batch {batch} is too large")))?;
        let alloc = |len: usize| {
            // SAFETY: every buffer is written before it is read (input by the copy, the rest
            // by the GEMMs and kernels that produce them, h and c by their memset).
            unsafe { self.gpu.stream.alloc::<f32>(len.max(1)) }
                .map_err(|e| self.gpu.failed("allocating a device workspace", e))
        };
        let ws = GpuWorkspace {
            batch,
            bytes,
            input: alloc(layout.input)?,
            ping: alloc(layout.dense)?,
            pong: alloc(layout.dense)?,
            proj: alloc(layout.proj)?,
            seq_a: alloc(layout.seq)?,
            seq_b: alloc(layout.seq)?,
            h: alloc(layout.state)?,
            c: alloc(layout.state)?,
        };
        self.ledger.allocated(Bucket::Gpu, bytes);
        Ok(ws)
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
            .map_err(|e| gpu.failed("copying input to the device", e))?;
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
                .map_err(|e| gpu.failed("clearing LSTM state", e))?;
            gpu.stream
                .memset_zeros(c)
                .map_err(|e| gpu.failed("clearing LSTM state", e))?;
            let cells = (batch as u64).saturating_mul(layer.hidden as u64);
            let Some(config) = launch_config(cells) else {
                continue;
            };
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
                let sizes = [batch as u64, steps as u64, layer.hidden as u64, t as u64];
                let write_seq = i32::from(!top);
                let mut launch = gpu.stream.launch_builder(&gpu.lstm_cell);
                launch
                    .arg(&*proj)
                    .arg(&layer.bias)
                    .arg(&mut *h)
                    .arg(&mut *c)
                    .arg(&mut *seq_b)
                    .arg(&sizes[0])
                    .arg(&sizes[1])
                    .arg(&sizes[2])
                    .arg(&sizes[3])
                    .arg(&write_seq);
                // SAFETY: the kernel touches `batch × hidden` cells of h and c, and rows of
                // proj and seq_b within the sizes allocated for this batch.
                unsafe { launch.launch(config) }
                    .map_err(|e| gpu.failed("launching lstm_cell", e))?;
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
            .map_err(|e| gpu.failed("copying output to the host", e))?;
        gpu.stream
            .synchronize()
            .map_err(|e| gpu.failed("running the model", e))
    }
}

impl Drop for CudaModel {
    fn drop(&mut self) {
        let workspace = self.workspace.get_mut().take();
        let bytes = workspace.as_ref().map_or(0, |ws| ws.bytes) + self.weight_bytes;
        self.ledger.freed(Bucket::Gpu, bytes);
        if self.gpu.broken.get().is_some() {
            // The context was reset: these pointers may belong to new allocations now.
            std::mem::forget(workspace);
            std::mem::forget(std::mem::take(&mut self.dense));
            std::mem::forget(std::mem::take(&mut self.lstm));
            return;
        }
        // Dropped from any thread (a GC finalizer, a pool thread): bind the context first.
        let _ = self.gpu.ctx.bind_to_thread();
        drop(workspace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::format::tests::{mlp, write};

    #[test]
    fn without_a_driver_open_is_device_unavailable_and_does_not_panic() {
        if driver_present() {
            return;
        }
        let err = Gpu::open(0).err().unwrap();
        assert_eq!(err.code, ErrorCode::DeviceUnavailable);
        assert!(err.message.contains("no CUDA driver"), "{}", err.message);
    }

    #[test]
    fn launches_cover_any_element_count_with_a_bounded_grid() {
        assert!(launch_config(0).is_none());
        for n in [
            1u64,
            255,
            256,
            257,
            1 << 31,
            (1 << 31) + 4096,
            1 << 32,
            (1 << 40) + 3,
        ] {
            let c = launch_config(n).unwrap();
            let threads = u64::from(c.grid_dim.0) * u64::from(c.block_dim.0);
            assert!(c.grid_dim.0 >= 1 && u64::from(c.grid_dim.0) <= MAX_BLOCKS);
            // Every element is reached by the grid-stride loop; none is skipped by truncation
            // (the old launch cast `n` to u32: 2³² became a grid of 0).
            assert!(threads >= n.min(MAX_BLOCKS * u64::from(BLOCK)), "{n}");
            assert_eq!(
                threads,
                n.div_ceil(256).min(MAX_BLOCKS) * 256,
                "{n}: no larger than needed"
            );
        }
    }

    #[test]
    fn the_size_check_allows_a_layer_of_2_31_floats_and_stops_at_cublas_limits() {
        let wide =
            crate::models::format::ModelFile::from_bytes(&mlp(&[1, 4096, 1], "relu,none", 1))
                .unwrap()
                .spec;
        // 4096 × 524 288 = 2³¹ floats in one layer: the old `int` index wrapped here.
        let bytes = check_batch(&wide, 524_289).unwrap();
        let layout = WorkspaceLayout::new(&wide, 524_289).unwrap();
        assert!(layout.dense > 1 << 31);
        assert_eq!(bytes, 4 * (524_289 + 2 * layout.dense + 5));
        let e = check_batch(&wide, i32::MAX as usize + 1).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("cuBLAS"), "{}", e.message);

        let v = |n: usize| vec![0.1f32; n];
        let lstm = write(
            &[("arch", "lstm"), ("sequence_length", "1000")],
            &[
                ("weight_ih_l0", vec![16, 3], v(48)),
                ("weight_hh_l0", vec![16, 4], v(64)),
            ],
        );
        let lstm = crate::models::format::ModelFile::from_bytes(&lstm)
            .unwrap()
            .spec;
        assert!(check_batch(&lstm, 2_000_000).is_ok());
        let e = check_batch(&lstm, 3_000_000).unwrap_err();
        assert!(e.message.contains("sequence length"), "{}", e.message);
    }

    #[test]
    fn sticky_errors_are_the_ones_that_poison_a_context() {
        assert!(is_sticky(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS));
        assert!(is_sticky(CUresult::CUDA_ERROR_LAUNCH_FAILED));
        assert!(!is_sticky(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert!(!is_sticky(CUresult::CUDA_ERROR_INVALID_VALUE));
    }
}
