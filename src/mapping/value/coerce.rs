//! One source value to a column's type: what converts, and what becomes a dead letter
//! (the error text names the value's BSON type and the way out).

use super::{raw_to_json_text, sanitize, ColumnType, SourceFormat, Value};
use bson::{raw::RawBsonRef, spec::ElementType, Bson};
use chrono::{DateTime, TimeZone, Utc};

fn type_name(v: &RawBsonRef<'_>) -> &'static str {
    match v.element_type() {
        ElementType::Double => "double",
        ElementType::String => "string",
        ElementType::EmbeddedDocument => "object",
        ElementType::Array => "array",
        ElementType::Binary => "binary",
        ElementType::ObjectId => "objectId",
        ElementType::Boolean => "bool",
        ElementType::DateTime => "date",
        ElementType::Null => "null",
        ElementType::Int32 => "int",
        ElementType::Int64 => "long",
        ElementType::Decimal128 => "decimal",
        _ => "other",
    }
}

fn as_f64(v: &RawBsonRef<'_>) -> Option<f64> {
    match *v {
        RawBsonRef::Int32(i) => Some(i as f64),
        RawBsonRef::Int64(i) => Some(i as f64),
        RawBsonRef::Double(d) => Some(d),
        RawBsonRef::Decimal128(d) => d.to_string().parse().ok(),
        _ => None,
    }
}

fn as_i64(v: &RawBsonRef<'_>) -> Option<i64> {
    match *v {
        RawBsonRef::Int32(i) => Some(i as i64),
        RawBsonRef::Int64(i) => Some(i),
        RawBsonRef::Double(d) if d.fract() == 0.0 && d.abs() < 9.2e18 => Some(d as i64),
        RawBsonRef::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Year range every backend stores losslessly.
fn check_year(t: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    use chrono::Datelike;
    if (1..=9999).contains(&t.year()) {
        Ok(t)
    } else {
        Err(format!("timestamp {t} is outside years 1..=9999"))
    }
}

fn from_millis(ms: i64) -> Result<DateTime<Utc>, String> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .ok_or_else(|| format!("{ms} ms is not a representable time"))
        .and_then(check_year)
}

/// Interpret `v` as an instant according to `format`.
pub fn to_timestamp(
    v: &RawBsonRef<'_>,
    format: Option<SourceFormat>,
) -> Result<DateTime<Utc>, String> {
    match (format, *v) {
        (None | Some(SourceFormat::Date), RawBsonRef::DateTime(d)) => {
            from_millis(d.timestamp_millis())
        }
        (Some(SourceFormat::EpochSeconds), _) => match as_f64(v) {
            Some(s) if s.is_finite() && s.abs() < 1e13 => from_millis((s * 1000.0).round() as i64),
            _ => Err(format!(
                "expected epoch seconds (a number), found {}",
                type_name(v)
            )),
        },
        (Some(SourceFormat::EpochMillis), _) => match as_f64(v) {
            Some(ms) if ms.is_finite() && ms.abs() < 1e16 => from_millis(ms.round() as i64),
            _ => Err(format!(
                "expected epoch milliseconds (a number), found {}",
                type_name(v)
            )),
        },
        (None | Some(SourceFormat::Iso8601), RawBsonRef::String(s)) => {
            DateTime::parse_from_rfc3339(s.trim())
                .map(|d| d.with_timezone(&Utc))
                .map_err(|e| format!("`{s}` is not an ISO-8601 time: {e}"))
                .and_then(check_year)
        }
        (Some(SourceFormat::ObjectidTime), RawBsonRef::ObjectId(o)) => {
            from_millis(o.timestamp().timestamp_millis())
        }
        (None, other) => Err(format!(
            "a {} cannot become a timestamp; set `from` to epoch_seconds, epoch_millis or iso8601",
            type_name(&other)
        )),
        (Some(f), other) => Err(format!("expected {f:?}, found {}", type_name(&other))),
    }
}

/// Convert one source value to the column type.
pub fn coerce(
    v: &RawBsonRef<'_>,
    ty: ColumnType,
    format: Option<SourceFormat>,
) -> Result<Value, String> {
    if matches!(v, RawBsonRef::Null | RawBsonRef::Undefined) {
        return Ok(Value::Null);
    }
    match ty {
        ColumnType::Text => match *v {
            RawBsonRef::String(s) => Ok(Value::Text(sanitize(s))),
            RawBsonRef::ObjectId(o) => Ok(Value::Text(o.to_hex())),
            RawBsonRef::Int32(i) => Ok(Value::Text(i.to_string())),
            RawBsonRef::Int64(i) => Ok(Value::Text(i.to_string())),
            RawBsonRef::Double(d) => Ok(Value::Text(d.to_string())),
            RawBsonRef::Boolean(b) => Ok(Value::Text(b.to_string())),
            RawBsonRef::Decimal128(d) => Ok(Value::Text(d.to_string())),
            RawBsonRef::DateTime(_) => {
                to_timestamp(v, None).map(|t| Value::Text(crate::span::fmt_ts(t)))
            }
            _ => Err(format!("expected text, found {}", type_name(v))),
        },
        ColumnType::Integer => match as_i64(v) {
            Some(i) => i32::try_from(i)
                .map(Value::Int)
                .map_err(|_| format!("{i} is out of range for integer; declare the column bigint")),
            None => Err(format!("expected an integer, found {}", type_name(v))),
        },
        ColumnType::Bigint => as_i64(v)
            .map(Value::BigInt)
            .ok_or_else(|| format!("expected an integer, found {}", type_name(v))),
        ColumnType::Double => match as_f64(v) {
            Some(d) if d.is_finite() => Ok(Value::Double(d)),
            Some(d) => Err(format!("{d} is not a finite number")),
            None => Err(format!("expected a number, found {}", type_name(v))),
        },
        ColumnType::Boolean => match *v {
            RawBsonRef::Boolean(b) => Ok(Value::Bool(b)),
            RawBsonRef::Int32(i) if i == 0 || i == 1 => Ok(Value::Bool(i == 1)),
            RawBsonRef::String("true") => Ok(Value::Bool(true)),
            RawBsonRef::String("false") => Ok(Value::Bool(false)),
            _ => Err(format!("expected a boolean, found {}", type_name(v))),
        },
        ColumnType::Timestamptz => to_timestamp(v, format).map(Value::Timestamp),
        ColumnType::Json => raw_to_json_text(*v),
        ColumnType::Numeric => match *v {
            RawBsonRef::Decimal128(d) => numeric_text(&d.to_string()),
            RawBsonRef::Int32(i) => Ok(Value::Text(i.to_string())),
            RawBsonRef::Int64(i) => Ok(Value::Text(i.to_string())),
            RawBsonRef::Double(d) if d.is_finite() => Ok(Value::Text(d.to_string())),
            RawBsonRef::String(s) => numeric_text(s),
            _ => Err(format!("expected a decimal number, found {}", type_name(v))),
        },
        ColumnType::Date => match (*v, format) {
            (RawBsonRef::String(s), None) if s.len() == 10 => {
                chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                    .map(|d| Value::Text(d.to_string()))
                    .map_err(|e| format!("`{s}` is not a date (YYYY-MM-DD): {e}"))
            }
            _ => to_timestamp(v, format).map(|t| Value::Text(t.date_naive().to_string())),
        },
        ColumnType::Uuid => match *v {
            RawBsonRef::String(s) => uuid_text(s),
            RawBsonRef::Binary(b) if b.bytes.len() == 16 => Ok(Value::Text(
                uuid::Uuid::from_slice(b.bytes)
                    .map_err(|e| e.to_string())?
                    .to_string(),
            )),
            _ => Err(format!("expected a UUID, found {}", type_name(v))),
        },
    }
}

fn numeric_text(s: &str) -> Result<Value, String> {
    let t = s.trim();
    let ok = !t.is_empty()
        && t.trim_start_matches(['-', '+']).chars().all(|c| {
            c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E' || c == '-' || c == '+'
        })
        && t.parse::<f64>().is_ok_and(f64::is_finite);
    if ok {
        Ok(Value::Text(t.to_owned()))
    } else {
        Err(format!("`{s}` is not a finite decimal number"))
    }
}

fn uuid_text(s: &str) -> Result<Value, String> {
    uuid::Uuid::parse_str(s.trim())
        .map(|u| Value::Text(u.to_string()))
        .map_err(|e| format!("`{s}` is not a UUID: {e}"))
}

/// CEL results that are not directly of the column's type: strings parsed by the column's rules.
pub fn from_text_like(v: cel_interpreter::Value, ty: ColumnType) -> Result<Value, String> {
    use cel_interpreter::Value as Cel;
    let s = match &v {
        Cel::String(s) => s.to_string(),
        Cel::Int(i) => i.to_string(),
        Cel::UInt(i) => i.to_string(),
        Cel::Float(f) => f.to_string(),
        other => return Err(format!("expression result {other:?} cannot become {ty:?}")),
    };
    let raw = RawBsonRef::String(&s);
    match (ty, &v) {
        (ColumnType::Integer | ColumnType::Bigint, Cel::String(_)) => coerce(&raw, ty, None),
        (ColumnType::Numeric | ColumnType::Date | ColumnType::Uuid, _) => coerce(&raw, ty, None),
        _ => Err(format!("expression result {v:?} cannot become {ty:?}")),
    }
}

/// Convert a constant or default from the mapping file.
pub fn from_toml(v: &toml::Value, ty: ColumnType) -> Result<Value, String> {
    let b = Bson::try_from(serde_json::to_value(v).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let raw = bson::RawBson::try_from(b).map_err(|e| e.to_string())?;
    coerce(&raw.as_raw_bson_ref(), ty, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_seconds_in_any_numeric_type() {
        for v in [
            RawBsonRef::Int32(1_600_000_000),
            RawBsonRef::Int64(1_600_000_000),
            RawBsonRef::Double(1.6e9),
        ] {
            let t = to_timestamp(&v, Some(SourceFormat::EpochSeconds)).unwrap();
            assert_eq!(t.timestamp(), 1_600_000_000);
        }
        assert!(to_timestamp(
            &RawBsonRef::String("1600000000"),
            Some(SourceFormat::EpochSeconds)
        )
        .is_err());
    }

    #[test]
    fn out_of_range_values_are_errors_not_wraps() {
        assert!(coerce(&RawBsonRef::Int64(1 << 40), ColumnType::Integer, None).is_err());
        assert!(to_timestamp(
            &RawBsonRef::Int64(400_000_000_000),
            Some(SourceFormat::EpochSeconds)
        )
        .is_err());
        assert!(coerce(&RawBsonRef::Double(f64::NAN), ColumnType::Double, None).is_err());
    }

    #[test]
    fn nul_bytes_are_removed() {
        assert_eq!(
            coerce(&RawBsonRef::String("a\0b"), ColumnType::Text, None).unwrap(),
            Value::Text("ab".into())
        );
    }
}
