//! JavaScript <-> `Value`: parameters in, rows and replies out. Raw N-API calls keep the hot
//! path to one call per cell.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ptr;
use std::sync::Arc;

use napi::bindgen_prelude::{ToNapiValue, TypeName, ValidateNapiValue};
use napi::{sys, Env, JsValue, ValueType};

use crate::error::Error;
use crate::pool::config::Int8Mode;
use crate::pool::value::{QueryResult, Value};

type Raw = sys::napi_value;

const MAX_DEPTH: usize = 64;
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

fn check(status: sys::napi_status, what: &str) -> napi::Result<()> {
    if status == sys::Status::napi_ok {
        Ok(())
    } else {
        Err(napi::Error::from_reason(format!(
            "N-API call failed: {what}"
        )))
    }
}

/// Reads the `params` argument: `undefined`/`null` or an array of values.
pub(crate) fn params_from_js(env: &Env, params: Option<Raw>) -> Result<Vec<Value>, Error> {
    let Some(array) = params else {
        return Ok(Vec::new());
    };
    let env = env.raw();
    let kind = type_of(env, array)?;
    if kind == ValueType::Undefined || kind == ValueType::Null {
        return Ok(Vec::new());
    }
    if !is_array(env, array) {
        return Err(Error::invalid_argument("params must be an array"));
    }
    let len = array_len(env, array)?;
    let mut out = Vec::with_capacity(len as usize);
    for i in 0..len {
        out.push(param_from_js(env, element(env, array, i)?, i as usize)?);
    }
    Ok(out)
}

/// Parameters passed as separate arguments (wrappers.js spreads a short `params` array:
/// cheaper than reading its elements here one by one).
pub(crate) fn params_from_args(env: &Env, args: &[Raw]) -> Result<Vec<Value>, Error> {
    let env = env.raw();
    args.iter()
        .enumerate()
        .map(|(i, item)| param_from_js(env, *item, i))
        .collect()
}

/// Parameter `$(i + 1)`.
fn param_from_js(env: sys::napi_env, item: Raw, i: usize) -> Result<Value, Error> {
    value_from_js(env, item, 0)
        .map_err(|e| Error::invalid_argument(format!("parameter ${}: {}", i + 1, e.message)))
}

fn internal(what: &str) -> Error {
    Error::internal(format!("could not read a JavaScript value ({what})"))
}

fn type_of(env: sys::napi_env, v: Raw) -> Result<ValueType, Error> {
    let mut t = 0;
    if unsafe { sys::napi_typeof(env, v, &mut t) } != sys::Status::napi_ok {
        return Err(internal("typeof"));
    }
    Ok(ValueType::from(t))
}

fn is_array(env: sys::napi_env, v: Raw) -> bool {
    let mut yes = false;
    unsafe { sys::napi_is_array(env, v, &mut yes) };
    yes
}

fn array_len(env: sys::napi_env, v: Raw) -> Result<u32, Error> {
    let mut len = 0;
    if unsafe { sys::napi_get_array_length(env, v, &mut len) } != sys::Status::napi_ok {
        return Err(internal("array length"));
    }
    Ok(len)
}

fn element(env: sys::napi_env, v: Raw, i: u32) -> Result<Raw, Error> {
    let mut item = ptr::null_mut();
    if unsafe { sys::napi_get_element(env, v, i, &mut item) } != sys::Status::napi_ok {
        return Err(internal("array element"));
    }
    Ok(item)
}

fn string_from_js(env: sys::napi_env, v: Raw) -> Result<String, Error> {
    string_in(env, v, &mut [0u8; SHORT_STRING]).map(Cow::into_owned)
}

/// Bytes of a string read without allocating (see [`string_in`]).
pub(crate) const SHORT_STRING: usize = 256;

