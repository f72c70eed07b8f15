//! PostgreSQL values both ways: JS values bound as parameters of the statement's types, and
//! result cells decoded from the binary format.

use std::error::Error as StdError;

use bytes::{BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_types::{to_sql_checked, FromSql, IsNull, Kind, ToSql, Type};

use crate::pool::value::Value;

type BoxError = Box<dyn StdError + Sync + Send>;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Parameter types sent when there is no prepared statement to ask.
pub(crate) fn inferred_type(v: &Value) -> Type {
    match v {
        Value::Null | Value::Text(_) | Value::Failed(_) => Type::TEXT,
        Value::Bool(_) => Type::BOOL,
        Value::Int(_) | Value::BigInt(_) => Type::INT8,
        Value::Float(_) => Type::FLOAT8,
        Value::Numeric(_) => Type::NUMERIC,
        Value::Bytes(_) => Type::BYTEA,
        Value::Json(_) => Type::JSONB,
        Value::Timestamp(_) => Type::TIMESTAMPTZ,
        Value::Array(items) => match items
            .iter()
            .find(|i| !matches!(i, Value::Null))
            .map(inferred_type)
        {
            Some(Type::BOOL) => Type::BOOL_ARRAY,
            Some(Type::INT8) => Type::INT8_ARRAY,
            Some(Type::FLOAT8) => Type::FLOAT8_ARRAY,
            Some(Type::NUMERIC) => Type::NUMERIC_ARRAY,
            Some(Type::BYTEA) => Type::BYTEA_ARRAY,
            Some(Type::JSONB) => Type::JSONB_ARRAY,
            Some(Type::TIMESTAMPTZ) => Type::TIMESTAMPTZ_ARRAY,
            _ => Type::TEXT_ARRAY,
        },
    }
}

// ---- parameters: Value -> PostgreSQL binary ----

fn mismatch(v: &Value, ty: &Type) -> BoxError {
    format!("a {} cannot be sent as {}", v.kind(), ty.name()).into()
}

fn as_i64(v: &Value, ty: &Type) -> std::result::Result<i64, BoxError> {
    match v {
        Value::Int(i) | Value::BigInt(i) => Ok(*i),
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Ok(*f as i64),
        Value::Text(s) | Value::Numeric(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("{s:?} is not an integer for {}", ty.name()).into()),
        Value::Bool(b) => Ok(*b as i64),
        _ => Err(mismatch(v, ty)),
    }
}

fn as_f64(v: &Value, ty: &Type) -> std::result::Result<f64, BoxError> {
    match v {
        Value::Int(i) | Value::BigInt(i) => Ok(*i as f64),
        Value::Float(f) => Ok(*f),
        Value::Text(s) | Value::Numeric(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("{s:?} is not a number for {}", ty.name()).into()),
        _ => Err(mismatch(v, ty)),
    }
}

fn in_range<T: TryFrom<i64>>(i: i64, ty: &Type) -> std::result::Result<T, BoxError> {
    T::try_from(i).map_err(|_| format!("{i} is out of range for {}", ty.name()).into())
}

fn out_of_range(v: &Value, ty: &Type) -> BoxError {
    format!("the {} is out of range for {}", v.kind(), ty.name()).into()
}

/// `f` rounded to a whole number, refused when it is not finite or does not fit an `i64`
/// (an `as` cast would saturate and write a different instant).
fn whole(f: f64, v: &Value, ty: &Type) -> std::result::Result<i64, BoxError> {
    let r = f.round();
    if r.is_finite() && r >= i64::MIN as f64 && r < i64::MAX as f64 {
        Ok(r as i64)
    } else {
        Err(out_of_range(v, ty))
    }
}

fn encode(v: &Value, ty: &Type, out: &mut BytesMut) -> std::result::Result<IsNull, BoxError> {
    if matches!(v, Value::Null) {
        return Ok(IsNull::Yes);
    }
    match *ty {
        Type::BOOL => match v {
            Value::Bool(b) => out.put_u8(*b as u8),
            Value::Int(0) => out.put_u8(0),
            Value::Int(1) => out.put_u8(1),
            _ => return Err(mismatch(v, ty)),
        },
        Type::INT2 => out.put_i16(in_range(as_i64(v, ty)?, ty)?),
        Type::INT4 => out.put_i32(in_range(as_i64(v, ty)?, ty)?),
        Type::INT8 => out.put_i64(as_i64(v, ty)?),
        Type::OID => out.put_u32(in_range(as_i64(v, ty)?, ty)?),
        Type::FLOAT4 => out.put_f32(as_f64(v, ty)? as f32),
        Type::FLOAT8 => out.put_f64(as_f64(v, ty)?),
        Type::NUMERIC => {
            let text = match v {
                Value::Int(i) | Value::BigInt(i) => i.to_string(),
                Value::Float(f) if f.is_finite() => format!("{f}"),
                Value::Float(f) if f.is_nan() => "NaN".into(),
                Value::Numeric(s) | Value::Text(s) => s.trim().to_string(),
                _ => return Err(mismatch(v, ty)),
            };
            numeric_to_sql(&text, out)?;
        }
        Type::BYTEA => match v {
            Value::Bytes(b) => out.put_slice(b),
            Value::Text(s) => out.put_slice(s.as_bytes()),
            _ => return Err(mismatch(v, ty)),
        },
        Type::JSON | Type::JSONB => {
            if *ty == Type::JSONB {
                out.put_u8(1);
            }
            match v {
                Value::Text(s) if serde_json::from_str::<serde_json::Value>(s).is_ok() => {
                    out.put_slice(s.as_bytes())
                }
                other => out.put_slice(other.to_json().to_string().as_bytes()),
            }
        }
        Type::TIMESTAMP | Type::TIMESTAMPTZ => {
            let micros = match v {
                Value::Timestamp(ms) => whole(ms * 1000.0, v, ty)?,
                Value::Text(s) => parse_timestamp(s)?,
                Value::Int(ms) | Value::BigInt(ms) => {
                    ms.checked_mul(1000).ok_or_else(|| out_of_range(v, ty))?
                }
                _ => return Err(mismatch(v, ty)),
            };
            let since_pg_epoch = micros
                .checked_sub(PG_EPOCH_MICROS)
                .ok_or_else(|| out_of_range(v, ty))?;
            out.put_i64(since_pg_epoch);
        }
        Type::DATE => {
            let days = match v {
                Value::Timestamp(ms) => whole((ms / 86_400_000.0).floor(), v, ty)?,
                Value::Text(s) => {
                    let d = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
                        .map_err(|_| format!("{s:?} is not a date (YYYY-MM-DD)"))?;
                    d.signed_duration_since(
                        chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch"),
                    )
                    .num_days()
                }
                _ => return Err(mismatch(v, ty)),
            };
            let since_pg_epoch = days
                .checked_sub(10_957)
                .ok_or_else(|| out_of_range(v, ty))?;
            out.put_i32(in_range(since_pg_epoch, ty)?);
        }
        Type::UUID => match v {
            Value::Text(s) => {
                let id =
                    uuid::Uuid::parse_str(s.trim()).map_err(|_| format!("{s:?} is not a UUID"))?;
                out.put_slice(id.as_bytes());
            }
            Value::Bytes(b) if b.len() == 16 => out.put_slice(b),
            _ => return Err(mismatch(v, ty)),
        },
        _ => match ty.kind() {
            Kind::Array(member) => {
                let Value::Array(items) = v else {
                    return Err(mismatch(v, ty));
                };
                let dims = [postgres_protocol::types::ArrayDimension {
                    len: i32::try_from(items.len())?,
                    lower_bound: 1,
                }];
                postgres_protocol::types::array_to_sql(
                    dims,
                    member.oid(),
                    items.iter(),
                    |item, buf| {
                        Ok(match encode(item, member, buf)? {
                            IsNull::Yes => postgres_protocol::IsNull::Yes,
                            IsNull::No => postgres_protocol::IsNull::No,
                        })
                    },
                    out,
                )?;
            }
            Kind::Domain(inner) => return encode(v, inner, out),
            _ => match v.to_text() {
                // text, varchar, enums, and anything with a text-compatible binary form
                Some(text) => out.put_slice(text.as_bytes()),
                None => return Ok(IsNull::Yes),
            },
        },
    }
    Ok(IsNull::No)
}

impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> std::result::Result<IsNull, BoxError> {
        encode(self, ty, out)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn parse_timestamp(s: &str) -> std::result::Result<i64, BoxError> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_micros());
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(t.and_utc().timestamp_micros());
        }
    }
    Err(format!("{s:?} is not a timestamp (RFC 3339)").into())
}

