//! SQLite: multi-row `INSERT … VALUES … ON CONFLICT` statements sized to stay under
//! SQLite's bound-parameter limit, all inside the batch's one transaction.
//!
//! A statement whose text grows with the rows it carries (the multi-row writes, the
//! `IN (VALUES …)` reads and deletes) is prepared for one use (`persistent(false)`). sqlx
//! keeps up to 100 prepared statements per connection, and a multi-row statement's compiled
//! program is large (a 240-row `vizzes` upsert is ~3,000 VDBE instructions plus a register
//! per bound value) and rarely used again, as each row count is a new text. On the full
//! VizHub mapping into SQLite (20k demo set) heaptrack put 15.7 MB of a 43 MB heap peak in
//! cached statements; one-use statements took the run's peak RSS from 71 MB to 51–52 MB
//! (BENCHMARKS.md, fourteenth round).

use super::ddl::quote;
use super::{ProvenanceRow, TableOps};
use crate::mapping::{ColumnType, TableRef, Value};
use crate::span::fmt_ts;
use anyhow::{Context, Result};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};

/// SQLite's default maximum of bound parameters per statement is 32766.
const MAX_PARAMS: usize = 32_000;

fn conflict_clause(t: TableRef<'_>) -> String {
    let pk: Vec<String> = t.pk.iter().map(|&i| quote(&t.columns[i].name)).collect();
    let rest: Vec<String> = t
        .columns
        .iter()
        .enumerate()
        .filter(|(i, _)| !t.pk.contains(i))
        .map(|(_, c)| quote(&c.name))
        .collect();
    if rest.is_empty() {
        return format!(" ON CONFLICT ({}) DO NOTHING", pk.join(", "));
    }
    let set: Vec<String> = rest.iter().map(|c| format!("{c} = excluded.{c}")).collect();
    let differs: Vec<String> = rest
        .iter()
        .map(|c| format!("cur.{c} IS NOT excluded.{c}"))
        .collect();
    format!(
        " ON CONFLICT ({}) DO UPDATE SET {} WHERE {}",
        pk.join(", "),
        set.join(", "),
        differs.join(" OR ")
    )
}

fn push_value<Sep: std::fmt::Display>(
    b: &mut sqlx::query_builder::Separated<'_, '_, Sqlite, Sep>,
    v: &Value,
) {
    match v {
        Value::Null => b.push_bind(None::<String>),
        Value::Text(s) => b.push_bind(s.clone()),
        Value::Int(x) => b.push_bind(*x),
        Value::BigInt(x) => b.push_bind(*x),
        Value::Double(x) => b.push_bind(*x),
        Value::Bool(x) => b.push_bind(*x),
        Value::Timestamp(t) => b.push_bind(fmt_ts(*t)),
        Value::Json(j) => b.push_bind(j.to_string()),
        Value::JsonText { text, .. } => b.push_bind(text.clone()),
    };
}

/// `WHERE (c1, c2) IN (VALUES (…), (…))`
fn push_in(q: &mut QueryBuilder<'_, Sqlite>, t: TableRef<'_>, cols: &[usize], keys: &[Vec<Value>]) {
    let names: Vec<String> = cols.iter().map(|&i| quote(&t.columns[i].name)).collect();
    q.push(format!(" WHERE ({}) IN (VALUES ", names.join(", ")));
    for (n, k) in keys.iter().enumerate() {
        q.push(if n == 0 { "(" } else { ", (" });
        let mut sep = q.separated(", ");
        for v in k {
            push_value(&mut sep, v);
        }
        q.push(")");
    }
    q.push(")");
}

/// `head` (a DELETE or UPDATE of `t`) restricted to the rows whose `by` columns match one of
/// `keys`, as many statements as SQLite's parameter limit needs; the rows affected.
async fn keyed(
    tx: &mut Transaction<'_, Sqlite>,
    head: &str,
    t: TableRef<'_>,
    by: &[usize],
    keys: &[Vec<Value>],
) -> Result<u64> {
    let mut n = 0;
    for chunk in keys.chunks(per_stmt(by.len())) {
        let mut q = QueryBuilder::new(head);
        push_in(&mut q, t, by, chunk);
        n += q
            .build()
            .persistent(false)
            .execute(&mut **tx)
            .await?
            .rows_affected();
    }
    Ok(n)
}

