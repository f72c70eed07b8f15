//! Core errors become JavaScript `Error`s with a stable `code` (and `sqlstate`, `phase`).

use napi::bindgen_prelude::{JsObjectValue, Object};
use napi::JsValue;
use napi::{Env, Status};

use crate::error::{Error, ErrorCode};

/// Builds the JS error object for a core error: `message`, `code`, and `sqlstate` / `phase` when known.
pub(crate) fn js_error(env: &Env, err: Error) -> napi::Error {
    match error_object(env, &err) {
        Ok(obj) => napi::Error::from(obj.to_unknown()),
        Err(fallback) => fallback,
    }
}

/// The JS `Error` for a core error, with `code` and whichever of `sqlstate`, `phase`,
/// `sent`, `timeoutMs` and `rolledBack` apply.
pub(crate) fn error_object<'e>(env: &'e Env, err: &Error) -> napi::Result<Object<'e>> {
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
    if let Some(sent) = err.sent {
        obj.set_named_property("sent", sent)?;
    }
    if let Some(ms) = err.timeout_ms {
        obj.set_named_property("timeoutMs", ms)?;
    }
    if err.rolled_back {
        obj.set_named_property("rolledBack", true)?;
    }
    if err.code == ErrorCode::Aborted {
        obj.set_named_property("name", "AbortError")?;
    }
    Ok(obj)
}
