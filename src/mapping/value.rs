//! Column types of the new schema and the typed values a document maps to.
//! Coercion from BSON lives here: one place decides what converts and what
//! becomes a dead letter.

use bson::{raw::RawBsonRef, spec::ElementType, Bson};
use chrono::{DateTime, TimeZone, Utc};
use serde::Deserialize;

/// SQL column types a mapping may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    Text,
    Integer,
    Bigint,
    Double,
    Boolean,
    Timestamptz,
    Json,
    /// Exact decimal (Decimal128, numbers, numeric strings); carried as canonical text.
    Numeric,
    /// Calendar date (from dates, timestamps or `YYYY-MM-DD` strings).
    Date,
    /// UUID (from strings or BSON binary subtype 4), lower-case hyphenated.
    Uuid,
}

impl ColumnType {
    pub fn postgres(self) -> &'static str {
        match self {
            ColumnType::Text => "TEXT",
            ColumnType::Integer => "INTEGER",
            ColumnType::Bigint => "BIGINT",
            ColumnType::Double => "DOUBLE PRECISION",
            ColumnType::Boolean => "BOOLEAN",
            ColumnType::Timestamptz => "TIMESTAMPTZ",
            ColumnType::Json => "JSONB",
            ColumnType::Numeric => "NUMERIC",
            ColumnType::Date => "DATE",
            ColumnType::Uuid => "UUID",
        }
    }

    pub fn sqlite(self) -> &'static str {
        match self {
            ColumnType::Text
            | ColumnType::Timestamptz
            | ColumnType::Json
            | ColumnType::Numeric
            | ColumnType::Date
            | ColumnType::Uuid => "TEXT",
            ColumnType::Integer | ColumnType::Bigint | ColumnType::Boolean => "INTEGER",
            ColumnType::Double => "REAL",
        }
    }
}

/// How a source value encodes the column's meaning, when that is not obvious from its BSON type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// BSON date (the default for timestamptz).
    Date,
    /// Number of seconds since 1970 (int32, int64 or double).
    EpochSeconds,
    /// Number of milliseconds since 1970 (int32, int64 or double).
    EpochMillis,
    /// ISO-8601 / RFC 3339 string.
    Iso8601,
    /// ObjectId rendered as 24 hex characters.
    ObjectidHex,
    /// The creation time embedded in an ObjectId.
    ObjectidTime,
}

/// A typed value ready to bind into a target statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Text(String),
    Int(i32),
    BigInt(i64),
    Double(f64),
    Bool(bool),
    Timestamp(DateTime<Utc>),
    Json(serde_json::Value),
    /// A JSON value already serialized: `text` is compact with keys in source order (what
    /// is stored); `sorted`, when known, is the same value with object keys sorted at every
    /// level (what row hashes read, see `canon`). Mapping writes both straight from the raw
    /// BSON ([`raw_to_json_text`]); the window pipeline turns remaining `Json` trees into
    /// text once the row is hashed and drops `sorted`, so the writer only binds text.
    JsonText {
        text: String,
        sorted: Option<String>,
    },
}

impl Value {
    /// A stable textual key used for in-batch de-duplication and lookups.
    pub fn key_text(&self) -> String {
        match self {
            Value::Null => "\u{0}null".into(),
            Value::Text(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::BigInt(i) => i.to_string(),
            Value::Double(d) => d.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Timestamp(t) => crate::engine::window::fmt_ts(*t),
            Value::Json(j) => j.to_string(),
            Value::JsonText { text, .. } => text.clone(),
        }
    }

    /// Serialized JSON, keys in source order (no sorted form).
    pub fn json_text(text: String) -> Value {
        Value::JsonText { text, sorted: None }
    }
}

/// Strip NUL characters, which PostgreSQL refuses in text and jsonb.
pub fn sanitize(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "")
    } else {
        s.to_owned()
    }
}

