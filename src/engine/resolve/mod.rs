//! Dependencies on demand. For a mapped batch: references (child → parent) not yet in the
//! target are fetched from the source in bulk (`$in`, chunked), mapped with their own
//! entity's mapping and written before the batch in the same transaction, recursively up to
//! `sync.max_depth`; dependents (parent → children in another collection) are fetched in bulk
//! and written after. Each key is looked up at most once per run (the memo).
//!
//! Cycles (a self-reference like `forkedFrom`, two entities referencing each other) need no
//! ordering trick: every row of a batch and everything it pulls commit in one transaction,
//! and the foreign keys tidemark creates are `DEFERRABLE INITIALLY DEFERRED`, so they are
//! checked at commit, when every referenced row is present.

mod policies;

use crate::engine::ctx::Ctx;
use crate::engine::memo::Memo;
use crate::engine::page::{map_page, source_id, MappedPage};
use crate::mapping::{lookup, Entity, Value};
use crate::sink::{DeadLetter, EntityRows, MissingRef};
use anyhow::Result;
use bson::{Bson, RawDocumentBuf};
use policies::apply_policies;
use std::collections::{HashMap, HashSet};

/// The outcome of resolving one batch.
#[derive(Debug, Default)]
pub struct Resolution {
    /// Pulled references, in write order (deepest first).
    pub before: Vec<EntityRows>,
    /// Dependents, written after the batch.
    pub after: Vec<EntityRows>,
    pub missing: Vec<MissingRef>,
    /// Batch documents held back: `(source_id, reason)`.
    pub deferred: Vec<(String, String)>,
    /// Batch documents dead-lettered by an `on_missing = "skip"` reference.
    pub dead: Vec<DeadLetter>,
    /// Pulled documents that could not be mapped, by entity.
    pub other_dead: Vec<(String, DeadLetter)>,
    /// `(entity, source id)` of pulled documents that mapped (their old missing-reference
    /// records are cleared).
    pub pulled_ids: Vec<(String, String)>,
    /// Documents pulled on demand (references and dependents).
    pub pulled: u64,
    /// Set when `max_depth` or `max_pulled_per_batch` stopped resolution.
    pub limit_hit: Option<String>,
    /// Pulled rows written with every reference resolved, for [`crate::engine::pulled`] once the
    /// batch commits.
    pub fresh: Vec<crate::engine::pulled::Fresh>,
    /// The batch's number in the run's memo ([`Memo::start_batch`]); the writer reports it
    /// written to the run's group of batches ([`crate::sink::GroupCommit::written`]).
    pub batch: u64,
}

/// A pulled page of one entity at one depth, with its documents (for source ids).
struct Level {
    entity: std::sync::Arc<Entity>,
    page: MappedPage,
    docs: Vec<RawDocumentBuf>,
}

/// `(referenced entity, key)` pairs used by rows of `e` (main rows and child rows).
fn refs_of(e: &Entity, page: &MappedPage) -> HashMap<String, Vec<Value>> {
    let mut out: HashMap<String, Vec<Value>> = HashMap::new();
    let mut seen = HashSet::new();
    let mut add = |r: &str, v: &Value| {
        if *v != Value::Null && seen.insert((r.to_owned(), v.key_text())) {
            out.entry(r.to_owned()).or_default().push(v.clone());
        }
    };
    for row in &page.rows {
        for (i, c) in e.columns.iter().enumerate() {
            if let Some(r) = &c.references {
                add(r, &row[i]);
            }
        }
    }
    for (ci, child) in e.children.iter().enumerate() {
        for row in page.children.get(ci).into_iter().flatten() {
            for (i, c) in child.columns.iter().enumerate() {
                if let Some(r) = &c.references {
                    add(r, &row[i]);
                }
            }
        }
    }
    // Big documents' child rows are not in the page: mapping collected their keys.
    for b in &page.big {
        for (ci, i, keys) in &b.refs {
            if let Some(r) = &e.children[*ci].columns[*i].references {
                for k in keys {
                    add(r, k);
                }
            }
        }
    }
    out
}