/// A JS string, read into `short` when it fits there (no allocation), else owned.
fn string_in<'b>(
    env: sys::napi_env,
    v: Raw,
    short: &'b mut [u8; SHORT_STRING],
) -> Result<Cow<'b, str>, Error> {
    // Most SQL texts and text parameters are short: one call into a buffer on the stack. A
    // cut string ends within 4 bytes (one character) of the buffer's 255: within those, its
    // length first, as below.
    let mut written = 0;
    if unsafe {
        sys::napi_get_value_string_utf8(
            env,
            v,
            short.as_mut_ptr().cast(),
            short.len(),
            &mut written,
        )
    } != sys::Status::napi_ok
    {
        return Err(internal("string"));
    }
    if written + 5 <= short.len() {
        return std::str::from_utf8(&short[..written])
            .map(Cow::Borrowed)
            .map_err(|_| internal("utf-8"));
    }
    let mut len = 0;
    if unsafe { sys::napi_get_value_string_utf8(env, v, ptr::null_mut(), 0, &mut len) }
        != sys::Status::napi_ok
    {
        return Err(internal("string length"));
    }
    let mut buf = vec![0u8; len + 1];
    let mut written = 0;
    if unsafe {
        sys::napi_get_value_string_utf8(env, v, buf.as_mut_ptr().cast(), len + 1, &mut written)
    } != sys::Status::napi_ok
    {
        return Err(internal("string"));
    }
    buf.truncate(written);
    String::from_utf8(buf)
        .map(Cow::Owned)
        .map_err(|_| internal("utf-8"))
}

fn value_from_js(env: sys::napi_env, v: Raw, depth: usize) -> Result<Value, Error> {
    if depth > MAX_DEPTH {
        return Err(Error::invalid_argument("value nests deeper than 64 levels"));
    }
    match type_of(env, v)? {
        ValueType::Undefined | ValueType::Null => Ok(Value::Null),
        ValueType::Boolean => {
            let mut b = false;
            unsafe { sys::napi_get_value_bool(env, v, &mut b) };
            Ok(Value::Bool(b))
        }
        ValueType::Number => {
            let mut f = 0.0;
            unsafe { sys::napi_get_value_double(env, v, &mut f) };
            if f.fract() == 0.0 && f.abs() <= MAX_SAFE_INTEGER {
                Ok(Value::Int(f as i64))
            } else {
                Ok(Value::Float(f))
            }
        }
        ValueType::BigInt => {
            let mut i = 0i64;
            let mut lossless = false;
            unsafe { sys::napi_get_value_bigint_int64(env, v, &mut i, &mut lossless) };
            if !lossless {
                return Err(Error::invalid_argument("bigint does not fit in 64 bits"));
            }
            Ok(Value::BigInt(i))
        }
        ValueType::String => Ok(Value::Text(string_from_js(env, v)?)),
        ValueType::Object => object_from_js(env, v, depth),
        other => Err(Error::invalid_argument(format!(
            "a {} cannot be sent to the database (use null, boolean, number, bigint, string, Date, Buffer, array or plain object)",
            type_name(other)
        ))),
    }
}

fn type_name(t: ValueType) -> &'static str {
    match t {
        ValueType::Function => "function",
        ValueType::Symbol => "symbol",
        ValueType::External => "external",
        _ => "value of this type",
    }
}

