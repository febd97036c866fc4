//! Column types of the new schema and the typed values a document maps to.
//! Coercion from BSON lives here: one place decides what converts and what
//! becomes a dead letter (`coerce.rs`); `json.rs` turns BSON into JSON, as a tree or as
//! text in one pass.

mod coerce;
mod json;

pub use coerce::{coerce, from_text_like, from_toml, to_timestamp};
pub use json::{nested_deeper_than, raw_to_json, raw_to_json_text, write_sorted_json, MAX_NESTING};

use chrono::{DateTime, Utc};
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
    /// The name a mapping file gives the type (`type = "timestamptz"`).
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Integer => "integer",
            ColumnType::Bigint => "bigint",
            ColumnType::Double => "double",
            ColumnType::Boolean => "boolean",
            ColumnType::Timestamptz => "timestamptz",
            ColumnType::Json => "json",
            ColumnType::Numeric => "numeric",
            ColumnType::Date => "date",
            ColumnType::Uuid => "uuid",
        }
    }

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
            Value::Timestamp(t) => crate::span::fmt_ts(*t),
            Value::Json(j) => j.to_string(),
            Value::JsonText { text, .. } => text.clone(),
        }
    }

    /// Serialized JSON, keys in source order (no sorted form).
    pub fn json_text(text: String) -> Value {
        Value::JsonText { text, sorted: None }
    }
}

/// The key text of a key of several values: each value's [`Value::key_text`], joined by
/// U+001F. The one in-memory encoding of keys (de-duplication in a page, child rows matched
/// with their parents, the run's memo). The other, `canon::key_text` (canonical JSON), is
/// what provenance stores and verify compares across backends: the two are not
/// interchangeable, and neither may change, since both reach stored records.
pub fn key_text<'v>(key: impl IntoIterator<Item = &'v Value>) -> String {
    key.into_iter()
        .map(Value::key_text)
        .collect::<Vec<_>>()
        .join("\u{1f}")
}

/// [`key_text`] of the columns `cols` of `row`.
pub fn key_text_of(row: &[Value], cols: &[usize]) -> String {
    key_text(cols.iter().map(|&i| &row[i]))
}

/// Strip NUL characters, which PostgreSQL refuses in text and jsonb.
pub fn sanitize(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "")
    } else {
        s.to_owned()
    }
}
