//! PostgreSQL: one `INSERT … SELECT * FROM UNNEST(…)` per batch and table, one array
//! parameter per column, so a batch costs one round-trip whatever its size.

mod copy;
mod fence;

use super::ddl::quote;
use super::{ProvenanceRow, TableOps};
use crate::mapping::{ColumnType, TableRef, Value};
use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use copy::{CopyBinary, COPY_CHUNK};
use sqlx::{Postgres, QueryBuilder, Row, Transaction};

fn pg_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Text => "text",
        ColumnType::Integer => "int4",
        ColumnType::Bigint => "int8",
        ColumnType::Double => "float8",
        ColumnType::Boolean => "bool",
        ColumnType::Timestamptz => "timestamptz",
        ColumnType::Json => "jsonb",
        ColumnType::Numeric => "numeric",
        ColumnType::Date => "date",
        ColumnType::Uuid => "uuid",
    }
}

/// Types carried as text and cast on the server.
fn via_text(t: ColumnType) -> bool {
    matches!(
        t,
        ColumnType::Json | ColumnType::Numeric | ColumnType::Date | ColumnType::Uuid
    )
}

/// Array parameter `$n` as an array of the column type (bound as text when the driver
/// cannot encode the type itself).
fn array_param(n: usize, ty: ColumnType) -> String {
    if via_text(ty) {
        format!("${n}::text[]::{}[]", pg_type(ty))
    } else {
        format!("${n}::{}[]", pg_type(ty))
    }
}

/// `INSERT INTO t (…) SELECT * FROM UNNEST(…)`: the start of both write statements.
fn insert_sql(t: TableRef<'_>) -> String {
    let cols: Vec<String> = t.columns.iter().map(|c| quote(&c.name)).collect();
    let unnest: Vec<String> = t
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| array_param(i + 1, c.ty))
        .collect();
    format!(
        "INSERT INTO {} AS cur ({}) SELECT * FROM UNNEST({})",
        quote(t.name),
        cols.join(", "),
        unnest.join(", ")
    )
}

/// The upsert statement for a table; rows identical to the stored ones are not touched.
pub fn upsert_sql(t: TableRef<'_>) -> String {
    let cols: Vec<String> = t.columns.iter().map(|c| quote(&c.name)).collect();
    let pk: Vec<String> = t.pk.iter().map(|&i| quote(&t.columns[i].name)).collect();
    let rest: Vec<&String> = cols
        .iter()
        .enumerate()
        .filter(|(i, _)| !t.pk.contains(i))
        .map(|(_, c)| c)
        .collect();
    let conflict = if rest.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        let set: Vec<String> = rest.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
        let cur: Vec<String> = rest.iter().map(|c| format!("cur.{c}")).collect();
        let exc: Vec<String> = rest.iter().map(|c| format!("EXCLUDED.{c}")).collect();
        format!(
            "DO UPDATE SET {} WHERE ROW({}) IS DISTINCT FROM ROW({})",
            set.join(", "),
            cur.join(", "),
            exc.join(", ")
        )
    };
    format!(
        "{} ON CONFLICT ({}) {}",
        insert_sql(t),
        pk.join(", "),
        conflict
    )
}