fn sanitize_json(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        J::String(s) => J::String(sanitize(&s)),
        J::Array(a) => J::Array(a.into_iter().map(sanitize_json).collect()),
        J::Object(o) => J::Object(
            o.into_iter()
                .map(|(k, v)| (sanitize(&k), sanitize_json(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Deepest nesting converted to JSON. MongoDB itself stores at most 100 levels; deeper
/// values (which other servers may accept) would exhaust the stack of the recursive
/// converters, so they are refused (a dead letter) instead.
pub const MAX_NESTING: usize = 100;

/// Whether `v` nests documents/arrays more than `limit` levels deep (stops at `limit + 1`).
pub fn nested_deeper_than(v: RawBsonRef<'_>, limit: usize) -> bool {
    let children = match v {
        RawBsonRef::Document(d) => d.into_iter().map(|r| r.map(|(_, v)| v)).collect::<Vec<_>>(),
        RawBsonRef::Array(a) => a.into_iter().collect::<Vec<_>>(),
        _ => return false,
    };
    if limit == 0 {
        return true;
    }
    children
        .into_iter()
        .flatten()
        .any(|c| nested_deeper_than(c, limit - 1))
}

/// Relaxed extended JSON of a raw BSON value, NUL-free, in one pass over the raw bytes.
/// The common types are converted here directly; the rare ones (dates, ObjectIds, binary,
/// regexes, decimals, non-finite doubles, …) go through the bson crate's own relaxed
/// extended JSON, one value at a time, so the output is exactly the crate's (a test checks
/// it). Going through `bson::Document` for the whole document cost three allocating passes.
pub fn raw_to_json(v: RawBsonRef<'_>) -> Result<serde_json::Value, String> {
    to_json(v, MAX_NESTING)
}

fn to_json(v: RawBsonRef<'_>, levels_left: usize) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    let too_deep = || {
        format!(
            "value is nested more than {MAX_NESTING} levels deep (MongoDB's own limit); \
             it cannot be converted to JSON"
        )
    };
    let undecodable = |e: bson::raw::Error| format!("undecodable BSON: {e}");
    Ok(match v {
        RawBsonRef::Document(d) => {
            if levels_left == 0 {
                return Err(too_deep());
            }
            let mut m = serde_json::Map::new();
            for el in d {
                let (k, v) = el.map_err(undecodable)?;
                m.insert(sanitize(k), to_json(v, levels_left - 1)?);
            }
            J::Object(m)
        }
        RawBsonRef::Array(a) => {
            if levels_left == 0 {
                return Err(too_deep());
            }
            let mut out = Vec::new();
            for el in a {
                out.push(to_json(el.map_err(undecodable)?, levels_left - 1)?);
            }
            J::Array(out)
        }
        RawBsonRef::String(s) => J::String(sanitize(s)),
        RawBsonRef::Int32(i) => J::from(i),
        RawBsonRef::Int64(i) => J::from(i),
        RawBsonRef::Boolean(b) => J::Bool(b),
        RawBsonRef::Null => J::Null,
        RawBsonRef::Double(f) if f.is_finite() => J::from(f),
        other => {
            let b = Bson::try_from(other).map_err(|e| format!("undecodable BSON: {e}"))?;
            sanitize_json(b.into_relaxed_extjson())
        }
    })
}

/// JSON of a raw BSON value as text, without a tree: [`Value::JsonText`] with the compact
/// text in source key order and the text with keys sorted at every level, each written in
/// one pass over the raw bytes. The bytes are exactly those of [`raw_to_json`] serialized
/// and of its tree rendered sorted (tests check both). Building, walking and freeing the
/// `serde_json` tree was most of the mapper's time on documents with a whole-document
/// JSON column (BENCHMARKS.md). A document that repeats a key (the tree keeps the last
/// value at the first position) and every error take the tree's path, so its rules and
/// messages stay the only ones.
pub fn raw_to_json_text(v: RawBsonRef<'_>) -> Result<Value, String> {
    let mut text = Vec::with_capacity(1024);
    let mut sorted = Vec::with_capacity(1024);
    let mut scratch = Vec::new();
    if !matches!(
        write_dual(v, MAX_NESTING, &mut text, &mut sorted, &mut scratch),
        Ok(true)
    ) {
        return raw_to_json(v).map(Value::Json);
    }
    // The writers copy `&str` slices and ASCII punctuation only.
    let utf8 =
        |b: Vec<u8>| String::from_utf8(b).map_err(|e| format!("JSON text is not UTF-8: {e}"));
    Ok(Value::JsonText {
        text: utf8(text)?,
        sorted: Some(utf8(sorted)?),
    })
}

fn sanitized(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', ""))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    // serde_json's own string escaping, so the text matches a serialized tree.
    serde_json::to_writer(out, s).expect("JSON into memory");
}

/// Writes `v` as compact JSON twice in one walk: to `text` in source order and to `sorted`
/// with keys sorted. A document's members are first rendered to `sorted` in source order,
/// then moved into key order through `scratch` (members are finished, so one scratch
/// buffer serves every level). Ok(false) when a document repeats a key.
fn write_dual(
    v: RawBsonRef<'_>,
    levels_left: usize,
    text: &mut Vec<u8>,
    sorted: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<bool, String> {
    let undecodable = |e: bson::raw::Error| format!("undecodable BSON: {e}");
    match v {
        RawBsonRef::Document(d) => {
            if levels_left == 0 {
                return Err("too deep".into());
            }
            text.push(b'{');
            let base = sorted.len();
            let mut members = Vec::new();
            for (n, el) in d.into_iter().enumerate() {
                let (k, v) = el.map_err(undecodable)?;
                let k = sanitized(k);
                if n > 0 {
                    text.push(b',');
                }
                write_str(&k, text);
                text.push(b':');
                let start = sorted.len();
                if !write_dual(v, levels_left - 1, text, sorted, scratch)? {
                    return Ok(false);
                }
                members.push((k, start - base, sorted.len() - base));
            }
            text.push(b'}');
            members.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            if members.windows(2).any(|w| w[0].0 == w[1].0) {
                return Ok(false);
            }
            scratch.clear();
            scratch.extend_from_slice(&sorted[base..]);
            sorted.truncate(base);
            sorted.push(b'{');
            for (n, (k, start, end)) in members.iter().enumerate() {
                if n > 0 {
                    sorted.push(b',');
                }
                write_str(k, sorted);
                sorted.push(b':');
                sorted.extend_from_slice(&scratch[*start..*end]);
            }
            sorted.push(b'}');
        }
        RawBsonRef::Array(a) => {
            if levels_left == 0 {
                return Err("too deep".into());
            }
            text.push(b'[');
            sorted.push(b'[');
            for (n, el) in a.into_iter().enumerate() {
                if n > 0 {
                    text.push(b',');
                    sorted.push(b',');
                }
                let el = el.map_err(undecodable)?;
                if !write_dual(el, levels_left - 1, text, sorted, scratch)? {
                    return Ok(false);
                }
            }
            text.push(b']');
            sorted.push(b']');
        }
        scalar => {
            let start = text.len();
            match scalar {
                RawBsonRef::String(s) => write_str(&sanitized(s), text),
                RawBsonRef::Int32(i) => {
                    text.extend_from_slice(itoa::Buffer::new().format(i).as_bytes())
                }
                RawBsonRef::Int64(i) => {
                    text.extend_from_slice(itoa::Buffer::new().format(i).as_bytes())
                }
                RawBsonRef::Boolean(b) => {
                    text.extend_from_slice(if b { b"true" } else { b"false" })
                }
                RawBsonRef::Null => text.extend_from_slice(b"null"),
                RawBsonRef::Double(f) if f.is_finite() => {
                    serde_json::to_writer(&mut *text, &f).expect("JSON into memory")
                }
                other => {
                    // Rare types: the bson crate's relaxed extended JSON of this one value.
                    let j = to_json(other, levels_left)?;
                    serde_json::to_writer(&mut *text, &j).expect("JSON into memory");
                    write_sorted_json(&j, sorted);
                    return Ok(true);
                }
            }
            sorted.extend_from_slice(&text[start..]);
        }
    }
    Ok(true)
}

/// Compact JSON of a tree with object keys sorted at every level.
pub fn write_sorted_json(j: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value as J;
    match j {
        J::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            out.push(b'{');
            for (n, k) in keys.into_iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                write_str(k, out);
                out.push(b':');
                write_sorted_json(&o[k], out);
            }
            out.push(b'}');
        }
        J::Array(a) => {
            out.push(b'[');
            for (n, v) in a.iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                write_sorted_json(v, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("JSON into memory"),
    }
}

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
                to_timestamp(v, None).map(|t| Value::Text(crate::engine::window::fmt_ts(t)))
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
    fn nesting_beyond_the_limit_is_an_error_not_a_stack_overflow() {
        let nest = |levels: usize| {
            let v = (0..levels).fold(Bson::Int32(1), |v, _| Bson::Array(vec![v]));
            bson::RawDocumentBuf::from_document(&bson::doc! { "v": v }).unwrap()
        };
        let ok = nest(MAX_NESTING);
        assert!(raw_to_json(ok.get("v").unwrap().unwrap()).is_ok());
        let deep = nest(MAX_NESTING + 1);
        let err = raw_to_json(deep.get("v").unwrap().unwrap()).unwrap_err();
        assert!(err.contains("nested"), "{err}");
        let very = nest(150);
        assert!(raw_to_json(very.get("v").unwrap().unwrap()).is_err());
    }

    #[test]
    fn one_pass_json_is_the_bson_crates_relaxed_extended_json() {
        let d = bson::doc! {
            "s": "a\u{0}b", "i": 1i32, "l": 1i64 << 40, "d": 1.5, "whole": 2.0, "nan": f64::NAN,
            "inf": f64::NEG_INFINITY, "b": true, "n": Bson::Null, "date": bson::DateTime::from_millis(1_600_000_000_123),
            "old": bson::DateTime::from_millis(-1), "oid": bson::oid::ObjectId::from_bytes([7; 12]),
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2] },
            "re": bson::Regex { pattern: "x".into(), options: "mi".into() },
            "dec": Bson::Decimal128(bson::Decimal128::from_bytes([1; 16])),
            "ts": bson::Timestamp { time: 1, increment: 2 }, "min": Bson::MinKey, "max": Bson::MaxKey,
            "undef": Bson::Undefined, "key": { "nested": [1, { "x": [] }, "y"] }, "empty": {},
        };
        let raw = bson::RawDocumentBuf::from_document(&d).unwrap();
        let old = sanitize_json(Bson::Document(d).into_relaxed_extjson());
        let new = raw_to_json(RawBsonRef::Document(&raw)).unwrap();
        assert_eq!(new.to_string(), old.to_string());
    }

    /// The one-pass text writer gives exactly the tree's bytes, in source order and sorted.
    fn assert_text_matches_tree(raw: &bson::RawDocument) {
        let v = RawBsonRef::Document(raw);
        let tree = raw_to_json(v).unwrap();
        let mut sorted_tree = Vec::new();
        write_sorted_json(&tree, &mut sorted_tree);
        match raw_to_json_text(v).unwrap() {
            Value::JsonText { text, sorted } => {
                assert_eq!(text, tree.to_string());
                assert_eq!(sorted.unwrap().as_bytes(), &sorted_tree[..]);
            }
            Value::Json(j) => assert_eq!(j, tree, "fallback must be the tree"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn one_pass_text_is_the_trees_text_sorted_and_unsorted() {
        let d = bson::doc! {
            "zeta": "a\u{0}b\"\\\n\u{1}é😀", "i": -1i32, "l": i64::MIN, "d": 1.5, "whole": 2.0, "tiny": 1e-300,
            "nan": f64::NAN, "inf": f64::NEG_INFINITY, "b": false, "n": Bson::Null,
            "date": bson::DateTime::from_millis(1_600_000_000_123), "oid": bson::oid::ObjectId::from_bytes([7; 12]),
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2] },
            "re": bson::Regex { pattern: "x".into(), options: "mi".into() },
            "dec": Bson::Decimal128(bson::Decimal128::from_bytes([1; 16])),
            "ts": bson::Timestamp { time: 1, increment: 2 }, "min": Bson::MinKey, "undef": Bson::Undefined,
            "key": { "nested": [1, { "y": [], "x": { "b": 1, "a\u{e9}": 2, "A": 3, "a": 4 } }, "y"] }, "empty": {}, "arr": [],
            "upvotes": [{ "userId": "u1", "timestamp": 1_600_000_000i64 }, { "timestamp": 3, "userId": "u2" }],
        };
        assert_text_matches_tree(&bson::RawDocumentBuf::from_document(&d).unwrap());
        // Raw BSON may repeat a key (BSON keys cannot hold NUL, so sanitizing never merges two).
        let mut repeated = bson::RawDocumentBuf::new();
        repeated.append("k", 1);
        repeated.append("j", "x");
        repeated.append("k", 2);
        let v = RawBsonRef::Document(&repeated);
        assert!(
            matches!(raw_to_json_text(v).unwrap(), Value::Json(_)),
            "the tree decides"
        );
        assert_text_matches_tree(&repeated);
    }

    #[test]
    fn one_pass_text_errors_are_the_trees_errors() {
        fn nest(n: usize) -> bson::Document {
            let mut v = Bson::Int32(1);
            for _ in 0..n {
                v = Bson::Document(bson::doc! { "a": v });
            }
            bson::doc! { "v": v }
        }
        let deep = bson::RawDocumentBuf::from_document(&nest(MAX_NESTING + 1)).unwrap();
        let v = deep.get("v").unwrap().unwrap();
        assert_eq!(
            raw_to_json_text(v).unwrap_err(),
            raw_to_json(v).unwrap_err()
        );
    }

    #[test]
    fn nul_bytes_are_removed() {
        assert_eq!(
            coerce(&RawBsonRef::String("a\0b"), ColumnType::Text, None).unwrap(),
            Value::Text("ab".into())
        );
    }
}
