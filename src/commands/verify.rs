//! `tidemark verify --from T1 --to T2 [--entity NAME]`: does the target hold what the
//! mapping makes of the source for a time range?
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

use crate::mapping::canon;
use crate::exit::Failure;
use crate::mapping::spec::{DeleteAction, MissingPolicy};
use crate::mapping::{Child, ColumnType, Entity, Outcome, TableRef, Value};
use crate::settings::Settings;
use crate::sink::verify::Record;
use crate::sink::Sink;
use crate::source::Source;
use crate::engine::window::{fmt_ts, Window};
use anyhow::Result;
use bson::RawDocumentBuf;
use chrono::{DateTime, Utc};
use indexmap::IndexMap;
use serde::Serialize;
use serde_json::Value as J;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

pub use crate::sink::verify::Dangling;

/// Exit code of `verify` when source and target differ.
pub const DIFFERENCES: i32 = 7;

/// Characters of a value shown in a report before it is cut.
const SHOWN_CHARS: usize = 120;

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

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<18} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>6} {:>8} {:>10}",
            "entity",
            "source",
            "target",
            "missing",
            "extra",
            "different",
            "unmap",
            "dead",
            "deferred",
            "buckets≠"
        )?;
        for e in &self.entities {
            writeln!(
                f,
                "{:<18} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>6} {:>8} {:>10}",
                e.entity,
                e.source_rows,
                e.target_rows,
                e.missing_count,
                e.extra_count,
                e.different_count,
                e.unmappable,
                e.dead_lettered,
                e.deferred,
                e.differing_buckets.len()
            )?;
            for d in &e.details {
                write!(f, "  {:<9} {} {}", d.state, e.entity, d.key)?;
                if let Some(r) = &d.reason {
                    write!(f, ": {r}")?;
                }
                writeln!(f)?;
                for c in &d.columns {
                    writeln!(
                        f,
                        "      {}: source {} target {}",
                        c.column, c.source, c.target
                    )?;
                }
                for c in &d.children {
                    writeln!(f, "      {} {} {}", c.table, c.key, c.state)?;
                    for col in &c.columns {
                        writeln!(
                            f,
                            "        {}: source {} target {}",
                            col.column, col.source, col.target
                        )?;
                    }
                }
            }
            if let Some(n) = &e.note {
                writeln!(f, "  note: {n}")?;
            }
        }
        for d in &self.dangling {
            writeln!(
                f,
                "  dangling  {} {}: {} row(s) point at nothing {}",
                d.table,
                d.constraint,
                d.rows,
                d.keys.join(" ")
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

/// What the target must hold for one key of a page.
enum Expected {
    /// This row and, per child table, these child rows (`soft`: marked deleted).
    Row {
        row: Vec<Value>,
        children: Vec<Vec<Vec<Value>>>,
        soft: bool,
    },
    /// Soft-deleted, but the document no longer maps: only the marker is known.
    Marked { key: Vec<Value>, at: Value },
    /// Deleted by the deleted rule: no row.
    Gone { key: Vec<Value> },
}

/// One key of a page: what is expected, from which document.
struct Entry {
    key: String,
    expected: Expected,
    doc: usize,
    /// Why the row must stay out of the target (a `skip` / `defer` reference), if so.
    held: Option<String>,
}

/// The verdict on one key of the range. A key seen again in a later page (two source
/// documents for one key, the later one wins as in a run) replaces its earlier verdict.
struct Verdict {
    bucket: i64,
    /// Hash of the expected row, when the target must hold one.
    source: Option<u128>,
    /// Hash of the target's row, when it holds one.
    target: Option<u128>,
    kind: Kind,
}

enum Kind {
    Same,
    SoftDeleted,
    DeadLettered,
    Deferred,
    /// Nothing expected and nothing to count (deleted and absent, recorded as unmappable).
    Nothing,
    /// A difference (`missing`, `different`, `extra`), with its details while the report
    /// has room for them.
    Differs(&'static str, Option<Box<RowDiff>>),
}

struct Acc<'a> {
    e: &'a Entity,
    out: EntityVerify,
    bucket_ms: i64,
    limit: usize,
    /// Every key of the range, in the order first decided.
    verdicts: IndexMap<String, Verdict>,
    /// Verdicts holding details.
    detailed: usize,
}

fn xor(h: &str) -> u128 {
    u128::from_str_radix(h, 16).unwrap_or(0)
}

impl Acc<'_> {
    fn bucket_of(&self, t: Option<DateTime<Utc>>) -> i64 {
        let ms = t.map_or(0, |t| t.timestamp_millis());
        ms.div_euclid(self.bucket_ms) * self.bucket_ms
    }

    /// Record the verdict on `key`, replacing an earlier one.
    fn decide(&mut self, key: String, mut v: Verdict) {
        if let Some(old) = self.verdicts.shift_remove(&key) {
            if matches!(old.kind, Kind::Differs(_, Some(_))) {
                self.detailed -= 1;
            }
        }
        if let Kind::Differs(_, d) = &mut v.kind {
            if d.is_some() {
                if self.detailed < self.limit {
                    self.detailed += 1;
                } else {
                    *d = None;
                }
            }
        }
        self.verdicts.insert(key, v);
    }

    /// A difference on `key`.
    fn differ(
        &mut self,
        when: Option<DateTime<Utc>>,
        source: Option<u128>,
        target: Option<u128>,
        d: RowDiff,
    ) {
        let key = d.key.clone();
        let v = Verdict {
            bucket: self.bucket_of(when),
            source,
            target,
            kind: Kind::Differs(d.state, Some(Box::new(d))),
        };
        self.decide(key, v);
    }

    /// Sum the verdicts into the report: counts, listed keys, details and buckets.
    fn finish(mut self) -> EntityVerify {
        let mut buckets: BTreeMap<i64, (Side, Side)> = BTreeMap::new();
        let out = &mut self.out;
        for (key, v) in std::mem::take(&mut self.verdicts) {
            let (s, t) = buckets.entry(v.bucket).or_default();
            if let Some(h) = v.source {
                s.rows += 1;
                s.hash ^= h;
                out.source_rows += 1;
            }
            if let Some(h) = v.target {
                t.rows += 1;
                t.hash ^= h;
                out.target_rows += 1;
            }
            match v.kind {
                Kind::Same | Kind::Nothing => {}
                Kind::SoftDeleted => out.soft_deleted += 1,
                Kind::DeadLettered => out.dead_lettered += 1,
                Kind::Deferred => out.deferred += 1,
                Kind::Differs(state, d) => {
                    let (list, count) = match state {
                        "missing" => (&mut out.missing, &mut out.missing_count),
                        "extra" => (&mut out.extra, &mut out.extra_count),
                        _ => (&mut out.different, &mut out.different_count),
                    };
                    *count += 1;
                    if list.len() < self.limit {
                        list.push(key);
                    }
                    if let Some(d) = d {
                        out.details.push(*d);
                    }
                }
            }
        }
        out.buckets = buckets.len();
        for (b, (s, t)) in &buckets {
            if s.rows != t.rows || s.hash != t.hash {
                out.differing_buckets.push(Bucket {
                    from: fmt_ts(crate::sink::from_ms(*b)),
                    source_rows: s.rows,
                    target_rows: t.rows,
                    source_hash: format!("{:032x}", s.hash),
                    target_hash: format!("{:032x}", t.hash),
                });
            }
        }
        self.out
    }
}

/// A column name that may hold a credential: its values are never shown.
fn secret_column(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "credential",
        "private_key",
    ]
    .iter()
    .any(|s| n.contains(s))
}

