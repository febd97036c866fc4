//! The comparison behind `tidemark verify --from T1 --to T2 [--entity NAME]`: does the
//! target hold what the mapping makes of the source for a time range? (Printing and the
//! exit code: `commands/verify.rs`; its SQL: `sink/verify.rs`; docs/VERIFY.md.)
//!
//! The source documents of the range are streamed page by page (the same indexed keyset
//! reads as a run). Each document gives what the target must hold for it: a row with its
//! child rows (a soft-deleted document: the row with its marker set), no row (deleted), or
//! nothing (filtered, or a dead letter when it cannot be mapped). References then take
//! their `on_missing` policy against the target, as a run applies it: a referenced key the
//! target lacks makes the column NULL (`null`, main or child column), drops the child row
//! (`skip` / `defer` in a child column) or keeps the whole row out (`skip` / `defer`), and
//! such a row must be recorded instead, as a dead letter or a pending entry. The target
//! rows of the page's keys and their child rows are read in one query per table and
//! compared column by column.
//!
//! Differences are *missing* (a row the target should hold and lacks, with no dead letter
//! or pending entry explaining it), *different* (a column, a child row, or a row that
//! should not be there: deleted in the source, or its reference points at nothing) and
//! *extra* (a target row whose time column lies in the range but whose document is not in
//! the source range). Documents a policy dead-lettered and rows held back are counted
//! apart, not as differences. Rows are also summed per time bucket into a count and an
//! order-independent hash (XOR) on each side. Memory holds one page plus the keys of the
//! range; the cost is one read of the range on each side.
//!
//! It also counts, over the whole of each verified entity's tables (not only the range),
//! rows whose foreign key points at nothing: with `target.foreign_key_checks = "tidemark"`
//! PostgreSQL no longer checks tidemark's writes, and this is the check after the fact.

mod expect;
mod judge;

use crate::engine::select::Selection;
use crate::engine::window::Window;
use crate::exit::Failure;
use crate::mapping::canon;
use crate::mapping::{Child, ColumnType, Entity, Mapping, Value};
use crate::sink::Sink;
use crate::source::Source;
use anyhow::Result;
use bson::RawDocumentBuf;
use chrono::Utc;
use expect::{apply_policies, expect_page, present_refs, Entry, Expected};
use indexmap::IndexMap;
use judge::{group_children, judge, target_hash, xor, Acc, InTarget, Kind, Verdict};
use serde::Serialize;
use serde_json::Value as J;
use std::collections::HashMap;
use std::time::Instant;

pub use crate::sink::verify::Dangling;
pub use judge::shown;

/// One time bucket on both sides.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Bucket {
    pub from: String,
    pub source_rows: u64,
    pub target_rows: u64,
    pub source_hash: String,
    pub target_hash: String,
}

/// A column whose value differs: what the mapping makes of the source, what the target holds.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnDiff {
    pub column: String,
    pub source: J,
    pub target: J,
}

/// A child row of a listed row that is missing, extra or different.
#[derive(Debug, Clone, Serialize)]
pub struct ChildDiff {
    pub table: String,
    /// Canonical JSON of the child row's primary key.
    pub key: String,
    /// `missing`, `extra` or `different`.
    pub state: &'static str,
    pub columns: Vec<ColumnDiff>,
}

/// Why one listed row differs.
#[derive(Debug, Clone, Serialize)]
pub struct RowDiff {
    /// Canonical JSON of the primary key.
    pub key: String,
    /// `missing`, `extra` or `different`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<ColumnDiff>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<ChildDiff>,
}

