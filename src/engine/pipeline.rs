//! One window of one entity: read pages, map, de-duplicate, write rows, dead letters
//! and checkpoint in one transaction per batch. `run`, tests and (later) backfill and
//! the daemon all go through [`catch_up`] / [`run_window`].

use crate::engine::window::{self, LaneState, PlanInput, Window};
use crate::exit::Failure;
use crate::mapping::{Entity, Mapping, Outcome, TableRef, Value};
use crate::settings::Settings;
use crate::sink::{BatchWrite, Checkpoint, DeadLetter, Sink};
use crate::source::{Page, Position, Source};
use anyhow::Result;
use bson::Bson;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info, warn};

/// Everything a run needs, shared by all entities of the run.
pub struct Ctx {
    pub settings: Settings,
    pub mapping: Mapping,
    /// The mapping's entities by name, shared with work sent off the async runtime.
    pub shared: HashMap<String, Arc<Entity>>,
    pub source: Source,
    pub sink: Sink,
    pub run_id: String,
    /// Dead letters written by this run so far (checked against the error budget).
    pub dead_total: AtomicU64,
    /// Set by a shutdown signal; checked between batches so the current batch commits first.
    pub stop: Arc<AtomicBool>,
    /// What reference resolution learned this run (each key fetched at most once per run).
    /// A mutex because backfill chunks of one run resolve concurrently.
    pub memo: tokio::sync::Mutex<crate::engine::resolve::Memo>,
    /// Rows this run wrote on demand, so a lane reading them again skips them.
    /// Shared with the window's mapper, which looks ahead in it (`pre_skip`).
    pub pulled: Arc<std::sync::Mutex<crate::engine::pulled::Pulled>>,
    /// Which documents have dead letters, missing references or pending records.
    pub records: crate::sink::records::Known,
    /// Every batch is rolled back instead of committed and no checkpoint is saved.
    pub dry_run: bool,
    /// Record before-images of changed rows (`sync.provenance`) for `tidemark rollback`.
    pub provenance: bool,
}

impl Ctx {
    /// Entity `name` of the mapping, shareable with other tasks.
    pub fn entity_arc(&self, name: &str) -> Result<Arc<Entity>> {
        match self.shared.get(name) {
            Some(e) => Ok(e.clone()),
            None => Ok(Arc::new(self.mapping.entity(name)?.clone())),
        }
    }

    pub fn new(
        settings: Settings,
        mapping: Mapping,
        source: Source,
        sink: Sink,
        run_id: String,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let shared = mapping
            .entities
            .iter()
            .map(|e| (e.name.clone(), Arc::new(e.clone())))
            .collect();
        Ctx {
            shared,
            mapping,
            source,
            sink,
            run_id,
            dead_total: AtomicU64::new(0),
            stop,
            memo: Default::default(),
            pulled: Arc::new(std::sync::Mutex::new(crate::engine::pulled::Pulled::new(
                settings.state_dir.clone(),
            ))),
            records: Default::default(),
            dry_run: false,
            provenance: settings.sync.provenance,
            settings,
        }
    }
}

/// Document counts: `read = written + unchanged + dead_lettered + duplicates + deleted + filtered`.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub read: u64,
    pub written: u64,
    /// Of `written`: new rows, and rows that existed with other content (counted when
    /// provenance is on or in a dry run; otherwise 0).
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Of `unchanged`: rows this run had already written from the same document (pulled on
    /// demand by another batch), skipped without reading the target ([`crate::engine::pulled`]).
    pub already_written: u64,
    pub dead_lettered: u64,
    /// Earlier versions of a key superseded inside the same batch.
    pub duplicates: u64,
    /// Documents whose time field is missing or mistyped (dead-lettered by the scan).
    pub invalid_time: u64,
    /// Documents matching the deleted rule.
    pub deleted: u64,
    /// Documents matching `skip_when`.
    pub filtered: u64,
    /// Child rows inserted or changed, and removed (element gone from the source array).
    pub child_written: u64,
    pub child_removed: u64,
    /// Documents pulled on demand (references and dependents), and their rows written.
    pub pulled: u64,
    pub pulled_written: u64,
    /// References that could not be resolved (recorded in tidemark_missing_refs).
    pub missing_refs: u64,
    /// Documents held back for a later run (on_missing = defer, or over a limit).
    pub deferred: u64,
    /// Batches where max_depth or max_pulled_per_batch stopped resolution.
    pub limit_hits: u64,
    /// Round-trips to the source.
    pub source_queries: u64,
    /// Batches written while the batch before them was still being written (on their own
    /// connection, committed after it: `target.batches_in_flight`).
    pub overlapped_batches: u64,
    /// Of one batch: none of its rows was stored before (the window's next batch then
    /// presumes a first load, [`crate::sink::BatchWrite::presume_new`]). Not summed.
    #[serde(skip)]
    pub all_new: bool,
    /// Of one batch: it had dependents and none was stored before (the next batch presumes
    /// the same, [`crate::sink::BatchWrite::presume_dependents_new`]). Not summed.
    #[serde(skip)]
    pub dependents_new: bool,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.read += o.read;
        self.written += o.written;
        self.inserted += o.inserted;
        self.updated += o.updated;
        self.unchanged += o.unchanged;
        self.already_written += o.already_written;
        self.dead_lettered += o.dead_lettered;
        self.duplicates += o.duplicates;
        self.invalid_time += o.invalid_time;
        self.deleted += o.deleted;
        self.filtered += o.filtered;
        self.child_written += o.child_written;
        self.child_removed += o.child_removed;
        self.pulled += o.pulled;
        self.pulled_written += o.pulled_written;
        self.missing_refs += o.missing_refs;
        self.deferred += o.deferred;
        self.limit_hits += o.limit_hits;
        self.source_queries += o.source_queries;
        self.overlapped_batches += o.overlapped_batches;
    }
}

/// The outcome of one window.
#[derive(Debug, Clone, Serialize)]
pub struct WindowReport {
    pub entity: String,
    pub window: Window,
    pub resumed: bool,
    pub batches: u64,
    pub counts: Counts,
    pub elapsed_ms: u64,
    /// The window's last batch stored only new rows (the next window's first batch then
    /// presumes a first load too).
    #[serde(skip)]
    pub ended_new: bool,
}

/// The outcome of catching one entity up.
#[derive(Debug, Clone, Serialize)]
pub struct EntityReport {
    pub entity: String,
    pub windows: usize,
    pub counts: Counts,
    pub watermark: Option<DateTime<Utc>>,
    pub warnings: Vec<String>,
    pub elapsed_ms: u64,
}

/// The nightly lane of an entity.
pub fn nightly_lane(entity: &str) -> String {
    format!("nightly:{entity}")
}

/// Source id used for dead letters: relaxed extended JSON of `_id`.
pub fn source_id(doc: &bson::RawDocument) -> String {
    match doc.get("_id") {
        Ok(Some(v)) => Bson::try_from(v)
            .map(|b| b.into_relaxed_extjson().to_string())
            .unwrap_or_else(|_| "<undecodable _id>".into()),
        _ => "<missing _id>".into(),
    }
}

pub fn raw_json(doc: &bson::RawDocument) -> String {
    // Too deep for the recursive converters: keep the exact bytes instead.
    if crate::mapping::value::nested_deeper_than(
        bson::raw::RawBsonRef::Document(doc),
        crate::mapping::value::MAX_NESTING,
    ) {
        return serde_json::json!({ "$nestedTooDeep": true, "$hex": hex::encode(doc.as_bytes()) })
            .to_string();
    }
    match bson::Document::try_from(doc) {
        Ok(d) => Bson::Document(d).into_relaxed_extjson().to_string(),
        Err(e) => serde_json::json!({ "$undecodable": e.to_string(), "$hex": hex::encode(doc.as_bytes()) }).to_string(),
    }
}

