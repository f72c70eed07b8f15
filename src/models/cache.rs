//! The model cache: the one strong owner of every model's memory. Exact LRU under a
//! count bound and a byte bound, an idle TTL, and single-flight loading.
//!
//! Handles hold a `Weak` to their model. A prediction upgrades it for its duration, so an
//! evicted model's memory is freed the moment its last in-flight call returns, and a handle
//! to an evicted model fails with `MODEL_EVICTED`.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use lru::LruCache;
use parking_lot::Mutex;
use tokio::sync::OnceCell;

use crate::error::{Error, ErrorCode, Result};
use crate::metrics::{CacheRecorder, EvictionReason, Registry};
use crate::models::cpu;
use crate::models::cuda::{Budget, CudaModel};
use crate::models::device::{Device, DeviceRequest};
use crate::models::format::{ModelFile, ModelSpec};
use crate::models::memory::{Accounting, Bucket, Ledger, MemoryUsage, TensorCache};
use crate::models::timing::ForwardTimes;
use crate::shared::{Directory, Shareable};

/// Cache settings; see `ModelCacheOptions` in the binding for their documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Label in metrics.
    pub name: String,
    pub max_models: usize,
    /// Bound on resident weight bytes (host and device).
    pub max_bytes: u64,
    /// A model unused for this long expires.
    pub ttl: Option<Duration>,
    /// Period of the background sweep of expired models.
    pub cleanup_interval: Option<Duration>,
    pub device: DeviceRequest,
    /// Per-model bound on idle workspace bytes kept for reuse.
    pub tensor_cache_bytes: usize,
    /// Threads one CPU forward pass may use (a large batch is split across them); 0: all.
    pub threads: usize,
    /// `predict` runs a CPU model on the calling thread when its forward pass at that batch
    /// size is estimated under this; zero never does.
    pub inline_below: Duration,
}

/// The default of [`CacheConfig::inline_below`]: the most a `predict` may hold the caller.
pub const INLINE_BELOW: Duration = Duration::from_micros(20);

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            name: "models".into(),
            max_models: 100,
            max_bytes: 4 << 30,
            ttl: Some(Duration::from_secs(3600)),
            cleanup_interval: Some(Duration::from_secs(300)),
            device: DeviceRequest::Auto,
            tensor_cache_bytes: 64 << 20,
            threads: 0,
            inline_below: INLINE_BELOW,
        }
    }
}

/// Where to read a model from.
pub enum ModelSource {
    /// Memory-mapped; aligned F32 weights are used in place.
    Path(PathBuf),
    /// The bytes of a safetensors file (copied into the model).
    Bytes(Vec<u8>),
}

/// What `stats()` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheStats {
    pub models: u64,
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
    /// Evictions by the count bound, the byte bound, or explicitly (expirations are separate).
    pub evictions: u64,
    pub expirations: u64,
    /// Host bytes held: weights and workspaces, including evicted models finishing a call.
    pub bytes: u64,
    pub gpu_bytes: u64,
    pub device: String,
    /// Handles the garbage collector collected without `release()`.
    pub collected_handles: u64,
}

enum Backend {
    /// The file and its weights' packed copies.
    Cpu(ModelFile, cpu::PackedWeights),
    Cuda(Box<CudaModel>),
}

/// One resident model. Owned by the cache; borrowed by predictions in flight.
pub struct ModelEntry {
    id: String,
    source: Option<PathBuf>,
    spec: ModelSpec,
    backend: Backend,
    tensors: TensorCache,
    ledger: Arc<Ledger>,
    /// Host weight bytes, freed with the entry.
    host_weight_bytes: usize,
    /// Bytes counted against `max_bytes`: weights.
    resident_bytes: u64,
    /// Device workspace bytes counted against `max_bytes` too (changed under the state lock).
    workspace_bytes: AtomicU64,
    /// The cache, for the workspace's share of the byte bound.
    cache: Weak<CacheInner>,
    evicted: AtomicBool,
    /// Nanoseconds since the cache's epoch at the last use.
    last_used: AtomicU64,
    /// Threads a forward pass may use (resolved from the config).
    threads: usize,
    inline_below: Duration,
    times: ForwardTimes,
}

impl Drop for ModelEntry {
    fn drop(&mut self) {
        self.ledger.freed(Bucket::ModelData, self.host_weight_bytes);
    }
}

/// Facts about a model that stay true after it is evicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub id: String,
    /// The file it was loaded from (`None` for bytes).
    pub source: Option<PathBuf>,
    pub arch: &'static str,
    pub device: String,
    pub input_size: usize,
    pub output_size: usize,
    pub sequence_length: usize,
}

type LoadSlot = Arc<OnceCell<Result<Arc<ModelEntry>>>>;

