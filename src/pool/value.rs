//! Values crossing the pool boundary: parameters in, cells out. Backend-neutral.

use std::sync::Arc;

/// One parameter or one result cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// An integer that JavaScript shows as a `number` (int2, int4, small SQLite integers).
    Int(i64),
    /// An integer that JavaScript shows as a `bigint` (int8, large SQLite integers).
    BigInt(i64),
    Float(f64),
    /// Arbitrary-precision decimal as text (PostgreSQL numeric).
    Numeric(String),
    Text(String),
    Bytes(Vec<u8>),
    Json(serde_json::Value),
    /// Milliseconds since the Unix epoch (JavaScript `Date`).
    Timestamp(f64),
    Array(Vec<Value>),
    /// A Redis error reply inside an array (one failed command of an EXEC or a pipeline):
    /// the others in the array were applied.
    Failed(Box<crate::error::Error>),
}

impl Value {
    /// What JavaScript type this value came from, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) | Value::Float(_) => "number",
            Value::BigInt(_) => "bigint",
            Value::Numeric(_) | Value::Text(_) => "string",
            Value::Bytes(_) => "Buffer",
            Value::Json(_) => "object",
            Value::Timestamp(_) => "Date",
            Value::Array(_) => "array",
            Value::Failed(_) => "Error",
        }
    }

    /// Text form used where a backend only takes strings (Redis arguments, SQLite dates).
    pub fn to_text(&self) -> Option<String> {
        match self {
            Value::Null | Value::Failed(_) => None,
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) | Value::BigInt(i) => Some(i.to_string()),
            Value::Float(f) => Some(format_float(*f)),
            Value::Numeric(s) | Value::Text(s) => Some(s.clone()),
            Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::Json(j) => Some(j.to_string()),
            Value::Timestamp(ms) => Some(timestamp_to_iso(*ms)),
            Value::Array(items) => Some(
                serde_json::Value::Array(items.iter().map(Value::to_json).collect()).to_string(),
            ),
        }
    }

    /// JSON form, for json/jsonb parameters given as plain values.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null | Value::Failed(_) => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) | Value::BigInt(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Numeric(s) | Value::Text(s) => J::String(s.clone()),
            Value::Bytes(b) => J::Array(b.iter().map(|x| J::from(*x)).collect()),
            Value::Json(j) => j.clone(),
            Value::Timestamp(ms) => J::String(timestamp_to_iso(*ms)),
            Value::Array(items) => J::Array(items.iter().map(Value::to_json).collect()),
        }
    }
}

fn format_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        f.to_string()
    }
}

/// RFC 3339 text with milliseconds, UTC.
pub fn timestamp_to_iso(ms: f64) -> String {
    let whole = ms.floor() as i64;
    chrono::DateTime::from_timestamp_millis(whole)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Rows of one statement. Column names are shared by every row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryResult {
    pub columns: Arc<[String]>,
    pub rows: Vec<Vec<Value>>,
    /// Rows returned, or rows affected for statements without a result set.
    pub row_count: u64,
}

/// Outcome of a statement run for its effect.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExecuteResult {
    pub row_count: u64,
    /// SQLite's last inserted rowid; `None` elsewhere.
    pub last_insert_id: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_are_what_a_person_expects() {
        assert_eq!(Value::Float(3.0).to_text().as_deref(), Some("3"));
        assert_eq!(Value::Float(0.25).to_text().as_deref(), Some("0.25"));
        assert_eq!(
            Value::Timestamp(0.0).to_text().as_deref(),
            Some("1970-01-01T00:00:00.000Z")
        );
        assert_eq!(Value::Null.to_text(), None);
    }
}
