//! One entity's lane caught up, window after window ([`catch_up`]), with the documents held
//! back by earlier runs retried and those no window can select dead-lettered. A window's
//! stages are in `drive.rs`, a batch in `batch.rs`, skipping in `skip.rs`; read pages, map,
//! de-duplicate, write rows, dead letters and checkpoint in one transaction per batch. `run`, tests and (later) backfill and
//! the daemon all go through [`catch_up`] / [`run_window`].

pub use crate::engine::batch::{
    commit_batch, forget_pulled, resolve_batch, write_docs, write_mapped, Resolved,
};
pub use crate::engine::ctx::{nightly_lane, Counts, Ctx, EntityReport, RowsWritten, WindowReport};
use crate::engine::drive::{drive_window, WindowJob};
pub use crate::engine::drive::{open_window, run_opened_window, run_window, Opened};
pub use crate::engine::page::{
    map_page, map_page_twins, prepare, raw_json, row_meta, source_id, MappedPage, PreSkipped,
};
use crate::engine::window::{self, PlanInput, Window};
use crate::exit::Failure;
use crate::mapping::Entity;
use crate::sink::{BatchWrite, DeadLetter};
use anyhow::Result;
use bson::Bson;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

/// Catch an entity's nightly lane up to `min(source clock - settle, until)`.
pub async fn catch_up(
    ctx: &Arc<Ctx>,
    e: &Entity,
    until: Option<DateTime<Utc>>,
) -> Result<EntityReport> {
    let started = Instant::now();
    let lane = nightly_lane(&e.name);
    let (mut warnings, unconfirmed) = preflight(ctx, e).await?;
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
    if unconfirmed {
        check_time_field(ctx, e, &plan).await?;
    }
    let counts = retry_pending(ctx, e).await?;
    let mut p = Progress {
        counts,
        outstanding: ctx.sink.has_outstanding(&e.name).await?,
        watermark: state.watermark,
        windows: 0,
    };
    if let Some(w) = plan.resume {
        let r = run_window(ctx, e, &lane, p.watermark, w, last, p.outstanding).await?;
        p.done(w, &r.counts);
    }
    fresh_windows(ctx, e, &lane, &plan, &mut p).await?;
    if s.scan_invalid_time {
        p.counts.invalid_time = scan_invalid_time(ctx, e).await?;
        if p.counts.invalid_time > 0 {
            let msg = format!(
                "{} documents in {} have a missing, mistyped or out-of-range {} (expected {:?}); they are in tidemark_dead_letters",
                p.counts.invalid_time, e.collection, e.time_field, e.time_encoding
            );
            warn!(entity = %e.name, "{msg}");
            warnings.push(msg);
        }
    }
    Ok(EntityReport {
        entity: e.name.clone(),
        windows: p.windows,
        counts: p.counts,
        watermark: p.watermark,
        warnings,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// Before the windows: the warning when `(time_field, _id)` has no index (logged and
/// returned for the report) and, with `sync.scan_invalid_time`, whether some documents have
/// no usable time (then [`check_time_field`] must pass before anything is written).
async fn preflight(ctx: &Ctx, e: &Entity) -> Result<(Vec<String>, bool)> {
    let mut warnings = Vec::new();
    if let Some(w) = ctx.source.missing_index_warning(e).await? {
        warn!(entity = %e.name, "{w}");
        warnings.push(w);
    }
    let unconfirmed = ctx.settings.sync.scan_invalid_time
        && !ctx.source.invalid_time_docs(e, 1).await?.is_empty();
    Ok((warnings, unconfirmed))
}

/// What an entity's windows have given so far.
struct Progress {
    counts: Counts,
    /// Documents of the entity wait in dead letters or pending (the writer checks them).
    outstanding: bool,
    watermark: Option<DateTime<Utc>>,
    windows: usize,
}

impl Progress {
    /// Window `w` is done with these counts: the watermark moves to its end.
    fn done(&mut self, w: Window, c: &Counts) {
        self.counts.add(c);
        self.outstanding |= c.dead_lettered + c.missing_refs + c.deferred > 0;
        self.watermark = Some(self.watermark.map_or(w.to, |m| m.max(w.to)));
        self.windows += 1;
    }
}

/// The new windows of `plan`, from `fresh_from` to `upper`, one after another.
async fn fresh_windows(
    ctx: &Arc<Ctx>,
    e: &Entity,
    lane: &str,
    plan: &window::Plan,
    p: &mut Progress,
) -> Result<()> {
    let max_window = ctx.settings.sync.max_window;
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
            probe_next(ctx, e, cursor, probe_span, plan).await?
        } else {
            window::next(cursor, Some(cursor), max_window, plan.upper)
        };
        let Some(w) = w else { break };
        let opened = match ahead.take() {
            Some((next, opened)) if next == w => opened,
            _ => open_window(ctx, e, w, None),
        };
        ahead = read_ahead(ctx, e, w, plan);
        let job = WindowJob {
            lane,
            watermark: p.watermark,
            window: w,
            resumed: false,
            outstanding: p.outstanding,
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
        p.done(w, &r.counts);
        cursor = w.to;
    }
    Ok(())
}

/// The next window from `cursor` after an empty one: one indexed query looks `probe_span`
/// windows ahead for the next document; none there gives the whole span as one window.
async fn probe_next(
    ctx: &Ctx,
    e: &Entity,
    cursor: DateTime<Utc>,
    probe_span: i32,
    plan: &window::Plan,
) -> Result<Option<Window>> {
    let max_window = ctx.settings.sync.max_window;
    let span = chrono::TimeDelta::from_std(max_window)
        .ok()
        .and_then(|d| d.checked_mul(probe_span));
    let end = span
        .and_then(|d| cursor.checked_add_signed(d))
        .map_or(plan.upper, |t| t.min(plan.upper));
    Ok(match ctx.source.next_time(e, cursor, end).await? {
        None => Some(Window::new(cursor, end)),
        first => window::next(cursor, first, max_window, plan.upper),
    })
}

/// Read ahead: start reading the window after `w` (as it is when `w` has documents) so its
/// first pages are mapped when `w` ends. Reading is all it does; a window that turns out
/// different is dropped unread. Only into PostgreSQL and for entities without references
/// or dependents: elsewhere the writer is the slower stage by far, and reading ahead only
/// held more memory (flat run into SQLite: 64 -> 71 MB peak; full mapping: 169 -> ~200 MB;
/// neither faster; BENCHMARKS.md).
fn read_ahead(
    ctx: &Arc<Ctx>,
    e: &Entity,
    w: Window,
    plan: &window::Plan,
) -> Option<(Window, Opened)> {
    if !(w.to < plan.upper && reads_ahead(ctx, e)) {
        return None;
    }
    let next = window::next(w.to, Some(w.to), ctx.settings.sync.max_window, plan.upper)?;
    Some((next, open_window(ctx, e, next, None)))
}

/// Whether a lane of `e` reads its next window ahead while writing one (see `read_ahead`):
/// into PostgreSQL, for entities without references or dependents. `run` and backfill
/// workers share this rule.
pub fn reads_ahead(ctx: &Ctx, e: &Entity) -> bool {
    e.dependents.is_empty() && !e.has_references() && ctx.sink.backend() == "postgres"
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
                fence: ctx.fence().as_deref(),
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
async fn check_time_field(ctx: &Ctx, e: &Entity, plan: &window::Plan) -> Result<()> {
    if usable_time_ahead(ctx, e, plan).await? {
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

/// Whether the windows this run is about to read hold a document with a usable time: the
/// resumed window, then the fresh range in spans of 1, 2, 4, … windows (the probes
/// `fresh_windows` makes too). Found, the time field is confirmed at the cost of the first
/// non-empty span. The question "does any document have a usable time?" over the whole
/// readable range costs what scanning that range costs on some servers (SecantusDB: 2.4 s
/// for 45,000 documents on a loaded machine, a third of a first load of them; BENCHMARKS.md,
/// session 18), and it was asked by every run over a collection holding one bad time.
async fn usable_time_ahead(ctx: &Ctx, e: &Entity, plan: &window::Plan) -> Result<bool> {
    if let Some(w) = plan.resume {
        if ctx.source.next_time(e, w.from, w.to).await?.is_some() {
            return Ok(true);
        }
    }
    let max_window = chrono::TimeDelta::from_std(ctx.settings.sync.max_window).ok();
    let (mut cursor, mut span) = (plan.fresh_from, 1i32);
    while cursor < plan.upper {
        let end = max_window
            .and_then(|d| d.checked_mul(span))
            .and_then(|d| cursor.checked_add_signed(d))
            .map_or(plan.upper, |t| t.min(plan.upper));
        if ctx.source.next_time(e, cursor, end).await?.is_some() {
            return Ok(true);
        }
        cursor = end;
        span = span.saturating_mul(2).min(1 << 20);
    }
    Ok(false)
}

/// Dead-letter documents that no window can ever select (time field missing, mistyped, or
/// outside the years 1–9999).
async fn scan_invalid_time(ctx: &Ctx, e: &Entity) -> Result<u64> {
    let docs = ctx.source.invalid_time_docs(e, 10_000).await?;
    if docs.is_empty() {
        return Ok(0);
    }
    // Documents already waiting in the dead letters (found by an earlier run's scan, or
    // dead-lettered for another reason) are neither written again nor counted: the warning
    // and the dead-letter counter name what is new, `status` and the outstanding gauge what
    // waits.
    let ids: Vec<String> = docs.iter().map(|d| source_id(d)).collect();
    let known = crate::sink::dead_letters::outstanding_among(&ctx.sink, &e.name, &ids).await?;
    let dead: Vec<DeadLetter> = docs
        .iter()
        .zip(ids)
        .filter(|(_, id)| !known.contains(id))
        .map(|(d, id)| DeadLetter {
            source_id: id,
            error: format!(
                "time field `{}` is missing, not {:?}, or outside the years 1-9999; no window can select this document. Fix the document or the mapping's time_encoding",
                e.time_field, e.time_encoding
            ),
            document: raw_json(d),
        })
        .collect();
    if dead.is_empty() {
        return Ok(0);
    }
    ctx.sink
        .write_batch(&BatchWrite {
            entity: Some(e),
            dead: &dead,
            run_id: &ctx.run_id,
            mapping_version: &ctx.mapping.version,
            known: Some(&ctx.records),
            dry_run: ctx.dry_run,
            fence: ctx.fence().as_deref(),
            ..Default::default()
        })
        .await?;
    Ok(dead.len() as u64)
}
