//! `ModelCache` and `Model`: neural models in host or GPU memory, cached, run and freed.
//! Conversion only; the cache, the backends and the accounting live in `crate::models`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use napi::bindgen_prelude::{
    Float32ArraySlice, ObjectFinalize, PromiseRaw, ToNapiValue, TypeName, Uint8ArraySlice, Unknown,
};
use napi::{sys, Env, JsValue, ValueType};
use napi_derive::napi;

use crate::error::{Error, Result as CoreResult};
use crate::metrics::{LiveResource, LiveToken, Registry};
use crate::models::{
    self as core, CacheConfig, DeviceRequest, MemoryUsage, ModelHandle, ModelSource,
};

use super::{js_error, promise, settled, spawn};

/// Settings for a `ModelCache`. Every field is optional.
#[napi(object)]
pub struct ModelCacheOptions {
    /// Most models resident at once (LRU eviction beyond it). Default 100.
    pub max_models: Option<f64>,
    /// Most bytes of weights resident at once, host and GPU together (LRU eviction beyond it).
    /// On a CPU with AVX-512 a layer of 64 or more outputs also keeps a packed copy of its
    /// weights for the kernel, counted here too (`memoryUsage().modelDataBytes`). Default 4 GiB. Note: `4 << 30` is 0 in JavaScript; write `4 * 2 ** 30`.
    pub max_bytes: Option<f64>,
    /// A model not used (loaded, got or run) for this long expires. Default one hour; 0 disables.
    pub ttl_ms: Option<f64>,
    /// Period of the background sweep of expired models. Default five minutes; 0 disables.
    /// The sweep never keeps the process alive.
    pub cleanup_interval_ms: Option<f64>,
    /// `'auto'` (CUDA when a driver and device are present, else CPU), `'cpu'`, `'cuda'` or
    /// `'cuda:N'`. Default `'auto'`.
    pub device: Option<String>,
    /// Per-model bound on idle inference workspaces kept for reuse. Default 64 MiB.
    pub tensor_cache_bytes: Option<f64>,
    /// Threads one CPU forward pass may use: a large batch is split across them (a small one
    /// runs on one). Default 0: every core (rayon's pool, `RAYON_NUM_THREADS` to change it).
    pub threads: Option<f64>,
    /// `predict` runs a CPU model on the calling (main) thread and returns a settled promise
    /// when the model's forward pass at that batch size is estimated (moving average of its
    /// measured runs) under this many microseconds. Default 20; 0 always uses the compute pool.
    pub inline_micros: Option<f64>,
    /// Label in metrics. Default `models`.
    pub name: Option<String>,
}

/// Options for one prediction.
#[napi(object)]
pub struct PredictOptions {
    /// Samples in the input. When given, the input must hold exactly `batch × inputSize ×
    /// sequenceLength` floats; otherwise the batch is inferred from the input length.
    pub batch: Option<f64>,
}

/// Bytes a model (or a whole cache) holds. Exact.
#[napi(object, object_from_js = false)]
pub struct ModelMemoryUsage {
    /// Weights in host memory (owned or memory-mapped).
    pub model_data_bytes: f64,
    /// Idle workspaces kept for reuse (bounded by `tensorCacheBytes` per model).
    pub cache_bytes: f64,
    /// Workspaces used by predictions running now.
    pub temp_buffer_bytes: f64,
    /// Weights and workspaces in GPU memory.
    pub gpu_bytes: f64,
    /// The sum of the four above.
    pub total_bytes: f64,
}

impl From<MemoryUsage> for ModelMemoryUsage {
    fn from(u: MemoryUsage) -> Self {
        ModelMemoryUsage {
            model_data_bytes: u.model_data_bytes as f64,
            cache_bytes: u.cache_bytes as f64,
            temp_buffer_bytes: u.temp_buffer_bytes as f64,
            gpu_bytes: u.gpu_bytes as f64,
            total_bytes: u.total_bytes as f64,
        }
    }
}