fn object_from_js(env: sys::napi_env, v: Raw, depth: usize) -> Result<Value, Error> {
    // Buffers are Uint8Arrays; other typed arrays are refused rather than sent as raw bytes.
    let mut yes = false;
    unsafe { sys::napi_is_typedarray(env, v, &mut yes) };
    if yes {
        let mut kind = 0;
        let mut len = 0;
        let mut data = ptr::null_mut();
        let mut buffer = ptr::null_mut();
        let mut offset = 0;
        unsafe {
            sys::napi_get_typedarray_info(
                env,
                v,
                &mut kind,
                &mut len,
                &mut data,
                &mut buffer,
                &mut offset,
            )
        };
        if kind != sys::TypedarrayType::uint8_array {
            return Err(Error::invalid_argument(
                "typed arrays other than Uint8Array cannot be sent; use a Buffer or an array",
            ));
        }
        let bytes = if len == 0 {
            Vec::new()
        } else {
            unsafe { std::slice::from_raw_parts(data as *const u8, len) }.to_vec()
        };
        return Ok(Value::Bytes(bytes));
    }
    unsafe { sys::napi_is_date(env, v, &mut yes) };
    if yes {
        let mut ms = 0.0;
        unsafe { sys::napi_get_date_value(env, v, &mut ms) };
        if !ms.is_finite() {
            return Err(Error::invalid_argument("Invalid Date"));
        }
        return Ok(Value::Timestamp(ms));
    }
    if is_array(env, v) {
        let len = array_len(env, v)?;
        let mut items = Vec::with_capacity(len as usize);
        for i in 0..len {
            items.push(value_from_js(env, element(env, v, i)?, depth + 1)?);
        }
        return Ok(Value::Array(items));
    }
    Ok(Value::Json(json_from_js(env, v, depth)?))
}

fn json_from_js(env: sys::napi_env, v: Raw, depth: usize) -> Result<serde_json::Value, Error> {
    use serde_json::Value as J;
    if depth > MAX_DEPTH {
        return Err(Error::invalid_argument("value nests deeper than 64 levels"));
    }
    Ok(match type_of(env, v)? {
        ValueType::Undefined | ValueType::Null => J::Null,
        ValueType::Boolean | ValueType::Number | ValueType::String | ValueType::BigInt => {
            match value_from_js(env, v, depth)? {
                Value::Bool(b) => J::Bool(b),
                Value::Int(i) | Value::BigInt(i) => J::from(i),
                Value::Float(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
                Value::Text(s) => J::String(s),
                other => other.to_json(),
            }
        }
        ValueType::Object => {
            if is_array(env, v) {
                let len = array_len(env, v)?;
                let mut items = Vec::with_capacity(len as usize);
                for i in 0..len {
                    items.push(json_from_js(env, element(env, v, i)?, depth + 1)?);
                }
                J::Array(items)
            } else {
                match object_from_js_leaf(env, v)? {
                    Some(leaf) => leaf.to_json(),
                    None => {
                        let mut keys = ptr::null_mut();
                        if unsafe { sys::napi_get_property_names(env, v, &mut keys) }
                            != sys::Status::napi_ok
                        {
                            return Err(internal("property names"));
                        }
                        let n = array_len(env, keys)?;
                        let mut map = serde_json::Map::new();
                        for i in 0..n {
                            let key = element(env, keys, i)?;
                            let mut val = ptr::null_mut();
                            if unsafe { sys::napi_get_property(env, v, key, &mut val) }
                                != sys::Status::napi_ok
                            {
                                return Err(internal("property"));
                            }
                            let t = type_of(env, val)?;
                            if t == ValueType::Undefined
                                || t == ValueType::Function
                                || t == ValueType::Symbol
                            {
                                continue;
                            }
                            let key = match type_of(env, key)? {
                                ValueType::String => string_from_js(env, key)?,
                                _ => {
                                    let mut s = ptr::null_mut();
                                    unsafe { sys::napi_coerce_to_string(env, key, &mut s) };
                                    string_from_js(env, s)?
                                }
                            };
                            map.insert(key, json_from_js(env, val, depth + 1)?);
                        }
                        J::Object(map)
                    }
                }
            }
        }
        other => {
            return Err(Error::invalid_argument(format!(
                "a {} cannot be stored as JSON",
                type_name(other)
            )))
        }
    })
}

/// Dates and Buffers inside JSON become their JSON forms (ISO text, byte arrays).
fn object_from_js_leaf(env: sys::napi_env, v: Raw) -> Result<Option<Value>, Error> {
    let mut yes = false;
    unsafe { sys::napi_is_date(env, v, &mut yes) };
    let mut buf = false;
    unsafe { sys::napi_is_buffer(env, v, &mut buf) };
    if yes || buf {
        return object_from_js(env, v, 0).map(Some);
    }
    Ok(None)
}

/// Reads a string array argument element-wise (Redis command args).
pub(crate) fn values_from_array(env: &Env, array: Raw, what: &str) -> Result<Vec<Value>, Error> {
    let env = env.raw();
    if !is_array(env, array) {
        return Err(Error::invalid_argument(format!("{what} must be an array")));
    }
    let len = array_len(env, array)?;
    (0..len)
        .map(|i| {
            value_from_js(env, element(env, array, i)?, 0)
                .map_err(|e| Error::invalid_argument(format!("{what}[{i}]: {}", e.message)))
        })
        .collect()
}

pub(crate) fn string_at(env: &Env, array: Raw, index: u32, what: &str) -> Result<String, Error> {
    string_value(env, element(env.raw(), array, index)?, what)
}

/// `a === b`.
pub(crate) fn strict_equals(env: &Env, a: Raw, b: Raw) -> bool {
    let mut equal = false;
    let status = unsafe { sys::napi_strict_equals(env.raw(), a, b, &mut equal) };
    status == sys::Status::napi_ok && equal
}

/// `v` as a string; `INVALID_ARGUMENT` naming `what` when it is not one.
pub(crate) fn string_value(env: &Env, v: Raw, what: &str) -> Result<String, Error> {
    string_value_in(env, v, what, &mut [0u8; SHORT_STRING]).map(Cow::into_owned)
}

/// [`string_value`] read into `short` when it fits there (no allocation).
pub(crate) fn string_value_in<'b>(
    env: &Env,
    v: Raw,
    what: &str,
    short: &'b mut [u8; SHORT_STRING],
) -> Result<Cow<'b, str>, Error> {
    let env = env.raw();
    if type_of(env, v)? != ValueType::String {
        return Err(Error::invalid_argument(format!("{what} must be a string")));
    }
    string_in(env, v, short)
}