/// The source values to look a key up by: a key is text made from the id whatever its BSON
/// type (docs/MAPPING.md, how ids of different BSON types are keyed), so text that spells an
/// integer or an ObjectId matches those forms too (an int64 matches every numeric type).
fn lookup_values(keys: &[Value]) -> Vec<Bson> {
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        match k {
            Value::Text(s) => {
                out.push(Bson::String(s.clone()));
                if let Ok(o) = bson::oid::ObjectId::parse_str(s) {
                    out.push(Bson::ObjectId(o));
                }
                if let Ok(i) = s.parse::<i64>() {
                    if i.to_string() == *s {
                        out.push(Bson::Int64(i));
                    }
                }
            }
            Value::Int(i) => out.push(Bson::Int32(*i)),
            Value::BigInt(i) => out.push(Bson::Int64(*i)),
            other => out.push(Bson::String(other.key_text())),
        }
    }
    out
}

/// Of fetched documents whose ids differ only in BSON type (`42` and `"42"`, an ObjectId and
/// its hex string), the string keeps the key, as in a window read (`engine/twins.rs`): the
/// others are not pulled (their own window dead-letters them). Only where the table's key is
/// the id itself; other keys are the mapping's choice.
fn string_twins_win(r: &Entity, mut docs: Vec<RawDocumentBuf>) -> Vec<RawDocumentBuf> {
    if docs.len() < 2 || r.key_column.is_none_or(|kc| r.pk != [kc]) {
        return docs;
    }
    let path: Vec<String> = r.id_field.split('.').map(str::to_owned).collect();
    let is_string =
        |d: &RawDocumentBuf| matches!(lookup(d, &path), Ok(Some(bson::raw::RawBsonRef::String(_))));
    let key = |d: &RawDocumentBuf| r.key_of(d).map(|k| crate::mapping::value::key_text(&k));
    let strings: HashSet<String> = docs
        .iter()
        .filter(|d| is_string(d))
        .filter_map(key)
        .collect();
    if strings.is_empty() {
        return docs;
    }
    docs.retain(|d| is_string(d) || key(d).is_none_or(|k| !strings.contains(&k)));
    docs
}

/// Keys the batch deletes are gone: a row of this batch (written after its deletions, in the
/// same transaction) or of a later one that references one of them must take its column's
/// missing-reference policy, not point at a row that no longer exists. (Found by
/// `fk_checks::deletions_keep_their_actions_*`: a viz deleted in the batch that re-read its
/// fork failed at commit on the fork's foreign key, in every run again.)
fn note_deleted(e: &Entity, page: &MappedPage, memo: &mut Memo) {
    if e.key_column.is_none_or(|kc| e.pk != [kc]) {
        return;
    }
    for key in &page.deletes {
        memo.set(&e.name, key[0].key_text(), false);
    }
}