/// What a `ModelCache` holds and how well it is doing.
#[napi(object, object_from_js = false)]
pub struct ModelCacheStats {
    /// Models resident now.
    pub models: u32,
    /// `load`/`get` calls that found the model resident.
    pub hits: f64,
    /// `load`/`get` calls that did not (a load that waited on another load of the id counts here).
    pub misses: f64,
    /// `hits / (hits + misses)`, 0 before the first lookup.
    pub hit_rate: f64,
    /// Evictions by the count bound, the byte bound or `evict()`/`clear()`.
    pub evictions: f64,
    /// Models that expired (TTL).
    pub expirations: f64,
    /// Host bytes held: weights and workspaces, including evicted models finishing a call.
    pub bytes: f64,
    /// Device bytes held: weights and workspaces.
    pub gpu_bytes: f64,
    /// `'cpu'` or `'cuda:N'`.
    pub device: String,
    /// Handles the garbage collector collected without `release()` (they are released then).
    pub collected_handles: f64,
}

/// Free and total memory of the cache's GPU.
#[napi(object, object_from_js = false)]
pub struct DeviceMemory {
    /// Free device bytes (`cuMemGetInfo`).
    pub free: f64,
    /// Total device bytes.
    pub total: f64,
}

/// Native bytes reported to V8 for one cache, reconciled whenever an env is at hand so GC
/// pressure follows what the cache really holds.
struct ExternalMemory {
    reported: AtomicI64,
    /// False for a handle to a shared cache made on another thread.
    enabled: bool,
}

impl ExternalMemory {
    fn sync(&self, env: &Env, actual: MemoryUsage) {
        if !self.enabled {
            return;
        }
        let actual = actual.total_bytes.min(i64::MAX as u64) as i64;
        let before = self.reported.swap(actual, Ordering::AcqRel);
        if actual != before {
            // Best effort: failing to inform the GC must not fail the call.
            let _ = env.adjust_external_memory(actual - before);
        }
    }
}

fn bytes_option(name: &str, value: Option<f64>, default: u64) -> CoreResult<u64> {
    match value {
        None => Ok(default),
        Some(v)
            if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= 9_007_199_254_740_991.0 =>
        {
            Ok(v as u64)
        }
        Some(v) => Err(Error::invalid_argument(format!(
            "{name} is {v}; expected a whole number of at least 0"
        ))),
    }
}

fn type_name(value: &Unknown) -> &'static str {
    match value.get_type() {
        Ok(ValueType::Undefined) => "undefined",
        Ok(ValueType::Null) => "null",
        Ok(ValueType::Boolean) => "a boolean",
        Ok(ValueType::Number) => "a number",
        Ok(ValueType::String) => "a string",
        Ok(ValueType::BigInt) => "a bigint",
        Ok(ValueType::Function) => "a function",
        _ => "an object of another type",
    }
}

/// The prediction input: a `Float32Array`, or `INVALID_ARGUMENT`.
fn float32_input<'a>(value: &Unknown<'a>) -> CoreResult<Float32ArraySlice<'a>> {
    // SAFETY: the conversion checks that the value is a Float32Array and fails otherwise.
    unsafe { value.cast::<Float32ArraySlice<'a>>() }.map_err(|_| {
        Error::invalid_argument(format!(
            "input must be a Float32Array, got {}",
            type_name(value)
        ))
    })
}

fn batch_option(options: Option<PredictOptions>) -> CoreResult<Option<u32>> {
    match options.and_then(|o| o.batch) {
        None => Ok(None),
        Some(b) if b.fract() == 0.0 && (1.0..=f64::from(u32::MAX)).contains(&b) => {
            Ok(Some(b as u32))
        }
        Some(b) => Err(Error::invalid_argument(format!(
            "batch is {b}; expected a whole number of at least 1"
        ))),
    }
}

fn model_id(value: &Unknown) -> CoreResult<String> {
    if value.get_type().ok() == Some(ValueType::String) {
        // SAFETY: checked to be a string just above.
        if let Ok(id) = unsafe { value.cast::<String>() } {
            if !id.is_empty() {
                return Ok(id);
            }
        }
    }
    Err(Error::invalid_argument(format!(
        "model id must be a non-empty string, got {}",
        type_name(value)
    )))
}

