#![doc = include_str!("../README.md")]
//! quartermaster: three domains (connections, models, metrics) and one thin binding layer.

pub mod error;
pub mod metrics;
pub mod models;
pub mod pool;
pub mod shared;

#[cfg(feature = "napi")]
mod binding;
