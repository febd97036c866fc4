//! `tidemark verify --from T1 --to T2 [--entity NAME]`: does the target hold what the
//! mapping makes of the source for a time range?
//!
//! The source documents of the range are streamed page by page (the same indexed keyset
//! reads as a run) and mapped with the current mapping; for each page the target rows of
//! the same keys, and their child rows, are read in one query per table. Each row gets a
//! canonical hash (child rows included); rows are summed per time bucket into a count and
//! an order-independent hash (XOR) on each side, and differing rows are listed by id:
//! *missing* (mapped but not in the target), *different* (content differs, or the source
//! marks it deleted), *extra* (a target row whose time column lies in the range but whose
//! document is not in the source range: deleted, or moved out by a later update). Memory
//! holds one page plus the keys of the range; the cost is one read of the range on each side.
//!
//! It also counts, over the whole of each verified entity's tables (not only the range),
//! rows whose foreign key points at nothing: with `target.foreign_key_checks = "tidemark"`
//! PostgreSQL no longer checks tidemark's writes, and this is the check after the fact (one
//! anti-join per constraint; SQLite: `PRAGMA foreign_key_check`).

use crate::engine::pipeline::map_page;
use crate::engine::window::{fmt_ts, Window};
use crate::exit::Failure;
use crate::mapping::canon;
use crate::mapping::spec::MissingPolicy;
use crate::mapping::{ColumnType, Entity, Value};
use crate::settings::Settings;
use crate::sink::Sink;
use crate::source::Source;
use anyhow::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

/// Exit code of `verify` when source and target differ.
pub const DIFFERENCES: i32 = 7;

/// One time bucket on both sides.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Bucket {
    pub from: String,
    pub source_rows: u64,
    pub target_rows: u64,
    pub source_hash: String,
    pub target_hash: String,
}

/// The comparison of one entity.
#[derive(Debug, Default, Serialize)]
pub struct EntityVerify {
    pub entity: String,
    pub source_documents: u64,
    pub source_rows: u64,
    pub target_rows: u64,
    /// Documents the mapping cannot map (they are dead letters, not differences).
    pub unmappable: u64,
    pub missing_count: u64,
    pub different_count: u64,
    pub extra_count: u64,
    /// Keys (canonical JSON of the primary key), at most `--limit` each.
    pub missing: Vec<String>,
    pub different: Vec<String>,
    pub extra: Vec<String>,
    /// Buckets whose count or hash differ.
    pub differing_buckets: Vec<Bucket>,
    pub buckets: usize,
    /// Why extra rows could not be looked for, if so.
    pub note: Option<String>,
}

/// Rows of a table whose foreign key points at nothing.
#[derive(Debug, Serialize)]
pub struct Dangling {
    pub table: String,
    pub constraint: String,
    pub rows: u64,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub range: Window,
    pub entities: Vec<EntityVerify>,
    /// Foreign keys of the verified entities' tables with rows pointing at nothing.
    pub dangling: Vec<Dangling>,
    pub differences: u64,
    pub elapsed_ms: u64,
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<18} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>10}",
            "entity", "source", "target", "missing", "extra", "different", "unmap", "buckets≠"
        )?;
        for e in &self.entities {
            writeln!(
                f,
                "{:<18} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>10}",
                e.entity,
                e.source_rows,
                e.target_rows,
                e.missing_count,
                e.extra_count,
                e.different_count,
                e.unmappable,
                e.differing_buckets.len()
            )?;
            for (what, ids) in [
                ("missing", &e.missing),
                ("extra", &e.extra),
                ("different", &e.different),
            ] {
                for id in ids {
                    writeln!(f, "  {what:<9} {} {id}", e.entity)?;
                }
            }
            if let Some(n) = &e.note {
                writeln!(f, "  note: {n}")?;
            }
        }
        for d in &self.dangling {
            writeln!(
                f,
                "  dangling  {} {}: {} row(s) point at nothing",
                d.table, d.constraint, d.rows
            )?;
        }
        write!(
            f,
            "verify {}: {}",
            self.range,
            if self.differences == 0 {
                "source and target agree".to_owned()
            } else {
                format!("{} difference(s)", self.differences)
            }
        )
    }
}

/// Options of a verification.
pub struct VerifyOptions {
    pub from: String,
    pub to: String,
    pub entities: Vec<String>,
    pub bucket: std::time::Duration,
    pub limit: usize,
}

