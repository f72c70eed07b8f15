//! Core errors become JavaScript `Error`s with a stable `code` (and `sqlstate`, `phase`).

use napi::bindgen_prelude::{JsObjectValue, Object};
use napi::JsValue;
use napi::{Env, Status};

use crate::error::Error;

/// Builds the JS error object for a core error: `message`, `code`, and `sqlstate` / `phase` when known.
pub(crate) fn js_error(env: &Env, err: Error) -> napi::Error {
    match build(env, &err) {
        Ok(obj) => napi::Error::from(obj.to_unknown()),
        Err(fallback) => fallback,
    }
}

fn build<'e>(env: &'e Env, err: &Error) -> napi::Result<Object<'e>> {
    let mut obj = env.create_error(napi::Error::new(
        Status::GenericFailure,
        err.message.clone(),
    ))?;
    obj.set_named_property("code", err.code.as_str())?;
    if let Some(sqlstate) = &err.sqlstate {
        obj.set_named_property("sqlstate", sqlstate.as_str())?;
    }
    if let Some(phase) = err.phase {
        obj.set_named_property("phase", phase.as_str())?;
    }
    Ok(obj)
}
