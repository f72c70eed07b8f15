//! Every `#[napi]` item: thin classes owning an `Arc` of a core object. This layer converts
//! values and errors and nothing more.

mod completion;
mod errors;
mod metrics;
mod models;
mod pool;
mod streams;
mod values;

pub(crate) use completion::{promise, settled, spawn};
pub(crate) use errors::js_error;

/// The tokio runtime napi-rs runs async work on.
pub(crate) fn runtime() -> tokio::runtime::Handle {
    napi::bindgen_prelude::within_runtime_if_available(tokio::runtime::Handle::current)
}