fn model_source(value: &Unknown) -> CoreResult<ModelSource> {
    if value.get_type().ok() == Some(ValueType::String) {
        // SAFETY: checked to be a string just above.
        if let Ok(path) = unsafe { value.cast::<String>() } {
            return Ok(ModelSource::Path(path.into()));
        }
    }
    // SAFETY: the conversion checks that the value is a Uint8Array (a Buffer is one).
    match unsafe { value.cast::<Uint8ArraySlice>() } {
        Ok(bytes) => Ok(ModelSource::Bytes(bytes.to_vec())),
        Err(_) => Err(Error::invalid_argument(format!(
            "model source must be a file path or a Buffer/Uint8Array, got {}",
            type_name(value)
        ))),
    }
}

fn config(options: Option<ModelCacheOptions>) -> CoreResult<CacheConfig> {
    let o = options.unwrap_or(ModelCacheOptions {
        max_models: None,
        max_bytes: None,
        ttl_ms: None,
        cleanup_interval_ms: None,
        device: None,
        tensor_cache_bytes: None,
        threads: None,
        inline_micros: None,
        name: None,
    });
    let defaults = CacheConfig::default();
    let millis =
        |name: &str, v: Option<f64>, default: Option<Duration>| -> CoreResult<Option<Duration>> {
            let default_ms = default.map_or(0, |d| d.as_millis() as u64);
            let ms = bytes_option(name, v, default_ms)?;
            Ok((ms > 0).then(|| Duration::from_millis(ms)))
        };
    let max_bytes = bytes_option("maxBytes", o.max_bytes, defaults.max_bytes)?;
    if max_bytes == 0 {
        return Err(Error::invalid_argument(
            "maxBytes is 0; no model would fit (note: 4 << 30 is 0 in JavaScript, write 4 * 2 ** 30)",
        ));
    }
    let max_models = bytes_option("maxModels", o.max_models, defaults.max_models as u64)?;
    if max_models == 0 {
        return Err(Error::invalid_argument("maxModels must be at least 1"));
    }
    let max_models = usize::try_from(max_models)
        .map_err(|_| Error::invalid_argument("maxModels is too large"))?;
    Ok(CacheConfig {
        name: o.name.unwrap_or(defaults.name),
        max_models,
        max_bytes,
        ttl: millis("ttlMs", o.ttl_ms, defaults.ttl)?,
        cleanup_interval: millis(
            "cleanupIntervalMs",
            o.cleanup_interval_ms,
            defaults.cleanup_interval,
        )?,
        device: match o.device {
            Some(d) => d.parse::<DeviceRequest>()?,
            None => defaults.device,
        },
        tensor_cache_bytes: bytes_option(
            "tensorCacheBytes",
            o.tensor_cache_bytes,
            defaults.tensor_cache_bytes as u64,
        )?
        .try_into()
        .map_err(|_| Error::invalid_argument("tensorCacheBytes is too large"))?,
        threads: bytes_option("threads", o.threads, 0)?
            .try_into()
            .map_err(|_| Error::invalid_argument("threads is too large"))?,
        inline_below: Duration::from_micros(bytes_option(
            "inlineMicros",
            o.inline_micros,
            defaults.inline_below.as_micros() as u64,
        )?),
    })
}

impl ModelCache {
    /// Wraps a core cache; `created` starts its sweep and reports its bytes to this thread's
    /// V8 heap (a shared cache is reported once, by the thread that made it).
    fn started(cache: core::ModelCache, created: bool) -> Self {
        if created {
            if let Some(sweep) = cache.sweeper() {
                napi::bindgen_prelude::spawn(sweep);
            }
        }
        ModelCache {
            core: cache,
            external: Arc::new(ExternalMemory {
                reported: AtomicI64::new(0),
                enabled: created,
            }),
        }
    }
}