pub(crate) fn array_length(env: &Env, array: Raw) -> Result<u32, Error> {
    if !is_array(env.raw(), array) {
        return Err(Error::invalid_argument("expected an array"));
    }
    array_len(env.raw(), array)
}

pub(crate) fn element_at(env: &Env, array: Raw, index: u32) -> Result<Raw, Error> {
    element(env.raw(), array, index)
}

/// `object[name]` as a number, `None` when absent; `what` names it in the error.
pub(crate) fn number_property(
    env: &Env,
    object: Raw,
    name: &str,
    what: &str,
) -> Result<Option<f64>, Error> {
    let env = env.raw();
    if type_of(env, object)? != ValueType::Object {
        return Err(Error::invalid_argument(format!(
            "options must be an object (for {what})"
        )));
    }
    let key = std::ffi::CString::new(name).map_err(|_| internal("property name"))?;
    let mut value = ptr::null_mut();
    if unsafe { sys::napi_get_named_property(env, object, key.as_ptr(), &mut value) }
        != sys::Status::napi_ok
    {
        return Err(internal("property"));
    }
    match type_of(env, value)? {
        ValueType::Undefined | ValueType::Null => Ok(None),
        ValueType::Number => {
            let mut n = 0.0;
            unsafe { sys::napi_get_value_double(env, value, &mut n) };
            Ok(Some(n))
        }
        _ => Err(Error::invalid_argument(format!("{what} must be a number"))),
    }
}

// ---- out ----

fn string_to_js(env: sys::napi_env, s: &str) -> napi::Result<Raw> {
    let mut out = ptr::null_mut();
    check(
        unsafe { sys::napi_create_string_utf8(env, s.as_ptr().cast(), s.len() as isize, &mut out) },
        "create string",
    )?;
    Ok(out)
}