/// A canonical value as shown in a report: cut after [`SHOWN_CHARS`] characters, hidden
/// for columns that may hold a credential.
pub fn shown(column: &str, v: J) -> J {
    if v.is_null() {
        return v;
    }
    if secret_column(column) {
        return J::String("<hidden: the column may hold a credential>".into());
    }
    let text = match &v {
        J::String(s) => s.clone(),
        other => other.to_string(),
    };
    let n = text.chars().count();
    if n <= SHOWN_CHARS {
        return v;
    }
    let head: String = text.chars().take(SHOWN_CHARS).collect();
    J::String(format!("{head}… ({n} characters)"))
}

/// The columns of two rows of `t` whose canonical values differ.
fn column_diffs(t: TableRef<'_>, source: &[Value], target: &[Value]) -> Vec<ColumnDiff> {
    t.columns
        .iter()
        .zip(source.iter().zip(target))
        .filter_map(|(c, (s, v))| {
            let (s, v) = (canon::value(s, c.ty), canon::value(v, c.ty));
            (s != v).then(|| ColumnDiff {
                column: c.name.clone(),
                source: shown(&c.name, s),
                target: shown(&c.name, v),
            })
        })
        .collect()
}

/// The child rows of one parent that differ between the two sides.
fn child_diffs(c: &Child, source: &[Vec<Value>], target: &[Vec<Value>]) -> Vec<ChildDiff> {
    let t = c.table_ref();
    let index = |rows: &[Vec<Value>]| -> BTreeMap<String, usize> {
        rows.iter()
            .enumerate()
            .map(|(i, r)| (canon::key_of_row(t, r), i))
            .collect()
    };
    let (s, d) = (index(source), index(target));
    let mut out = Vec::new();
    for (k, &i) in &s {
        match d.get(k) {
            None => out.push(ChildDiff {
                table: c.table.clone(),
                key: k.clone(),
                state: "missing",
                columns: Vec::new(),
            }),
            Some(&j) => {
                let columns = column_diffs(t, &source[i], &target[j]);
                if !columns.is_empty() {
                    out.push(ChildDiff {
                        table: c.table.clone(),
                        key: k.clone(),
                        state: "different",
                        columns,
                    });
                }
            }
        }
    }
    for k in d.keys().filter(|k| !s.contains_key(*k)) {
        out.push(ChildDiff {
            table: c.table.clone(),
            key: k.clone(),
            state: "extra",
            columns: Vec::new(),
        });
    }
    out
}