struct State {
    lru: LruCache<String, Arc<ModelEntry>>,
    resident_bytes: u64,
}

pub(crate) struct CacheInner {
    config: CacheConfig,
    device: Device,
    state: Mutex<State>,
    loading: Mutex<HashMap<String, LoadSlot>>,
    accounting: Arc<Accounting>,
    recorder: Arc<CacheRecorder>,
    epoch: Instant,
}

/// A cache of models. Cloning shares the cache.
#[derive(Clone)]
pub struct ModelCache {
    inner: Arc<CacheInner>,
}

impl Shareable for ModelCache {
    type Weak = Weak<CacheInner>;

    fn downgrade(&self) -> Self::Weak {
        Arc::downgrade(&self.inner)
    }

    fn upgrade(weak: &Self::Weak) -> Option<Self> {
        weak.upgrade().map(|inner| ModelCache { inner })
    }

    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

/// A caller's reference to a model: does not keep it resident.
#[derive(Clone)]
pub struct ModelHandle {
    entry: Weak<ModelEntry>,
    cache: Weak<CacheInner>,
    info: Arc<ModelInfo>,
}

impl ModelHandle {
    /// The owner of this handle was garbage-collected without releasing it: count it.
    pub fn count_collected(&self) {
        if let Some(cache) = self.cache.upgrade() {
            cache.recorder.collected_handles.inc();
        }
    }
}

impl CacheInner {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn expired(&self, entry: &ModelEntry, now: u64) -> bool {
        self.config.ttl.is_some_and(|ttl| {
            now.saturating_sub(entry.last_used.load(Ordering::Relaxed)) >= ttl.as_nanos() as u64
        })
    }

    /// Marks an entry evicted and counts it; its memory goes when the last in-flight call ends.
    fn retire(&self, state: &mut State, entry: &Arc<ModelEntry>, reason: EvictionReason) {
        entry.evicted.store(true, Ordering::Release);
        state.resident_bytes -=
            entry.resident_bytes + entry.workspace_bytes.load(Ordering::Relaxed);
        self.recorder.record_eviction(reason);
        self.recorder.models.set(state.lru.len() as i64);
    }

    /// A resident, unexpired model, promoted to most recently used.
    fn lookup(&self, id: &str, retired: &mut Vec<Arc<ModelEntry>>) -> Option<Arc<ModelEntry>> {
        let now = self.now();
        let mut state = self.state.lock();
        let entry = Arc::clone(state.lru.get(id)?);
        if self.expired(&entry, now) {
            state.lru.pop(id);
            self.retire(&mut state, &entry, EvictionReason::Expired);
            retired.push(entry);
            return None;
        }
        entry.last_used.store(now, Ordering::Relaxed);
        Some(entry)
    }

    /// Makes room under both bounds (LRU first), then inserts.
    fn insert(
        &self,
        id: &str,
        entry: Arc<ModelEntry>,
        retired: &mut Vec<Arc<ModelEntry>>,
    ) -> Result<()> {
        if entry.resident_bytes > self.config.max_bytes {
            return Err(Error::invalid_argument(format!(
                "model '{id}' needs {} bytes, more than maxBytes ({})",
                entry.resident_bytes, self.config.max_bytes
            )));
        }
        let mut state = self.state.lock();
        if let Some(old) = state.lru.pop(id) {
            self.retire(&mut state, &old, EvictionReason::Explicit);
            retired.push(old);
        }
        while state.lru.len() >= self.config.max_models {
            let Some((_, old)) = state.lru.pop_lru() else {
                break;
            };
            self.retire(&mut state, &old, EvictionReason::Count);
            retired.push(old);
        }
        while state.resident_bytes + entry.resident_bytes > self.config.max_bytes {
            let Some((_, old)) = state.lru.pop_lru() else {
                break;
            };
            self.retire(&mut state, &old, EvictionReason::Bytes);
            retired.push(old);
        }
        entry.last_used.store(self.now(), Ordering::Relaxed);
        state.resident_bytes += entry.resident_bytes;
        state.lru.put(id.to_string(), entry);
        self.recorder.models.set(state.lru.len() as i64);
        Ok(())
    }