pub(crate) fn value_to_js(env: sys::napi_env, v: &Value, int8: Int8Mode) -> napi::Result<Raw> {
    let mut out = ptr::null_mut();
    let status = unsafe {
        match v {
            Value::Null => sys::napi_get_null(env, &mut out),
            Value::Bool(b) => sys::napi_get_boolean(env, *b, &mut out),
            Value::Int(i) => sys::napi_create_double(env, *i as f64, &mut out),
            Value::BigInt(i) => match int8 {
                Int8Mode::BigInt => sys::napi_create_bigint_int64(env, *i, &mut out),
                Int8Mode::String => return string_to_js(env, &i.to_string()),
            },
            Value::Float(f) => sys::napi_create_double(env, *f, &mut out),
            Value::Numeric(s) | Value::Text(s) => return string_to_js(env, s),
            Value::Bytes(b) => {
                let mut data = ptr::null_mut();
                sys::napi_create_buffer_copy(env, b.len(), b.as_ptr().cast(), &mut data, &mut out)
            }
            Value::Json(j) => return json_to_js(env, j),
            Value::Timestamp(ms) => sys::napi_create_date(env, *ms, &mut out),
            Value::Failed(e) => {
                return super::errors::error_object(&napi::Env::from_raw(env), e).map(|o| o.raw())
            }
            Value::Array(items) => {
                check(
                    sys::napi_create_array_with_length(env, items.len(), &mut out),
                    "create array",
                )?;
                for (i, item) in items.iter().enumerate() {
                    let el = value_to_js(env, item, int8)?;
                    check(sys::napi_set_element(env, out, i as u32, el), "set element")?;
                }
                sys::Status::napi_ok
            }
        }
    };
    check(status, "create value")?;
    Ok(out)
}

fn json_to_js(env: sys::napi_env, j: &serde_json::Value) -> napi::Result<Raw> {
    use serde_json::Value as J;
    let mut out = ptr::null_mut();
    unsafe {
        match j {
            J::Null => check(sys::napi_get_null(env, &mut out), "null")?,
            J::Bool(b) => check(sys::napi_get_boolean(env, *b, &mut out), "bool")?,
            J::Number(n) => check(
                sys::napi_create_double(env, n.as_f64().unwrap_or(f64::NAN), &mut out),
                "number",
            )?,
            J::String(s) => return string_to_js(env, s),
            J::Array(items) => {
                check(
                    sys::napi_create_array_with_length(env, items.len(), &mut out),
                    "array",
                )?;
                for (i, item) in items.iter().enumerate() {
                    let el = json_to_js(env, item)?;
                    check(sys::napi_set_element(env, out, i as u32, el), "element")?;
                }
            }
            J::Object(map) => {
                check(sys::napi_create_object(env, &mut out), "object")?;
                for (k, v) in map {
                    let key = string_to_js(env, k)?;
                    let val = json_to_js(env, v)?;
                    check(sys::napi_set_property(env, out, key, val), "property")?;
                }
            }
        }
    }
    Ok(out)
}

/// Rows as plain objects keyed by column name. Column name strings are created once.
pub struct Rows {
    pub result: QueryResult,
    pub int8: Int8Mode,
}

impl TypeName for Rows {
    fn type_name() -> &'static str {
        "Array<Record<string, any>>"
    }
    fn value_type() -> ValueType {
        ValueType::Object
    }
}

impl ValidateNapiValue for Rows {}