/// A mapped page: rows de-duplicated on the primary key (last version wins).
#[derive(Default)]
pub struct MappedPage {
    pub rows: Vec<Vec<Value>>,
    /// Canonical key and hash of each row, when [`prepare`] computed them ahead.
    pub row_meta: Vec<(String, String)>,
    /// The same per child table, for each of `children`' rows; emptied when the children
    /// change after [`prepare`] (the writer then computes them itself).
    pub child_meta: Vec<Vec<(String, String)>>,
    /// [`crate::engine::pulled::doc_hash`] of each of the page's documents (indexed like them), when
    /// computed ahead, off the writer's task; empty: computed where needed.
    pub doc_hashes: Vec<u64>,
    /// Write without reading first (the window's previous batch was all new rows).
    pub presume_new: bool,
    /// Write the dependents without reading first (the previous batch's were all new).
    pub presume_dependents_new: bool,
    /// For each row, the index of its document in the page.
    pub row_docs: Vec<usize>,
    /// Per child table: rows of the kept parents, de-duplicated on the child key.
    pub children: Vec<Vec<Vec<Value>>>,
    pub deletes: Vec<Vec<Value>>,
    pub soft_deletes: Vec<(Vec<Value>, Value)>,
    pub dead: Vec<DeadLetter>,
    pub resolved: Vec<String>,
    pub duplicates: u64,
    /// Documents matching the deleted rule (with or without a derivable key).
    pub deleted: u64,
    pub filtered: u64,
    /// A missing-reference policy nulled or dropped child rows: a later mapping of the same
    /// documents could write more, so [`crate::engine::pulled`] does not record the page's rows.
    pub children_cut: bool,
    /// Documents taken out of the page before mapping because this run already wrote them
    /// (see [`pre_skip`]), to be confirmed when the batch's turn comes
    /// ([`confirm_pre_skipped`]).
    pub unmapped: Vec<PreSkipped>,
    /// How many documents [`confirm_pre_skipped`] confirmed: read, skipped, never mapped.
    pub skipped_unmapped: u64,
}

/// A document [`pre_skip`] took out of its page: its position in the page, the document, its
/// source id (computed in the mapper, off the window's task) and its key and document hashes.
pub struct PreSkipped {
    at: usize,
    doc: bson::RawDocumentBuf,
    id: String,
    key: u64,
    hash: u64,
}

impl MappedPage {
    /// Compute [`MappedPage::doc_hashes`] for the page's documents `docs`.
    pub fn hash_docs(&mut self, docs: &[bson::RawDocumentBuf]) {
        self.doc_hashes = docs
            .iter()
            .map(|d| crate::engine::pulled::doc_hash(d))
            .collect();
    }

    /// [`crate::engine::pulled::doc_hash`] of document `di` of `docs` (the page's documents):
    /// computed ahead when it was, else now.
    pub fn doc_hash(&self, docs: &[bson::RawDocumentBuf], di: usize) -> u64 {
        match self.doc_hashes.get(di) {
            Some(&h) => h,
            None => crate::engine::pulled::doc_hash(&docs[di]),
        }
    }

    /// Keep the rows marked in `keep` (with their documents, precomputed keys and hashes, and
    /// child rows); returns the rows removed. A child row goes with its parent, matched on
    /// the child's parent link.
    pub fn retain_rows(&mut self, e: &Entity, keep: &[bool]) -> Vec<Vec<Value>> {
        if keep.iter().all(|k| *k) {
            return Vec::new();
        }
        let meta = std::mem::take(&mut self.row_meta);
        let has_meta = meta.len() == self.rows.len();
        let rows = std::mem::take(&mut self.rows);
        let docs = std::mem::take(&mut self.row_docs);
        let mut removed = Vec::new();
        let mut meta = meta.into_iter();
        for ((row, d), k) in rows.into_iter().zip(docs).zip(keep) {
            let m = if has_meta { meta.next() } else { None };
            if *k {
                self.rows.push(row);
                self.row_docs.push(d);
                self.row_meta.extend(m);
            } else {
                removed.push(row);
            }
        }
        for (ci, child) in e.children.iter().enumerate() {
            let (by, parent_cols): (Vec<usize>, Vec<usize>) =
                child.parent_links.iter().copied().unzip();
            let gone: std::collections::HashSet<String> =
                removed.iter().map(|r| key_text(r, &parent_cols)).collect();
            let Some(rows) = self.children.get_mut(ci) else {
                continue;
            };
            let kept: Vec<bool> = rows
                .iter()
                .map(|row| !gone.contains(&key_text(row, &by)))
                .collect();
            let aligned = self
                .child_meta
                .get(ci)
                .is_some_and(|m| m.len() == rows.len());
            retain_marked(rows, &kept);
            // The child rows' keys and hashes computed ahead go with their rows.
            if let Some(meta) = self.child_meta.get_mut(ci) {
                if aligned {
                    retain_marked(meta, &kept);
                } else {
                    meta.clear();
                }
            }
        }
        removed
    }
}

/// Keep the items of `v` whose mark in `keep` (indexed like them) is true.
fn retain_marked<T>(v: &mut Vec<T>, keep: &[bool]) {
    let mut k = keep.iter();
    v.retain(|_| *k.next().unwrap_or(&false));
}

fn key_text(row: &[Value], cols: &[usize]) -> String {
    cols.iter()
        .map(|&i| row[i].key_text())
        .collect::<Vec<_>>()
        .join("\u{1f}")
}

type RowWithChildren = (Vec<Value>, Vec<Vec<Vec<Value>>>, usize);
type Deletion = (Vec<Value>, Option<DateTime<Utc>>);

