//! One window of one entity: read pages, map, de-duplicate, write rows, dead letters
//! and checkpoint in one transaction per batch. `run`, tests and (later) backfill and
//! the daemon all go through [`catch_up`] / [`run_window`].

pub use crate::engine::ctx::{nightly_lane, Counts, Ctx, EntityReport, WindowReport};
pub use crate::engine::page::{
    map_page, map_page_twins, prepare, raw_json, row_meta, source_id, MappedPage, PreSkipped,
};
use crate::engine::window::{self, LaneState, PlanInput, Window};
use crate::exit::Failure;
use crate::mapping::{Entity, Value};
use crate::sink::{BatchWrite, Checkpoint, DeadLetter, Sink};
use crate::source::{Page, Position};
use anyhow::Result;
use bson::Bson;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info, warn};

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
    let mut res = crate::engine::resolve::resolve(ctx, e, &mut mapped, docs).await?;
    res.other_dead.extend(
        std::mem::take(&mut mapped.twin_dead)
            .into_iter()
            .map(|d| (e.name.clone(), d)),
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
    let mut again = map_page_twins(
        e,
        &page.docs,
        true,
        std::mem::take(&mut mapped.twin_losers),
        std::mem::take(&mut mapped.twin_dead),
    );
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
    let source = ctx.source.clone();
    let mapper = tokio::spawn(async move {
        loop {
            let t0 = Instant::now();
            let Some(page) = rx.recv().await else { break };
            // Ids of another BSON type with the same key text, looked up in the source.
            let page = match page {
                Ok(p) => crate::engine::twins::find(&source, &entity, &p.docs)
                    .await
                    .map(|t| (p, t)),
                Err(e) => Err(e),
            };
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
                page.map(|(mut p, twins)| {
                    let (unmapped, hashes) = if hash_docs {
                        pre_skip(&pulled, &entity, &mut p.docs)
                    } else {
                        Default::default()
                    };
                    let mut m = map_page_twins(&entity, &p.docs, true, twins.losers, twins.outside);
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
    let job = WindowJob {
        lane,
        watermark,
        window: w,
        resumed,
        outstanding,
        presume_new: false,
    };
    drive_window(ctx, e, job, opened).await
}

/// What a batch's task gives back: its documents, its counts, the time it took.
type Committed = (usize, Result<Counts>, std::time::Duration);

/// A batch being written by a task of its own.
struct InFlight {
    task: AbortOnDrop<Committed>,
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

/// What the window's last stage needs besides the run and the entity: the lane and its
/// watermark, the window, and what the run knows going in.
#[derive(Clone, Copy)]
struct WindowJob<'a> {
    lane: &'a str,
    watermark: Option<DateTime<Utc>>,
    window: Window,
    /// Resumed after a checkpoint inside the window (reported as such).
    resumed: bool,
    /// The entity has dead letters, missing-reference or pending records: every batch also
    /// clears the records of the documents it writes cleanly.
    outstanding: bool,
    /// The first batch presumes a first load (the previous window's last batch was one).
    presume_new: bool,
}

/// The batches of one window being written, each by a task of its own, committed in order
/// (at most `max` at once), and what the committed ones added up to.
struct Writing {
    in_flight: std::collections::VecDeque<InFlight>,
    /// Batches written at once at most ([`batches_in_flight`]).
    max: usize,
    counts: Counts,
    batches: u64,
    /// The last committed batch found none of its rows stored (a first load): the next one
    /// presumes the same ([`crate::sink::BatchWrite::presume_new`]).
    presume_new: bool,
    /// The same for its dependents.
    presume_dependents_new: bool,
    /// Time spent writing batches, summed over batches written at once.
    write_ms: u64,
}

impl Writing {
    /// Whether a resolved batch may be written now: nothing is in flight, or there is room
    /// and it touches nothing the batches in flight touch.
    fn fits(&self, r: &Resolved) -> bool {
        self.in_flight.is_empty()
            || (self.in_flight.len() < self.max
                && r.touched.as_ref().is_some_and(|t| {
                    self.in_flight
                        .iter()
                        .all(|f| f.touched.as_ref().is_some_and(|o| o.disjoint(t)))
                }))
    }

    /// Start writing a resolved batch, with the checkpoint after its last document, on a
    /// task of its own.
    fn start(
        &mut self,
        ctx: &Arc<Ctx>,
        entity: &Arc<Entity>,
        job: &WindowJob<'_>,
        page: Page,
        mut ready: Resolved,
    ) {
        ready.mapped.presume_new = self.presume_new;
        ready.mapped.presume_dependents_new = self.presume_dependents_new;
        let cp = Checkpoint {
            lane: job.lane.to_owned(),
            entity: entity.name.clone(),
            state: LaneState {
                watermark: job.watermark,
                open: Some(job.window),
            },
            last: Some(page.last.clone()),
            run_id: ctx.run_id.clone(),
        };
        let beside = !self.in_flight.is_empty();
        let order = (self.max > 1).then(|| {
            Arc::new(crate::sink::order::Order::new(
                self.in_flight.back().and_then(|f| f.order.as_deref()),
            ))
        });
        let touched = ready.touched.take();
        let outstanding = job.outstanding;
        let task = {
            let (ctx, e, order) = (Arc::clone(ctx), Arc::clone(entity), order.clone());
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
        self.in_flight.push_back(InFlight {
            task: AbortOnDrop(task),
            order,
            touched,
            beside,
        });
    }

    /// The oldest batch in flight, `f`, ended with `joined`: count it, or fail the window
    /// (nothing this run pulled may be skipped after a failed batch). After each commit the
    /// run's error budget and the stop flag are checked.
    fn committed(
        &mut self,
        ctx: &Ctx,
        e: &Entity,
        f: InFlight,
        joined: std::result::Result<Committed, tokio::task::JoinError>,
    ) -> Result<()> {
        let verdict = |ok: bool| {
            if let Some(o) = &f.order {
                o.done(ok);
            }
        };
        let fail = |err: anyhow::Error| {
            verdict(false);
            forget_pulled(ctx);
            Err(err)
        };
        let (docs, c, took) = match joined {
            Ok(j) => j,
            Err(err) => return fail(anyhow::anyhow!("writing a batch failed: {err}")),
        };
        self.write_ms += took.as_millis() as u64;
        let c = match c {
            Ok(c) => Counts {
                overlapped_batches: f.beside as u64,
                ..c
            },
            Err(err) => return fail(err),
        };
        self.presume_new = c.all_new;
        self.presume_dependents_new = c.dependents_new;
        self.batches += 1;
        self.counts.add(&c);
        debug!(entity = %e.name, batch = self.batches, docs, written = c.written, "batch committed");
        let dead_total =
            ctx.dead_total.fetch_add(c.dead_lettered, Ordering::SeqCst) + c.dead_lettered;
        if dead_total > ctx.settings.sync.error_budget {
            return fail(
                Failure::Partial(format!(
                    "{dead_total} documents dead-lettered in this run, over sync.error_budget = {}; \
                     stopped after the last committed batch. Inspect tidemark_dead_letters, fix the mapping, run again",
                    ctx.settings.sync.error_budget
                ))
                .into(),
            );
        }
        if ctx.stop.load(Ordering::SeqCst) {
            return fail(anyhow::anyhow!(
                "stopped by signal after a committed batch; the next run resumes from the checkpoint"
            ));
        }
        verdict(true);
        Ok(())
    }
}

/// The window's next batch: received from the mapper and resolved while the batches before
/// it are written.
#[derive(Default)]
struct Reading<'a> {
    /// The mapper's channel, when no batch is being received.
    mrx: Option<Mapped>,
    /// The batch being received and resolved.
    next: Option<NextBatch<'a>>,
    /// The batch resolved and waiting for its turn to be written.
    ahead: Option<(Page, Resolved)>,
    /// The mapper has no more pages (or resolving one failed).
    ended: bool,
    /// Resolving a batch failed: the window fails once the batches in flight are committed.
    failed: Option<anyhow::Error>,
    /// Time spent waiting for mapped pages, and resolving them.
    wait_ms: u64,
    resolve_ms: u64,
}

impl<'a> Reading<'a> {
    /// Start receiving the next batch, unless one is waiting or being received.
    fn request(&mut self, ctx: &'a Arc<Ctx>, e: &'a Entity) {
        if self.ahead.is_none() && !self.ended {
            if let Some(rx) = self.mrx.take() {
                self.next = Some(Box::pin(next_batch(ctx, e, rx)));
            }
        }
    }

    /// The batch being received arrived (or the window ended, or resolving it failed).
    fn got(&mut self, (rx, got): (Mapped, Result<Received>)) {
        self.next = None;
        self.mrx = Some(rx);
        match got {
            Ok((resolved, waited, took)) => {
                self.wait_ms += waited.as_millis() as u64;
                self.resolve_ms += took.as_millis() as u64;
                match resolved {
                    Some(r) => self.ahead = Some(r),
                    None => self.ended = true,
                }
            }
            // The batches in flight were resolved cleanly: they commit first.
            Err(err) => {
                self.failed = Some(err);
                self.ended = true;
            }
        }
    }
}

/// The window's last stage: resolve and write what [`open_window`] reads.
async fn drive_window(
    ctx: &Arc<Ctx>,
    e: &Entity,
    job: WindowJob<'_>,
    opened: Opened,
) -> Result<WindowReport> {
    let started = Instant::now();
    let Opened {
        rx: mrx,
        _mapper,
        source_wait,
        map_time,
    } = opened;
    // Where the window's time went: waiting for the next mapped page (`wait_ms`), resolving
    // it (`resolve_ms`: source reads and mapping of what it pulls) and writing batches
    // (`write_ms`, summed over batches written at once), which run at the same time; the
    // mapper waiting for the source's next page (`source_wait_ms`) versus mapping one
    // (`map_ms`). Logged with "window done" (`Reading`, `Writing` count them).
    //
    // While batches are written, the next one is received and resolved (its reads of the
    // source and of committed target rows do not depend on the writes in flight: what they
    // pull is in the resolution memo before it is resolved). On PostgreSQL up to
    // `target.batches_in_flight` batches are written at once, each in its own transaction,
    // committed in order ([`crate::sink::order`]); elsewhere one after the other.
    let mut writing = Writing {
        in_flight: Default::default(),
        max: batches_in_flight(ctx),
        counts: Counts::default(),
        batches: 0,
        presume_new: job.presume_new,
        presume_dependents_new: false,
        write_ms: 0,
    };
    let mut reading = Reading {
        mrx: Some(mrx),
        ..Default::default()
    };
    let entity = ctx.entity_arc(&e.name)?;
    loop {
        // Start writing the batch ahead if it may go beside those in flight.
        if reading.ahead.as_ref().is_some_and(|(_, r)| writing.fits(r)) {
            let (page, ready) = reading.ahead.take().expect("checked above");
            writing.start(ctx, &entity, &job, page, ready);
        }
        reading.request(ctx, e);
        if writing.in_flight.is_empty() && reading.ahead.is_none() && reading.ended {
            break;
        }
        tokio::select! {
            joined = async {
                match writing.in_flight.front_mut() {
                    Some(f) => (&mut f.task.0).await,
                    None => std::future::pending().await,
                }
            } => {
                let f = writing.in_flight.pop_front().expect("a batch was in flight");
                writing.committed(ctx, e, f, joined)?;
            }
            got = async {
                match reading.next.as_mut() {
                    Some(n) => n.await,
                    None => std::future::pending().await,
                }
            } => reading.got(got),
        }
    }
    if let Some(err) = reading.failed {
        return Err(err);
    }
    close_window(ctx, e, &job).await?;
    let (w, counts) = (job.window, writing.counts);
    let report = WindowReport {
        entity: e.name.clone(),
        window: w,
        resumed: job.resumed,
        batches: writing.batches,
        counts,
        elapsed_ms: started.elapsed().as_millis() as u64,
        ended_new: writing.presume_new,
    };
    info!(entity = %e.name, window = %w, read = counts.read, written = counts.written,
          already = counts.already_written, dead = counts.dead_lettered, overlapped = counts.overlapped_batches, ms = report.elapsed_ms,
          wait_ms = reading.wait_ms, resolve_ms = reading.resolve_ms, write_ms = writing.write_ms,
          source_wait_ms = source_wait.load(Ordering::Relaxed), map_ms = map_time.load(Ordering::Relaxed),
          "window done");
    Ok(report)
}

/// Every batch of the window committed: the lane's checkpoint leaves the window, its
/// watermark at the window's end.
async fn close_window(ctx: &Ctx, e: &Entity, job: &WindowJob<'_>) -> Result<()> {
    let w = job.window;
    let done = Checkpoint {
        lane: job.lane.to_owned(),
        entity: e.name.clone(),
        state: LaneState {
            watermark: Some(job.watermark.map_or(w.to, |m| m.max(w.to))),
            open: None,
        },
        last: None,
        run_id: ctx.run_id.clone(),
    };
    if !ctx.dry_run {
        ctx.sink.save_checkpoint(&done).await?;
    }
    Ok(())
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
    if ctx.settings.sync.scan_invalid_time {
        check_time_field(ctx, e).await?;
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
        let job = WindowJob {
            lane: &lane,
            watermark,
            window: w,
            resumed: false,
            outstanding,
            presume_new,
        };
        let r = drive_window(ctx, e, job, opened).await?;
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
                "{} documents in {} have a missing, mistyped or out-of-range {} (expected {:?}); they are in tidemark_dead_letters",
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

/// A collection none of whose documents has a usable time (a misspelt `time_field`, a wrong
/// `time_encoding`) would look like an empty one: every window reads nothing, the watermark
/// advances and the scan dead-letters everything. Fail before any window instead, so the
/// watermark stays where it was and the message names the field.
async fn check_time_field(ctx: &Ctx, e: &Entity) -> Result<()> {
    if ctx.source.invalid_time_docs(e, 1).await?.is_empty() {
        return Ok(());
    }
    let (first, last) = crate::source::readable_range();
    if ctx.source.next_time(e, first, last).await?.is_some() {
        return Ok(());
    }
    Err(Failure::Config(anyhow::anyhow!(
        "no document of collection {} has a usable time field `{}` (expected {:?}), and some have none \
         or another type: is time_field misspelt, or time_encoding wrong? Fix entity `{}` in the \
         mapping; nothing was read and the watermark did not move",
        e.collection,
        e.time_field,
        e.time_encoding,
        e.name
    ))
    .into())
}

/// Dead-letter documents that no window can ever select (time field missing, mistyped, or
/// outside the years 1–9999).
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
                "time field `{}` is missing, not {:?}, or outside the years 1-9999; no window can select this document. Fix the document or the mapping's time_encoding",
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
    use crate::mapping::Mapping;
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