impl ToNapiValue for Rows {
    unsafe fn to_napi_value(env: sys::napi_env, val: Self) -> napi::Result<Raw> {
        let keys: Vec<Raw> = val
            .result
            .columns
            .iter()
            .map(|c| string_to_js(env, c))
            .collect::<napi::Result<_>>()?;
        let mut array = ptr::null_mut();
        check(
            sys::napi_create_array_with_length(env, val.result.rows.len(), &mut array),
            "rows",
        )?;
        for (i, row) in val.result.rows.iter().enumerate() {
            let mut obj = ptr::null_mut();
            check(sys::napi_create_object(env, &mut obj), "row")?;
            for (key, cell) in keys.iter().zip(row) {
                let v = value_to_js(env, cell, val.int8)?;
                check(sys::napi_set_property(env, obj, *key, v), "cell")?;
            }
            check(
                sys::napi_set_element(env, array, i as u32, obj),
                "row element",
            )?;
        }
        Ok(array)
    }
}

/// One statement's result for wrappers.js to shape into `{ rows, rowCount, fields }`:
/// `[column list (its number, see [`ShapeBook`]), rowCount, rows, cell, cell, …]`, the
/// cells row-major (`rows` apart: zero-column rows exist). A small result goes as the arguments of one call to the
/// shaper, a large one as one array; either way no property key is made here: the row
/// objects come from a function wrappers.js compiles once per column list (napi's per-row
/// property definition was a third of a small read's cost).
pub struct Packed {
    pub result: QueryResult,
    pub int8: Int8Mode,
}

impl TypeName for Packed {
    fn type_name() -> &'static str {
        "unknown[]"
    }
    fn value_type() -> ValueType {
        ValueType::Object
    }
}

impl ValidateNapiValue for Packed {}

/// A column list as one string: `<count>\0name\0name…` (the count tells one column named ""
/// from none).
fn shape_key(columns: &[String]) -> String {
    let mut key = columns.len().to_string();
    for c in columns {
        key.push('\0');
        key.push_str(c);
    }
    key
}

/// Column lists numbered for wrappers.js, which keeps each one's row constructor under its
/// number: a result names its columns by number instead of by a key string made, hashed
/// and looked up on every call. Numbers are never reused; past [`SHAPES_MAX`] lists a
/// result names its columns by key as before.
#[derive(Default)]
struct ShapeBook {
    ids: HashMap<Arc<[String]>, u32>,
    keys: Vec<String>,
}

const SHAPES_MAX: usize = 4096;

static SHAPES: std::sync::LazyLock<parking_lot::Mutex<ShapeBook>> =
    std::sync::LazyLock::new(Default::default);

/// A column list and its number.
type Numbered = (Option<Arc<[String]>>, u32);

thread_local! {
    /// The column lists this thread numbered last, by address (the clones keep each
    /// address theirs): a statement's results share one list, so most results find theirs
    /// here without hashing it.
    static RECENT_SHAPES: std::cell::RefCell<[Numbered; 4]> =
        const { std::cell::RefCell::new([const { (None, 0) }; 4]) };
}

/// The number of a column list (see [`ShapeBook`]); `None` once the book is full.
fn shape_id(columns: &Arc<[String]>) -> Option<u32> {
    RECENT_SHAPES.with(|recent| {
        let mut recent = recent.borrow_mut();
        if let Some((_, id)) = recent
            .iter()
            .find(|(c, _)| c.as_ref().is_some_and(|c| Arc::ptr_eq(c, columns)))
        {
            return Some(*id);
        }
        let id = {
            let mut book = SHAPES.lock();
            match book.ids.get(columns) {
                Some(id) => *id,
                None if book.keys.len() >= SHAPES_MAX => return None,
                None => {
                    let id = book.keys.len() as u32;
                    book.keys.push(shape_key(columns));
                    book.ids.insert(Arc::clone(columns), id);
                    id
                }
            }
        };
        recent.rotate_right(1);
        recent[0] = (Some(Arc::clone(columns)), id);
        Some(id)
    })
}