/// Map every document of a page; failures become dead letters, nothing is dropped.
/// Within a page the last event per key wins: a later version replaces an earlier one,
/// a deletion cancels an earlier row and a row cancels an earlier deletion.
pub fn map_page(e: &Entity, docs: &[bson::RawDocumentBuf], track_resolved: bool) -> MappedPage {
    let mut out = MappedPage::default();
    let mut rows: Vec<Option<RowWithChildren>> = Vec::with_capacity(docs.len());
    let mut index: HashMap<String, usize> = HashMap::with_capacity(docs.len());
    let mut deletes: Vec<Option<Deletion>> = Vec::new();
    let mut del_index: HashMap<String, usize> = HashMap::new();
    let mut last_ok: HashMap<String, bool> = HashMap::new();
    let soft = e
        .deleted
        .as_ref()
        .is_some_and(|d| d.action == crate::mapping::spec::DeleteAction::SoftDelete);
    for (di, doc) in docs.iter().enumerate() {
        let outcome = match e.map(doc) {
            Ok(o) => o,
            Err(err) => {
                let id = source_id(doc);
                if track_resolved {
                    last_ok.insert(id.clone(), false);
                }
                out.dead.push(DeadLetter {
                    source_id: id,
                    error: err.to_string(),
                    document: raw_json(doc),
                });
                continue;
            }
        };
        if track_resolved {
            let id = source_id(doc);
            last_ok.insert(id.clone(), true);
            out.resolved.push(id);
        }
        match outcome {
            Outcome::Row { row, children } => {
                let key = key_text(&row, &e.pk);
                if let Some(at) = del_index.remove(&key) {
                    deletes[at] = None;
                    out.duplicates += 1;
                    out.deleted -= 1;
                }
                match index.get(&key) {
                    Some(&at) => {
                        rows[at] = Some((row, children, di));
                        out.duplicates += 1;
                    }
                    None => {
                        index.insert(key, rows.len());
                        rows.push(Some((row, children, di)));
                    }
                }
            }
            Outcome::Deleted { key, at } => {
                out.deleted += 1;
                let Some(k) = key else { continue };
                let kt = k
                    .iter()
                    .map(Value::key_text)
                    .collect::<Vec<_>>()
                    .join("\u{1f}");
                if let Some(i) = index.remove(&kt) {
                    rows[i] = None;
                    out.duplicates += 1;
                }
                match del_index.get(&kt) {
                    Some(&i) => {
                        deletes[i] = Some((k, at));
                        out.duplicates += 1;
                        out.deleted -= 1;
                    }
                    None => {
                        del_index.insert(kt, deletes.len());
                        deletes.push(Some((k, at)));
                    }
                }
            }
            Outcome::Filtered => out.filtered += 1,
        }
    }
    if track_resolved && last_ok.len() < out.dead.len() + out.resolved.len() {
        // A document came twice in the page (changed while being read): its last version
        // decides whether it is dead-lettered or resolved; a superseded failure counts as a
        // duplicate.
        let before = out.dead.len();
        out.dead
            .retain(|d| last_ok.get(&d.source_id) != Some(&true));
        out.duplicates += (before - out.dead.len()) as u64;
        let mut seen = std::collections::HashSet::new();
        out.resolved
            .retain(|id| last_ok.get(id) == Some(&true) && seen.insert(id.clone()));
    }
    for (k, at) in deletes.into_iter().flatten() {
        if soft {
            out.soft_deletes
                .push((k, at.map_or(Value::Null, Value::Timestamp)));
        } else {
            out.deletes.push(k);
        }
    }
    let mut parent_children = Vec::with_capacity(rows.len());
    for (row, children, di) in rows.into_iter().flatten() {
        out.rows.push(row);
        out.row_docs.push(di);
        parent_children.push(children);
    }
    out.children = e
        .children
        .iter()
        .enumerate()
        .map(|(ci, c)| {
            let mut rows: Vec<Vec<Value>> = Vec::new();
            let mut seen: HashMap<String, usize> = HashMap::new();
            for pc in &parent_children {
                for r in &pc[ci] {
                    let k = key_text(r, &c.pk);
                    match seen.get(&k) {
                        Some(&at) => rows[at] = r.clone(),
                        None => {
                            seen.insert(k, rows.len());
                            rows.push(r.clone());
                        }
                    }
                }
            }
            rows
        })
        .collect();
    out
}

/// A row's canonical key and hash, as the writer records them for provenance.
pub fn row_meta(t: TableRef<'_>, row: &[Value]) -> (String, String) {
    (
        crate::mapping::canon::key_of_row(t, row),
        crate::mapping::canon::row_hash(t, row),
    )
}

/// Get a mapped page ready for the writer, off its critical path: with `hash` (provenance
/// on, or a dry run counting inserts and updates) compute each row's canonical key and
/// hash, then serialize its JSON columns to text. The writer then only compares hashes and
/// binds text while the database works (the window pipeline runs this in its mapper stage).
pub fn prepare(e: &Entity, page: &mut MappedPage, hash: bool) {
    let t = e.table_ref();
    let meta = |t: TableRef<'_>, rows: &[Vec<Value>]| -> Vec<(String, String)> {
        rows.iter().map(|r| row_meta(t, r)).collect()
    };
    if hash {
        page.row_meta = meta(t, &page.rows);
        page.child_meta = e
            .children
            .iter()
            .zip(&page.children)
            .map(|(c, rows)| meta(c.table_ref(), rows))
            .collect();
    }
    for row in page
        .rows
        .iter_mut()
        .chain(page.children.iter_mut().flatten())
    {
        for v in row.iter_mut() {
            match v {
                Value::Json(j) => *v = Value::json_text(j.to_string()),
                // Hashed: the writer needs only the text.
                Value::JsonText { sorted, .. } => *sorted = None,
                _ => {}
            }
        }
    }
}

/// Map, resolve and write one page of documents of `e` (with `cp`, when given, in the same
/// transaction). Used by windows, pending retries and single-record runs.
pub async fn write_docs(
    ctx: &Ctx,
    e: &Entity,
    docs: &[bson::RawDocumentBuf],
    cp: Option<&Checkpoint>,
    track_ids: bool,
) -> Result<Counts> {
    write_mapped(ctx, e, docs, map_page(e, docs, true), cp, track_ids).await
}

/// Resolve and write one page already mapped by [`map_page`] (with `track_resolved`).
pub async fn write_mapped(
    ctx: &Ctx,
    e: &Entity,
    docs: &[bson::RawDocumentBuf],
    mapped: MappedPage,
    cp: Option<&Checkpoint>,
    track_ids: bool,
) -> Result<Counts> {
    let ready = resolve_batch(ctx, e, docs, mapped).await?;
    let out = commit_batch(ctx, e, docs, ready, cp, track_ids, None).await;
    if out.is_err() {
        forget_pulled(ctx);
    }
    out
}

/// A page resolved and ready to write: its rows (without those skipped, see
/// [`crate::engine::pulled`]) and everything resolution pulled for them.
pub struct Resolved {
    mapped: MappedPage,
    res: crate::engine::resolve::Resolution,
    skipped: u64,
    source_queries: u64,
    /// What the batch writes, when batches may be written at once ([`touched`]).
    touched: Option<crate::sink::order::Touched>,
}

/// The first half of a batch: skip rows this run already wrote, resolve references and
/// dependents (source reads, mapping), and bring [`crate::engine::pulled`] up to date as if the batch
/// had committed. Batches must be resolved in the order they are committed; the window
/// resolves the next batch while the previous one is written. If a batch then fails,
/// [`forget_pulled`] must run before anything else is skipped.
pub async fn resolve_batch(
    ctx: &Ctx,
    e: &Entity,
    docs: &[bson::RawDocumentBuf],
    mut mapped: MappedPage,
) -> Result<Resolved> {
    let before_queries = ctx.source.queries.load(Ordering::Relaxed);
    let skipped = skip_pulled(ctx, e, docs, &mut mapped) + mapped.skipped_unmapped;
    let res = crate::engine::resolve::resolve(ctx, e, &mut mapped, docs).await?;
    if let Some(l) = &res.limit_hit {
        warn!(entity = %e.name, "{l}");
    }
    if !ctx.dry_run {
        let mut pulled = ctx.pulled.lock().unwrap_or_else(|p| p.into_inner());
        pulled.record(&res.fresh);
        // Rule 4 of `crate::engine::pulled`: what this batch writes of `e` itself replaces any
        // pulled version of the same key (also one pulled by this very batch). Rows of an
        // entity with dependents are never recorded (rule 3), so there is nothing to forget
        // (each forget may read the set's spill file).
        if !pulled.is_empty() && e.dependents.is_empty() {
            for row in &mapped.rows {
                pulled.forget(crate::engine::pulled::key_hash(e, row));
            }
            for key in mapped
                .deletes
                .iter()
                .chain(mapped.soft_deletes.iter().map(|(k, _)| k))
            {
                pulled.forget(crate::engine::pulled::deleted_key_hash(e, key));
            }
        }
    }
    let source_queries = ctx
        .source
        .queries
        .load(Ordering::Relaxed)
        .saturating_sub(before_queries);
    let touched = (batches_in_flight(ctx) > 1).then(|| touched(e, &mapped, &res));
    Ok(Resolved {
        mapped,
        res,
        skipped,
        source_queries,
        touched,
    })
}