    fn build(self: &Arc<Self>, id: &str, source: ModelSource) -> Result<ModelEntry> {
        let (file, source) = match source {
            ModelSource::Path(path) => (ModelFile::open(&path)?, Some(path)),
            ModelSource::Bytes(bytes) => (ModelFile::from_bytes(&bytes)?, None),
        };
        let model_rec = self.recorder.model(id);
        *model_rec.device.write() = self.device.to_string();
        let ledger = Arc::new(Ledger::new(
            Arc::clone(&self.accounting),
            Arc::clone(&self.recorder),
            model_rec,
        ));
        let spec = file.spec.clone();
        let (backend, host_weight_bytes, resident_bytes) = match &self.device {
            Device::Cpu => {
                let packed = cpu::PackedWeights::new(&file.spec, &file.weights);
                let bytes = file.weights.bytes() + packed.bytes();
                ledger.allocated(Bucket::ModelData, bytes);
                (Backend::Cpu(file, packed), bytes, bytes as u64)
            }
            Device::Cuda(_) => {
                let gpu = self
                    .device
                    .gpu()
                    .ok_or_else(|| Error::internal("no GPU"))??;
                let keep = self.config.tensor_cache_bytes;
                let model = CudaModel::upload(&gpu, &file, Arc::clone(&ledger), keep)?;
                let bytes = model.weight_bytes() as u64;
                (Backend::Cuda(Box::new(model)), 0, bytes)
            }
        };
        Ok(ModelEntry {
            id: id.to_string(),
            source,
            spec,
            backend,
            tensors: TensorCache::new(self.config.tensor_cache_bytes, Arc::clone(&ledger)),
            ledger,
            host_weight_bytes,
            resident_bytes,
            workspace_bytes: AtomicU64::new(0),
            cache: Arc::downgrade(self),
            evicted: AtomicBool::new(false),
            last_used: AtomicU64::new(self.now()),
            threads: cpu::threads(self.config.threads),
            inline_below: self.config.inline_below,
            times: ForwardTimes::default(),
        })
    }

    fn handle(self: &Arc<Self>, entry: &Arc<ModelEntry>) -> ModelHandle {
        ModelHandle {
            entry: Arc::downgrade(entry),
            cache: Arc::downgrade(self),
            info: Arc::new(ModelInfo {
                id: entry.id.clone(),
                source: entry.source.clone(),
                arch: entry.spec.arch_name(),
                device: self.device.to_string(),
                input_size: entry.spec.input_size,
                output_size: entry.spec.output_size,
                sequence_length: entry.spec.sequence_length,
            }),
        }
    }

    fn sweep(&self) -> usize {
        let now = self.now();
        let mut retired = Vec::new();
        {
            let mut state = self.state.lock();
            // LRU order is last-use order, so expired models sit at the LRU end.
            while let Some((_, oldest)) = state.lru.peek_lru() {
                if !self.expired(oldest, now) {
                    break;
                }
                let Some((_, entry)) = state.lru.pop_lru() else {
                    break;
                };
                self.retire(&mut state, &entry, EvictionReason::Expired);
                retired.push(entry);
            }
        }
        retired.len()
    }
}

impl ModelCache {
    /// A cache reporting into the global metrics registry.
    pub fn new(config: CacheConfig) -> Result<ModelCache> {
        ModelCache::with_registry(config, &Registry::global())
    }

    /// The cache shared process-wide (across `worker_threads`) as `config.name`, made from
    /// `config` if none is alive; true when this call made it. A live one asked for with
    /// other settings is `INVALID_ARGUMENT`. It lives while any holder (a cache or model
    /// handle) does.
    pub fn shared(config: CacheConfig) -> Result<(ModelCache, bool)> {
        static SHARED: Directory<ModelCache, CacheConfig> = Directory::new("model cache");
        let name = config.name.clone();
        let claimed = SHARED.claim(&name, config.clone(), || ModelCache::new(config))?;
        Ok((claimed.object, claimed.created))
    }

    pub fn with_registry(config: CacheConfig, registry: &Registry) -> Result<ModelCache> {
        if config.max_models == 0 {
            return Err(Error::invalid_argument("maxModels must be at least 1"));
        }
        let device = Device::resolve(config.device)?;
        let recorder = registry.register_cache(&config.name);
        Ok(ModelCache {
            inner: Arc::new(CacheInner {
                device,
                state: Mutex::new(State {
                    lru: LruCache::unbounded(),
                    resident_bytes: 0,
                }),
                loading: Mutex::new(HashMap::new()),
                accounting: Arc::new(Accounting::default()),
                recorder,
                epoch: Instant::now(),
                config,
            }),
        })
    }

    pub fn device(&self) -> String {
        self.inner.device.to_string()
    }

    pub fn recorder(&self) -> &Arc<CacheRecorder> {
        &self.inner.recorder
    }