/// A cache of neural models in host or GPU memory: the one owner of their memory. Models are
/// evicted least-recently-used first when `maxModels` or `maxBytes` would be exceeded, expire
/// after `ttlMs` unused, and are freed as soon as their in-flight predictions end.
#[napi(custom_finalize)]
pub struct ModelCache {
    core: core::ModelCache,
    external: Arc<ExternalMemory>,
}

#[napi]
impl ModelCache {
    /// Creates a cache. With `device: 'cuda'` and no usable GPU it throws `DEVICE_UNAVAILABLE`;
    /// with `'auto'` it falls back to the CPU (see `device`).
    #[napi(constructor, catch_unwind)]
    pub fn new(env: Env, options: Option<ModelCacheOptions>) -> napi::Result<Self> {
        let cache = config(options)
            .and_then(core::ModelCache::new)
            .map_err(|e| js_error(&env, e))?;
        Ok(ModelCache::started(cache, true))
    }

    /// The cache shared process-wide under `options.name` (required), created on the first
    /// call: every `worker_thread` asking with the same name and options gets the same
    /// models, so N workers do not hold N copies of the weights. Asking with other options is
    /// `INVALID_ARGUMENT`. Its native bytes are reported to the V8 heap of the thread that
    /// created it.
    #[napi(factory, catch_unwind)]
    pub fn shared(env: Env, options: ModelCacheOptions) -> napi::Result<Self> {
        let (cache, created) = match options.name {
            Some(_) => config(Some(options)).and_then(core::ModelCache::shared),
            None => Err(Error::invalid_argument(
                "a shared model cache needs options.name",
            )),
        }
        .map_err(|e| js_error(&env, e))?;
        Ok(ModelCache::started(cache, created))
    }

    /// `'cpu'` or `'cuda:N'`: where every model of this cache runs.
    #[napi(getter)]
    pub fn device(&self) -> String {
        self.core.device()
    }