/// Encodes decimal text (`-12.3400`, `1e-3`, `NaN`) as PostgreSQL's binary numeric.
fn numeric_to_sql(text: &str, out: &mut BytesMut) -> std::result::Result<(), BoxError> {
    let bad = || -> BoxError { format!("{text:?} is not a decimal number").into() };
    match text {
        "NaN" => {
            out.put_slice(&[0, 0, 0, 0, 0xC0, 0, 0, 0]);
            return Ok(());
        }
        "Infinity" => {
            out.put_slice(&[0, 0, 0, 0, 0xD0, 0, 0, 0]);
            return Ok(());
        }
        "-Infinity" => {
            out.put_slice(&[0, 0, 0, 0, 0xF0, 0, 0, 0]);
            return Ok(());
        }
        _ => {}
    }
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => (
            &unsigned[..i],
            unsigned[i + 1..].parse::<i32>().map_err(|_| bad())?,
        ),
        None => (unsigned, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    // All digits with the decimal point at `point` (may be negative or past the end).
    let digits: Vec<u8> = int_part
        .bytes()
        .chain(frac_part.bytes())
        .map(|b| b - b'0')
        .collect();
    let point = int_part.len() as i64 + exponent as i64;
    if !(-131_072..=131_072).contains(&point) {
        return Err(bad());
    }
    let dscale = (digits.len() as i64 - point).max(0) as u16;
    // Align to base-10000 groups: pad left so `point` is a multiple of 4.
    let lead = (4 - point.rem_euclid(4)) % 4;
    let mut padded = vec![0u8; lead as usize];
    padded.extend_from_slice(&digits);
    while !padded.len().is_multiple_of(4) {
        padded.push(0);
    }
    let first_group_weight = (point + lead) / 4 - 1;
    let mut groups: Vec<i16> = padded
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |acc, d| acc * 10 + *d as i16))
        .collect();
    let mut weight = first_group_weight;
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    out.put_i16(i16::try_from(groups.len()).map_err(|_| bad())?);
    out.put_i16(i16::try_from(weight).map_err(|_| bad())?);
    out.put_u16(if negative && !groups.is_empty() {
        0x4000
    } else {
        0
    });
    out.put_u16(dscale);
    for g in groups {
        out.put_i16(g);
    }
    Ok(())
}