#[derive(Default)]
struct Side {
    rows: u64,
    hash: u128,
}

struct Acc<'a> {
    e: &'a Entity,
    out: EntityVerify,
    buckets: BTreeMap<i64, (Side, Side)>,
    bucket_ms: i64,
    limit: usize,
    source_keys: HashSet<String>,
}

fn xor(h: &str) -> u128 {
    u128::from_str_radix(h, 16).unwrap_or(0)
}

impl Acc<'_> {
    fn bucket(&mut self, t: Option<DateTime<Utc>>) -> &mut (Side, Side) {
        let ms = t.map_or(0, |t| t.timestamp_millis());
        let b = ms.div_euclid(self.bucket_ms) * self.bucket_ms;
        self.buckets.entry(b).or_default()
    }

    fn note(list: &mut Vec<String>, count: &mut u64, limit: usize, key: String) {
        *count += 1;
        if list.len() < limit {
            list.push(key);
        }
    }
}

/// Canonical group key of child rows (their link to the parent) and of a parent row.
fn link_of_child(c: &crate::mapping::Child, row: &[Value]) -> String {
    let v: Vec<serde_json::Value> = c
        .parent_links
        .iter()
        .map(|(ci, _)| canon::value(&row[*ci], c.columns[*ci].ty))
        .collect();
    serde_json::Value::Array(v).to_string()
}

fn link_of_parent(c: &crate::mapping::Child, row: &[Value]) -> String {
    let v: Vec<serde_json::Value> = c
        .parent_links
        .iter()
        .map(|(ci, p)| canon::value(&row[*p], c.columns[*ci].ty))
        .collect();
    serde_json::Value::Array(v).to_string()
}

/// Hash of a row with its child rows (each child table's row hashes, sorted).
fn full_hash(e: &Entity, row: &[Value], kids: &[HashMap<String, Vec<String>>]) -> String {
    let mut text = canon::row_hash(e.table_ref(), row);
    for (ci, c) in e.children.iter().enumerate() {
        let mut hs = kids[ci]
            .get(&link_of_parent(c, row))
            .cloned()
            .unwrap_or_default();
        hs.sort();
        text.push('|');
        text.push_str(&hs.join(","));
    }
    canon::hash_text(&text)
}

fn group_children(e: &Entity, children: &[Vec<Vec<Value>>]) -> Vec<HashMap<String, Vec<String>>> {
    e.children
        .iter()
        .enumerate()
        .map(|(ci, c)| {
            let mut m: HashMap<String, Vec<String>> = HashMap::new();
            for r in children.get(ci).into_iter().flatten() {
                m.entry(link_of_child(c, r))
                    .or_default()
                    .push(canon::row_hash(c.table_ref(), r));
            }
            m
        })
        .collect()
}

/// Columns whose reference may legitimately be NULL in the target (`on_missing = "null"`).
fn nullable_refs(e: &Entity) -> Vec<usize> {
    e.columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.references.is_some() && c.on_missing == MissingPolicy::Null)
        .map(|(i, _)| i)
        .collect()
}

/// The target column holding the source time field, if the mapping copies it.
fn time_column(e: &Entity) -> Option<usize> {
    let path: Vec<String> = e.time_field.split('.').map(str::to_owned).collect();
    e.columns
        .iter()
        .position(|c| c.ty == ColumnType::Timestamptz && c.source_path() == Some(path.as_slice()))
}

