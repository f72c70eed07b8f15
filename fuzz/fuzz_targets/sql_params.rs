// Any parameter value bound as any PostgreSQL type: encoded, or refused with an error — never
// a panic, and never a value of the wrong width for fixed-size types.
#![no_main]
use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postgres_types::{IsNull, ToSql, Type};
use quartermaster::pool::Value;

#[derive(Arbitrary, Debug)]
enum V {
    Null,
    Bool(bool),
    Int(i64),
    BigInt(i64),
    Float(f64),
    Numeric(String),
    Text(String),
    Bytes(Vec<u8>),
    Timestamp(f64),
    Array(Vec<V>),
}

fn value(v: V, depth: u8) -> Value {
    match v {
        V::Null => Value::Null,
        V::Bool(b) => Value::Bool(b),
        V::Int(i) => Value::Int(i),
        V::BigInt(i) => Value::BigInt(i),
        V::Float(f) => Value::Float(f),
        V::Numeric(s) => Value::Numeric(s),
        V::Text(s) => Value::Text(s),
        V::Bytes(b) => Value::Bytes(b),
        V::Timestamp(t) => Value::Timestamp(t),
        V::Array(items) if depth < 3 => Value::Array(items.into_iter().map(|i| value(i, depth + 1)).collect()),
        V::Array(_) => Value::Null,
    }
}

const TYPES: &[Type] = &[
    Type::BOOL, Type::INT2, Type::INT4, Type::INT8, Type::FLOAT4, Type::FLOAT8, Type::NUMERIC,
    Type::TEXT, Type::BYTEA, Type::JSON, Type::JSONB, Type::TIMESTAMP, Type::TIMESTAMPTZ,
    Type::DATE, Type::UUID, Type::INT4_ARRAY, Type::TEXT_ARRAY, Type::NUMERIC_ARRAY, Type::OID,
];

fuzz_target!(|input: (V, u8)| {
    let (v, which) = input;
    let v = value(v, 0);
    let ty = &TYPES[which as usize % TYPES.len()];
    let mut out = BytesMut::new();
    if let Ok(IsNull::No) = v.to_sql_checked(ty, &mut out) {
        let width = match *ty {
            Type::BOOL => Some(1),
            Type::INT2 => Some(2),
            Type::INT4 | Type::FLOAT4 | Type::DATE | Type::OID => Some(4),
            Type::INT8 | Type::FLOAT8 | Type::TIMESTAMP | Type::TIMESTAMPTZ => Some(8),
            Type::UUID => Some(16),
            _ => None,
        };
        if let Some(w) = width {
            assert_eq!(out.len(), w, "{v:?} as {ty}");
        }
    }
});
