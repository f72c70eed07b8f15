//! Neural models: safetensors format, CPU and CUDA backends, the cache and its memory
//! accounting. No napi here: `cargo test --no-default-features` runs all of it.

pub mod cache;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod format;
pub mod matmul;
pub mod memory;
pub mod timing;

pub use cache::{
    predict, CacheConfig, CacheStats, ModelCache, ModelHandle, ModelInfo, ModelSource, Prediction,
};
pub use device::DeviceRequest;
pub use memory::MemoryUsage;