async fn verify_entity(
    source: &Source,
    sink: &Sink,
    e: &Entity,
    range: Window,
    opts: &VerifyOptions,
) -> Result<EntityVerify> {
    let mut acc = Acc {
        e,
        out: EntityVerify {
            entity: e.name.clone(),
            ..Default::default()
        },
        buckets: BTreeMap::new(),
        bucket_ms: (opts.bucket.as_millis() as i64).max(1),
        limit: opts.limit,
        source_keys: HashSet::new(),
    };
    let time_path: Vec<String> = e.time_field.split('.').map(str::to_owned).collect();
    let refs = nullable_refs(e);
    let mut rx = source.stream_window(e, range, None);
    while let Some(page) = rx.recv().await {
        let page = page?;
        acc.out.source_documents += page.docs.len() as u64;
        let mut mapped = map_page(e, &page.docs, false);
        acc.out.unmappable += mapped.dead.len() as u64;
        let keys: Vec<Vec<Value>> = mapped
            .rows
            .iter()
            .map(|r| e.pk.iter().map(|&i| r[i].clone()).collect())
            .chain(mapped.deletes.iter().cloned())
            .collect();
        let target = crate::sink::provenance::index_rows(
            e.table_ref(),
            sink.select_rows(e.table_ref(), &e.pk, &keys).await?,
        );
        let mut t_children = Vec::new();
        for c in &e.children {
            let by: Vec<usize> = c.parent_links.iter().map(|(ci, _)| *ci).collect();
            let parents: Vec<Vec<Value>> = mapped
                .rows
                .iter()
                .map(|r| c.parent_links.iter().map(|(_, p)| r[*p].clone()).collect())
                .collect();
            t_children.push(sink.select_rows(c.table_ref(), &by, &parents).await?);
        }
        let s_kids = group_children(e, &mapped.children);
        let t_kids = group_children(e, &t_children);
        for (ri, row) in mapped.rows.iter_mut().enumerate() {
            let key = canon::key_of_row(e.table_ref(), row);
            acc.source_keys.insert(key.clone());
            let when = crate::mapping::lookup(&page.docs[mapped.row_docs[ri]], &time_path)
                .ok()
                .flatten()
                .and_then(|v| crate::mapping::value::to_timestamp(&v, Some(e.time_format())).ok());
            let trow = target.get(&key);
            if let Some(t) = trow {
                for &i in &refs {
                    if t[i] == Value::Null {
                        row[i] = Value::Null;
                    }
                }
            }
            let sh = full_hash(e, row, &s_kids);
            acc.out.source_rows += 1;
            let th = trow.map(|t| full_hash(e, t, &t_kids));
            let (s, t) = acc.bucket(when);
            s.rows += 1;
            s.hash ^= xor(&sh);
            if let Some(th) = &th {
                t.rows += 1;
                t.hash ^= xor(th);
            }
            match th {
                None => Acc::note(
                    &mut acc.out.missing,
                    &mut acc.out.missing_count,
                    acc.limit,
                    key,
                ),
                Some(th) if th != sh => Acc::note(
                    &mut acc.out.different,
                    &mut acc.out.different_count,
                    acc.limit,
                    key,
                ),
                Some(_) => acc.out.target_rows += 1,
            }
        }
        for k in &mapped.deletes {
            let key = canon::key_text(e.table_ref(), k);
            if target.contains_key(&key) {
                acc.source_keys.insert(key.clone());
                Acc::note(
                    &mut acc.out.different,
                    &mut acc.out.different_count,
                    acc.limit,
                    format!("{key} (deleted in the source)"),
                );
            }
        }
    }
    acc.out.target_rows += acc.out.different_count;
    extras(sink, &mut acc, range).await?;
    acc.out.buckets = acc.buckets.len();
    for (b, (s, t)) in &acc.buckets {
        if s.rows != t.rows || s.hash != t.hash {
            acc.out.differing_buckets.push(Bucket {
                from: fmt_ts(crate::sink::from_ms(*b)),
                source_rows: s.rows,
                target_rows: t.rows,
                source_hash: format!("{:032x}", s.hash),
                target_hash: format!("{:032x}", t.hash),
            });
        }
    }
    Ok(acc.out)
}

/// Target rows whose time column lies in the range but whose key the source range lacks.
async fn extras(sink: &Sink, acc: &mut Acc<'_>, range: Window) -> Result<()> {
    let e = acc.e;
    let (Some(tc), [kc]) = (time_column(e), e.pk.as_slice()) else {
        acc.out.note = Some(format!(
            "extra rows not checked: {} needs a single-column primary key and a timestamptz column copied from `{}`",
            e.table, e.time_field
        ));
        return Ok(());
    };
    let (lo, hi) = (Value::Timestamp(range.from), Value::Timestamp(range.to));
    let mut after: Option<Value> = None;
    loop {
        let rows = sink
            .scan_rows(
                e.table_ref(),
                *kc,
                after.as_ref(),
                Some((tc, &lo, &hi)),
                1000,
            )
            .await?;
        let Some(last) = rows.last() else { break };
        after = Some(last[*kc].clone());
        for r in &rows {
            let key = canon::key_of_row(e.table_ref(), r);
            if acc.source_keys.contains(&key) {
                continue;
            }
            let when = match &r[tc] {
                Value::Timestamp(t) => Some(*t),
                _ => None,
            };
            let h = canon::row_hash(e.table_ref(), r);
            let (_, t) = acc.bucket(when);
            t.rows += 1;
            t.hash ^= xor(&h);
            acc.out.target_rows += 1;
            let limit = acc.limit;
            Acc::note(&mut acc.out.extra, &mut acc.out.extra_count, limit, key);
        }
    }
    Ok(())
}