/// Resolve references and dependents of a mapped batch of `e`, applying missing-reference
/// policies to `page` (rows may be nulled, dead-lettered or deferred).
pub async fn resolve(
    ctx: &Ctx,
    e: &Entity,
    page: &mut MappedPage,
    docs: &[RawDocumentBuf],
) -> Result<Resolution> {
    let mut res = Resolution::default();
    let mut memo = ctx.memo.lock().await;
    res.batch = memo.start_batch();
    if let (Some(g), false) = (&ctx.group, page.deletes.is_empty()) {
        // Until this batch has committed, key lookups must see its deletions (and the rows
        // their `ON DELETE` actions reach): they go to the writing connection.
        g.deletes_in(res.batch);
    }
    if !e.has_references() && e.dependents.is_empty() {
        note_deleted(e, page, &mut memo);
        return Ok(res);
    }
    memo.bound(ctx.group.as_ref().and_then(|g| g.reader_has_seen()));
    note_deleted(e, page, &mut memo);
    if let Some(kc) = e.key_column {
        for row in &page.rows {
            memo.set(&e.name, row[kc].key_text(), true);
        }
    }
    let mut budget = ctx.settings.sync.max_pulled_per_batch;
    let refs = refs_of(e, page);
    // Fetch every dependent collection concurrently (one `$in` each), while the batch's own
    // references are pulled (the fetches read only the batch's ids); then process in order.
    // Resolution is the vizzes lane's critical path once batches are written at once
    // (BENCHMARKS.md, eleventh round), and these are its longest source reads.
    let fetches = dependent_fetches(ctx, e, page, docs)?;
    let (levels, fetched) = tokio::join!(
        pull(ctx, &mut memo, refs, &mut budget, &mut res),
        futures::future::join_all(fetches)
    );
    let mut levels = levels?;
    let mut dependents = Vec::new();
    for fetched in fetched {
        let (dent, ddocs) = fetched?;
        res.pulled += ddocs.len() as u64;
        let (ddocs, dpage) = map_fetched(ctx, dent, ddocs).await?;
        if let Some(kc) = dent.key_column {
            for row in &dpage.rows {
                memo.set(&dent.name, row[kc].key_text(), true);
            }
        }
        levels.extend(pull(ctx, &mut memo, refs_of(dent, &dpage), &mut budget, &mut res).await?);
        dependents.push(Level {
            entity: ctx.entity_arc(&dent.name)?,
            page: dpage,
            docs: ddocs,
        });
    }
    settle_all(
        e,
        page,
        docs,
        &mut levels,
        &mut dependents,
        &mut memo,
        &mut res,
    );
    drop(memo);
    res.fresh = fresh_rows(&levels, &dependents, &res.missing);
    for (_, level) in levels {
        if let Some(rows) = level.into_rows(&mut res.other_dead, &mut res.pulled_ids) {
            res.before.push(rows);
        }
    }
    for level in dependents {
        if let Some(rows) = level.into_rows(&mut res.other_dead, &mut res.pulled_ids) {
            res.after.push(rows);
        }
    }
    Ok(res)
}