/// The comparison of one entity.
#[derive(Debug, Default, Serialize)]
pub struct EntityVerify {
    pub entity: String,
    pub source_documents: u64,
    /// Rows the target must hold for the range.
    pub source_rows: u64,
    /// Rows of the range found in the target (extra ones included).
    pub target_rows: u64,
    /// Documents the mapping cannot map (they are dead letters, not differences).
    pub unmappable: u64,
    /// Documents dead-lettered by an `on_missing = "skip"` reference (recorded, not differences).
    pub dead_lettered: u64,
    /// Documents held back in `tidemark_pending` (retried by later runs; not differences).
    pub deferred: u64,
    /// Rows present and marked deleted by a `soft_delete` rule.
    pub soft_deleted: u64,
    pub missing_count: u64,
    pub different_count: u64,
    pub extra_count: u64,
    /// Keys (canonical JSON of the primary key), at most `--limit` each.
    pub missing: Vec<String>,
    pub different: Vec<String>,
    pub extra: Vec<String>,
    /// Why each listed key differs: the columns and child rows (at most `--limit`).
    pub details: Vec<RowDiff>,
    /// Buckets whose count or hash differ.
    pub differing_buckets: Vec<Bucket>,
    pub buckets: usize,
    /// Why extra rows could not be looked for, if so.
    pub note: Option<String>,
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
/// Options of a verification.
pub struct VerifyOptions {
    pub from: String,
    pub to: String,
    pub entities: Vec<String>,
    pub bucket: std::time::Duration,
    pub limit: usize,
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
    mapping: &Mapping,
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
        bucket_ms: (opts.bucket.as_millis() as i64).max(1),
        limit: opts.limit,
        verdicts: IndexMap::new(),
        detailed: 0,
    };
    let mut plain = e.clone();
    plain.deleted = None;
    let mut rx = source.stream_window(e, range, None);
    while let Some(page) = rx.recv().await {
        let page = page?;
        acc.out.source_documents += page.docs.len() as u64;
        // Ids that differ only in BSON type: the loser is dead-lettered by a run, so it is
        // judged apart and never replaces the winner's verdict on the shared key.
        let twins = crate::engine::twins::find(source, e, &page.docs).await?;
        let (losers, docs): (Vec<RawDocumentBuf>, Vec<RawDocumentBuf>) =
            page.docs.into_iter().partition(|d| {
                twins
                    .losers
                    .contains_key(&crate::engine::page::source_id(d))
            });
        twin_losers(sink, &mut acc, &losers).await?;
        verify_page(sink, mapping, &mut acc, &plain, &docs).await?;
    }
    extras(sink, &mut acc, range).await?;
    Ok(acc.finish())
}

/// Documents that lose their key to a string twin (`engine/twins.rs`): a dead letter must
/// record each; their key belongs to the winner, so they add no verdict of their own.
async fn twin_losers(sink: &Sink, acc: &mut Acc<'_>, losers: &[RawDocumentBuf]) -> Result<()> {
    if losers.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = losers
        .iter()
        .map(|d| crate::engine::page::source_id(d))
        .collect();
    let records = sink.records_of(&acc.e.name, &ids).await?;
    for id in ids {
        if records.contains_key(&id) {
            acc.out.dead_lettered += 1;
        } else {
            acc.differ(
                None,
                None,
                None,
                RowDiff {
                    key: format!("source id {id}"),
                    state: "missing",
                    reason: Some(
                        "its id collides with a string id of another document and no dead \
                         letter records it"
                            .into(),
                    ),
                    columns: Vec::new(),
                    children: Vec::new(),
                },
            );
        }
    }
    Ok(())
}

/// The target's rows of the page's keys, and per child table the child rows of its
/// parents, keyed by their link to the parent.
async fn read_target(
    sink: &Sink,
    e: &Entity,
    entries: &[Entry],
) -> Result<(TargetRows, Vec<HashMap<String, Vec<Vec<Value>>>>)> {
    let keys: Vec<Vec<Value>> = entries
        .iter()
        .map(|en| match &en.expected {
            Expected::Row { row, .. } => e.pk.iter().map(|&i| row[i].clone()).collect(),
            Expected::Marked { key, .. } | Expected::Gone { key } => key.clone(),
        })
        .collect();
    let rows = crate::sink::provenance::index_rows(
        e.table_ref(),
        sink.select_rows(e.table_ref(), &e.pk, &keys).await?,
    );
    let mut children = Vec::new();
    for c in &e.children {
        let by: Vec<usize> = c.parent_links.iter().map(|(ci, _)| *ci).collect();
        let parents: Vec<Vec<Value>> = rows
            .values()
            .map(|row| {
                c.parent_links
                    .iter()
                    .map(|(_, p)| row[*p].clone())
                    .collect()
            })
            .collect();
        children.push(sink.select_rows(c.table_ref(), &by, &parents).await?);
    }
    Ok((rows, group_children(e, children)))
}

type TargetRows = HashMap<String, Vec<Value>>;

