//! One batch of one window: resolve it (skip what this run already wrote, pull references
//! and dependents), then commit it (rows, records and checkpoint in one transaction).

use crate::engine::ctx::{Counts, Ctx};
use crate::engine::page::{map_page_twins, MappedPage};
use crate::engine::skip::skip_pulled;
use crate::mapping::{Entity, Value};
use crate::sink::{BatchWrite, Checkpoint, Sink};
use anyhow::Result;
use std::sync::atomic::Ordering;
use tracing::warn;

/// Map, resolve and write one page of documents of `e` (with `cp`, when given, in the same
/// transaction). Used by windows, pending retries and single-record runs.
pub async fn write_docs(
    ctx: &Ctx,
    e: &Entity,
    docs: &[bson::RawDocumentBuf],
    cp: Option<&Checkpoint>,
    track_ids: bool,
) -> Result<Counts> {
    let twins = crate::engine::twins::find(&ctx.source, e, docs).await?;
    let mapped = map_page_twins(e, docs, true, twins.losers, twins.outside);
    write_mapped(ctx, e, docs, mapped, cp, track_ids).await
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
    pub(crate) mapped: MappedPage,
    pub(crate) res: crate::engine::resolve::Resolution,
    pub(crate) skipped: u64,
    pub(crate) source_queries: u64,
    /// What the batch writes, when batches may be written at once ([`touched`]).
    pub(crate) touched: Option<crate::sink::order::Touched>,
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
    let mut res = crate::engine::resolve::resolve(ctx, e, &mut mapped, docs).await?;
    res.other_dead.extend(
        std::mem::take(&mut mapped.twin_dead)
            .into_iter()
            .map(|(_, d)| (e.name.clone(), d)),
    );
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
pub(super) fn batches_in_flight(ctx: &Ctx) -> usize {
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
    // A big document's child rows are not listed: its batch goes alone.
    t.exclusive = !m.deletes.is_empty() || !m.big.is_empty();
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

/// The page's big documents whose rows are still to be written, for the writer to map and
/// write their child rows in pieces (`sink/pieces.rs`).
fn big_parents<'a>(
    big: &'a [crate::engine::big::BigDoc],
    row_docs: &[usize],
    docs: &'a [bson::RawDocumentBuf],
) -> Vec<crate::sink::BigParent<'a>> {
    big.iter()
        .filter_map(|b| {
            let row = row_docs.iter().position(|&di| di == b.di)?;
            Some(crate::sink::BigParent {
                row,
                doc: &docs[b.di],
                missing: &b.missing,
            })
        })
        .collect()
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
    let big = big_parents(&mapped.big, &mapped.row_docs, docs);
    let mut dead = mapped.dead;
    dead.extend(res.dead);
    if let Some(g) = &ctx.group {
        ctx.sink.begin_group(g).await?;
    }
    let out = ctx
        .sink
        .write_batch(&BatchWrite {
            entity: Some(e),
            rows: &mapped.rows,
            row_meta: &mapped.row_meta,
            child_meta: &mapped.child_meta,
            children: &mapped.children,
            big: &big,
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
            fence: ctx.fence().as_deref(),
        })
        .await?;
    if let Some(g) = &ctx.group {
        g.written(res.batch);
        ctx.sink.end_batch_in_group(g).await?;
    }
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