    /// Loads model `id` from a safetensors file path (memory-mapped) or a Buffer, on a
    /// background thread. If `id` is resident it is returned at once and `source` is not read;
    /// concurrent loads of one id load it once. Rejects with `MODEL_NOT_FOUND`, `MODEL_FORMAT`,
    /// `DEVICE_OUT_OF_MEMORY` or `INVALID_ARGUMENT` (larger than `maxBytes`).
    #[napi(
        catch_unwind,
        ts_args_type = "id: string, source: string | Uint8Array",
        ts_return_type = "Promise<Model>"
    )]
    pub fn load<'env>(
        &self,
        env: &'env Env,
        id: Unknown,
        source: Unknown,
    ) -> napi::Result<PromiseRaw<'env, Model>> {
        let load = model_id(&id).and_then(|id| Ok(self.core.load(id, model_source(&source)?)));
        model_promise(
            env,
            load,
            Some(self.core.clone()),
            Arc::clone(&self.external),
            self.core.ttl(),
        )
    }

    /// The resident model `id`, or `null` (counted as a hit or a miss).
    #[napi(ts_args_type = "id: string")]
    pub fn get(&self, env: Env, id: Unknown) -> napi::Result<Option<Model>> {
        let id = model_id(&id).map_err(|e| js_error(&env, e))?;
        Ok(self.core.get(&id).map(|h| {
            Model::new(
                h,
                self.core.clone(),
                Arc::clone(&self.external),
                self.core.ttl(),
            )
        }))
    }

    /// Evicts `id` now; its memory is freed when its in-flight predictions end. Handles to it
    /// then fail with `MODEL_EVICTED`. Returns whether it was resident.
    #[napi(ts_args_type = "id: string")]
    pub fn evict(&self, env: Env, id: Unknown) -> napi::Result<bool> {
        let id = model_id(&id).map_err(|e| js_error(&env, e))?;
        let evicted = self.core.evict(&id);
        self.external.sync(&env, self.core.memory_usage());
        Ok(evicted)
    }

    /// Evicts every expired model now; returns how many.
    #[napi]
    pub fn cleanup(&self, env: Env) -> u32 {
        let n = self.core.cleanup();
        self.external.sync(&env, self.core.memory_usage());
        n as u32
    }

    /// Evicts every model; returns how many.
    #[napi]
    pub fn clear(&self, env: Env) -> u32 {
        let n = self.core.clear();
        self.external.sync(&env, self.core.memory_usage());
        n as u32
    }

    /// Resident model ids, most recently used first.
    #[napi]
    pub fn ids(&self) -> Vec<String> {
        self.core.ids()
    }

    /// Counts and bytes; `hitRate` is `hits / (hits + misses)`.
    #[napi]
    pub fn stats(&self, env: Env) -> ModelCacheStats {
        let s = self.core.stats();
        self.external.sync(&env, self.core.memory_usage());
        ModelCacheStats {
            models: s.models as u32,
            hits: s.hits as f64,
            misses: s.misses as f64,
            hit_rate: s.hit_rate,
            evictions: s.evictions as f64,
            expirations: s.expirations as f64,
            bytes: s.bytes as f64,
            gpu_bytes: s.gpu_bytes as f64,
            device: s.device,
            collected_handles: s.collected_handles as f64,
        }
    }

    /// Every byte the cache's models hold, including evicted models finishing a call.
    #[napi]
    pub fn memory_usage(&self) -> ModelMemoryUsage {
        self.core.memory_usage().into()
    }

    /// Free and total memory of the cache's GPU after a device sync; `null` on the CPU.
    #[napi(catch_unwind)]
    pub fn device_memory(&self, env: Env) -> napi::Result<Option<DeviceMemory>> {
        match self.core.device_memory() {
            None => Ok(None),
            Some(Ok((free, total))) => Ok(Some(DeviceMemory {
                free: free as f64,
                total: total as f64,
            })),
            Some(Err(e)) => Err(js_error(&env, e)),
        }
    }

    /// The GPU and how its kernels were built, e.g. `'NVIDIA H200, sm_90, kernels: sm_90
    /// CUBIN, NVRTC 12.9'` (PTX when NVRTC could not build the device's own CUBIN); `null` on
    /// the CPU.
    #[napi(catch_unwind)]
    pub fn device_info(&self, env: Env) -> napi::Result<Option<String>> {
        self.core
            .device_info()
            .transpose()
            .map_err(|e| js_error(&env, e))
    }
}

impl ObjectFinalize for ModelCache {
    fn finalize(self, env: Env) -> napi::Result<()> {
        // The cache owns its models. Model handles still reachable from JS keep it alive;
        // once the last owner lets go, every model not in flight is freed.
        let ModelCache { core, external } = self;
        external.sync(&env, core.release());
        Ok(())
    }
}

/// A handle to a model in a `ModelCache`. It keeps its cache alive but not the model resident:
/// once evicted, calls fail with `MODEL_EVICTED` (a prediction already running finishes first)
/// until `reload()` is asked for. Release it with `release()` or `using`; a collected handle
/// is released too.
#[napi(custom_finalize)]
pub struct Model {
    handle: Option<ModelHandle>,
    /// Keeps the cache (not the model) alive while the handle is: `(await new
    /// ModelCache().load(…))` must not see its model freed when the cache object is collected.
    cache: Option<core::ModelCache>,
    info: core::ModelInfo,
    external: Arc<ExternalMemory>,
    _live: Option<LiveToken>,
}

impl Model {
    fn new(
        handle: ModelHandle,
        cache: core::ModelCache,
        external: Arc<ExternalMemory>,
        ttl: Option<Duration>,
    ) -> Model {
        let info = handle.info().clone();
        let live = Registry::global().live.track(LiveResource {
            kind: "model",
            name: info.id.clone(),
            acquired_at: Instant::now(),
            threshold: ttl.unwrap_or(Duration::from_secs(3600)),
            stack: None,
        });
        Model {
            handle: Some(handle),
            cache: Some(cache),
            info,
            external,
            _live: Some(live),
        }
    }