/// Canonical group key of child rows (their link to the parent) and of a parent row.
fn link_of_child(c: &Child, row: &[Value]) -> String {
    let v: Vec<J> = c
        .parent_links
        .iter()
        .map(|(ci, _)| canon::value(&row[*ci], c.columns[*ci].ty))
        .collect();
    J::Array(v).to_string()
}

fn link_of_parent(c: &Child, row: &[Value]) -> String {
    let v: Vec<J> = c
        .parent_links
        .iter()
        .map(|(ci, p)| canon::value(&row[*p], c.columns[*ci].ty))
        .collect();
    J::Array(v).to_string()
}

/// Hash of a row with its child rows (each child table's row hashes, sorted).
fn full_hash(e: &Entity, row: &[Value], kids: &[Vec<Vec<Value>>]) -> String {
    let mut text = canon::row_hash(e.table_ref(), row);
    for (c, rows) in e.children.iter().zip(kids) {
        let mut hs: Vec<String> = rows
            .iter()
            .map(|r| canon::row_hash(c.table_ref(), r))
            .collect();
        hs.sort();
        text.push('|');
        text.push_str(&hs.join(","));
    }
    canon::hash_text(&text)
}

/// The target child rows of each parent, per child table, keyed by the parent link.
fn group_children(
    e: &Entity,
    children: Vec<Vec<Vec<Value>>>,
) -> Vec<HashMap<String, Vec<Vec<Value>>>> {
    e.children
        .iter()
        .zip(children)
        .map(|(c, rows)| {
            let mut m: HashMap<String, Vec<Vec<Value>>> = HashMap::new();
            for r in rows {
                m.entry(link_of_child(c, &r)).or_default().push(r);
            }
            m
        })
        .collect()
}

/// The target column holding the source time field, if the mapping copies it.
fn time_column(e: &Entity) -> Option<usize> {
    let path: Vec<String> = e.time_field.split('.').map(str::to_owned).collect();
    e.columns
        .iter()
        .position(|c| c.ty == ColumnType::Timestamptz && c.source_path() == Some(path.as_slice()))
}