fn column<'r, T>(
    rows: &'r [Vec<Value>],
    i: usize,
    f: impl Fn(&'r Value) -> Option<T>,
) -> Vec<Option<T>> {
    rows.iter().map(|r| f(&r[i])).collect()
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

/// Bind column `i` of `rows` as one array parameter of the column's type.
/// Text is borrowed from `rows`, not copied: a batch's JSON column is most of its bytes.
fn bind_array<'q>(q: PgQuery<'q>, rows: &'q [Vec<Value>], i: usize, ty: ColumnType) -> PgQuery<'q> {
    match ty {
        ColumnType::Text | ColumnType::Numeric | ColumnType::Date | ColumnType::Uuid => {
            q.bind(column(rows, i, |v| match v {
                Value::Text(s) => Some(s.as_str()),
                _ => None,
            }))
        }
        ColumnType::Json => q.bind(column(rows, i, |v| match v {
            Value::Json(j) => Some(std::borrow::Cow::Owned(j.to_string())),
            Value::JsonText { text, .. } => Some(std::borrow::Cow::Borrowed(text.as_str())),
            _ => None,
        })),
        ColumnType::Integer => q.bind(column(rows, i, |v| match v {
            Value::Int(x) => Some(*x),
            _ => None,
        })),
        ColumnType::Bigint => q.bind(column(rows, i, |v| match v {
            Value::BigInt(x) => Some(*x),
            Value::Int(x) => Some(*x as i64),
            _ => None,
        })),
        ColumnType::Double => q.bind(column(rows, i, |v| match v {
            Value::Double(x) => Some(*x),
            _ => None,
        })),
        ColumnType::Boolean => q.bind(column(rows, i, |v| match v {
            Value::Bool(x) => Some(*x),
            _ => None,
        })),
        ColumnType::Timestamptz => q.bind(column::<DateTime<Utc>>(rows, i, |v| match v {
            Value::Timestamp(t) => Some(*t),
            _ => None,
        })),
    }
}

/// `WHERE (c1, c2) IN (SELECT * FROM UNNEST($1::t1[], $2::t2[]))`: the whole key set as one
/// array per column, so the statement text is the same for every batch (prepared once) and
/// the planner sees one hashable set instead of a thousand-row VALUES list. (`c = ANY($1)`
/// was measured too: its generic plan scans the table comparing each row with every key.)
/// The planner needs statistics to pick an index here: see [`crate::sink::Sink::analyze_grown`].
fn key_filter(t: TableRef<'_>, by: &[usize]) -> String {
    let names: Vec<String> = by.iter().map(|&i| quote(&t.columns[i].name)).collect();
    let arrays: Vec<String> = by
        .iter()
        .enumerate()
        .map(|(n, &i)| array_param(n + 1, t.columns[i].ty))
        .collect();
    format!(
        " WHERE ({}) IN (SELECT * FROM UNNEST({}))",
        names.join(", "),
        arrays.join(", ")
    )
}

/// Bind a key set for [`key_filter`].
fn bind_keys<'q>(
    mut q: PgQuery<'q>,
    t: TableRef<'_>,
    by: &[usize],
    keys: &'q [Vec<Value>],
) -> PgQuery<'q> {
    for (n, &i) in by.iter().enumerate() {
        q = bind_array(q, keys, n, t.columns[i].ty);
    }
    q
}

fn push_value(q: &mut QueryBuilder<'_, Postgres>, v: &Value, ty: ColumnType) {
    match v {
        Value::Null => q.push(format!("NULL::{}", pg_type(ty))),
        Value::Text(s) => q.push_bind(s.clone()).push(format!("::{}", pg_type(ty))),
        Value::Int(x) => q.push_bind(*x),
        Value::BigInt(x) => q.push_bind(*x),
        Value::Double(x) => q.push_bind(*x),
        Value::Bool(x) => q.push_bind(*x),
        Value::Timestamp(t) => q.push_bind(*t),
        Value::Json(j) => q.push_bind(j.to_string()).push("::jsonb"),
        Value::JsonText { text, .. } => q.push_bind(text.clone()).push("::jsonb"),
    };
}

/// `WHERE (c1, c2) IN (VALUES (…))` for a few literal keys.
fn push_in(
    q: &mut QueryBuilder<'_, Postgres>,
    t: TableRef<'_>,
    cols: &[usize],
    keys: &[Vec<Value>],
) {
    let names: Vec<String> = cols.iter().map(|&i| quote(&t.columns[i].name)).collect();
    q.push(format!(" WHERE ({}) IN (VALUES ", names.join(", ")));
    for (n, k) in keys.iter().enumerate() {
        q.push(if n == 0 { "(" } else { ", (" });
        for (j, v) in k.iter().enumerate() {
            if j > 0 {
                q.push(", ");
            }
            push_value(q, v, t.columns[cols[j]].ty);
        }
        q.push(")");
    }
    q.push(")");
}

fn decode(row: &sqlx::postgres::PgRow, i: usize, ty: ColumnType) -> Result<Value> {
    Ok(match ty {
        ColumnType::Integer => row
            .try_get::<Option<i32>, _>(i)?
            .map_or(Value::Null, Value::Int),
        ColumnType::Bigint => row
            .try_get::<Option<i64>, _>(i)?
            .map_or(Value::Null, Value::BigInt),
        ColumnType::Double => row
            .try_get::<Option<f64>, _>(i)?
            .map_or(Value::Null, Value::Double),
        ColumnType::Boolean => row
            .try_get::<Option<bool>, _>(i)?
            .map_or(Value::Null, Value::Bool),
        ColumnType::Timestamptz => row
            .try_get::<Option<DateTime<Utc>>, _>(i)?
            .map_or(Value::Null, Value::Timestamp),
        _ => row
            .try_get::<Option<String>, _>(i)?
            .map_or(Value::Null, Value::Text),
    })
}