    /// Loads `id` from `source`, or returns it if resident (the source is then not read).
    /// Concurrent loads of one id share a single load.
    pub fn load(
        &self,
        id: String,
        source: ModelSource,
    ) -> impl Future<Output = Result<ModelHandle>> + Send + 'static {
        let inner = Arc::clone(&self.inner);
        async move {
            if id.is_empty() {
                return Err(Error::invalid_argument("model id must not be empty"));
            }
            let mut retired = Vec::new();
            if let Some(entry) = inner.lookup(&id, &mut retired) {
                inner.recorder.hits.inc();
                return Ok(inner.handle(&entry));
            }
            drop(retired);
            inner.recorder.misses.inc();
            let slot: LoadSlot = Arc::clone(inner.loading.lock().entry(id.clone()).or_default());
            let result = slot
                .get_or_init(|| {
                    let inner = Arc::clone(&inner);
                    let slot = Arc::clone(&slot);
                    let id = id.clone();
                    async move {
                        let result = load_once(&inner, &id, source).await;
                        let mut loading = inner.loading.lock();
                        if loading.get(&id).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                            loading.remove(&id);
                        }
                        result
                    }
                })
                .await
                .clone();
            result.map(|entry| inner.handle(&entry))
        }
    }

    /// The resident model `id`, if any (counted as a hit or a miss).
    pub fn get(&self, id: &str) -> Option<ModelHandle> {
        let mut retired = Vec::new();
        let found = self.inner.lookup(id, &mut retired);
        match &found {
            Some(_) => self.inner.recorder.hits.inc(),
            None => self.inner.recorder.misses.inc(),
        }
        found.map(|e| self.inner.handle(&e))
    }

    /// Evicts `id`; returns whether it was resident.
    pub fn evict(&self, id: &str) -> bool {
        let removed = {
            let mut state = self.inner.state.lock();
            let removed = state.lru.pop(id);
            if let Some(entry) = &removed {
                self.inner
                    .retire(&mut state, entry, EvictionReason::Explicit);
            }
            removed
        };
        removed.is_some()
    }

    /// Evicts every expired model now; returns how many.
    pub fn cleanup(&self) -> usize {
        self.inner.sweep()
    }

    /// Evicts every model; returns how many.
    pub fn clear(&self) -> usize {
        let retired: Vec<Arc<ModelEntry>> = {
            let mut state = self.inner.state.lock();
            let mut all = Vec::with_capacity(state.lru.len());
            while let Some((_, entry)) = state.lru.pop_lru() {
                self.inner
                    .retire(&mut state, &entry, EvictionReason::Explicit);
                all.push(entry);
            }
            all
        };
        retired.len()
    }

    /// Ids from most to least recently used.
    pub fn ids(&self) -> Vec<String> {
        self.inner
            .state
            .lock()
            .lru
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn stats(&self) -> CacheStats {
        let models = self.inner.state.lock().lru.len() as u64;
        let rec = &self.inner.recorder;
        let (hits, misses) = (rec.hits.get(), rec.misses.get());
        let usage = self.memory_usage();
        CacheStats {
            models,
            hits,
            misses,
            hit_rate: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            evictions: rec.evictions(),
            expirations: rec.expirations.get(),
            bytes: usage.total_bytes - usage.gpu_bytes,
            gpu_bytes: usage.gpu_bytes,
            device: self.device(),
            collected_handles: rec.collected_handles.get(),
        }
    }

    /// Every byte the cache's models hold, including evicted models finishing a call.
    pub fn memory_usage(&self) -> MemoryUsage {
        self.inner.accounting.usage()
    }

    /// Gives up this owner of the cache and returns what the cache still holds: zero when
    /// this was the last owner and every model has been freed.
    pub fn release(self) -> MemoryUsage {
        let weak = Arc::downgrade(&self.inner);
        drop(self);
        weak.upgrade()
            .map(|c| c.accounting.usage())
            .unwrap_or_default()
    }

    /// `(free, total)` device memory when the cache runs on a GPU.
    pub fn device_memory(&self) -> Option<Result<(usize, usize)>> {
        self.inner
            .device
            .gpu()
            .map(|gpu| gpu.and_then(|g| g.mem_get_info()))
    }

    /// The GPU and how its kernels were built, when the cache runs on one.
    pub fn device_info(&self) -> Option<Result<String>> {
        self.inner
            .device
            .gpu()
            .map(|gpu| gpu.map(|g| g.describe().to_string()))
    }

    pub fn ttl(&self) -> Option<Duration> {
        self.inner.config.ttl
    }

    /// The periodic sweep, when `cleanup_interval` is set. Spawn it on a tokio runtime; it holds
    /// only a weak reference and ends when the cache is dropped.
    pub fn sweeper(&self) -> Option<impl Future<Output = ()> + Send + 'static> {
        let period = self.inner.config.cleanup_interval?;
        let cache = Arc::downgrade(&self.inner);
        Some(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match cache.upgrade() {
                    Some(inner) => {
                        inner.sweep();
                    }
                    None => break,
                }
            }
        })
    }
}