/// Batches of one window this run writes at once (see [`crate::sink::order`]).
fn batches_in_flight(ctx: &Ctx) -> usize {
    if ctx.dry_run || !matches!(ctx.sink, Sink::Postgres(_)) {
        1
    } else {
        ctx.settings.batches_in_flight()
    }
}

/// Every row key a batch writes (its rows, child rows, pulled rows and theirs) and every
/// tool record it writes or clears, for [`crate::sink::order`]. Hard deletions make the
/// batch exclusive: their `ON DELETE` actions reach rows by reference, not by key.
fn touched(
    e: &Entity,
    m: &MappedPage,
    res: &crate::engine::resolve::Resolution,
) -> crate::sink::order::Touched {
    use crate::sink::key_text_at;
    let mut t = crate::sink::order::Touched::default();
    t.exclusive = !m.deletes.is_empty();
    let add_rows = |t: &mut crate::sink::order::Touched,
                    e: &Entity,
                    rows: &[Vec<Value>],
                    children: &[Vec<Vec<Value>>]| {
        for r in rows {
            t.add(&e.table, &key_text_at(r, &e.pk));
        }
        for (c, rows) in e.children.iter().zip(children) {
            for r in rows {
                t.add(&c.table, &key_text_at(r, &c.pk));
            }
        }
    };
    add_rows(&mut t, e, &m.rows, &m.children);
    for r in res.before.iter().chain(&res.after) {
        add_rows(&mut t, &r.entity, &r.rows, &r.children);
    }
    for (key, _) in &m.soft_deletes {
        t.add(
            &e.table,
            &crate::sink::key_text_at(key, &(0..key.len()).collect::<Vec<_>>()),
        );
    }
    for id in m
        .dead
        .iter()
        .chain(&res.dead)
        .map(|d| &d.source_id)
        .chain(&m.resolved)
    {
        t.add_record(&e.name, id);
    }
    for (id, _) in &res.deferred {
        t.add_record(&e.name, id);
    }
    for (entity, d) in &res.other_dead {
        t.add_record(entity, &d.source_id);
    }
    for m in &res.missing {
        t.add_record(&m.entity, &m.source_id);
    }
    for (entity, id) in &res.pulled_ids {
        t.add_record(entity, id);
    }
    t
}