// ---- results: PostgreSQL binary -> Value ----

pub(crate) struct Cell(pub(crate) Value);

impl<'a> FromSql<'a> for Cell {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> std::result::Result<Self, BoxError> {
        decode(ty, raw).map(Cell)
    }

    fn from_sql_null(_: &Type) -> std::result::Result<Self, BoxError> {
        Ok(Cell(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

fn decode(ty: &Type, raw: &[u8]) -> std::result::Result<Value, BoxError> {
    Ok(match *ty {
        Type::BOOL => Value::Bool(bool::from_sql(ty, raw)?),
        Type::INT2 => Value::Int(i16::from_sql(ty, raw)? as i64),
        Type::INT4 => Value::Int(i32::from_sql(ty, raw)? as i64),
        Type::INT8 => Value::BigInt(i64::from_sql(ty, raw)?),
        Type::OID => Value::Int(u32::from_sql(ty, raw)? as i64),
        Type::FLOAT4 => Value::Float(f32::from_sql(ty, raw)? as f64),
        Type::FLOAT8 => Value::Float(f64::from_sql(ty, raw)?),
        Type::NUMERIC => Value::Numeric(numeric_from_sql(raw)?),
        Type::BYTEA => Value::Bytes(raw.to_vec()),
        Type::JSON => Value::Json(serde_json::from_slice(raw)?),
        Type::JSONB => Value::Json(serde_json::from_slice(raw.get(1..).ok_or("empty jsonb")?)?),
        Type::TIMESTAMP | Type::TIMESTAMPTZ => {
            let micros = i64::from_sql(ty, raw)?;
            match micros {
                i64::MAX => Value::Timestamp(f64::INFINITY),
                i64::MIN => Value::Timestamp(f64::NEG_INFINITY),
                m => Value::Timestamp((m + PG_EPOCH_MICROS) as f64 / 1000.0),
            }
        }
        Type::DATE => {
            let days = i32::from_sql(ty, raw)? as i64;
            let date = chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
                .and_then(|d| d.checked_add_signed(chrono::Duration::days(days)));
            Value::Text(
                date.map_or_else(|| "infinity".into(), |d| d.format("%Y-%m-%d").to_string()),
            )
        }
        Type::UUID => Value::Text(uuid::Uuid::from_slice(raw)?.to_string()),
        _ => match ty.kind() {
            Kind::Array(member) => {
                let array = postgres_protocol::types::array_from_sql(raw)?;
                let dims: Vec<usize> = array.dimensions().map(|d| Ok(d.len as usize)).collect()?;
                let mut flat = Vec::new();
                let mut values = array.values();
                while let Some(item) = values.next()? {
                    flat.push(match item {
                        Some(bytes) => decode(member, bytes)?,
                        None => Value::Null,
                    });
                }
                nest(&dims, &mut flat.into_iter())
            }
            Kind::Domain(inner) => decode(inner, raw)?,
            _ => match std::str::from_utf8(raw) {
                Ok(text) => Value::Text(text.to_string()),
                Err(_) => Value::Bytes(raw.to_vec()),
            },
        },
    })
}

/// Rebuilds a multi-dimensional array from its flattened elements.
fn nest(dims: &[usize], items: &mut impl Iterator<Item = Value>) -> Value {
    match dims.split_first() {
        None => Value::Array(Vec::new()),
        Some((&len, [])) => Value::Array(items.take(len).collect()),
        Some((&len, rest)) => Value::Array((0..len).map(|_| nest(rest, items)).collect()),
    }
}

fn numeric_from_sql(raw: &[u8]) -> std::result::Result<String, BoxError> {
    let word = |i: usize| -> std::result::Result<u16, BoxError> {
        raw.get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated numeric".into())
    };
    let ndigits = word(0)? as usize;
    let weight = word(2)? as i16 as i64;
    let sign = word(4)?;
    let dscale = word(6)? as usize;
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        _ => {}
    }
    let groups: Vec<u16> = (0..ndigits)
        .map(|i| word(8 + i * 2))
        .collect::<std::result::Result<_, _>>()?;
    let group = |pos: i64| -> u16 {
        // `pos` is the base-10000 exponent; group index = weight - pos.
        let idx = weight - pos;
        if idx >= 0 && (idx as usize) < groups.len() {
            groups[idx as usize]
        } else {
            0
        }
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for pos in (0..=weight).rev() {
            if pos == weight {
                text.push_str(&group(pos).to_string());
            } else {
                text.push_str(&format!("{:04}", group(pos)));
            }
        }
    }
    if dscale > 0 {
        text.push('.');
        let mut frac = String::new();
        let mut pos = -1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", group(pos)));
            pos -= 1;
        }
        frac.truncate(dscale);
        text.push_str(&frac);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(text: &str) -> String {
        let mut buf = BytesMut::new();
        numeric_to_sql(text, &mut buf).unwrap();
        numeric_from_sql(&buf).unwrap()
    }

    #[test]
    fn numeric_round_trips_through_binary() {
        for (input, expected) in [
            ("0", "0"),
            ("1", "1"),
            ("-12.3400", "-12.3400"),
            ("12345678.9", "12345678.9"),
            ("0.0001", "0.0001"),
            ("100000000", "100000000"),
            ("1e3", "1000"),
            ("1.5e-3", "0.0015"),
            ("-0.5", "-0.5"),
            ("NaN", "NaN"),
        ] {
            assert_eq!(roundtrip(input), expected, "{input}");
        }
    }

    /// Found by the sql_params fuzz target: a millisecond count whose microseconds overflow
    /// an i64 panicked (debug) or wrapped to another instant (release).
    #[test]
    fn out_of_range_instants_are_refused_not_wrapped() {
        for (v, ty) in [
            (Value::Int(i64::MAX / 10), Type::TIMESTAMPTZ),
            (Value::BigInt(i64::MIN / 999), Type::TIMESTAMP),
            (Value::Int(i64::MIN / 1000), Type::TIMESTAMP),
            (Value::Timestamp(1e300), Type::TIMESTAMPTZ),
            (Value::Timestamp(f64::NAN), Type::TIMESTAMP),
            (Value::Timestamp(f64::NEG_INFINITY), Type::DATE),
            (Value::Timestamp(-1e300), Type::DATE),
        ] {
            let mut buf = BytesMut::new();
            let Err(err) = encode(&v, &ty, &mut buf) else {
                panic!("{v:?} as {ty} was encoded");
            };
            assert!(err.to_string().contains("out of range"), "{err}");
        }
        let mut buf = BytesMut::new();
        encode(&Value::Int(1_700_000_000_000), &Type::TIMESTAMPTZ, &mut buf).unwrap();
        assert_eq!(
            i64::from_be_bytes(buf[..].try_into().unwrap()),
            1_700_000_000_000_000 - PG_EPOCH_MICROS
        );
    }

    #[test]
    fn numeric_rejects_garbage() {
        let mut buf = BytesMut::new();
        assert!(numeric_to_sql("12a", &mut buf).is_err());
        assert!(numeric_to_sql("", &mut buf).is_err());
        assert!(numeric_to_sql("1e999999", &mut buf).is_err());
    }

    #[test]
    fn arrays_nest_by_dimension() {
        let v = nest(&[2, 2], &mut (1..=4).map(Value::Int));
        assert_eq!(
            v,
            Value::Array(vec![
                Value::Array(vec![Value::Int(1), Value::Int(2)]),
                Value::Array(vec![Value::Int(3), Value::Int(4)])
            ])
        );
    }
}