async fn load_once(
    inner: &Arc<CacheInner>,
    id: &str,
    source: ModelSource,
) -> Result<Arc<ModelEntry>> {
    let mut retired = Vec::new();
    // A load that finished between our lookup and joining the slot.
    if let Some(entry) = inner.lookup(id, &mut retired) {
        return Ok(entry);
    }
    let started = Instant::now();
    let (builder, owned_id) = (Arc::clone(inner), id.to_string());
    let built = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            builder.build(&owned_id, source)
        }))
    })
    .await;
    let entry = match built {
        Ok(Ok(Ok(entry))) => Arc::new(entry),
        Ok(Ok(Err(err))) => {
            inner.recorder.load_failures.inc();
            return Err(err);
        }
        _ => {
            inner.recorder.load_failures.inc();
            return Err(Error::internal(format!("loading model '{id}' panicked")));
        }
    };
    if let Err(err) = inner.insert(id, Arc::clone(&entry), &mut retired) {
        inner.recorder.load_failures.inc();
        return Err(err);
    }
    inner.recorder.loads.inc();
    inner.recorder.load_latency.record(started.elapsed());
    Ok(entry)
}

impl ModelHandle {
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// A handle to the model again: the resident one, or a fresh load from the file it was
    /// loaded from. Models loaded from bytes cannot be reloaded this way.
    pub fn reload(&self) -> Result<impl Future<Output = Result<ModelHandle>> + Send + 'static> {
        let inner = self.cache.upgrade().ok_or_else(|| {
            Error::new(
                ErrorCode::ModelEvicted,
                format!(
                    "model '{}' cannot be reloaded: its cache is gone",
                    self.info.id
                ),
            )
        })?;
        let source = self.info.source.clone().ok_or_else(|| {
            Error::invalid_argument(format!(
                "model '{}' was loaded from bytes; load it again with them",
                self.info.id
            ))
        })?;
        Ok(ModelCache { inner }.load(self.info.id.clone(), ModelSource::Path(source)))
    }

    /// Whether the model is still resident (not evicted).
    pub fn is_resident(&self) -> bool {
        self.entry
            .upgrade()
            .is_some_and(|e| !e.evicted.load(Ordering::Acquire))
    }

    /// The TTL of the handle's cache, while the cache exists.
    pub fn cache_ttl(&self) -> Option<Duration> {
        self.cache.upgrade().and_then(|c| c.config.ttl)
    }

    /// Everything the handle's cache holds (zero once the cache is gone).
    pub fn cache_memory_usage(&self) -> MemoryUsage {
        self.cache
            .upgrade()
            .map(|c| c.accounting.usage())
            .unwrap_or_default()
    }

    /// What the model holds now; zero once it is evicted and its last call has ended.
    pub fn memory_usage(&self) -> MemoryUsage {
        self.entry
            .upgrade()
            .map(|e| e.ledger.usage())
            .unwrap_or_default()
    }

    fn evicted_error(&self) -> Error {
        Error::new(
            ErrorCode::ModelEvicted,
            format!(
                "model '{}' was evicted from the cache; load it again",
                self.info.id
            ),
        )
    }

    /// Checks the input length and reserves a workspace. `input_len` is in floats; `batch`,
    /// when given, must match it exactly.
    pub fn prepare(&self, input_len: usize, batch: Option<u32>) -> Result<Prediction> {
        let entry = self.entry.upgrade().ok_or_else(|| self.evicted_error())?;
        if entry.evicted.load(Ordering::Acquire) {
            return Err(self.evicted_error());
        }
        let sample = entry.spec.sample_len();
        let batch = match batch {
            Some(0) => return Err(Error::invalid_argument("batch must be at least 1")),
            Some(b) => {
                let b = b as usize;
                let expected = b
                    .checked_mul(sample)
                    .ok_or_else(|| Error::invalid_argument("batch is too large"))?;
                if input_len != expected {
                    return Err(Error::invalid_argument(format!(
                        "input has {input_len} floats; expected {expected} (batch {b} × {sample} per sample)"
                    )));
                }
                b
            }
            None => {
                if input_len == 0 || !input_len.is_multiple_of(sample) {
                    return Err(Error::invalid_argument(format!(
                        "input has {input_len} floats; expected a positive multiple of {sample} (floats per sample)"
                    )));
                }
                input_len / sample
            }
        };
        if let Some(cache) = self.cache.upgrade() {
            entry.last_used.store(cache.now(), Ordering::Relaxed);
            let mut state = cache.state.lock();
            if state
                .lru
                .peek(&entry.id)
                .is_some_and(|e| Arc::ptr_eq(e, &entry))
            {
                state.lru.promote(&entry.id);
            }
        }
        let output_len = batch * entry.spec.output_size;
        let workspace_len = match entry.backend {
            Backend::Cpu(..) => cpu::workspace_len(&entry.spec, batch, entry.threads)?,
            Backend::Cuda(_) => 0,
        };
        let total = [input_len, output_len, workspace_len]
            .into_iter()
            .try_fold(0usize, |a, n| a.checked_add(n))
            .ok_or_else(|| Error::invalid_argument("batch is too large"))?;
        let buffer = entry.tensors.take(total).map_err(|bytes| {
            Error::new(
                ErrorCode::DeviceOutOfMemory,
                format!(
                    "cannot allocate a {bytes}-byte workspace for model '{}'",
                    entry.id
                ),
            )
        })?;
        Ok(Prediction {
            entry,
            buffer,
            batch,
            input_len,
            output_len,
            done: false,
        })
    }
}