/// A batch failed after [`resolve_batch`] recorded it: nothing this run pulled may be
/// skipped any more (the set described a target that the rollback did not produce).
pub fn forget_pulled(ctx: &Ctx) {
    ctx.pulled.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// The second half of a batch: write it, with `cp` when given, in one transaction.
pub async fn commit_batch(
    ctx: &Ctx,
    e: &Entity,
    docs: &[bson::RawDocumentBuf],
    ready: Resolved,
    cp: Option<&Checkpoint>,
    track_ids: bool,
    order: Option<&crate::sink::order::Order>,
) -> Result<Counts> {
    let Resolved {
        mapped,
        res,
        skipped,
        source_queries,
        touched: _,
    } = ready;
    // Documents skipped before they were mapped are not in `docs`, but they were read.
    let read = (docs.len() as u64) + mapped.skipped_unmapped;
    let deferred: std::collections::HashSet<&str> =
        res.deferred.iter().map(|(id, _)| id.as_str()).collect();
    let clear: Vec<String> = if track_ids || !res.missing.is_empty() || !res.deferred.is_empty() {
        mapped
            .resolved
            .iter()
            .filter(|id| !deferred.contains(id.as_str()))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let mut dead = mapped.dead;
    dead.extend(res.dead);
    let out = ctx
        .sink
        .write_batch(&BatchWrite {
            entity: Some(e),
            rows: &mapped.rows,
            row_meta: &mapped.row_meta,
            child_meta: &mapped.child_meta,
            children: &mapped.children,
            deletes: &mapped.deletes,
            soft_deletes: &mapped.soft_deletes,
            dead: &dead,
            resolved: if track_ids { &mapped.resolved } else { &[] },
            checkpoint: cp,
            run_id: &ctx.run_id,
            mapping_version: &ctx.mapping.version,
            known: Some(&ctx.records),
            before: &res.before,
            after: &res.after,
            other_dead: &res.other_dead,
            missing: &res.missing,
            deferred: &res.deferred,
            clear_refs: &clear,
            clear_pulled: &res.pulled_ids,
            dry_run: ctx.dry_run,
            provenance: ctx.provenance,
            presume_new: mapped.presume_new,
            presume_dependents_new: mapped.presume_dependents_new,
            optimistic_inserts: true,
            skip_fk_checks: ctx.settings.target.foreign_key_checks
                == crate::settings::ForeignKeyChecks::Tidemark,
            order,
        })
        .await?;
    Ok(Counts {
        read,
        written: out.written,
        inserted: out.inserted,
        updated: out.updated,
        unchanged: out.unchanged + skipped,
        already_written: skipped,
        dead_lettered: dead.len() as u64,
        duplicates: mapped.duplicates,
        invalid_time: 0,
        deleted: mapped.deleted,
        filtered: mapped.filtered,
        child_written: out.child_written,
        child_removed: out.child_removed,
        pulled: res.pulled,
        pulled_written: out.pulled_written,
        missing_refs: res.missing.len() as u64,
        deferred: res.deferred.len() as u64,
        limit_hits: res.limit_hit.is_some() as u64,
        source_queries,
        overlapped_batches: 0,
        all_new: out.all_new,
        dependents_new: out.dependents_new,
    })
}

/// Take out of a page, before it is mapped, the documents this run already wrote as they
/// are (pulled by an earlier lane, [`crate::engine::pulled`]): most of what the lanes after the
/// vizzes lane read on the benchmark's full mapping, where mapping them only to drop the
/// rows was most of those lanes' time. A document's key comes from the key columns alone
/// ([`Entity::key_of`]). Only documents whose key appears once in the page qualify (a later
/// version of the same key in the page wins, so skipping one of them is not the same as
/// skipping the row). The mapper looks ahead of the batches being resolved and written, so
/// this is a guess: [`confirm_pre_skipped`] checks it again in the batch's turn. Returns
/// the documents taken out, and the document hashes of those left (for [`skip_pulled`]).
fn pre_skip(
    pulled: &std::sync::Mutex<crate::engine::pulled::Pulled>,
    e: &Entity,
    docs: &mut Vec<bson::RawDocumentBuf>,
) -> (Vec<PreSkipped>, Vec<u64>) {
    let hashes: Vec<u64> = docs
        .iter()
        .map(|d| crate::engine::pulled::doc_hash(d))
        .collect();
    let keys: Vec<Option<u64>> = docs
        .iter()
        .map(|d| {
            e.key_of(d)
                .map(|k| crate::engine::pulled::deleted_key_hash(e, &k))
        })
        .collect();
    let mut seen: HashMap<u64, u32> = HashMap::with_capacity(keys.len());
    for k in keys.iter().flatten() {
        *seen.entry(*k).or_default() += 1;
    }
    let hit: Vec<bool> = {
        let mut pulled = pulled.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .zip(&hashes)
            .map(|(k, &h)| k.is_some_and(|k| seen[&k] == 1 && pulled.same(k, h)))
            .collect()
    };
    if !hit.contains(&true) {
        return (Vec::new(), hashes);
    }
    let mut out = Vec::new();
    let mut kept = Vec::with_capacity(docs.len());
    let mut kept_hashes = Vec::with_capacity(docs.len());
    for (at, (((doc, key), hash), hit)) in std::mem::take(docs)
        .into_iter()
        .zip(keys)
        .zip(hashes)
        .zip(hit)
        .enumerate()
    {
        match key.filter(|_| hit) {
            Some(key) => out.push(PreSkipped {
                at,
                id: source_id(&doc),
                doc,
                key,
                hash,
            }),
            None => {
                kept.push(doc);
                kept_hashes.push(hash);
            }
        }
    }
    *docs = kept;
    (out, kept_hashes)
}

/// In the batch's turn (after every earlier batch was resolved), skip the documents
/// [`pre_skip`] took out, as [`skip_pulled`] would have skipped their rows. If one no longer
/// qualifies (an earlier batch wrote its key since), the page is put back together and
/// mapped again whole, as if nothing had been taken out.
/// `hash`: as [`prepare`]'s.
fn confirm_pre_skipped(
    pulled: &std::sync::Mutex<crate::engine::pulled::Pulled>,
    e: &Entity,
    page: &mut Page,
    mapped: &mut MappedPage,
    hash: bool,
) {
    if mapped.unmapped.is_empty() {
        return;
    }
    let confirmed = {
        let mut pulled = pulled.lock().unwrap_or_else(|p| p.into_inner());
        // Every key is looked up, as `skip_pulled` would have (a stale one is forgotten).
        mapped
            .unmapped
            .iter()
            .filter(|p| !pulled.take_same(p.key, p.hash))
            .count()
            == 0
    };
    if confirmed {
        mapped.skipped_unmapped = mapped.unmapped.len() as u64;
        mapped
            .resolved
            .extend(mapped.unmapped.drain(..).map(|p| p.id));
        return;
    }
    let mut docs = std::mem::take(&mut page.docs).into_iter();
    let mut unmapped = std::mem::take(&mut mapped.unmapped).into_iter().peekable();
    let total = docs.len() + unmapped.len();
    page.docs = (0..total)
        .filter_map(|at| match unmapped.next_if(|p| p.at == at) {
            Some(p) => Some(p.doc),
            None => docs.next(),
        })
        .collect();
    let mut again = map_page(e, &page.docs, true);
    prepare(e, &mut again, hash);
    again.hash_docs(&page.docs);
    again.presume_new = mapped.presume_new;
    again.presume_dependents_new = mapped.presume_dependents_new;
    *mapped = again;
}

/// Take out of `mapped` the rows this run already wrote from the same documents (see
/// [`crate::engine::pulled`]); returns how many.
fn skip_pulled(
    ctx: &Ctx,
    e: &Entity,
    docs: &[bson::RawDocumentBuf],
    mapped: &mut MappedPage,
) -> u64 {
    if !e.dependents.is_empty() || mapped.rows.is_empty() {
        return 0;
    }
    let mut pulled = ctx.pulled.lock().unwrap_or_else(|p| p.into_inner());
    if pulled.is_empty() {
        return 0;
    }
    let keep: Vec<bool> = mapped
        .rows
        .iter()
        .zip(&mapped.row_docs)
        .map(|(row, &di)| {
            !pulled.take_same(
                crate::engine::pulled::key_hash(e, row),
                mapped.doc_hash(docs, di),
            )
        })
        .collect();
    drop(pulled);
    mapped.retain_rows(e, &keep).len() as u64
}

/// Aborts a spawned stage when the window ends early (an error, a stop).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A window whose source pages are being read and mapped: the first two stages of
/// [`run_window`], started ahead so the next window's first pages are ready when the current
/// one ends (a catch-up of years runs one window after another).
pub struct Opened {
    rx: tokio::sync::mpsc::Receiver<Result<(Page, MappedPage)>>,
    _mapper: AbortOnDrop<()>,
    source_wait: Arc<AtomicU64>,
    map_time: Arc<AtomicU64>,
}

/// Start reading and mapping window `w` of `e` (after `after`, when resuming).
pub fn open_window(ctx: &Ctx, e: &Entity, w: Window, after: Option<Position>) -> Opened {
    let mut rx = ctx.source.stream_window(e, w, after);
    // Three stages joined by bounded channels: the source pump reads ahead (two pages),
    // this mapper converts the next page (CPU) while the window's loop resolves and writes
    // the current one (mostly waiting on the databases).
    let (mtx, mrx) = tokio::sync::mpsc::channel::<Result<(Page, MappedPage)>>(1);
    let entity = Arc::new(e.clone());
    let pulled = Arc::clone(&ctx.pulled);
    let hash = ctx.provenance || ctx.dry_run;
    // Rows this run pulled earlier may be skipped (`skip_pulled`), which compares document
    // hashes: computed here, with the mapping, when there is anything to compare against.
    let hash_docs = e.dependents.is_empty()
        && !ctx
            .pulled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
    // The mapper's own split: waiting for the source's next page, and mapping.
    let source_wait = Arc::new(AtomicU64::new(0));
    let map_time = Arc::new(AtomicU64::new(0));
    let (sw, mt) = (source_wait.clone(), map_time.clone());
    let mapper = tokio::spawn(async move {
        loop {
            let t0 = Instant::now();
            let Some(page) = rx.recv().await else { break };
            sw.fetch_add(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
            // Map only once the writer has room: at most two mapped pages exist at a time.
            let Ok(slot) = mtx.reserve().await else { break };
            // Mapping a page is milliseconds of CPU, which a runtime worker should not spend
            // while the writer's and the pump's I/O wakeups may be queued behind it: it runs
            // on the blocking pool (no measurable change on 2 cores; BENCHMARKS.md).
            let entity = entity.clone();
            let pulled = Arc::clone(&pulled);
            let t1 = Instant::now();
            let mapped = tokio::task::spawn_blocking(move || {
                page.map(|mut p| {
                    let (unmapped, hashes) = if hash_docs {
                        pre_skip(&pulled, &entity, &mut p.docs)
                    } else {
                        Default::default()
                    };
                    let mut m = map_page(&entity, &p.docs, true);
                    prepare(&entity, &mut m, hash);
                    m.doc_hashes = hashes;
                    m.unmapped = unmapped;
                    (p, m)
                })
            })
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("mapping a page failed: {e}")));
            mt.fetch_add(t1.elapsed().as_millis() as u64, Ordering::Relaxed);
            slot.send(mapped);
        }
    });
    Opened {
        rx: mrx,
        _mapper: AbortOnDrop(mapper),
        source_wait,
        map_time,
    }
}

/// Read and write one window, resuming after `after` when given. With `outstanding` (the
/// entity has dead letters, missing-reference or pending records) every batch also clears
/// the records of the documents it writes cleanly.
pub async fn run_window(
    ctx: &Arc<Ctx>,
    e: &Entity,
    lane: &str,
    watermark: Option<DateTime<Utc>>,
    w: Window,
    after: Option<Position>,
    outstanding: bool,
) -> Result<WindowReport> {
    let resumed = after.is_some();
    let opened = open_window(ctx, e, w, after);
    drive_window(
        ctx,
        e,
        lane,
        watermark,
        w,
        resumed,
        opened,
        outstanding,
        false,
    )
    .await
}

/// A batch being written by a task of its own.
struct InFlight {
    task: AbortOnDrop<(usize, Result<Counts>, std::time::Duration)>,
    /// Its place in the order of commits, when batches are written at once.
    order: Option<Arc<crate::sink::order::Order>>,
    touched: Option<crate::sink::order::Touched>,
    /// Started while another batch was in flight.
    beside: bool,
}

type Received = (
    Option<(Page, Resolved)>,
    std::time::Duration,
    std::time::Duration,
);

type Mapped = tokio::sync::mpsc::Receiver<Result<(Page, MappedPage)>>;

/// The next batch of a window, received from the mapper and resolved (the receiver comes
/// back with it).
type NextBatch<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = (Mapped, Result<Received>)> + Send + 'a>>;

async fn next_batch(ctx: &Arc<Ctx>, e: &Entity, mut mrx: Mapped) -> (Mapped, Result<Received>) {
    let got = receive_and_resolve(ctx, e, &mut mrx).await;
    (mrx, got)
}

/// Receive the window's next mapped page and resolve it: `None` at the window's end; with
/// the time spent waiting for the page, and resolving it.
async fn receive_and_resolve(ctx: &Arc<Ctx>, e: &Entity, mrx: &mut Mapped) -> Result<Received> {
    let t = Instant::now();
    let item = mrx.recv().await;
    let waited = t.elapsed();
    let Some(item) = item else {
        return Ok((None, waited, Default::default()));
    };
    let (mut page, mut mapped) = item?;
    let t = Instant::now();
    confirm_pre_skipped(
        &ctx.pulled,
        e,
        &mut page,
        &mut mapped,
        ctx.provenance || ctx.dry_run,
    );
    // On a task of its own when there is anything to resolve: resolution's CPU work
    // (mapping what the batch pulls, the policies) then never delays the window's loop.
    // Otherwise here: the hop to another thread and back cost the flat mapping ~5 % (a
    // wake-up per batch on two busy cores).
    if !e.has_references() && e.dependents.is_empty() {
        let ready = resolve_batch(ctx, e, &page.docs, mapped).await?;
        return Ok((Some((page, ready)), waited, t.elapsed()));
    }
    let task = {
        let ctx = Arc::clone(ctx);
        let e = ctx.entity_arc(&e.name)?;
        tokio::spawn(async move {
            let ready = resolve_batch(&ctx, &e, &page.docs, mapped).await;
            (page, ready)
        })
    };
    let mut task = AbortOnDrop(task);
    let (page, ready) = (&mut task.0)
        .await
        .map_err(|err| anyhow::anyhow!("resolving a batch failed: {err}"))?;
    Ok((Some((page, ready?)), waited, t.elapsed()))
}

/// The window's last stage: resolve and write what [`open_window`] reads. `presume_new`:
/// the first batch presumes a first load (the previous window's last batch was one).
#[allow(clippy::too_many_arguments)]
async fn drive_window(
    ctx: &Arc<Ctx>,
    e: &Entity,
    lane: &str,
    watermark: Option<DateTime<Utc>>,
    w: Window,
    resumed: bool,
    opened: Opened,
    outstanding: bool,
    presume_new: bool,
) -> Result<WindowReport> {
    let started = Instant::now();
    let mut counts = Counts::default();
    let mut batches = 0;
    let Opened {
        rx: mrx,
        _mapper,
        source_wait,
        map_time,
    } = opened;
    let mut presume_new = presume_new;
    let mut presume_dependents_new = false;
    // Where the window's time went: waiting for the next mapped page (`wait_ms`), resolving
    // it (`resolve_ms`: source reads and mapping of what it pulls) and writing batches
    // (`write_ms`, summed over batches written at once), which run at the same time; the
    // mapper waiting for the source's next page (`source_wait_ms`) versus mapping one
    // (`map_ms`). Logged with "window done".
    let (mut wait_ms, mut resolve_ms, mut write_ms) = (0u64, 0u64, 0u64);
    // While batches are written, the next one is received and resolved (its reads of the
    // source and of committed target rows do not depend on the writes in flight: what they
    // pull is in the resolution memo before it is resolved). On PostgreSQL up to
    // `target.batches_in_flight` batches are written at once, each in its own transaction,
    // committed in order ([`crate::sink::order`]); elsewhere one after the other.
    let max_in_flight = batches_in_flight(ctx);
    let entity = ctx.entity_arc(&e.name)?;
    let mut in_flight: std::collections::VecDeque<InFlight> = Default::default();
    let mut ahead: Option<(Page, Resolved)> = None;
    let mut next: Option<NextBatch<'_>> = None;
    let mut mrx = Some(mrx);
    let mut ended = false;
    let mut failed: Option<anyhow::Error> = None;
    loop {
        // Start writing the batch ahead if it may go beside those in flight.
        if let Some((_, r)) = &ahead {
            let fits = in_flight.is_empty()
                || (in_flight.len() < max_in_flight
                    && r.touched.as_ref().is_some_and(|t| {
                        in_flight
                            .iter()
                            .all(|f| f.touched.as_ref().is_some_and(|o| o.disjoint(t)))
                    }));
            if fits {
                let (page, mut ready) = ahead.take().expect("checked above");
                ready.mapped.presume_new = presume_new;
                ready.mapped.presume_dependents_new = presume_dependents_new;
                let cp = Checkpoint {
                    lane: lane.to_owned(),
                    entity: e.name.clone(),
                    state: LaneState {
                        watermark,
                        open: Some(w),
                    },
                    last: Some(page.last.clone()),
                    run_id: ctx.run_id.clone(),
                };
                let beside = !in_flight.is_empty();
                let order = (max_in_flight > 1).then(|| {
                    Arc::new(crate::sink::order::Order::new(
                        in_flight.back().and_then(|f| f.order.as_deref()),
                    ))
                });
                let touched = ready.touched.take();
                let task = {
                    let (ctx, e, order) = (Arc::clone(ctx), entity.clone(), order.clone());
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let c = commit_batch(
                            &ctx,
                            &e,
                            &page.docs,
                            ready,
                            Some(&cp),
                            outstanding,
                            order.as_deref(),
                        )
                        .await;
                        (page.docs.len(), c, t.elapsed())
                    })
                };
                in_flight.push_back(InFlight {
                    task: AbortOnDrop(task),
                    order,
                    touched,
                    beside,
                });
            }
        }
        if ahead.is_none() && !ended {
            if let Some(rx) = mrx.take() {
                next = Some(Box::pin(next_batch(ctx, e, rx)));
            }
        }
        if in_flight.is_empty() && ahead.is_none() && ended {
            break;
        }
        tokio::select! {
            joined = async {
                match in_flight.front_mut() {
                    Some(f) => (&mut f.task.0).await,
                    None => std::future::pending().await,
                }
            } => {
                let f = in_flight.pop_front().expect("a batch was in flight");
                let verdict = |ok: bool| {
                    if let Some(o) = &f.order {
                        o.done(ok);
                    }
                };
                let (docs, c, took) = match joined {
                    Ok(j) => j,
                    Err(err) => {
                        verdict(false);
                        forget_pulled(ctx);
                        return Err(anyhow::anyhow!("writing a batch failed: {err}"));
                    }
                };
                write_ms += took.as_millis() as u64;
                let c = match c {
                    Ok(c) => Counts { overlapped_batches: f.beside as u64, ..c },
                    Err(err) => {
                        verdict(false);
                        forget_pulled(ctx);
                        return Err(err);
                    }
                };
                presume_new = c.all_new;
                presume_dependents_new = c.dependents_new;
                batches += 1;
                counts.add(&c);
                debug!(entity = %e.name, batch = batches, docs, written = c.written, "batch committed");
                let dead_total =
                    ctx.dead_total.fetch_add(c.dead_lettered, Ordering::SeqCst) + c.dead_lettered;
                if dead_total > ctx.settings.sync.error_budget {
                    verdict(false);
                    forget_pulled(ctx);
                    return Err(Failure::Partial(format!(
                        "{dead_total} documents dead-lettered in this run, over sync.error_budget = {}; \
                         stopped after the last committed batch. Inspect tidemark_dead_letters, fix the mapping, run again",
                        ctx.settings.sync.error_budget
                    ))
                    .into());
                }
                if ctx.stop.load(Ordering::SeqCst) {
                    verdict(false);
                    forget_pulled(ctx);
                    anyhow::bail!("stopped by signal after a committed batch; the next run resumes from the checkpoint");
                }
                verdict(true);
            }
            got = async {
                match next.as_mut() {
                    Some(n) => n.await,
                    None => std::future::pending().await,
                }
            } => {
                next = None;
                let (rx, got) = got;
                mrx = Some(rx);
                match got {
                    Ok((resolved, waited, took)) => {
                        wait_ms += waited.as_millis() as u64;
                        resolve_ms += took.as_millis() as u64;
                        match resolved {
                            Some(r) => ahead = Some(r),
                            None => ended = true,
                        }
                    }
                    // The batches in flight were resolved cleanly: they commit first.
                    Err(err) => {
                        failed = Some(err);
                        ended = true;
                    }
                }
            }
        }
    }
    if let Some(err) = failed {
        return Err(err);
    }
    let done = Checkpoint {
        lane: lane.to_owned(),
        entity: e.name.clone(),
        state: LaneState {
            watermark: Some(watermark.map_or(w.to, |m| m.max(w.to))),
            open: None,
        },
        last: None,
        run_id: ctx.run_id.clone(),
    };
    if !ctx.dry_run {
        ctx.sink.save_checkpoint(&done).await?;
    }
    let report = WindowReport {
        entity: e.name.clone(),
        window: w,
        resumed,
        batches,
        counts,
        elapsed_ms: started.elapsed().as_millis() as u64,
        ended_new: presume_new,
    };
    info!(entity = %e.name, window = %w, read = counts.read, written = counts.written,
          already = counts.already_written, dead = counts.dead_lettered, overlapped = counts.overlapped_batches, ms = report.elapsed_ms, wait_ms, resolve_ms, write_ms,
          source_wait_ms = source_wait.load(Ordering::Relaxed), map_ms = map_time.load(Ordering::Relaxed),
          "window done");
    Ok(report)
}

