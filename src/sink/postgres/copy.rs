//! PostgreSQL's binary COPY format, written straight from mapped rows: the fast path for
//! rows known to be absent.

use super::*;

/// Bytes of binary COPY data built before they are sent: a batch of large documents (a viz's
/// content holds its files) is several MB, and building it whole, then copying it into the
/// connection's buffer, was ~16 MB of the full mapping's peak heap (heaptrack, BENCHMARKS.md).
/// Each pooled connection keeps its write buffer at the largest message it sent: with 1 MB
/// pieces, three connections' buffers held 5.7 MB at the full mapping's heap peak (heaptrack,
/// fourteenth round); 256 KiB pieces bound each to about a quarter of that (the run's peak
/// RSS did not move beyond its run-to-run spread). A single row larger than that (a
/// megabyte-sized file) still goes out in messages of at most this size: the encoded rows are
/// cut at byte boundaries, which COPY allows, so no buffer grows to the size of a document.
pub(super) const COPY_CHUNK: usize = 256 << 10;

/// Microseconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// PostgreSQL's binary COPY format of rows of one table. Each type accepts the same values as
/// [`bind_array`] (anything else is NULL, as there), so both paths store the same thing.
/// Hand-written because sqlx exposes COPY only as raw bytes: the format is a header, then per
/// row a field count and per field a length and the type's binary form, then a trailer.
pub(super) struct CopyBinary<'t> {
    t: TableRef<'t>,
    fields: i16,
}

impl<'t> CopyBinary<'t> {
    /// None when a column type has no encoder here (numeric, date, uuid: those tables take
    /// the `INSERT … UNNEST` path), or a value cannot be encoded (a time outside
    /// PostgreSQL's range). Checked for every row first: once COPY has started, a row that
    /// fails would fail the whole transaction instead of taking the other path.
    pub(super) fn new(t: TableRef<'t>, rows: &[Vec<Value>]) -> Option<Self> {
        if t.columns
            .iter()
            .any(|c| via_text(c.ty) && c.ty != ColumnType::Json)
        {
            return None;
        }
        let fields = i16::try_from(t.columns.len()).ok()?;
        let encodable = |c: &crate::mapping::Column, v: &Value| match (c.ty, v) {
            (ColumnType::Timestamptz, Value::Timestamp(ts)) => {
                ts.timestamp_micros().checked_sub(PG_EPOCH_US).is_some()
            }
            (_, Value::Text(s)) => i32::try_from(s.len()).is_ok(),
            (_, Value::JsonText { text, .. }) => i32::try_from(text.len() + 1).is_ok(),
            _ => true,
        };
        rows.iter()
            .all(|row| t.columns.iter().zip(row).all(|(c, v)| encodable(c, v)))
            .then_some(CopyBinary { t, fields })
    }

    pub(super) fn header(out: &mut Vec<u8>) {
        out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        out.extend_from_slice(&0i32.to_be_bytes()); // flags
        out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    }

    pub(super) fn trailer(out: &mut Vec<u8>) {
        out.extend_from_slice(&(-1i16).to_be_bytes());
    }

    /// Append one row (None only for what [`CopyBinary::new`] checked).
    pub(super) fn row(&self, out: &mut Vec<u8>, row: &[Value]) -> Option<()> {
        let field = |out: &mut Vec<u8>, bytes: &[u8]| -> Option<()> {
            out.extend_from_slice(&i32::try_from(bytes.len()).ok()?.to_be_bytes());
            out.extend_from_slice(bytes);
            Some(())
        };
        out.extend_from_slice(&self.fields.to_be_bytes());
        for (c, v) in self.t.columns.iter().zip(row) {
            match (c.ty, v) {
                (ColumnType::Text, Value::Text(s)) => field(out, s.as_bytes())?,
                (ColumnType::Json, Value::JsonText { text, .. }) => {
                    out.extend_from_slice(&i32::try_from(text.len() + 1).ok()?.to_be_bytes());
                    out.push(1); // jsonb format version
                    out.extend_from_slice(text.as_bytes());
                }
                (ColumnType::Json, Value::Json(j)) => {
                    let mut b = vec![1u8];
                    serde_json::to_writer(&mut b, j).ok()?;
                    field(out, &b)?
                }
                (ColumnType::Integer, Value::Int(x)) => field(out, &x.to_be_bytes())?,
                (ColumnType::Bigint, Value::BigInt(x)) => field(out, &x.to_be_bytes())?,
                (ColumnType::Bigint, Value::Int(x)) => field(out, &(*x as i64).to_be_bytes())?,
                (ColumnType::Double, Value::Double(x)) => field(out, &x.to_be_bytes())?,
                (ColumnType::Boolean, Value::Bool(x)) => field(out, &[*x as u8])?,
                (ColumnType::Timestamptz, Value::Timestamp(ts)) => {
                    let us = ts.timestamp_micros().checked_sub(PG_EPOCH_US)?;
                    field(out, &us.to_be_bytes())?
                }
                _ => out.extend_from_slice(&(-1i32).to_be_bytes()), // NULL
            }
        }
        Some(())
    }
}