    /// Checks the input and copies it into a workspace of the model.
    fn start(
        &self,
        input: &Unknown,
        options: Option<PredictOptions>,
    ) -> CoreResult<core::Prediction> {
        let input = float32_input(input)?;
        let mut p = self
            .handle()?
            .prepare(input.len(), batch_option(options)?)?;
        p.input_mut().copy_from_slice(&input);
        Ok(p)
    }

    fn handle(&self) -> CoreResult<&ModelHandle> {
        self.handle.as_ref().ok_or_else(|| {
            Error::invalid_argument(format!("model '{}' handle was released", self.info.id))
        })
    }
}

#[napi]
impl Model {
    /// The id it was loaded under.
    #[napi(getter)]
    pub fn id(&self) -> String {
        self.info.id.clone()
    }

    /// `'mlp'` or `'lstm'`.
    #[napi(getter)]
    pub fn arch(&self) -> String {
        self.info.arch.to_string()
    }

    /// `'cpu'` or `'cuda:N'`.
    #[napi(getter)]
    pub fn device(&self) -> String {
        self.info.device.clone()
    }

    /// Features per sample (MLP) or per time step (LSTM).
    #[napi(getter)]
    pub fn input_size(&self) -> u32 {
        self.info.input_size as u32
    }

    /// Outputs per sample.
    #[napi(getter)]
    pub fn output_size(&self) -> u32 {
        self.info.output_size as u32
    }

    /// Time steps per sample (1 for an MLP). An input holds `batch × sequenceLength × inputSize`
    /// floats, sample-major then step-major.
    #[napi(getter)]
    pub fn sequence_length(&self) -> u32 {
        self.info.sequence_length as u32
    }

    /// True while the model is in the cache and this handle is not released.
    #[napi(getter)]
    pub fn resident(&self) -> bool {
        self.handle.as_ref().is_some_and(ModelHandle::is_resident)
    }

    /// Runs the model on the compute pool, or — a CPU model whose forward pass at this batch
    /// size is estimated under the cache's `inlineMicros` — on the calling thread, returning a
    /// settled promise. Input: `Float32Array` of `batch × sequenceLength × inputSize` floats;
    /// output: `batch × outputSize`. Rejects with `INVALID_ARGUMENT` (input length, saying
    /// expected vs got) or `MODEL_EVICTED`.
    #[napi(
        catch_unwind,
        ts_args_type = "input: Float32Array, options?: PredictOptions | undefined | null",
        ts_return_type = "Promise<Float32Array>"
    )]
    pub fn predict<'env>(
        &self,
        env: &'env Env,
        input: Unknown,
        options: Option<PredictOptions>,
    ) -> napi::Result<PromiseRaw<'env, PredictOutput>> {
        // The input is copied into the model's workspace here, on the main thread. A tiny
        // forward pass runs right here too: a hand-off to another thread and back costs more
        // than the work. Otherwise the job owns everything it touches (nothing borrowed from a
        // JS object) and runs on rayon's pool (`run_on_pool`), whose idle threads spin
        // briefly before sleeping, so back-to-back calls skip the wake-up a libuv work item
        // pays; the result settles through the batched completion queue.
        let mut prepared = match self.start(&input, options) {
            Ok(p) => p,
            Err(e) => return settled(env, Err(e)),
        };
        if prepared.fits_calling_thread() {
            let ran = prepared.run().map(|()| PredictOutput(prepared));
            if let Some(h) = &self.handle {
                self.external.sync(env, h.cache_memory_usage());
            }
            return settled(env, ran);
        }
        let external = Arc::clone(&self.external);
        let handle = self.handle.clone();
        let (complete, promise) = promise(env, move |env, p: core::Prediction| {
            if let Some(h) = &handle {
                external.sync(env, h.cache_memory_usage());
            }
            Ok(PredictOutput(p))
        })?;
        prepared.run_on_pool(complete);
        Ok(promise)
    }

    /// `predict` on the calling thread, for tiny models where the hop to a worker costs more
    /// than the work. Throws the same errors.
    #[napi(
        catch_unwind,
        ts_args_type = "input: Float32Array, options?: PredictOptions | undefined | null"
    )]
    pub fn predict_sync<'env>(
        &self,
        env: &'env Env,
        input: Unknown,
        options: Option<PredictOptions>,
    ) -> napi::Result<Float32ArraySlice<'env>> {
        let run = || -> CoreResult<core::Prediction> {
            let mut p = self.start(&input, options)?;
            p.run()?;
            Ok(p)
        };
        let p = run().map_err(|e| js_error(env, e))?;
        Float32ArraySlice::copy_from(env, p.output())
    }

    /// A handle to this model again: the resident one, or (after eviction) a fresh load from
    /// the file it was loaded from. Rejects with `INVALID_ARGUMENT` for a model loaded from a
    /// Buffer or a released handle.
    #[napi(catch_unwind, ts_return_type = "Promise<Model>")]
    pub fn reload<'env>(&self, env: &'env Env) -> napi::Result<PromiseRaw<'env, Model>> {
        let reload = self.handle().and_then(ModelHandle::reload);
        let ttl = self.handle.as_ref().and_then(|h| h.cache_ttl());
        model_promise(
            env,
            reload,
            self.cache.clone(),
            Arc::clone(&self.external),
            ttl,
        )
    }

    /// Bytes the model holds now; all zero once it is evicted and its last call has ended.
    #[napi]
    pub fn memory_usage(&self) -> ModelMemoryUsage {
        self.handle
            .as_ref()
            .map(ModelHandle::memory_usage)
            .unwrap_or_default()
            .into()
    }

    /// Releases the handle (idempotent). The model stays in the cache for other callers.
    #[napi]
    pub fn release(&mut self, env: Env) {
        if self.handle.take().is_some() {
            self._live = None;
        }
        if let Some(cache) = self.cache.take() {
            self.external.sync(&env, cache.release());
        }
    }

    /// `using model = await cache.load(…)` releases the handle at the end of the scope.
    #[napi(well_known_symbol = "dispose")]
    pub fn dispose(&mut self, env: Env) {
        self.release(env);
    }
}

