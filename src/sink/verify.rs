//! What `tidemark verify` reads from the target besides rows: the tool's records of a
//! document (dead letter, pending entry) and the rows whose foreign key points at nothing.

use super::{ddl, Sink};
use crate::mapping::{ColumnType, TableRef, Value};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// What the target records about a document that has no row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// In `tidemark_dead_letters`.
    DeadLetter,
    /// In `tidemark_pending` (held back, retried by later runs).
    Pending,
}

/// Rows of a table whose foreign key points at nothing.
#[derive(Debug, Serialize)]
pub struct Dangling {
    pub table: String,
    pub constraint: String,
    pub rows: u64,
    /// Primary keys of such rows (canonical JSON text, at most the report's limit).
    pub keys: Vec<String>,
}

/// Source ids per statement: well under both backends' bind limits.
const IDS_PER_QUERY: usize = 500;

impl Sink {
    /// Which of `source_ids` of `entity` have a dead letter or a pending entry (a pending
    /// entry wins: the document will be tried again).
    pub async fn records_of(
        &self,
        entity: &str,
        source_ids: &[String],
    ) -> Result<HashMap<String, Record>> {
        let mut out = HashMap::new();
        for chunk in source_ids.chunks(IDS_PER_QUERY) {
            let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
            let marks = marks.join(", ");
            let sql = format!(
                "SELECT source_id, 0 FROM tidemark_dead_letters WHERE entity = $1 AND source_id IN ({marks}) \
                 UNION ALL SELECT source_id, 1 FROM tidemark_pending WHERE entity = $1 AND source_id IN ({marks})"
            );
            let found: Vec<(String, i32)> = match self {
                Sink::Postgres(p) => {
                    let mut q = sqlx::query_as(&sql).bind(entity);
                    for id in chunk {
                        q = q.bind(id);
                    }
                    q.fetch_all(p).await
                }
                Sink::Sqlite(p) => {
                    let mut q = sqlx::query_as(&sql).bind(entity);
                    for id in chunk {
                        q = q.bind(id);
                    }
                    q.fetch_all(p).await
                }
            }
            .with_context(|| format!("reading the dead letters and pending entries of {entity}"))?;
            for (id, kind) in found {
                let r = if kind == 1 {
                    Record::Pending
                } else {
                    Record::DeadLetter
                };
                let e = out.entry(id).or_insert(r);
                if r == Record::Pending {
                    *e = r;
                }
            }
        }
        Ok(out)
    }