/// Child rows of one parent without two of the same key (the last one wins, as in a run).
fn dedup_children(c: &Child, rows: Vec<Vec<Value>>) -> Vec<Vec<Value>> {
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<Vec<Value>> = Vec::with_capacity(rows.len());
    for r in rows {
        let k = canon::key_of_row(c.table_ref(), &r);
        match at.get(&k) {
            Some(&i) => out[i] = r,
            None => {
                at.insert(k, out.len());
                out.push(r);
            }
        }
    }
    out
}

/// What the target must hold for a page of documents, one entry per key (the last
/// document of a key wins, as in a run), and the indexes of the documents that cannot be
/// mapped. `plain` is `e` without its deleted rule: a soft-deleted document keeps its row.
fn expect_page(e: &Entity, plain: &Entity, docs: &[RawDocumentBuf]) -> (Vec<Entry>, Vec<usize>) {
    let soft_col = e
        .deleted
        .as_ref()
        .filter(|d| d.action == DeleteAction::SoftDelete)
        .and_then(|d| d.column);
    let mut entries: Vec<Option<Entry>> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut unmappable = Vec::new();
    let t = e.table_ref();
    for (di, doc) in docs.iter().enumerate() {
        let expected = match e.map(doc) {
            Err(_) => {
                unmappable.push(di);
                continue;
            }
            Ok(Outcome::Filtered) => continue,
            Ok(Outcome::Row { row, children }) => Expected::Row {
                row,
                children,
                soft: false,
            },
            Ok(Outcome::Deleted { key: None, .. }) => continue,
            Ok(Outcome::Deleted { key: Some(key), at }) => {
                let at = at.map_or(Value::Null, Value::Timestamp);
                match soft_col {
                    None => Expected::Gone { key },
                    Some(sc) => match plain.map(doc) {
                        Ok(Outcome::Row { mut row, children }) => {
                            row[sc] = at;
                            Expected::Row {
                                row,
                                children,
                                soft: true,
                            }
                        }
                        _ => Expected::Marked { key, at },
                    },
                }
            }
        };
        let key = match &expected {
            Expected::Row { row, .. } => canon::key_of_row(t, row),
            Expected::Marked { key, .. } | Expected::Gone { key } => canon::key_text(t, key),
        };
        let entry = Entry {
            key: key.clone(),
            expected,
            doc: di,
            held: None,
        };
        match at.get(&key) {
            Some(&i) => entries[i] = Some(entry),
            None => {
                at.insert(key, entries.len());
                entries.push(Some(entry));
            }
        }
    }
    let mut out: Vec<Entry> = entries.into_iter().flatten().collect();
    for en in &mut out {
        if let Expected::Row { children, .. } = &mut en.expected {
            for (c, rows) in e.children.iter().zip(children.iter_mut()) {
                *rows = dedup_children(c, std::mem::take(rows));
            }
        }
    }
    (out, unmappable)
}

/// Referenced keys (per referenced entity) the target holds, of those `entries` use.
async fn present_refs(
    sink: &Sink,
    s: &crate::mapping::Mapping,
    e: &Entity,
    entries: &[Entry],
) -> Result<HashMap<String, HashSet<String>>> {
    let mut wanted: HashMap<String, (HashSet<String>, Vec<Value>)> = HashMap::new();
    let mut add = |r: &str, v: &Value| {
        if *v == Value::Null {
            return;
        }
        let w = wanted.entry(r.to_owned()).or_default();
        if w.0.insert(v.key_text()) {
            w.1.push(v.clone());
        }
    };
    for en in entries {
        let Expected::Row { row, children, .. } = &en.expected else {
            continue;
        };
        for (c, v) in e.columns.iter().zip(row) {
            if let Some(r) = &c.references {
                add(r, v);
            }
        }
        for (ch, rows) in e.children.iter().zip(children) {
            for row in rows {
                for (c, v) in ch.columns.iter().zip(row) {
                    if let Some(r) = &c.references {
                        add(r, v);
                    }
                }
            }
        }
    }
    let mut out = HashMap::new();
    for (r, (texts, keys)) in wanted {
        let re = s.entity(&r)?;
        let found = match re.key_column {
            Some(kc) => sink.existing_keys(re.table_ref(), kc, &keys).await?,
            // Without a key column a reference cannot be looked up (a run defers such rows).
            None => texts,
        };
        out.insert(r, found);
    }
    Ok(out)
}