/// The promise of a `load` or `reload`: a `Model` handle once `loading` finishes, holding
/// `owner` (its cache) alive. `owner` is `None` only for a released handle, whose reload
/// already failed.
fn model_promise<'env, F>(
    env: &'env Env,
    loading: CoreResult<F>,
    owner: Option<core::ModelCache>,
    external: Arc<ExternalMemory>,
    ttl: Option<Duration>,
) -> napi::Result<PromiseRaw<'env, Model>>
where
    F: std::future::Future<Output = CoreResult<ModelHandle>> + Send + 'static,
{
    let loading = loading.and_then(|l| {
        let owner = owner.ok_or_else(|| Error::internal("a model handle without its cache"))?;
        Ok((l, owner))
    });
    spawn(
        env,
        async move {
            let (loading, owner) = loading?;
            Ok((loading.await?, owner))
        },
        move |env, (handle, owner): (ModelHandle, core::ModelCache)| {
            external.sync(env, handle.cache_memory_usage());
            Ok(Model::new(handle, owner, external, ttl))
        },
    )
}

/// A finished prediction, copied into a new `Float32Array` on the main thread; its workspace
/// goes back to the model's tensor cache right after.
pub struct PredictOutput(core::Prediction);

impl TypeName for PredictOutput {
    fn type_name() -> &'static str {
        "Float32Array"
    }
    fn value_type() -> ValueType {
        ValueType::Object
    }
}

impl ToNapiValue for PredictOutput {
    unsafe fn to_napi_value(env: sys::napi_env, val: Self) -> napi::Result<sys::napi_value> {
        let env = Env::from_raw(env);
        let out = Float32ArraySlice::copy_from(&env, val.0.output())?;
        Ok(out.raw())
    }
}

impl ObjectFinalize for Model {
    fn finalize(mut self, env: Env) -> napi::Result<()> {
        if let Some(handle) = &self.handle {
            handle.count_collected();
        }
        self.release(env);
        Ok(())
    }
}