/// One inference call: holds the model alive and owns its workspace until dropped.
pub struct Prediction {
    entry: Arc<ModelEntry>,
    /// `[input | output | workspace]`, borrowed from the model's tensor cache.
    buffer: Vec<f32>,
    batch: usize,
    input_len: usize,
    output_len: usize,
    done: bool,
}

impl Prediction {
    pub fn input_mut(&mut self) -> &mut [f32] {
        &mut self.buffer[..self.input_len]
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// True when this call may run on the caller's thread: a CPU model whose measured forward
    /// pass at this batch size is under the cache's `inline_below` (the first call at a batch
    /// size is measured off the caller's thread). GPU calls never do: they wait for the device.
    pub fn fits_calling_thread(&self) -> bool {
        matches!(self.entry.backend, Backend::Cpu(..))
            && self.entry.times.under(self.batch, self.entry.inline_below)
    }

    /// Runs the model on the input; the result is then in [`output`](Self::output).
    pub fn run(&mut self) -> Result<()> {
        let started = Instant::now();
        let (input, rest) = self.buffer.split_at_mut(self.input_len);
        let (output, workspace) = rest.split_at_mut(self.output_len);
        let (entry, batch) = (&self.entry, self.batch);
        // A panic here would be a bug; it must still never unwind into Node.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &entry.backend {
            Backend::Cpu(file, packed) => {
                let (spec, threads) = (&entry.spec, entry.threads);
                cpu::forward(
                    spec,
                    &file.weights,
                    packed,
                    input,
                    batch,
                    threads,
                    workspace,
                    output,
                );
                Ok(())
            }
            Backend::Cuda(model) => model.forward(input, batch, output, &WorkspaceBudget(entry)),
        }))
        .map_err(|_| Error::internal(format!("model '{}' failed while running", entry.id)))??;
        self.done = true;
        let elapsed = started.elapsed();
        self.entry.times.record(self.batch, elapsed);
        let model = self.entry.ledger.model_recorder();
        model.predicts.inc();
        model.predict_latency.record(elapsed);
        self.entry
            .ledger
            .cache_recorder()
            .predict_latency
            .record(elapsed);
        Ok(())
    }

    /// Runs the prediction on rayon's pool and hands the outcome to `done` there. (Keeping the
    /// thread spinning for the next call, as onnxruntime's intra-op threads do, was measured
    /// slower on 2 cores: the spinner takes the core the main thread needs to settle.)
    pub fn run_on_pool(self, done: impl FnOnce(Result<Prediction>) + Send + 'static) {
        rayon::spawn(move || {
            let mut p = self;
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.run()))
                .unwrap_or_else(|_| Err(Error::internal("the prediction panicked")));
            done(ran.map(|()| p));
        });
    }

    pub fn output(&self) -> &[f32] {
        debug_assert!(self.done);
        &self.buffer[self.input_len..self.input_len + self.output_len]
    }
}

impl Drop for Prediction {
    fn drop(&mut self) {
        self.entry
            .tensors
            .give_back(std::mem::take(&mut self.buffer));
    }
}

/// A GPU model's workspace counted against its cache's `max_bytes`, as weights are: room is
/// made by evicting other models, least recently used first.
struct WorkspaceBudget<'a>(&'a Arc<ModelEntry>);