    /// Rows of `tables` whose foreign key points at nothing, per constraint, with the primary
    /// keys (`pk` columns per table, in key order) of up to `limit` of them. PostgreSQL: one
    /// anti-join per constraint; SQLite: `PRAGMA foreign_key_check`.
    pub async fn dangling(&self, tables: &[TableRef<'_>], limit: usize) -> Result<Vec<Dangling>> {
        match self {
            Sink::Postgres(p) => dangling_pg(p, tables, limit).await,
            Sink::Sqlite(p) => dangling_sqlite(p, tables, limit).await,
        }
    }
}

/// The canonical key text ([`crate::mapping::canon::key_text`]) of a key read as text columns.
fn key_json(t: &TableRef<'_>, vals: Vec<Option<String>>) -> String {
    let key: Vec<Value> =
        t.pk.iter()
            .zip(vals)
            .map(|(&i, v)| match (v, t.columns[i].ty) {
                (None, _) => Value::Null,
                (Some(s), ColumnType::Integer | ColumnType::Bigint) => {
                    s.parse().map_or(Value::Text(s), Value::BigInt)
                }
                (Some(s), ColumnType::Double) => s.parse().map_or(Value::Text(s), Value::Double),
                (Some(s), ColumnType::Boolean) => Value::Bool(s == "true" || s == "1"),
                (Some(s), _) => Value::Text(s),
            })
            .collect();
    crate::mapping::canon::key_text(*t, &key)
}

/// The quoted primary-key columns of `t`.
fn pk_names(t: &TableRef<'_>) -> Vec<String> {
    t.pk.iter()
        .map(|&i| ddl::quote(&t.columns[i].name))
        .collect()
}

async fn dangling_pg(
    p: &sqlx::PgPool,
    tables: &[TableRef<'_>],
    limit: usize,
) -> Result<Vec<Dangling>> {
    let names: Vec<&str> = tables.iter().map(|t| t.name).collect();
    #[allow(clippy::type_complexity)]
    let fks: Vec<(String, String, String, Vec<String>, Vec<String>)> = sqlx::query_as(
        "SELECT con.conname::text, src.relname::text, dst.relname::text, \
                array_agg(quote_ident(sa.attname) ORDER BY k.ord), \
                array_agg(quote_ident(da.attname) ORDER BY k.ord) \
         FROM pg_constraint con \
         JOIN pg_class src ON src.oid = con.conrelid \
         JOIN pg_class dst ON dst.oid = con.confrelid \
         CROSS JOIN LATERAL unnest(con.conkey, con.confkey) WITH ORDINALITY AS k(s, d, ord) \
         JOIN pg_attribute sa ON sa.attrelid = con.conrelid AND sa.attnum = k.s \
         JOIN pg_attribute da ON da.attrelid = con.confrelid AND da.attnum = k.d \
         WHERE con.contype = 'f' AND src.relname = ANY($1) \
           AND src.relnamespace = current_schema()::regnamespace \
         GROUP BY 1, 2, 3 ORDER BY 2, 1",
    )
    .bind(&names)
    .fetch_all(p)
    .await?;
    let mut out = Vec::new();
    for (constraint, table, parent, mine, theirs) in fks {
        let not_null: Vec<String> = mine.iter().map(|c| format!("s.{c} IS NOT NULL")).collect();
        let same: Vec<String> = mine
            .iter()
            .zip(&theirs)
            .map(|(c, p)| format!("d.{p} = s.{c}"))
            .collect();
        // An anti-join: `NOT IN` over a parent table larger than work_mem is rescanned for
        // every row.
        let from = format!(
            "FROM {} s WHERE {} AND NOT EXISTS (SELECT 1 FROM {} d WHERE {})",
            ddl::quote(&table),
            not_null.join(" AND "),
            ddl::quote(&parent),
            same.join(" AND ")
        );
        let rows: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {from}"))
            .fetch_one(p)
            .await?;
        if rows == 0 {
            continue;
        }
        let mut keys = Vec::new();
        if let Some(t) = tables.iter().find(|t| t.name == table) {
            let pk = pk_names(t);
            let cols: Vec<String> = pk.iter().map(|c| format!("s.{c}::text")).collect();
            let order: Vec<String> = pk.iter().map(|c| format!("s.{c}")).collect();
            let sql = format!(
                "SELECT ARRAY[{}] {from} ORDER BY {} LIMIT {limit}",
                cols.join(", "),
                order.join(", ")
            );
            let found: Vec<Vec<Option<String>>> = sqlx::query_scalar(&sql).fetch_all(p).await?;
            keys = found.into_iter().map(|k| key_json(t, k)).collect();
        }
        out.push(Dangling {
            table,
            constraint,
            rows: rows as u64,
            keys,
        });
    }
    Ok(out)
}

async fn dangling_sqlite(
    p: &sqlx::SqlitePool,
    tables: &[TableRef<'_>],
    limit: usize,
) -> Result<Vec<Dangling>> {
    let mut out = Vec::new();
    for t in tables {
        let table = t.name;
        let found: Vec<(i64, Option<i64>)> = sqlx::query_as(&format!(
            "SELECT fkid, rowid FROM pragma_foreign_key_check('{}')",
            table.replace('\'', "''")
        ))
        .fetch_all(p)
        .await?;
        let mut by: BTreeMap<i64, Vec<Option<i64>>> = BTreeMap::new();
        for (id, rowid) in found {
            by.entry(id).or_default().push(rowid);
        }
        for (id, rowids) in by {
            let mut keys = Vec::new();
            let cols: Vec<String> = pk_names(t)
                .iter()
                .map(|c| format!("CAST({c} AS TEXT)"))
                .collect();
            for rowid in rowids.iter().flatten().take(limit) {
                let vals: Vec<Option<String>> = match cols.len() {
                    0 => continue,
                    _ => {
                        let sql = format!(
                            "SELECT {} FROM {} WHERE rowid = $1",
                            cols.join(", "),
                            ddl::quote(table)
                        );
                        let row = sqlx::query(&sql).bind(rowid).fetch_optional(p).await?;
                        match row {
                            Some(r) => (0..cols.len())
                                .map(|i| sqlx::Row::try_get::<Option<String>, _>(&r, i))
                                .collect::<Result<_, _>>()?,
                            None => continue,
                        }
                    }
                };
                keys.push(key_json(t, vals));
            }
            keys.sort();
            out.push(Dangling {
                table: table.to_owned(),
                constraint: format!("foreign key #{id}"),
                rows: rowids.len() as u64,
                keys,
            });
        }
    }
    Ok(out)
}