fn decode(row: &sqlx::sqlite::SqliteRow, i: usize, ty: ColumnType) -> Result<Value> {
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
        ColumnType::Timestamptz => match row.try_get::<Option<String>, _>(i)? {
            Some(s) => chrono::DateTime::parse_from_rfc3339(&s)
                .map(|d| Value::Timestamp(d.with_timezone(&chrono::Utc)))
                .unwrap_or(Value::Text(s)),
            None => Value::Null,
        },
        _ => row
            .try_get::<Option<String>, _>(i)?
            .map_or(Value::Null, Value::Text),
    })
}

fn per_stmt(width: usize) -> usize {
    (MAX_PARAMS / width.max(1)).clamp(1, 1000)
}

fn decode_row(t: TableRef<'_>, row: &sqlx::sqlite::SqliteRow) -> Result<Vec<Value>> {
    t.columns
        .iter()
        .enumerate()
        .map(|(i, c)| match (decode(row, i, c.ty)?, c.ty) {
            (Value::Text(s), ColumnType::Json) => Ok(serde_json::from_str(&s)
                .map(Value::Json)
                .unwrap_or(Value::Text(s))),
            (v, _) => Ok(v),
        })
        .collect()
}

fn select_list(t: TableRef<'_>) -> String {
    t.columns
        .iter()
        .map(|c| quote(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

impl TableOps for Transaction<'_, Sqlite> {
    async fn select_rows(
        &mut self,
        t: TableRef<'_>,
        by: &[usize],
        keys: &[Vec<Value>],
    ) -> Result<Vec<Vec<Value>>> {
        let mut out = Vec::new();
        for chunk in keys.chunks(per_stmt(by.len())) {
            let mut q =
                QueryBuilder::new(format!("SELECT {} FROM {}", select_list(t), quote(t.name)));
            push_in(&mut q, t, by, chunk);
            for row in q
                .build()
                .persistent(false)
                .fetch_all(&mut **self)
                .await
                .with_context(|| format!("reading rows of {}", t.name))?
            {
                out.push(decode_row(t, &row)?);
            }
        }
        Ok(out)
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
            "SELECT {} FROM {} WHERE 1",
            select_list(t),
            quote(t.name)
        ));
        for (c, v) in by.iter().zip(key) {
            q.push(format!(" AND {} = ", col(c)));
            push_value(&mut q.separated(""), v);
        }
        let pk: Vec<String> = t.pk.iter().map(col).collect();
        if let Some(a) = after {
            q.push(format!(" AND ({}) > (", pk.join(", ")));
            let mut sep = q.separated(", ");
            for v in a {
                push_value(&mut sep, v);
            }
            q.push(")");
        }
        q.push(format!(" ORDER BY {} LIMIT {limit}", pk.join(", ")));
        q.build()
            .persistent(false)
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
            "SELECT {} FROM {} WHERE 1",
            select_list(t),
            quote(t.name)
        ));
        let col = |i: usize| quote(&t.columns[i].name);
        if let Some(a) = after {
            q.push(format!(" AND {} > ", col(order)));
            push_value(&mut q.separated(""), a);
        }
        if let Some((rc, lo, hi)) = range {
            q.push(format!(" AND {} >= ", col(rc)));
            push_value(&mut q.separated(""), lo);
            q.push(format!(" AND {} < ", col(rc)));
            push_value(&mut q.separated(""), hi);
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

    async fn upsert_rows(&mut self, t: TableRef<'_>, rows: &[Vec<Value>]) -> Result<u64> {
        let cols: Vec<String> = t.columns.iter().map(|c| quote(&c.name)).collect();
        let head = format!(
            "INSERT INTO {} AS cur ({}) ",
            quote(t.name),
            cols.join(", ")
        );
        let tail = conflict_clause(t);
        let per_stmt = (MAX_PARAMS / cols.len().max(1)).max(1);
        let mut written = 0;
        for chunk in rows.chunks(per_stmt) {
            let mut q = QueryBuilder::<Sqlite>::new(&head);
            q.push_values(chunk, |mut b, row| {
                for v in row {
                    push_value(&mut b, v);
                }
            });
            q.push(&tail);
            let done = q
                .build()
                .persistent(false)
                .execute(&mut **self)
                .await
                .with_context(|| format!("writing {} rows into {}", chunk.len(), t.name))?;
            written += done.rows_affected();
        }
        Ok(written)
    }

    async fn select_keys(
        &mut self,
        t: TableRef<'_>,
        by: &[usize],
        keys: &[Vec<Value>],
    ) -> Result<Vec<Vec<Value>>> {
        let mut out = Vec::new();
        let pk: Vec<String> = t.pk.iter().map(|&i| quote(&t.columns[i].name)).collect();
        for chunk in keys.chunks(per_stmt(by.len())) {
            let mut q =
                QueryBuilder::new(format!("SELECT {} FROM {}", pk.join(", "), quote(t.name)));
            push_in(&mut q, t, by, chunk);
            for row in q
                .build()
                .persistent(false)
                .fetch_all(&mut **self)
                .await
                .with_context(|| format!("reading keys of {}", t.name))?
            {
                let key =
                    t.pk.iter()
                        .enumerate()
                        .map(|(j, &c)| decode(&row, j, t.columns[c].ty))
                        .collect::<Result<_>>()?;
                out.push(key);
            }
        }
        Ok(out)
    }

    async fn delete_keys(
        &mut self,
        t: TableRef<'_>,
        by: &[usize],
        keys: &[Vec<Value>],
    ) -> Result<u64> {
        let head = format!("DELETE FROM {}", quote(t.name));
        keyed(self, &head, t, by, keys)
            .await
            .with_context(|| format!("deleting from {}", t.name))
    }

    async fn runs_delete_actions(&mut self) -> Result<bool> {
        let on: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&mut **self)
            .await?;
        Ok(on == 1)
    }

    async fn set_null(&mut self, t: TableRef<'_>, keys: &[Vec<Value>]) -> Result<u64> {
        let col = quote(&t.columns[t.pk[0]].name);
        let head = format!("UPDATE {} SET {col} = NULL", quote(t.name));
        keyed(self, &head, t, t.pk, keys)
            .await
            .with_context(|| format!("setting {}.{col} to NULL", t.name))
    }

    async fn delete_source_ids(&mut self, table: &str, entity: &str, ids: &[String]) -> Result<()> {
        for chunk in ids.chunks(per_stmt(1)) {
            let mut q = QueryBuilder::new(format!("DELETE FROM {table} WHERE entity = "));
            q.push_bind(entity).push(" AND source_id IN (");
            let mut sep = q.separated(", ");
            for id in chunk {
                sep.push_bind(id);
            }
            q.push(")");
            q.build()
                .persistent(false)
                .execute(&mut **self)
                .await
                .with_context(|| format!("clearing {table} of {entity}"))?;
        }
        Ok(())
    }

    async fn insert_provenance(
        &mut self,
        run_id: &str,
        changes: &[ProvenanceRow<'_>],
        now: i64,
    ) -> Result<()> {
        for chunk in changes.chunks(per_stmt(7)) {
            let mut q = QueryBuilder::new(
                "INSERT INTO tidemark_provenance (run_id, table_name, pk, before_image, after_hash, inserted, written_at_ms) ",
            );
            q.push_values(chunk, |mut row, (table, pk, before, after, inserted)| {
                row.push_bind(run_id)
                    .push_bind(*table)
                    .push_bind(*pk)
                    .push_bind(*before)
                    .push_bind(*after)
                    .push_bind(*inserted)
                    .push_bind(now);
            });
            q.build().persistent(false).execute(&mut **self).await?;
        }
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
        {
            let mut sep = q.separated(", ");
            push_value(&mut sep, value);
        }
        push_in(&mut q, t, t.pk, std::slice::from_ref(&key.to_vec()));
        Ok(q.build().execute(&mut **self).await?.rows_affected())
    }

    /// The lock file is held until this process exits, so only the claim row is checked
    /// (inside `BEGIN IMMEDIATE`: no other writer can change it before the commit).
    async fn check_fence(&mut self, f: &crate::sink::lease::Fence) -> Result<()> {
        let Some(c) = &f.claim else { return Ok(()) };
        let holder: Option<Option<String>> = sqlx::query_scalar(
            "SELECT holder FROM tidemark_backfill_chunks \
             WHERE backfill_id = $1 AND entity = $2 AND from_ms = $3",
        )
        .bind(&c.backfill_id)
        .bind(&c.entity)
        .bind(c.from_ms)
        .fetch_optional(&mut **self)
        .await?;
        if holder.flatten().as_deref() != Some(c.holder.as_str()) {
            return Err(crate::sink::lease::LostLane {
                lane: f.lane.clone(),
                why: "its ledger row names another holder",
            }
            .into());
        }
        Ok(())
    }
}