impl Budget for WorkspaceBudget<'_> {
    fn reserve(&self, bytes: usize) -> Result<()> {
        let entry = self.0;
        let Some(cache) = entry.cache.upgrade() else {
            return Ok(());
        };
        let bytes = bytes as u64;
        let mut retired = Vec::new();
        let mut state = cache.state.lock();
        if entry.evicted.load(Ordering::Acquire) {
            return Ok(()); // finishing an in-flight call; no longer counted
        }
        let own = entry.resident_bytes + entry.workspace_bytes.load(Ordering::Relaxed);
        if own + bytes > cache.config.max_bytes {
            return Err(Error::new(
                ErrorCode::DeviceOutOfMemory,
                format!(
                    "model '{}' needs a {bytes}-byte GPU workspace for this batch; with its {own} bytes that is more than maxBytes ({})",
                    entry.id, cache.config.max_bytes
                ),
            ));
        }
        while state.resident_bytes + bytes > cache.config.max_bytes {
            let oldest = state
                .lru
                .iter()
                .rev()
                .find(|(_, e)| !Arc::ptr_eq(e, entry))
                .map(|(id, _)| id.clone());
            let Some(old) = oldest.and_then(|id| state.lru.pop(&id)) else {
                break;
            };
            cache.retire(&mut state, &old, EvictionReason::Bytes);
            retired.push(old);
        }
        state.resident_bytes += bytes;
        entry.workspace_bytes.fetch_add(bytes, Ordering::Relaxed);
        drop(state);
        drop(retired); // freed outside the lock
        Ok(())
    }

    fn release(&self, bytes: usize) {
        let entry = self.0;
        let Some(cache) = entry.cache.upgrade() else {
            return;
        };
        let bytes = (bytes as u64).min(entry.workspace_bytes.load(Ordering::Relaxed));
        let mut state = cache.state.lock();
        entry.workspace_bytes.fetch_sub(bytes, Ordering::Relaxed);
        if !entry.evicted.load(Ordering::Acquire) {
            state.resident_bytes -= bytes;
        }
    }
}