/// The key of column list `id` (see [`shape_key`]), for wrappers.js meeting the number for
/// the first time.
unsafe extern "C" fn shape_key_of(env: sys::napi_env, info: sys::napi_callback_info) -> Raw {
    let mut argc = 1;
    let mut argv = [ptr::null_mut(); 1];
    let mut id = u32::MAX;
    let key = unsafe {
        let read = sys::napi_get_cb_info(
            env,
            info,
            &mut argc,
            argv.as_mut_ptr(),
            ptr::null_mut(),
            ptr::null_mut(),
        ) == sys::Status::napi_ok
            && sys::napi_get_value_uint32(env, argv[0], &mut id) == sys::Status::napi_ok;
        read.then(|| SHAPES.lock().keys.get(id as usize).cloned())
            .flatten()
    };
    match key.map(|k| string_to_js(env, &k)) {
        Some(Ok(value)) => value,
        _ => {
            unsafe {
                sys::napi_throw_error(
                    env,
                    ptr::null(),
                    c"quartermaster: unknown column list (a bug)".as_ptr(),
                )
            };
            ptr::null_mut()
        }
    }
}

/// wrappers.js's way to a column list's key by number ([`shape_key_of`]).
pub(crate) fn shape_key_function(env: sys::napi_env) -> napi::Result<Raw> {
    let name = "shapeKey";
    let mut f = ptr::null_mut();
    check(
        unsafe {
            sys::napi_create_function(
                env,
                name.as_ptr().cast(),
                name.len() as isize,
                Some(shape_key_of),
                ptr::null_mut(),
                &mut f,
            )
        },
        "shape key function",
    )?;
    Ok(f)
}

/// A count as a JS number (a small one made as such: cheaper than from a double).
fn count_to_js(env: sys::napi_env, n: u64) -> napi::Result<Raw> {
    let mut out = ptr::null_mut();
    let status = match u32::try_from(n) {
        Ok(small) => unsafe { sys::napi_create_uint32(env, small, &mut out) },
        Err(_) => unsafe { sys::napi_create_double(env, n as f64, &mut out) },
    };
    check(status, "row count")?;
    Ok(out)
}

/// The first packed value: the column list's number, else (book full) its key.
fn shape_to_js(env: sys::napi_env, columns: &Arc<[String]>) -> napi::Result<Raw> {
    match shape_id(columns) {
        Some(id) => {
            let mut out = ptr::null_mut();
            check(
                unsafe { sys::napi_create_uint32(env, id, &mut out) },
                "shape",
            )?;
            Ok(out)
        }
        None => string_to_js(env, &shape_key(columns)),
    }
}

/// Most values passed to the shaper as arguments; a larger result goes as one array.
const SHAPER_ARGS: usize = 64;

/// This thread's environment and its shaper: wrappers.js's function that turns
/// `(key, rowCount, rows, ...cells)` into the result object (a small result is handed over
/// as call arguments, which costs less than an element store per cell).
struct Shaper {
    env: sys::napi_env,
    function: sys::napi_ref,
}

thread_local! {
    static SHAPER: std::cell::RefCell<Option<Shaper>> = const { std::cell::RefCell::new(None) };
}

/// Keeps `function` as this environment's shaper (wrappers.js, at module load).
pub(crate) fn set_shaper(env: sys::napi_env, function: Raw) -> napi::Result<()> {
    let mut reference = ptr::null_mut();
    check(
        unsafe { sys::napi_create_reference(env, function, 1, &mut reference) },
        "shaper reference",
    )?;
    unsafe extern "C" fn forget(arg: *mut std::ffi::c_void) {
        // The environment is going: its reference goes with it.
        SHAPER.with(|s| {
            let mut s = s.borrow_mut();
            if s.as_ref()
                .is_some_and(|shaper| shaper.env as *mut std::ffi::c_void == arg)
            {
                s.take();
            }
        });
    }
    // The hook's argument is this environment, so it is unique: the addon loaded twice into
    // one Node environment (two napi environments) must not register the same pair twice,
    // which aborts Node. The later load's shaper wins; the other instance's results then go
    // as arrays, shaped the same way.
    let previous = SHAPER.with(|s| {
        s.borrow_mut().replace(Shaper {
            env,
            function: reference,
        })
    });
    if let Some(old) = previous.filter(|old| old.env == env) {
        unsafe { sys::napi_delete_reference(env, old.function) };
        return Ok(());
    }
    check(
        unsafe { sys::napi_add_env_cleanup_hook(env, Some(forget), env.cast()) },
        "shaper cleanup",
    )
}