/// Compare one page of source documents with the target.
async fn verify_page(
    sink: &Sink,
    mapping: &Mapping,
    acc: &mut Acc<'_>,
    plain: &Entity,
    docs: &[RawDocumentBuf],
) -> Result<()> {
    let e = acc.e;
    let (mut entries, unmappable) = expect_page(e, plain, docs);
    let present = present_refs(sink, mapping, e, &entries).await?;
    for en in &mut entries {
        if let Expected::Row { row, children, .. } = &mut en.expected {
            en.held = apply_policies(e, &present, row, children);
        }
    }
    let (target, t_kids) = read_target(sink, e, &entries).await?;

    // Documents with no row in the target: their dead letters and pending entries.
    let sid = |di: usize| crate::engine::page::source_id(&docs[di]);
    let unrecorded: Vec<String> = entries
        .iter()
        .filter(|en| en.held.is_some() || !target.contains_key(&en.key))
        .map(|en| en.doc)
        .chain(unmappable.iter().copied())
        .map(sid)
        .collect();
    let records = if unrecorded.is_empty() {
        HashMap::new()
    } else {
        sink.records_of(&e.name, &unrecorded).await?
    };
    for &di in &unmappable {
        acc.out.unmappable += 1;
        let key = e.key_of(&docs[di]).map_or_else(
            || format!("source id {}", sid(di)),
            |k| canon::key_text(e.table_ref(), &k),
        );
        if records.contains_key(&sid(di)) {
            let v = Verdict {
                bucket: 0,
                source: None,
                target: None,
                kind: Kind::Nothing,
            };
            acc.decide(key, v);
        } else {
            acc.differ(
                None,
                None,
                None,
                RowDiff {
                    key,
                    state: "missing",
                    reason: Some(
                        "the document cannot be mapped and no dead letter records it".into(),
                    ),
                    columns: Vec::new(),
                    children: Vec::new(),
                },
            );
        }
    }
    let time_path: Vec<String> = e.time_field.split('.').map(str::to_owned).collect();
    for en in entries {
        let when = crate::mapping::lookup(&docs[en.doc], &time_path)
            .ok()
            .flatten()
            .and_then(|v| crate::mapping::value::to_timestamp(&v, Some(e.time_format())).ok());
        let row = target.get(&en.key);
        let held = InTarget {
            row,
            hash: row.map(|t| target_hash(e, t, &t_kids)),
            record: records.get(&sid(en.doc)).copied(),
            kids: &t_kids,
        };
        judge(acc, en, when, held);
    }
    Ok(())
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
            if acc.verdicts.contains_key(&key) {
                continue;
            }
            let when = match &r[tc] {
                Value::Timestamp(t) => Some(*t),
                _ => None,
            };
            let h = xor(&canon::row_hash(e.table_ref(), r));
            let d = RowDiff {
                key,
                state: "extra",
                reason: Some(
                    "no source document of the range has this key (deleted in the source, or moved out of the range)"
                        .into(),
                ),
                columns: Vec::new(),
                children: Vec::new(),
            };
            acc.differ(when, None, Some(h), d);
        }
    }
    Ok(())
}

/// What to verify: the range and the entities (every windowed one when none is named).
pub struct Plan {
    pub range: Window,
    pub entities: Vec<String>,
}

/// Check the range and the entity names before anything is connected.
pub fn plan(mapping: &Mapping, opts: &VerifyOptions) -> Result<Plan> {
    let (f, t) =
        crate::timearg::parse_range(&opts.from, &opts.to, Utc::now()).map_err(Failure::Config)?;
    let range = Window::new(
        crate::engine::window::to_millis(f),
        crate::engine::window::to_millis(t),
    );
    let entities = Selection::new(mapping, &opts.entities).names()?;
    Ok(Plan { range, entities })
}

/// Compare the planned entities' source documents with the target.
pub async fn compare(
    source: &Source,
    sink: &Sink,
    mapping: &Mapping,
    plan: &Plan,
    opts: &VerifyOptions,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let mut entities = Vec::new();
    for n in &plan.entities {
        let e = mapping.entity(n)?;
        entities.push(verify_entity(source, sink, mapping, e, plan.range, opts).await?);
    }
    let mut tables = Vec::new();
    for n in &plan.entities {
        let e = mapping.entity(n)?;
        tables.push(e.table_ref());
        tables.extend(e.children.iter().map(Child::table_ref));
    }
    let dangling = sink.dangling(&tables, opts.limit).await?;
    let differences = entities
        .iter()
        .map(|e| e.missing_count + e.extra_count + e.different_count)
        .sum::<u64>()
        + dangling.iter().map(|d| d.rows).sum::<u64>();
    Ok(VerifyReport {
        range: plan.range,
        entities,
        dangling,
        differences,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}