/// Catch an entity's nightly lane up to `min(source clock - settle, until)`.
pub async fn catch_up(
    ctx: &Arc<Ctx>,
    e: &Entity,
    until: Option<DateTime<Utc>>,
) -> Result<EntityReport> {
    let started = Instant::now();
    let lane = nightly_lane(&e.name);
    let mut warnings = Vec::new();
    if let Some(w) = ctx.source.missing_index_warning(e).await? {
        warn!(entity = %e.name, "{w}");
        warnings.push(w);
    }
    let mut counts = retry_pending(ctx, e).await?;
    let cp = ctx.sink.load_checkpoint(&lane).await?;
    let (state, last) = cp.map(|c| (c.state, c.last)).unwrap_or_default();
    let s = &ctx.settings.sync;
    let input = PlanInput {
        start: s.start,
        overlap: s.overlap,
        max_window: s.max_window,
        source_now: ctx.source.server_time().await?,
        settle: s.settle,
        until,
    };
    let plan = window::plan(&state, &input);
    let mut outstanding = ctx.sink.has_outstanding(&e.name).await?;
    let mut watermark = state.watermark;
    let mut windows = 0;
    if let Some(w) = plan.resume {
        let r = run_window(ctx, e, &lane, watermark, w, last, outstanding).await?;
        counts.add(&r.counts);
        outstanding |= r.counts.dead_lettered + r.counts.missing_refs + r.counts.deferred > 0;
        watermark = Some(watermark.map_or(w.to, |m| m.max(w.to)));
        windows += 1;
    }
    let mut cursor = plan.fresh_from;
    // After an empty window (and at the start) one indexed query finds the next document, so a
    // quiet stretch costs one window. The probe looks a growing number of windows ahead: some
    // servers scan the whole index range even for `limit 1`. Dense data needs no probe.
    let mut probe_span: i32 = 1;
    let mut probe = true;
    let mut ahead: Option<(Window, Opened)> = None;
    let mut presume_new = false;
    while cursor < plan.upper {
        let w = if probe {
            let span = chrono::TimeDelta::from_std(s.max_window)
                .ok()
                .and_then(|d| d.checked_mul(probe_span));
            let end = span
                .and_then(|d| cursor.checked_add_signed(d))
                .map_or(plan.upper, |t| t.min(plan.upper));
            match ctx.source.next_time(e, cursor, end).await? {
                None => Some(Window::new(cursor, end)),
                first => window::next(cursor, first, s.max_window, plan.upper),
            }
        } else {
            window::next(cursor, Some(cursor), s.max_window, plan.upper)
        };
        let Some(w) = w else { break };
        let opened = match ahead.take() {
            Some((next, opened)) if next == w => opened,
            _ => open_window(ctx, e, w, None),
        };
        // Read ahead: start reading the window after this one (as it is when this one has
        // documents) so its first pages are mapped when this one ends. Reading is all it
        // does; a window that turns out different is dropped unread. Only into PostgreSQL
        // and for entities without references or dependents: elsewhere the writer is the
        // slower stage by far, and reading ahead only held more memory (flat run into
        // SQLite: 64 -> 71 MB peak; full mapping: 169 -> ~200 MB; neither faster;
        // BENCHMARKS.md).
        let plain = e.dependents.is_empty() && !e.has_references();
        ahead = (w.to < plan.upper && plain && ctx.sink.backend() == "postgres")
            .then(|| window::next(w.to, Some(w.to), s.max_window, plan.upper))
            .flatten()
            .map(|next| (next, open_window(ctx, e, next, None)));
        let r = drive_window(
            ctx,
            e,
            &lane,
            watermark,
            w,
            false,
            opened,
            outstanding,
            presume_new,
        )
        .await?;
        presume_new = r.ended_new;
        probe = r.counts.read == 0;
        // Quiet stretches are skipped in exponentially growing steps; data resets the step.
        probe_span = if probe {
            probe_span.saturating_mul(2).min(1 << 20)
        } else {
            1
        };
        counts.add(&r.counts);
        outstanding |= r.counts.dead_lettered + r.counts.missing_refs + r.counts.deferred > 0;
        watermark = Some(watermark.map_or(w.to, |m| m.max(w.to)));
        windows += 1;
        cursor = w.to;
    }
    if s.scan_invalid_time {
        counts.invalid_time = scan_invalid_time(ctx, e).await?;
        if counts.invalid_time > 0 {
            let msg = format!(
                "{} documents in {} have a missing or mistyped {} (expected {:?}); they are in tidemark_dead_letters",
                counts.invalid_time, e.collection, e.time_field, e.time_encoding
            );
            warn!(entity = %e.name, "{msg}");
            warnings.push(msg);
        }
    }
    Ok(EntityReport {
        entity: e.name.clone(),
        windows,
        counts,
        watermark,
        warnings,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// Retry documents held back by earlier runs (`on_missing = "defer"` or a pull limit): fetch
/// them again by `_id` and write what now resolves; after `sync.defer_attempts` runs a
/// document still held back becomes a dead letter.
pub async fn retry_pending(ctx: &Ctx, e: &Entity) -> Result<Counts> {
    let pending = ctx.sink.pending(&e.name).await?;
    if pending.is_empty() {
        return Ok(Counts::default());
    }
    let ids: Vec<Bson> = pending
        .iter()
        .filter_map(|(id, _)| serde_json::from_str::<serde_json::Value>(id).ok())
        .filter_map(|j| Bson::try_from(j).ok())
        .collect();
    let docs = ctx.source.fetch_in(e, "_id", ids).await?;
    let found: std::collections::HashSet<String> = docs.iter().map(|d| source_id(d)).collect();
    let vanished: Vec<String> = pending
        .iter()
        .map(|(id, _)| id.clone())
        .filter(|id| !found.contains(id))
        .collect();
    let mut counts = write_docs(ctx, e, &docs, None, true).await?;
    let limit = ctx.settings.sync.defer_attempts as i64;
    let exhausted: Vec<String> = ctx
        .sink
        .pending(&e.name)
        .await?
        .into_iter()
        .filter(|(_, n)| *n > limit)
        .map(|(id, _)| id)
        .collect();
    let dead: Vec<DeadLetter> = docs
        .iter()
        .filter(|d| exhausted.contains(&source_id(d)))
        .map(|d| DeadLetter {
            source_id: source_id(d),
            error: format!("a reference stayed unresolved for {limit} runs (sync.defer_attempts); see tidemark_missing_refs"),
            document: raw_json(d),
        })
        .collect();
    let clear: Vec<String> = vanished.into_iter().chain(exhausted).collect();
    if !clear.is_empty() {
        ctx.sink
            .write_batch(&BatchWrite {
                entity: Some(e),
                dead: &dead,
                clear_refs: &clear,
                run_id: &ctx.run_id,
                mapping_version: &ctx.mapping.version,
                known: Some(&ctx.records),
                ..Default::default()
            })
            .await?;
        counts.dead_lettered += dead.len() as u64;
    }
    info!(entity = %e.name, retried = docs.len(), written = counts.written, still_deferred = counts.deferred, "pending documents retried");
    Ok(counts)
}

/// Dead-letter documents that no window can ever select (time field missing or mistyped).
async fn scan_invalid_time(ctx: &Ctx, e: &Entity) -> Result<u64> {
    let docs = ctx.source.invalid_time_docs(e, 10_000).await?;
    if docs.is_empty() {
        return Ok(0);
    }
    let dead: Vec<DeadLetter> = docs
        .iter()
        .map(|d| DeadLetter {
            source_id: source_id(d),
            error: format!(
                "time field `{}` is missing or not {:?}; no window can select this document. Fix the document or the mapping's time_encoding",
                e.time_field, e.time_encoding
            ),
            document: raw_json(d),
        })
        .collect();
    ctx.sink
        .write_batch(&BatchWrite {
            entity: Some(e),
            dead: &dead,
            run_id: &ctx.run_id,
            mapping_version: &ctx.mapping.version,
            known: Some(&ctx.records),
            dry_run: ctx.dry_run,
            ..Default::default()
        })
        .await?;
    Ok(dead.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::pulled::{deleted_key_hash, doc_hash, Pulled};
    use std::sync::Mutex;

    const MAPPING: &str = r#"
version = "t1"
[entities.items]
collection = "items"
time_field = "t"
time_encoding = "epoch_seconds"
table = "items"
primary_key = ["id"]
[entities.items.columns]
id = { path = "k", type = "text", required = true }
v = { path = "v", type = "integer" }
"#;

    fn doc(k: &str, v: i32) -> bson::RawDocumentBuf {
        bson::rawdoc! { "_id": format!("{k}-{v}"), "k": k, "t": 1, "v": v }
    }

    fn key(e: &Entity, k: &str) -> u64 {
        deleted_key_hash(e, &[Value::Text(k.into())])
    }

    /// The mapper's look-ahead: what it takes out, what it leaves, and the batch's turn
    /// confirming the guess, or mapping the page again whole when an earlier batch wrote
    /// one of the keys since.
    #[test]
    fn documents_already_written_are_skipped_unmapped_and_a_stale_guess_is_mapped_again() {
        let m = Mapping::parse(MAPPING, "test").unwrap();
        let e = m.entity("items").unwrap();
        let (a, b, c, c2) = (doc("a", 1), doc("b", 1), doc("c", 1), doc("c", 2));
        let pulled = Mutex::new(Pulled::default());
        pulled.lock().unwrap().record(&[
            (key(e, "a"), doc_hash(&a)),
            (key(e, "b"), doc_hash(&doc("b", 0))),
            (key(e, "c"), doc_hash(&c)),
        ]);
        // a: written as it is; b: another version was; c twice in the page: the later wins,
        // so neither is taken out.
        let page = || Page {
            docs: vec![a.clone(), b.clone(), c.clone(), c2.clone()],
            last: Position {
                ts: Bson::Int32(1),
                id: Bson::Null,
            },
        };
        let mut p = page();
        let (unmapped, hashes) = pre_skip(&pulled, e, &mut p.docs);
        assert_eq!(unmapped.len(), 1);
        assert_eq!(p.docs, vec![b.clone(), c.clone(), c2.clone()]);
        assert_eq!(hashes, vec![doc_hash(&b), doc_hash(&c), doc_hash(&c2)]);
        let mapped = |p: &Page, unmapped| {
            let mut m = map_page(e, &p.docs, true);
            m.unmapped = unmapped;
            m
        };

        // The batch's turn, nothing changed: a is skipped, counted, its id resolved.
        let mut m = mapped(&p, unmapped);
        confirm_pre_skipped(&pulled, e, &mut p, &mut m, false);
        assert_eq!(m.skipped_unmapped, 1);
        assert_eq!(m.rows.len(), 2, "b and the later c");
        assert_eq!(p.docs.len(), 3);
        assert!(m.resolved.contains(&source_id(&a)), "{:?}", m.resolved);

        // An earlier batch wrote a (another version) after the guess: the page is whole again.
        let mut p = page();
        let (unmapped, _) = pre_skip(&pulled, e, &mut p.docs);
        let mut m = mapped(&p, unmapped);
        pulled.lock().unwrap().forget(key(e, "a"));
        confirm_pre_skipped(&pulled, e, &mut p, &mut m, false);
        assert_eq!(m.skipped_unmapped, 0);
        assert!(m.unmapped.is_empty());
        assert_eq!(p.docs, page().docs, "in the page's order");
        assert_eq!(m.rows.len(), 3, "a, b and the later c");
        assert_eq!(m.doc_hashes.len(), 4);
        assert_eq!(m.row_docs, vec![0, 1, 3]);
    }

    #[test]
    fn nothing_is_taken_out_when_nothing_matches() {
        let m = Mapping::parse(MAPPING, "test").unwrap();
        let e = m.entity("items").unwrap();
        let pulled = Mutex::new(Pulled::default());
        pulled.lock().unwrap().record(&[(key(e, "zz"), 1)]);
        let mut docs = vec![doc("a", 1), bson::rawdoc! { "_id": 9, "t": 1 }];
        let (unmapped, hashes) = pre_skip(&pulled, e, &mut docs);
        assert!(unmapped.is_empty());
        assert_eq!(docs.len(), 2);
        assert_eq!(hashes.len(), 2);
    }
}
