//! Exact accounting of every byte a model holds, and the bounded tensor cache that
//! recycles inference workspaces so the hot path does not allocate.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::metrics::{CacheRecorder, ModelRecorder};

/// What a model (or a whole cache) holds, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Weights in host memory (owned or memory-mapped).
    pub model_data_bytes: u64,
    /// Idle workspaces kept for reuse by the tensor cache.
    pub cache_bytes: u64,
    /// Workspaces in use by running predictions.
    pub temp_buffer_bytes: u64,
    /// Weights and workspaces in device memory.
    pub gpu_bytes: u64,
    pub total_bytes: u64,
}

/// Which bucket a buffer counts under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    ModelData,
    Cache,
    Temp,
    Gpu,
}

/// Four byte counters.
#[derive(Debug, Default)]
pub struct Accounting {
    counters: [AtomicI64; 4],
}

impl Accounting {
    fn add(&self, bucket: Bucket, bytes: i64) {
        self.counters[bucket as usize].fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn usage(&self) -> MemoryUsage {
        let get = |b: Bucket| self.counters[b as usize].load(Ordering::Relaxed).max(0) as u64;
        let (model_data_bytes, cache_bytes, temp_buffer_bytes, gpu_bytes) = (
            get(Bucket::ModelData),
            get(Bucket::Cache),
            get(Bucket::Temp),
            get(Bucket::Gpu),
        );
        MemoryUsage {
            model_data_bytes,
            cache_bytes,
            temp_buffer_bytes,
            gpu_bytes,
            total_bytes: model_data_bytes + cache_bytes + temp_buffer_bytes + gpu_bytes,
        }
    }
}

/// One model's accounting, mirrored into its cache's totals and the metrics gauges.
pub struct Ledger {
    own: Accounting,
    cache: Arc<Accounting>,
    recorder: Arc<CacheRecorder>,
    model: Arc<ModelRecorder>,
}

impl Ledger {
    pub fn new(
        cache: Arc<Accounting>,
        recorder: Arc<CacheRecorder>,
        model: Arc<ModelRecorder>,
    ) -> Ledger {
        Ledger {
            own: Accounting::default(),
            cache,
            recorder,
            model,
        }
    }

    /// A native buffer of `bytes` was allocated.
    pub fn allocated(&self, bucket: Bucket, bytes: usize) {
        self.recorder.allocations.inc();
        self.shift(bucket, bytes as i64);
    }

    /// A native buffer of `bytes` was freed.
    pub fn freed(&self, bucket: Bucket, bytes: usize) {
        self.recorder.deallocations.inc();
        self.shift(bucket, -(bytes as i64));
    }

    /// A buffer changed bucket without being allocated or freed.
    pub fn moved(&self, from: Bucket, to: Bucket, bytes: usize) {
        self.shift(from, -(bytes as i64));
        self.shift(to, bytes as i64);
    }

    fn shift(&self, bucket: Bucket, delta: i64) {
        self.own.add(bucket, delta);
        self.cache.add(bucket, delta);
        if bucket == Bucket::Gpu {
            self.recorder.gpu_bytes.add(delta);
            self.model.gpu_bytes.add(delta);
        } else {
            self.recorder.host_bytes.add(delta);
            self.model.host_bytes.add(delta);
        }
    }

    pub fn usage(&self) -> MemoryUsage {
        self.own.usage()
    }

    pub fn model_recorder(&self) -> &Arc<ModelRecorder> {
        &self.model
    }

    pub fn cache_recorder(&self) -> &Arc<CacheRecorder> {
        &self.recorder
    }
}

/// Per-model pool of workspaces, holding at most `limit` idle bytes. Checked-out buffers count
/// as temporary bytes; returned ones stay (as cache bytes) while they fit under the limit.
pub struct TensorCache {
    limit: usize,
    idle: Mutex<Vec<Vec<f32>>>,
    ledger: Arc<Ledger>,
}

fn bytes_of(buf: &Vec<f32>) -> usize {
    buf.capacity() * std::mem::size_of::<f32>()
}

impl TensorCache {
    pub fn new(limit: usize, ledger: Arc<Ledger>) -> TensorCache {
        TensorCache {
            limit,
            idle: Mutex::new(Vec::new()),
            ledger,
        }
    }

    /// A buffer of exactly `floats` elements (contents unspecified), reused when one fits.
    pub fn take(&self, floats: usize) -> Result<Vec<f32>, usize> {
        let reused = {
            let mut idle = self.idle.lock();
            let best = idle
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= floats)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| idle.swap_remove(i))
        };
        let mut buf = match reused {
            Some(buf) => {
                self.ledger
                    .moved(Bucket::Cache, Bucket::Temp, bytes_of(&buf));
                buf
            }
            None => {
                // Round up so a slowly growing batch does not allocate on every call.
                let capacity = floats.checked_next_power_of_two().unwrap_or(floats);
                let mut buf = Vec::new();
                buf.try_reserve_exact(capacity)
                    .or_else(|_| buf.try_reserve_exact(floats))
                    .map_err(|_| floats.saturating_mul(4))?;
                self.ledger.allocated(Bucket::Temp, bytes_of(&buf));
                buf
            }
        };
        buf.resize(floats, 0.0);
        Ok(buf)
    }

    /// Returns a buffer from [`take`](Self::take): kept if it fits under the limit, else freed.
    pub fn give_back(&self, buf: Vec<f32>) {
        let bytes = bytes_of(&buf);
        let mut idle = self.idle.lock();
        let held: usize = idle.iter().map(bytes_of).sum();
        if held + bytes <= self.limit {
            idle.push(buf);
            drop(idle);
            self.ledger.moved(Bucket::Temp, Bucket::Cache, bytes);
        } else {
            drop(idle);
            drop(buf);
            self.ledger.freed(Bucket::Temp, bytes);
        }
    }
}

impl Drop for TensorCache {
    fn drop(&mut self) {
        for buf in self.idle.get_mut().drain(..) {
            self.ledger.freed(Bucket::Cache, bytes_of(&buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Registry;

    #[test]
    fn tensor_cache_reuses_within_its_bound_and_accounts_exactly() {
        let reg = Registry::new();
        let rec = reg.register_cache("t");
        let totals = Arc::new(Accounting::default());
        let ledger = Arc::new(Ledger::new(
            Arc::clone(&totals),
            Arc::clone(&rec),
            rec.model("m"),
        ));
        let cache = TensorCache::new(1024, Arc::clone(&ledger));
        let a = cache.take(100).unwrap();
        assert_eq!(ledger.usage().temp_buffer_bytes, 128 * 4);
        cache.give_back(a);
        assert_eq!(ledger.usage().cache_bytes, 512);
        assert_eq!(ledger.usage().temp_buffer_bytes, 0);
        let b = cache.take(120).unwrap();
        assert_eq!(rec.allocations.get(), 1, "reused");
        let c = cache.take(200).unwrap();
        cache.give_back(b);
        cache.give_back(c); // 512 + 1024 > limit: freed
        assert_eq!(rec.deallocations.get(), 1);
        assert_eq!(ledger.usage().cache_bytes, 512);
        drop(cache);
        assert_eq!(ledger.usage(), MemoryUsage::default());
        assert_eq!(totals.usage(), MemoryUsage::default());
        assert_eq!(rec.host_bytes.get(), 0);
    }
}