/// Every column, types the driver cannot decode as such read as text.
fn select_list(t: TableRef<'_>) -> String {
    t.columns
        .iter()
        .map(|c| {
            if via_text(c.ty) {
                format!("{}::text", quote(&c.name))
            } else {
                quote(&c.name)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn decode_row(t: TableRef<'_>, row: &sqlx::postgres::PgRow) -> Result<Vec<Value>> {
    t.columns
        .iter()
        .enumerate()
        .map(|(i, c)| match (decode(row, i, c.ty)?, c.ty) {
            (Value::Text(s), ColumnType::Json) => Ok(Value::Json(serde_json::from_str(&s)?)),
            (v, _) => Ok(v),
        })
        .collect()
}

fn write_error(e: sqlx::Error, t: TableRef<'_>, n: usize) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("writing {n} rows into {}", t.name))
}

/// A plain insert of rows that should not exist yet: it skips `ON CONFLICT`'s speculative
/// insertion (about a third of the statement's cost), and binary `COPY` skips building and
/// unpacking one array per column (BENCHMARKS.md). A key that exists fails it (23505).
/// The COPY data goes out in pieces of about [`COPY_CHUNK`] bytes.
async fn insert_plain(
    tx: &mut Transaction<'_, Postgres>,
    t: TableRef<'_>,
    rows: &[Vec<Value>],
) -> sqlx::Result<u64> {
    let Some(enc) = CopyBinary::new(t, rows) else {
        let sql = insert_sql(t);
        let mut q = sqlx::query(&sql);
        for (i, c) in t.columns.iter().enumerate() {
            q = bind_array(q, rows, i, c.ty);
        }
        return q.execute(&mut **tx).await.map(|d| d.rows_affected());
    };
    let cols: Vec<String> = t.columns.iter().map(|c| quote(&c.name)).collect();
    let sql = format!(
        "COPY {} ({}) FROM STDIN (FORMAT binary)",
        quote(t.name),
        cols.join(", ")
    );
    let mut copy = (**tx).copy_in_raw(&sql).await?;
    let mut buf = Vec::with_capacity(COPY_CHUNK.min(64 + rows.len() * 256) + (64 << 10));
    CopyBinary::header(&mut buf);
    let sent = async {
        for row in rows {
            enc.row(&mut buf, row).ok_or_else(|| {
                sqlx::Error::Protocol(format!("a row of {} could not be encoded for COPY", t.name))
            })?;
            if buf.len() >= COPY_CHUNK {
                for piece in buf.chunks(COPY_CHUNK) {
                    copy.send(piece).await?;
                }
                buf.clear();
            }
        }
        CopyBinary::trailer(&mut buf);
        for piece in buf.chunks(COPY_CHUNK) {
            copy.send(piece).await?;
        }
        Ok::<_, sqlx::Error>(())
    }
    .await;
    match sent {
        Ok(()) => copy.finish().await,
        Err(e) => {
            // Ends the COPY on the server too; the error to report is `e`.
            let _ = copy.abort(e.to_string()).await;
            Err(e)
        }
    }
}

impl TableOps for Transaction<'_, Postgres> {
    async fn select_rows(
        &mut self,
        t: TableRef<'_>,
        by: &[usize],
        keys: &[Vec<Value>],
    ) -> Result<Vec<Vec<Value>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {} FROM {}{}",
            select_list(t),
            quote(t.name),
            key_filter(t, by)
        );
        bind_keys(sqlx::query(&sql), t, by, keys)
            .fetch_all(&mut **self)
            .await
            .with_context(|| format!("reading rows of {}", t.name))?
            .iter()
            .map(|row| decode_row(t, row))
            .collect()
    }

    async fn select_page(
        &mut self,
        t: TableRef<'_>,
        by: &[usize],
        key: &[Value],
        after: Option<&[Value]>,
        limit: usize,
    ) -> Result<Vec<Vec<Value>>> {
        let col = |i: &usize| quote(&t.columns[*i].name);
        let mut q = QueryBuilder::new(format!(
            "SELECT {} FROM {} WHERE TRUE",
            select_list(t),
            quote(t.name)
        ));
        for (c, v) in by.iter().zip(key) {
            q.push(format!(" AND {} = ", col(c)));
            push_value(&mut q, v, t.columns[*c].ty);
        }
        let pk: Vec<String> = t.pk.iter().map(col).collect();
        if let Some(a) = after {
            q.push(format!(" AND ({}) > (", pk.join(", ")));
            for (n, (c, v)) in t.pk.iter().zip(a).enumerate() {
                if n > 0 {
                    q.push(", ");
                }
                push_value(&mut q, v, t.columns[*c].ty);
            }
            q.push(")");
        }
        q.push(format!(" ORDER BY {} LIMIT {limit}", pk.join(", ")));
        q.build()
            .fetch_all(&mut **self)
            .await
            .with_context(|| format!("reading a page of rows of {}", t.name))?
            .iter()
            .map(|r| decode_row(t, r))
            .collect()
    }

    async fn scan_rows(
        &mut self,
        t: TableRef<'_>,
        order: usize,
        after: Option<&Value>,
        range: Option<(usize, &Value, &Value)>,
        limit: usize,
    ) -> Result<Vec<Vec<Value>>> {
        let mut q = QueryBuilder::new(format!(
            "SELECT {} FROM {} WHERE TRUE",
            select_list(t),
            quote(t.name)
        ));
        let col = |i: usize| quote(&t.columns[i].name);
        if let Some(a) = after {
            q.push(format!(" AND {} > ", col(order)));
            push_value(&mut q, a, t.columns[order].ty);
        }
        if let Some((rc, lo, hi)) = range {
            q.push(format!(" AND {} >= ", col(rc)));
            push_value(&mut q, lo, t.columns[rc].ty);
            q.push(format!(" AND {} < ", col(rc)));
            push_value(&mut q, hi, t.columns[rc].ty);
        }
        q.push(format!(" ORDER BY {} LIMIT {limit}", col(order)));
        q.build()
            .fetch_all(&mut **self)
            .await
            .with_context(|| format!("scanning {}", t.name))?
            .iter()
            .map(|r| decode_row(t, r))
            .collect()
    }

    async fn try_insert(&mut self, t: TableRef<'_>, rows: &[Vec<Value>]) -> Result<Option<u64>> {
        if rows.is_empty() {
            return Ok(Some(0));
        }
        // If a key exists (another writer added it since this transaction read the keys),
        // the savepoint undoes the attempt and the caller upserts.
        sqlx::query("SAVEPOINT tidemark_insert")
            .execute(&mut **self)
            .await?;
        match insert_plain(self, t, rows).await {
            Ok(n) => {
                sqlx::query("RELEASE SAVEPOINT tidemark_insert")
                    .execute(&mut **self)
                    .await?;
                Ok(Some(n))
            }
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("23505") => {
                sqlx::query("ROLLBACK TO SAVEPOINT tidemark_insert")
                    .execute(&mut **self)
                    .await?;
                Ok(None)
            }
            Err(e) => Err(write_error(e, t, rows.len())),
        }
    }

    async fn insert_presumed(
        &mut self,
        t: TableRef<'_>,
        rows: &[Vec<Value>],
    ) -> Result<Option<u64>> {
        if rows.is_empty() {
            return Ok(Some(0));
        }
        match insert_plain(self, t, rows).await {
            Ok(n) => Ok(Some(n)),
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("23505") => {
                Err(super::PresumedNewConflict.into())
            }
            Err(e) => Err(write_error(e, t, rows.len())),
        }
    }

    async fn upsert_rows(&mut self, t: TableRef<'_>, rows: &[Vec<Value>]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let sql = upsert_sql(t);
        let mut q = sqlx::query(&sql);
        for (i, c) in t.columns.iter().enumerate() {
            q = bind_array(q, rows, i, c.ty);
        }
        let done = q
            .execute(&mut **self)
            .await
            .map_err(|e| write_error(e, t, rows.len()))?;
        Ok(done.rows_affected())
    }

    async fn select_keys(
        &mut self,
        t: TableRef<'_>,
        by: &[usize],
        keys: &[Vec<Value>],
    ) -> Result<Vec<Vec<Value>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let pk: Vec<String> = t.pk.iter().map(|&i| quote(&t.columns[i].name)).collect();
        let sql = format!(
            "SELECT {} FROM {}{}",
            pk.join(", "),
            quote(t.name),
            key_filter(t, by)
        );
        bind_keys(sqlx::query(&sql), t, by, keys)
            .fetch_all(&mut **self)
            .await
            .with_context(|| format!("reading keys of {}", t.name))?
            .iter()
            .map(|row| {
                t.pk.iter()
                    .enumerate()
                    .map(|(j, &c)| decode(row, j, t.columns[c].ty))
                    .collect()
            })
            .collect()
    }

    async fn delete_keys(
        &mut self,
        t: TableRef<'_>,
        by: &[usize],
        keys: &[Vec<Value>],
    ) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let sql = format!("DELETE FROM {}{}", quote(t.name), key_filter(t, by));
        Ok(bind_keys(sqlx::query(&sql), t, by, keys)
            .execute(&mut **self)
            .await
            .with_context(|| format!("deleting from {}", t.name))?
            .rows_affected())
    }

    async fn set_null(&mut self, t: TableRef<'_>, keys: &[Vec<Value>]) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let col = quote(&t.columns[t.pk[0]].name);
        let sql = format!(
            "UPDATE {} SET {col} = NULL{}",
            quote(t.name),
            key_filter(t, t.pk)
        );
        Ok(bind_keys(sqlx::query(&sql), t, t.pk, keys)
            .execute(&mut **self)
            .await
            .with_context(|| format!("setting {}.{col} to NULL", t.name))?
            .rows_affected())
    }

    async fn delete_source_ids(&mut self, table: &str, entity: &str, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE entity = $1 AND source_id = ANY($2)"
        ))
        .bind(entity)
        .bind(ids)
        .execute(&mut **self)
        .await
        .with_context(|| format!("clearing {table} of {entity}"))?;
        Ok(())
    }

    async fn insert_provenance(
        &mut self,
        run_id: &str,
        changes: &[ProvenanceRow<'_>],
        now: i64,
    ) -> Result<()> {
        let tables: Vec<&str> = changes.iter().map(|c| c.0).collect();
        let keys: Vec<&str> = changes.iter().map(|c| c.1).collect();
        let befores: Vec<Option<&str>> = changes.iter().map(|c| c.2).collect();
        let afters: Vec<Option<&str>> = changes.iter().map(|c| c.3).collect();
        let inserted: Vec<Option<&str>> = changes.iter().map(|c| c.4).collect();
        sqlx::query(
            "INSERT INTO tidemark_provenance (run_id, table_name, pk, before_image, after_hash, inserted, written_at_ms) \
             SELECT $1, t, k, b, a, i, $2 FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) AS u(t, k, b, a, i)",
        )
        .bind(run_id)
        .bind(now)
        .bind(tables)
        .bind(keys)
        .bind(befores)
        .bind(afters)
        .bind(inserted)
        .execute(&mut **self)
        .await?;
        Ok(())
    }

    async fn set_column(
        &mut self,
        t: TableRef<'_>,
        col: usize,
        key: &[Value],
        value: &Value,
    ) -> Result<u64> {
        let mut q = QueryBuilder::new(format!(
            "UPDATE {} SET {} = ",
            quote(t.name),
            quote(&t.columns[col].name)
        ));
        push_value(&mut q, value, t.columns[col].ty);
        push_in(&mut q, t, t.pk, std::slice::from_ref(&key.to_vec()));
        Ok(q.build().execute(&mut **self).await?.rows_affected())
    }

    async fn fk_checks(&mut self, on: bool) -> Result<()> {
        let role = if on { "origin" } else { "replica" };
        sqlx::query(&format!("SET LOCAL session_replication_role = {role}"))
            .execute(&mut **self)
            .await
            .map_err(|e| fk_checks_error(&e))?;
        Ok(())
    }

    async fn take_turn_lock(&mut self, key: i64) -> Result<()> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(key)
            .execute(&mut **self)
            .await?;
        Ok(())
    }

    async fn wait_turn(
        &mut self,
        after: &(i64, tokio::sync::watch::Receiver<super::order::Turn>),
    ) -> Result<()> {
        super::order::wait_turn(self, after).await
    }

    async fn check_fence(&mut self, f: &crate::sink::lease::Fence) -> Result<()> {
        fence::check(self, f).await
    }
}

/// The error of `target.foreign_key_checks = "tidemark"` when the role may not set
/// `session_replication_role`, with the fix.
pub(super) fn fk_checks_error(e: &sqlx::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "target.foreign_key_checks = \"tidemark\" needs to set session_replication_role, and the \
         target refused: {e}. Run tidemark as a superuser, or on PostgreSQL 15 or later \
         `GRANT SET ON PARAMETER session_replication_role TO <tidemark's role>`; or set \
         target.foreign_key_checks = \"database\""
    )
}