/// `tidemark verify`.
pub async fn verify(s: &Settings, opts: &VerifyOptions) -> Result<VerifyReport> {
    let started = Instant::now();
    let mapping = crate::commands::setup::load_mapping(s)?;
    let (f, t) =
        crate::timearg::parse_range(&opts.from, &opts.to, Utc::now()).map_err(Failure::Config)?;
    let range = Window::new(
        crate::engine::window::to_millis(f),
        crate::engine::window::to_millis(t),
    );
    let names: Vec<String> = if opts.entities.is_empty() {
        mapping
            .entities
            .iter()
            .filter(|e| e.windowed)
            .map(|e| e.name.clone())
            .collect()
    } else {
        opts.entities.clone()
    };
    for n in &names {
        mapping.entity(n).map_err(Failure::Config)?;
    }
    let source = Source::connect(&s.source)
        .await
        .map_err(Failure::Unavailable)?;
    let sink = crate::commands::setup::open_sink_dry(s, &mapping).await?;
    let mut entities = Vec::new();
    for n in &names {
        let e = mapping.entity(n)?;
        entities.push(verify_entity(&source, &sink, e, range, opts).await?);
    }
    let mut tables = Vec::new();
    for n in &names {
        let e = mapping.entity(n)?;
        tables.push(e.table.clone());
        tables.extend(e.children.iter().map(|c| c.table.clone()));
    }
    let dangling = dangling(&sink, &tables).await?;
    sink.close().await;
    let differences = entities
        .iter()
        .map(|e| e.missing_count + e.extra_count + e.different_count)
        .sum::<u64>()
        + dangling.iter().map(|d| d.rows).sum::<u64>();
    Ok(VerifyReport {
        range,
        entities,
        dangling,
        differences,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// Rows of `tables` whose foreign key points at nothing, per constraint (see the module
/// documentation).
async fn dangling(sink: &Sink, tables: &[String]) -> Result<Vec<Dangling>> {
    let mut out = Vec::new();
    match sink {
        Sink::Postgres(p) => {
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
            .bind(tables)
            .fetch_all(p)
            .await?;
            for (constraint, table, parent, mine, theirs) in fks {
                let not_null: Vec<String> =
                    mine.iter().map(|c| format!("s.{c} IS NOT NULL")).collect();
                let same: Vec<String> = mine
                    .iter()
                    .zip(&theirs)
                    .map(|(c, p)| format!("d.{p} = s.{c}"))
                    .collect();
                // An anti-join: `NOT IN` over a parent table larger than work_mem is
                // rescanned for every row.
                let rows: i64 = sqlx::query_scalar(&format!(
                    "SELECT COUNT(*) FROM {} s WHERE {} AND NOT EXISTS (SELECT 1 FROM {} d WHERE {})",
                    crate::sink::ddl::quote(&table),
                    not_null.join(" AND "),
                    crate::sink::ddl::quote(&parent),
                    same.join(" AND ")
                ))
                .fetch_one(p)
                .await?;
                if rows > 0 {
                    out.push(Dangling {
                        table,
                        constraint,
                        rows: rows as u64,
                    });
                }
            }
        }
        Sink::Sqlite(p) => {
            for table in tables {
                let found: Vec<(i64,)> = sqlx::query_as(&format!(
                    "SELECT fkid FROM pragma_foreign_key_check('{}')",
                    table.replace('\'', "''")
                ))
                .fetch_all(p)
                .await?;
                let mut by: BTreeMap<i64, u64> = BTreeMap::new();
                for (id,) in found {
                    *by.entry(id).or_default() += 1;
                }
                for (id, rows) in by {
                    out.push(Dangling {
                        table: table.clone(),
                        constraint: format!("foreign key #{id}"),
                        rows,
                    });
                }
            }
        }
    }
    Ok(out)
}