/// Apply the missing-reference policies to one expected row, as a run does against what
/// the target holds: NULL the column (`null`), drop the child row (`skip` / `defer` in a
/// child column) or keep the row out (`skip` / `defer`: the reason is returned).
fn apply_policies(
    e: &Entity,
    present: &HashMap<String, HashSet<String>>,
    row: &mut [Value],
    children: &mut [Vec<Vec<Value>>],
) -> Option<String> {
    let absent = |r: &str, v: &Value| {
        *v != Value::Null && !present.get(r).is_some_and(|p| p.contains(&v.key_text()))
    };
    let mut held = None;
    for (c, v) in e.columns.iter().zip(row.iter_mut()) {
        let Some(r) = &c.references else { continue };
        if !absent(r, v) {
            continue;
        }
        match c.on_missing {
            MissingPolicy::Null => *v = Value::Null,
            p => {
                held.get_or_insert_with(|| {
                    format!(
                        "column `{}` references {r} `{}`, which the target does not hold (on_missing = {})",
                        c.name,
                        v.key_text(),
                        if p == MissingPolicy::Skip { "skip" } else { "defer" }
                    )
                });
            }
        }
    }
    for (ch, rows) in e.children.iter().zip(children.iter_mut()) {
        rows.retain_mut(|row| {
            for (c, v) in ch.columns.iter().zip(row.iter_mut()) {
                let Some(r) = &c.references else { continue };
                if absent(r, v) {
                    if c.on_missing != MissingPolicy::Null {
                        return false;
                    }
                    *v = Value::Null;
                }
            }
            true
        });
    }
    held
}

async fn verify_entity(
    source: &Source,
    sink: &Sink,
    mapping: &crate::mapping::Mapping,
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
        verify_page(sink, mapping, &mut acc, &plain, &page.docs).await?;
    }
    extras(sink, &mut acc, range).await?;
    Ok(acc.finish())
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
    mapping: &crate::mapping::Mapping,
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
        let record = records.get(&sid(en.doc)).copied();
        let trow = target.get(&en.key);
        let th = trow.map(|t| target_hash(e, t, &t_kids));
        judge(acc, en, when, trow, th, record, &t_kids);
    }
    Ok(())
}

/// The hash of a target row with its child rows.
fn target_hash(e: &Entity, row: &[Value], t_kids: &[HashMap<String, Vec<Vec<Value>>>]) -> u128 {
    let kids: Vec<Vec<Vec<Value>>> = e
        .children
        .iter()
        .zip(t_kids.iter())
        .map(|(c, m)| m.get(&link_of_parent(c, row)).cloned().unwrap_or_default())
        .collect();
    xor(&full_hash(e, row, &kids))
}