/// Runs one prediction synchronously: the shared core of `predict` and `predictSync`.
pub fn predict(handle: &ModelHandle, input: &[f32], batch: Option<u32>) -> Result<Vec<f32>> {
    let mut p = handle.prepare(input.len(), batch)?;
    p.input_mut().copy_from_slice(input);
    p.run()?;
    Ok(p.output().to_vec())
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<ModelCache>();
    is::<ModelHandle>();
    is::<Prediction>();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::format::tests::mlp;

    fn cache(max_models: usize, max_bytes: u64, ttl_ms: Option<u64>) -> ModelCache {
        ModelCache::with_registry(
            CacheConfig {
                name: "test".into(),
                max_models,
                max_bytes,
                ttl: ttl_ms.map(Duration::from_millis),
                cleanup_interval: None,
                device: DeviceRequest::Cpu,
                tensor_cache_bytes: 1 << 20,
                ..CacheConfig::default()
            },
            &Registry::new(),
        )
        .unwrap()
    }

    fn model(seed: u64) -> ModelSource {
        ModelSource::Bytes(mlp(&[4, 8, 2], "relu,none", seed))
    }

    const MODEL_BYTES: u64 = (4 * 8 + 8 + 8 * 2 + 2) * 4;

    #[tokio::test]
    async fn lru_order_and_count_bound() {
        let c = cache(2, u64::MAX, None);
        c.load("a".into(), model(1)).await.unwrap();
        c.load("b".into(), model(2)).await.unwrap();
        assert!(c.get("a").is_some()); // a is now most recent
        c.load("c".into(), model(3)).await.unwrap();
        assert_eq!(c.ids(), vec!["c", "a"]);
        assert_eq!(c.recorder().evictions_count.get(), 1);
    }

    #[tokio::test]
    async fn byte_bound_evicts_least_recent_until_it_fits() {
        let c = cache(10, MODEL_BYTES * 2, None);
        for id in ["a", "b", "c"] {
            c.load(id.into(), model(1)).await.unwrap();
        }
        assert_eq!(c.ids(), vec!["c", "b"]);
        assert_eq!(c.recorder().evictions_bytes.get(), 1);
        let tiny = cache(10, 10, None);
        let err = tiny.load("x".into(), model(1)).await.err().unwrap();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert_eq!(tiny.memory_usage(), MemoryUsage::default());
    }

    #[tokio::test]
    async fn ttl_expires_on_access_and_on_cleanup() {
        let c = cache(10, u64::MAX, Some(30));
        c.load("a".into(), model(1)).await.unwrap();
        c.load("b".into(), model(2)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(c.get("a").is_none());
        assert_eq!(c.cleanup(), 1);
        assert_eq!(c.stats().expirations, 2);
        assert_eq!(c.memory_usage(), MemoryUsage::default());
    }

    #[tokio::test]
    async fn periodic_sweep_expires_without_access() {
        let c = ModelCache::with_registry(
            CacheConfig {
                ttl: Some(Duration::from_millis(20)),
                cleanup_interval: Some(Duration::from_millis(10)),
                device: DeviceRequest::Cpu,
                ..CacheConfig::default()
            },
            &Registry::new(),
        )
        .unwrap();
        tokio::spawn(c.sweeper().unwrap());
        c.load("a".into(), model(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(c.stats().models, 0);
        assert_eq!(c.stats().expirations, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_loads_of_one_id_load_once() {
        let c = cache(10, u64::MAX, None);
        let loads: Vec<_> = (0..16)
            .map(|_| tokio::spawn(c.load("a".into(), model(1))))
            .collect();
        for l in loads {
            l.await.unwrap().unwrap();
        }
        assert_eq!(c.recorder().loads.get(), 1);
        assert_eq!(c.stats().models, 1);
    }

    #[tokio::test]
    async fn evicted_model_fails_and_in_flight_call_keeps_memory_until_done() {
        let c = cache(10, u64::MAX, None);
        let h = c.load("a".into(), model(1)).await.unwrap();
        let mut p = h.prepare(8, None).unwrap();
        assert_eq!(p.batch(), 2);
        assert!(c.evict("a"));
        assert!(
            c.memory_usage().model_data_bytes > 0,
            "in flight keeps it alive"
        );
        p.input_mut().fill(0.5);
        p.run().unwrap();
        assert_eq!(p.output().len(), 4);
        assert_eq!(
            h.prepare(4, None).err().unwrap().code,
            ErrorCode::ModelEvicted
        );
        drop(p);
        assert_eq!(c.memory_usage(), MemoryUsage::default());
        assert_eq!(h.memory_usage(), MemoryUsage::default());
        assert_eq!(
            h.prepare(4, None).err().unwrap().code,
            ErrorCode::ModelEvicted
        );
        assert_eq!(
            c.recorder().allocations.get(),
            c.recorder().deallocations.get()
        );
    }

    #[tokio::test]
    async fn an_evicted_model_reloads_from_its_file_when_asked() {
        let dir = std::env::temp_dir().join(format!("qm-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.safetensors");
        std::fs::write(&path, mlp(&[4, 8, 2], "relu,none", 5)).unwrap();
        let c = cache(10, u64::MAX, None);
        let h = c
            .load("a".into(), ModelSource::Path(path.clone()))
            .await
            .unwrap();
        let before = predict(&h, &[0.5; 4], None).unwrap();
        c.evict("a");
        let again = h.reload().unwrap().await.unwrap();
        assert_eq!(predict(&again, &[0.5; 4], None).unwrap(), before);
        assert_eq!(c.recorder().loads.get(), 2);
        let bytes = c.load("b".into(), model(1)).await.unwrap();
        assert_eq!(
            bytes.reload().err().unwrap().code,
            ErrorCode::InvalidArgument
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn a_tiny_forward_pass_may_run_on_the_caller_once_measured_and_within_the_bound() {
        let config = |inline_below| CacheConfig {
            device: DeviceRequest::Cpu,
            inline_below,
            ..CacheConfig::default()
        };
        // A bound a debug build's first runs fit under, too.
        let c =
            ModelCache::with_registry(config(Duration::from_secs(1)), &Registry::new()).unwrap();
        let h = c.load("a".into(), model(1)).await.unwrap();
        let fits = |batch: usize| h.prepare(batch * 4, None).unwrap().fits_calling_thread();
        assert!(
            !fits(1),
            "the first call at a batch size is measured, not guessed"
        );
        predict(&h, &[0.5; 4], None).unwrap();
        assert!(fits(1));
        assert!(!fits(2), "another batch size is measured on its own");
        let never = ModelCache::with_registry(config(Duration::ZERO), &Registry::new()).unwrap();
        let h = never.load("a".into(), model(1)).await.unwrap();
        predict(&h, &[0.5; 4], None).unwrap();
        assert!(!h.prepare(4, None).unwrap().fits_calling_thread());
    }

    #[tokio::test]
    async fn input_length_is_checked() {
        let c = cache(10, u64::MAX, None);
        let h = c.load("a".into(), model(1)).await.unwrap();
        let e = predict(&h, &[0.0; 5], None).err().unwrap();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        let e = predict(&h, &[0.0; 8], Some(3)).err().unwrap();
        assert!(e.message.contains("expected 12"), "{}", e.message);
        assert_eq!(predict(&h, &[0.0; 8], Some(2)).unwrap().len(), 4);
        let usage = h.memory_usage();
        assert_eq!(usage.model_data_bytes, MODEL_BYTES);
        assert!(usage.cache_bytes > 0 && usage.temp_buffer_bytes == 0);
    }

    #[tokio::test]
    async fn bad_files_are_model_format_and_leave_the_cache_empty() {
        let c = cache(10, u64::MAX, None);
        let e = c
            .load("a".into(), ModelSource::Bytes(vec![1, 2, 3]))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::ModelFormat);
        let e = c
            .load(
                "a".into(),
                ModelSource::Path("/nonexistent/x.safetensors".into()),
            )
            .await
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::ModelNotFound);
        assert_eq!(c.stats().models, 0);
        assert_eq!(c.recorder().load_failures.get(), 2);
    }
}
