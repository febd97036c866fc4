//! One window's stages: the source pump and the mapper ([`open_window`]), then the loop
//! that receives and resolves each batch while the batches before it are written
//! ([`run_window`], `drive_window`).

use crate::engine::batch::{
    batches_in_flight, commit_batch, forget_pulled, resolve_batch, Resolved,
};
use crate::engine::ctx::{Counts, Ctx, WindowReport};
use crate::engine::page::{map_page_twins, prepare, MappedPage};
use crate::engine::skip::{confirm_pre_skipped, pre_skip};
use crate::engine::window::{LaneState, Window};
use crate::exit::Failure;
use crate::mapping::Entity;
use crate::sink::Checkpoint;
use crate::source::{Page, Position};
use anyhow::Result;
use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info};

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

/// [`run_window`] from the start of `w`, whose pages `opened` is already reading (opened
/// ahead with [`open_window`] and no position, while the lane's previous window ran).
pub async fn run_opened_window(
    ctx: &Arc<Ctx>,
    e: &Entity,
    lane: &str,
    watermark: Option<DateTime<Utc>>,
    w: Window,
    opened: Opened,
    outstanding: bool,
) -> Result<WindowReport> {
    let job = WindowJob {
        lane,
        watermark,
        window: w,
        resumed: false,
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
pub(crate) struct WindowJob<'a> {
    pub(crate) lane: &'a str,
    pub(crate) watermark: Option<DateTime<Utc>>,
    pub(crate) window: Window,
    /// Resumed after a checkpoint inside the window (reported as such).
    pub(crate) resumed: bool,
    /// The entity has dead letters, missing-reference or pending records: every batch also
    /// clears the records of the documents it writes cleanly.
    pub(crate) outstanding: bool,
    /// The first batch presumes a first load (the previous window's last batch was one).
    pub(crate) presume_new: bool,
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
pub(crate) async fn drive_window(
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
        // A finished window is durable: its batches' group commits with its checkpoint.
        ctx.commit_group().await?;
    }
    Ok(())
}
