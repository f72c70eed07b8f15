#![doc = include_str!("../README.md")]
//! quartermaster: three domains (connections, models, metrics) and one thin binding layer.

// Opt-in allocator (`--features jemalloc`); RELIABILITY.md compares it with the system one.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

pub mod error;
pub mod metrics;
pub mod models;
pub mod pool;
pub mod shared;

#[cfg(feature = "napi")]
mod binding;