fn shaper(env: sys::napi_env) -> Option<Raw> {
    SHAPER.with(|s| {
        let s = s.borrow();
        let shaper = s.as_ref().filter(|s| s.env == env)?;
        let mut function = ptr::null_mut();
        let status = unsafe { sys::napi_get_reference_value(env, shaper.function, &mut function) };
        (status == sys::Status::napi_ok && !function.is_null()).then_some(function)
    })
}

/// Past this many cells a result is built here, row by row, as before: one packed array that
/// large lands in V8's large-object space per batch, which only a full GC frees (a 5M-row
/// cursor grew RSS by 93 MiB that way).
const PACKED_CELLS_MAX: usize = 4096;

impl ToNapiValue for Packed {
    unsafe fn to_napi_value(env: sys::napi_env, val: Self) -> napi::Result<Raw> {
        let cells = val.result.rows.len() * val.result.columns.len();
        if cells > PACKED_CELLS_MAX {
            let whole = super::pool::rows(val.result, val.int8);
            return unsafe { ToNapiValue::to_napi_value(env, whole) };
        }
        let r = &val.result;
        if 3 + cells <= SHAPER_ARGS {
            if let Some(function) = shaper(env) {
                let mut args = [ptr::null_mut(); SHAPER_ARGS];
                args[0] = shape_to_js(env, &r.columns)?;
                for (i, n) in [(1, r.row_count), (2, r.rows.len() as u64)] {
                    args[i] = count_to_js(env, n)?;
                }
                let mut i = 3;
                for row in &r.rows {
                    for cell in row {
                        args[i] = value_to_js(env, cell, val.int8)?;
                        i += 1;
                    }
                }
                let mut undefined = ptr::null_mut();
                check(
                    unsafe { sys::napi_get_undefined(env, &mut undefined) },
                    "undefined",
                )?;
                let mut out = ptr::null_mut();
                check(
                    unsafe {
                        sys::napi_call_function(
                            env,
                            undefined,
                            function,
                            i,
                            args.as_ptr(),
                            &mut out,
                        )
                    },
                    "shape rows",
                )?;
                return Ok(out);
            }
        }
        let mut array = ptr::null_mut();
        check(
            unsafe { sys::napi_create_array_with_length(env, 3 + cells, &mut array) },
            "packed rows",
        )?;
        let set = |i: usize, v: Raw| {
            check(
                unsafe { sys::napi_set_element(env, array, i as u32, v) },
                "packed cell",
            )
        };
        set(0, shape_to_js(env, &r.columns)?)?;
        for (i, n) in [(1, r.row_count as f64), (2, r.rows.len() as f64)] {
            let mut number = ptr::null_mut();
            check(
                unsafe { sys::napi_create_double(env, n, &mut number) },
                "row count",
            )?;
            set(i, number)?;
        }
        let mut i = 3;
        for row in &r.rows {
            for cell in row {
                set(i, value_to_js(env, cell, val.int8)?)?;
                i += 1;
            }
        }
        Ok(array)
    }
}

/// A single reply value (Redis) converted on the main thread.
pub struct Reply(pub Value);

impl TypeName for Reply {
    fn type_name() -> &'static str {
        "unknown"
    }
    fn value_type() -> ValueType {
        ValueType::Unknown
    }
}

impl ValidateNapiValue for Reply {}

impl ToNapiValue for Reply {
    unsafe fn to_napi_value(env: sys::napi_env, val: Self) -> napi::Result<Raw> {
        value_to_js(env, &val.0, Int8Mode::BigInt)
    }
}