/// The verdict on one entry of a page, given the target's row (`trow`, hashed `th`) and
/// the tool's record of its document.
fn judge(
    acc: &mut Acc<'_>,
    en: Entry,
    when: Option<DateTime<Utc>>,
    trow: Option<&Vec<Value>>,
    th: Option<u128>,
    record: Option<Record>,
    t_kids: &[HashMap<String, Vec<Vec<Value>>>],
) {
    let e = acc.e;
    let bucket = acc.bucket_of(when);
    let plain = |kind| Verdict {
        bucket,
        source: None,
        target: th,
        kind,
    };
    let diff = |state: &'static str,
                reason: Option<String>,
                columns: Vec<ColumnDiff>,
                children: Vec<ChildDiff>| RowDiff {
        key: en.key.clone(),
        state,
        reason,
        columns,
        children,
    };
    match en.expected {
        Expected::Gone { .. } => match trow {
            None => acc.decide(en.key, plain(Kind::Nothing)),
            Some(_) => {
                let d = diff(
                    "different",
                    Some("deleted in the source".into()),
                    vec![],
                    vec![],
                );
                acc.differ(when, None, th, d)
            }
        },
        Expected::Marked { at, .. } => {
            let Some(t) = trow else {
                return acc.decide(en.key, plain(Kind::Nothing));
            };
            let sc = e.deleted.as_ref().and_then(|d| d.column).unwrap_or(0);
            let c = &e.columns[sc];
            let (s, v) = (canon::value(&at, c.ty), canon::value(&t[sc], c.ty));
            if s == v {
                acc.decide(
                    en.key,
                    Verdict {
                        source: th,
                        ..plain(Kind::SoftDeleted)
                    },
                );
            } else {
                let cols = vec![ColumnDiff {
                    column: c.name.clone(),
                    source: shown(&c.name, s),
                    target: shown(&c.name, v),
                }];
                let d = diff(
                    "different",
                    Some("soft-deleted in the source".into()),
                    cols,
                    vec![],
                );
                acc.differ(when, None, th, d);
            }
        }
        Expected::Row {
            row,
            children,
            soft,
        } => {
            if let Some(why) = &en.held {
                // The row must stay out until its reference exists.
                match (trow, record) {
                    (Some(_), _) => {
                        let why = format!("{why}, yet the row is there");
                        acc.differ(when, None, th, diff("different", Some(why), vec![], vec![]))
                    }
                    (None, Some(Record::DeadLetter)) => {
                        acc.decide(en.key, plain(Kind::DeadLettered))
                    }
                    (None, Some(Record::Pending)) => acc.decide(en.key, plain(Kind::Deferred)),
                    (None, None) => {
                        let why = format!(
                            "{why}, and no dead letter or pending entry records the document"
                        );
                        acc.differ(when, None, None, diff("missing", Some(why), vec![], vec![]))
                    }
                }
                return;
            }
            let sh = xor(&full_hash(e, &row, &children));
            let Some(t) = trow else {
                return match record {
                    Some(Record::Pending) => acc.decide(en.key, plain(Kind::Deferred)),
                    Some(Record::DeadLetter) => acc.decide(en.key, plain(Kind::DeadLettered)),
                    None => acc.differ(when, Some(sh), None, diff("missing", None, vec![], vec![])),
                };
            };
            if Some(sh) == th {
                let kind = if soft { Kind::SoftDeleted } else { Kind::Same };
                return acc.decide(
                    en.key,
                    Verdict {
                        bucket,
                        source: Some(sh),
                        target: th,
                        kind,
                    },
                );
            }
            let t_children: Vec<Vec<Vec<Value>>> = e
                .children
                .iter()
                .zip(t_kids.iter())
                .map(|(c, m)| m.get(&link_of_parent(c, &row)).cloned().unwrap_or_default())
                .collect();
            let columns = column_diffs(e.table_ref(), &row, t);
            let kids: Vec<ChildDiff> = e
                .children
                .iter()
                .zip(children.iter().zip(&t_children))
                .flat_map(|(c, (s, t))| child_diffs(c, s, t))
                .collect();
            let reason = soft.then(|| "soft-deleted in the source".into());
            acc.differ(when, Some(sh), th, diff("different", reason, columns, kids));
        }
    }
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

/// `tidemark verify`.
pub async fn verify(s: &Settings, opts: &VerifyOptions) -> Result<VerifyReport> {
    let started = Instant::now();
    let mapping = crate::commands::setup::load_mapping(s)?;
    let (f, t) =
        crate::timearg::parse_range(&opts.from, &opts.to, Utc::now()).map_err(Failure::Config)?;
    let range = Window::new(crate::engine::window::to_millis(f), crate::engine::window::to_millis(t));
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
        entities.push(verify_entity(&source, &sink, &mapping, e, range, opts).await?);
    }
    let mut tables = Vec::new();
    for n in &names {
        let e = mapping.entity(n)?;
        tables.push(e.table_ref());
        tables.extend(e.children.iter().map(Child::table_ref));
    }
    let dangling = sink.dangling(&tables, opts.limit).await?;
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