/// One `$in` fetch per dependent collection of `e`, by the batch's parent values.
#[allow(clippy::type_complexity)]
fn dependent_fetches<'a>(
    ctx: &'a Ctx,
    e: &'a Entity,
    page: &MappedPage,
    docs: &[RawDocumentBuf],
) -> Result<Vec<impl std::future::Future<Output = Result<(&'a Entity, Vec<RawDocumentBuf>)>> + 'a>>
{
    let mut fetches = Vec::new();
    for d in &e.dependents {
        let dent = ctx.mapping.entity(&d.entity)?;
        let parent_field = d.parent_field.clone().unwrap_or_else(|| e.id_field.clone());
        let path: Vec<String> = parent_field.split('.').map(str::to_owned).collect();
        let mut seen = HashSet::new();
        let values: Vec<Bson> = page
            .row_docs
            .iter()
            .filter_map(|&i| lookup(&docs[i], &path).ok().flatten())
            .filter_map(|v| Bson::try_from(v).ok())
            .filter(|b| seen.insert(b.to_string()))
            .collect();
        if !values.is_empty() {
            fetches.push(async move {
                ctx.source
                    .fetch_in(dent, &d.foreign_field, values)
                    .await
                    .map(|docs| (dent, docs))
            });
        }
    }
    Ok(fetches)
}

/// Apply policies bottom-up: a row dropped for a missing reference makes its own key
/// unknown, so rows pointing at it (at any level, in the batch or among its dependents:
/// a dependent of a batch row that was deferred) are dropped in turn, until nothing
/// changes. Only rows are removed, so this ends; a second pass over a page only sees
/// rows the first left alone.
fn settle_all(
    e: &Entity,
    page: &mut MappedPage,
    docs: &[RawDocumentBuf],
    levels: &mut [(u32, Level)],
    dependents: &mut [Level],
    memo: &mut Memo,
    res: &mut Resolution,
) {
    levels.sort_by_key(|(depth, _)| std::cmp::Reverse(*depth));
    loop {
        let mut dropped_any = false;
        for (_, l) in levels.iter_mut() {
            dropped_any |= settle(&l.entity, &mut l.page, &l.docs, memo, res, true);
        }
        dropped_any |= settle(e, page, docs, memo, res, false);
        for l in dependents.iter_mut() {
            dropped_any |= settle(&l.entity, &mut l.page, &l.docs, memo, res, true);
        }
        if !dropped_any {
            break;
        }
    }
}

/// Pulled rows written with every reference resolved, for [`crate::engine::pulled`].
fn fresh_rows(
    levels: &[(u32, Level)],
    dependents: &[Level],
    missing: &[MissingRef],
) -> Vec<crate::engine::pulled::Fresh> {
    let cut: HashSet<(&str, &str)> = missing
        .iter()
        .map(|m| (m.entity.as_str(), m.source_id.as_str()))
        .collect();
    let mut fresh = Vec::new();
    for l in levels.iter().map(|(_, l)| l).chain(dependents) {
        // A row with dependents of its own is not recorded: its lane must read it again to
        // pull them (a viz pulled as a fork's parent comes without its content and commits).
        if l.page.children_cut || !l.entity.dependents.is_empty() {
            continue;
        }
        for (row, &di) in l.page.rows.iter().zip(&l.page.row_docs) {
            let doc = &l.docs[di];
            if !cut.is_empty() && cut.contains(&(l.entity.name.as_str(), source_id(doc).as_str())) {
                continue;
            }
            let doc_hash = l.page.doc_hash(&l.docs, di);
            fresh.push((crate::engine::pulled::key_hash(&l.entity, row), doc_hash));
        }
    }
    fresh
}

impl Level {
    /// Hand the level's dead letters to `dead` and its rows (if any) to the writer.
    /// The source ids of the level's documents that mapped go to `written`: their old
    /// missing-reference records are cleared (new ones, if still missing, are written after).
    fn into_rows(
        self,
        dead: &mut Vec<(String, DeadLetter)>,
        written: &mut Vec<(String, String)>,
    ) -> Option<EntityRows> {
        let name = &self.entity.name;
        let failed: HashSet<&str> = self
            .page
            .dead
            .iter()
            .map(|d| d.source_id.as_str())
            .collect();
        written.extend(
            self.docs
                .iter()
                .map(|d| source_id(d))
                .filter(|id| !failed.contains(id.as_str()))
                .map(|id| (name.clone(), id)),
        );
        dead.extend(self.page.dead.into_iter().map(|d| (name.clone(), d)));
        (!self.page.rows.is_empty()).then(|| EntityRows {
            entity: self.entity,
            rows: self.page.rows,
            children: self.page.children,
            meta: self.page.row_meta,
            child_meta: self.page.child_meta,
        })
    }
}

/// Apply the policies to one page and forget the keys of the rows they dropped; true if
/// any were dropped (rows pointing at them must be checked again).
fn settle(
    e: &Entity,
    page: &mut MappedPage,
    docs: &[RawDocumentBuf],
    memo: &mut Memo,
    res: &mut Resolution,
    pulled: bool,
) -> bool {
    let dropped = apply_policies(e, page, docs, memo, res, pulled);
    forget_dropped(e, &dropped, memo);
    !dropped.is_empty()
}

fn forget_dropped(e: &Entity, dropped: &[Vec<Value>], memo: &mut Memo) {
    if let Some(kc) = e.key_column {
        for row in dropped {
            memo.forget(&e.name, &row[kc].key_text());
        }
    }
}

/// Map documents fetched by key. Two of them for one target key (a legacy data bug, but
/// real) must be mapped oldest first so the later version wins the page's de-duplication, as
/// in a window read; the server returns them in index or natural order. Sorting costs
/// measurably on every batch of a full mapping (BENCHMARKS.md), so it is done, and the page
/// mapped again, only when the page had such duplicates.
fn map_in_time_order(e: &Entity, docs: &mut [RawDocumentBuf]) -> MappedPage {
    let page = map_page(e, docs, false);
    if page.duplicates == 0 {
        return page;
    }
    crate::source::in_time_order(e, docs);
    map_page(e, docs, false)
}

/// Map documents fetched by key and get them ready for the writer ([`crate::engine::page::prepare`]),
/// on the blocking pool: a batch of 250 vizzes pulls ~1,400 documents (contents with their
/// files, commits, events), tens of milliseconds of CPU that a runtime worker should not
/// spend while the source pump's and the writer's I/O wake-ups wait behind it.
async fn map_fetched(
    ctx: &Ctx,
    e: &Entity,
    mut docs: Vec<RawDocumentBuf>,
) -> Result<(Vec<RawDocumentBuf>, MappedPage)> {
    let e = ctx.entity_arc(&e.name)?;
    let hash = ctx.provenance || ctx.dry_run;
    tokio::task::spawn_blocking(move || {
        let mut page = map_in_time_order(&e, &mut docs);
        crate::engine::page::prepare(&e, &mut page, hash);
        // What `resolve` records in `fresh` (rows of entities without dependents).
        if e.dependents.is_empty() {
            page.hash_docs(&docs);
        }
        (docs, page)
    })
    .await
    .map_err(|err| anyhow::anyhow!("mapping pulled documents failed: {err}"))
}

/// Breadth-first pull of referenced keys; returns pulled pages tagged with their depth.
async fn pull(
    ctx: &Ctx,
    memo: &mut Memo,
    mut frontier: HashMap<String, Vec<Value>>,
    budget: &mut usize,
    res: &mut Resolution,
) -> Result<Vec<(u32, Level)>> {
    let mut levels = Vec::new();
    let max_depth = ctx.settings.sync.max_depth;
    for depth in 1..=max_depth {
        if frontier.is_empty() {
            break;
        }
        let mut next: HashMap<String, Vec<Value>> = HashMap::new();
        let mut names: Vec<String> = frontier.keys().cloned().collect();
        names.sort();
        for rname in names {
            let keys = frontier.remove(&rname).unwrap_or_default();
            let r = ctx.mapping.entity(&rname)?;
            let Some(kc) = r.key_column else { continue };
            let unknown: Vec<Value> = keys
                .into_iter()
                .filter(|k| memo.get(&rname, &k.key_text()).is_none())
                .collect();
            if unknown.is_empty() {
                continue;
            }
            let present = ctx
                .sink
                .existing_keys_in_run(ctx.group.as_ref(), r.table_ref(), kc, &unknown)
                .await?;
            let mut rest = Vec::new();
            for k in unknown {
                let kt = k.key_text();
                if present.contains(&kt) {
                    memo.set(&rname, kt, true);
                } else {
                    rest.push(k);
                }
            }
            if rest.is_empty() {
                continue;
            }
            if rest.len() > *budget {
                res.limit_hit = Some(format!(
                    "sync.max_pulled_per_batch = {} reached while pulling {rname}; the rows that need the rest are deferred to a later run",
                    ctx.settings.sync.max_pulled_per_batch
                ));
                rest.truncate(*budget);
            }
            if rest.is_empty() {
                continue;
            }
            let docs = ctx
                .source
                .fetch_in(r, &r.id_field, lookup_values(&rest))
                .await?;
            let docs = string_twins_win(r, docs);
            *budget = budget.saturating_sub(docs.len());
            res.pulled += docs.len() as u64;
            let (docs, page) = map_fetched(ctx, r, docs).await?;
            let found: HashSet<String> = page.rows.iter().map(|row| row[kc].key_text()).collect();
            for k in rest {
                let kt = k.key_text();
                let here = found.contains(&kt);
                memo.set(&rname, kt, here);
            }
            for (rn, ks) in refs_of(r, &page) {
                next.entry(rn).or_default().extend(ks);
            }
            levels.push((
                depth,
                Level {
                    entity: ctx.entity_arc(&rname)?,
                    page,
                    docs,
                },
            ));
        }
        frontier = next;
    }
    let unresolved = frontier
        .iter()
        .any(|(r, ks)| ks.iter().any(|k| memo.get(r, &k.key_text()).is_none()));
    if unresolved {
        res.limit_hit = Some(format!(
            "sync.max_depth = {max_depth} reached; references deeper than that are not followed and the rows needing them are deferred"
        ));
    }
    Ok(levels)
}

#[cfg(test)]
mod tests;
