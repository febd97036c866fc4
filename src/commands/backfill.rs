//! `tidemark backfill`: a range cut into chunks, one checkpoint lane per (entity, chunk),
//! each chunk run by [`pipeline::run_window`]. Never touches the nightly lanes.
//!
//! The plan lives in the target (`tidemark_backfills`, `tidemark_backfill_chunks`), so
//! it survives crashes and can be shared: any number of processes on any hosts claim
//! chunks from the ledger. Claiming a chunk is taking its lane's lock with the target's own
//! locking, as `run` does for the nightly lanes ([`crate::sink::lease`]: a PostgreSQL session
//! advisory lock, a lock file beside a SQLite database); the chunk's row then shows the
//! holder (host, pid, since). A chunk whose holder died is free at once (its process or
//! session ended); a frozen holder keeps it. Every batch of a chunk checks before it commits
//! that the lock and the row are still this worker's ([`crate::sink::lease::Fence`]), so a
//! worker that lost its lock session writes nothing more and stops; the next holder resumes
//! from the chunk's checkpoint.
//!
//! By default chunks are cut by document count (about [`DEFAULT_CHUNK_DOCS`] each, planned
//! with indexed counts per range, sparse stretches merged: see
//! [`window::chunks_by_count`]), so a backfill costs about what `run` costs over the same
//! range, dense or sparse; `--chunk DURATION` cuts by time instead. The plan is made once,
//! by the worker that creates the backfill, and stored; every other worker reads it from
//! the ledger. A collection no larger than a chunk is planned without counting. With
//! `--parallel 1` a worker reads the first pages of the chunk it will likely claim next
//! while it writes the current one, as `run` reads its next window ahead.
//!
//! The backfill id is derived from the range, the chunk setting and entities, so running the
//! same command again (or on another host) resumes or joins the same backfill.
//!
//! [`DEFAULT_CHUNK_DOCS`]: crate::engine::window::DEFAULT_CHUNK_DOCS

mod dry_run;

pub use dry_run::backfill_dry_run;

use crate::commands::lifecycle::{outcome, RunLog};
use crate::engine::lane::this_host;
use crate::engine::pipeline::{self, Counts, Ctx, Opened};
use crate::engine::select::Selection;
use crate::engine::window::{self, fmt_ts, to_millis, ChunkBy, Window};
use crate::exit::Failure;
use crate::settings::Settings;
use crate::sink::chunks::{plan_id, Chunk, ChunkCounts, Ledger, Plan, Progress};
use crate::sink::lease::{LaneLocks, LostLane};
use crate::source::Source;
use crate::timearg;
use anyhow::{anyhow, Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    pub from: Option<String>,
    pub to: Option<String>,
    pub entities: Vec<String>,
    pub chunk: ChunkBy,
    pub parallel: usize,
    /// Resume or join this backfill; the range and entities come from the ledger.
    pub resume: Option<String>,
}

/// The outcome of this worker's part of a backfill.
#[derive(Debug, Serialize)]
pub struct BackfillReport {
    pub id: String,
    pub plan: Plan,
    /// Chunks this process finished.
    pub chunks_here: u64,
    /// Documents this process read and wrote.
    pub counts: Counts,
    /// The whole backfill, all workers.
    pub progress: Progress,
    pub elapsed_ms: u64,
}

impl std::fmt::Display for BackfillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed_ms as f64 / 1000.0;
        writeln!(
            f,
            "backfill {} {} of {}: {}/{} chunks done",
            self.id,
            self.plan.range,
            self.plan.entities.join(", "),
            self.progress.done,
            self.progress.total
        )?;
        if self.progress.running > 0 {
            writeln!(
                f,
                "{} chunk(s) still running on other workers",
                self.progress.running
            )?;
        }
        write!(
            f,
            "this worker: {} chunks, {} documents read, {} rows written ({} main, {} child, {} pulled), {} dead-lettered in {:.1}s ({:.0} documents/s)",
            self.chunks_here,
            self.counts.read,
            self.counts.rows_written().total,
            self.counts.written,
            self.counts.child_written,
            self.counts.pulled_written,
            self.counts.dead_lettered,
            secs,
            self.counts.read as f64 / secs.max(0.001)
        )
    }
}

/// `tidemark backfill`.
pub async fn backfill(
    mut s: Settings,
    opts: BackfillOptions,
    stop: Arc<AtomicBool>,
) -> Result<BackfillReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    if opts.parallel == 0 {
        return Err(Failure::Config(anyhow!("--parallel must be at least 1")).into());
    }
    let mapping = crate::commands::setup::load_mapping(&s)?;
    let source = Source::connect(&s.source)
        .await
        .map_err(Failure::Unavailable)?;
    // Each chunk's window holds a connection per batch in flight and one to resolve.
    s.target.max_connections = s
        .target
        .max_connections
        .max(opts.parallel as u32 * (s.target.batches_in_flight + 1) + 2);
    // The pool's connections share the budget of `target.sqlite_cache_mib`
    // (`SqliteTuning::of`), so a wide pool holds no more than a run's one connection.
    let sink = crate::commands::setup::open_sink(&s, &mapping).await?;
    let mut ledger = Ledger {
        sink: sink.clone(),
        id: String::new(),
        holder: uuid::Uuid::new_v4().to_string(),
        host: this_host(),
        pid: std::process::id() as i64,
    };
    let plan = plan_or_join(&s, &opts, &mapping, &source, &mut ledger).await?;
    ledger.prepare().await?;
    let log = RunLog::start(&s, &sink, "backfill", false, &mapping.version, started_at).await?;
    let before = Ledger::progress(&sink, &plan.id).await?;
    info!(backfill = %plan.id, range = %plan.range, entities = %plan.entities.join(","),
          chunks = before.total, done = before.done, parallel = opts.parallel, "backfill started");
    let ctx = Ctx::new(s, mapping, source, sink.clone(), log.id().to_owned(), stop);
    let ledger = Arc::new(ledger);
    let done = Arc::new(AtomicBool::new(false));
    let shown = tokio::spawn(show_progress(
        Arc::new(ctx.for_lane()),
        plan.clone(),
        before,
        done.clone(),
    ));
    let (result, tally) = run_workers(&ctx, &ledger, opts.parallel).await;
    done.store(true, Ordering::SeqCst);
    let _ = shown.await;
    let complete = ledger.close_if_complete().await?;
    let report = BackfillReport {
        id: plan.id.clone(),
        progress: Ledger::progress(&sink, &plan.id).await?,
        plan,
        chunks_here: tally.0,
        counts: tally.1,
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    let mut json = serde_json::to_value(&report)?;
    let status = outcome(&result, &mut json, true);
    log.finish(&sink, status, &json).await?;
    sink.close().await;
    if complete {
        info!(backfill = %report.id, "backfill complete");
    }
    result
        .with_context(|| {
            format!(
                "backfill {} stopped; resume it with: tidemark backfill --resume {}",
                report.id, report.id
            )
        })
        .map(|_| report)
}

/// The backfill the options name: read from the ledger (`--resume`, or planned already by
/// another worker or an earlier run of the same command), or planned now and stored.
async fn plan_or_join(
    s: &Settings,
    opts: &BackfillOptions,
    mapping: &crate::mapping::Mapping,
    source: &Source,
    ledger: &mut Ledger,
) -> Result<Plan> {
    let plan = match &opts.resume {
        Some(id) => Ledger::load(&ledger.sink, id).await?.ok_or_else(|| {
            Failure::Config(anyhow!(
                "there is no backfill {id} in the target; `tidemark status` lists backfills"
            ))
        })?,
        None => {
            let (id, range, entities) = new_range(s, opts, mapping, source).await?;
            match Ledger::load(&ledger.sink, &id).await? {
                Some(plan) => plan,
                None => {
                    let mut chunks = Vec::new();
                    let mut docs = Some(0);
                    for n in &entities {
                        let e = mapping.entity(n).map_err(Failure::Config)?;
                        let (windows, counted) = plan_chunks(source, e, range, opts.chunk).await?;
                        docs = docs.zip(counted).map(|(a, b)| a + b);
                        chunks.extend(windows.into_iter().map(|w| (n.clone(), w)));
                    }
                    let plan = Plan {
                        id,
                        range,
                        chunk_ms: opts.chunk.ledger_ms(),
                        entities,
                        chunks,
                        docs,
                    };
                    ledger.id = plan.id.clone();
                    ledger.create(&plan).await?;
                    plan
                }
            }
        }
    };
    ledger.id = plan.id.clone();
    for n in &plan.entities {
        mapping.entity(n).map_err(Failure::Config)?;
    }
    Ok(plan)
}

/// Chunks this process finished and what they counted.
type Tally = (u64, Counts);

/// Run `parallel` workers on one set of chunk locks until no chunk is left to claim; the
/// first error (if any) and what they did.
async fn run_workers(ctx: &Ctx, ledger: &Arc<Ledger>, parallel: usize) -> (Result<()>, Tally) {
    let locks = match LaneLocks::open(&ledger.sink).await {
        Ok(l) => Arc::new(l),
        Err(e) => return (Err(e), Tally::default()),
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    let abort = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        set.spawn(worker(
            Arc::new(ctx.for_lane()),
            ledger.clone(),
            locks.clone(),
            abort.clone(),
            tally.clone(),
            // Workers of one process would all guess the same next chunk; with several,
            // chunks overlap each other anyway.
            parallel == 1,
        ));
    }
    let mut result: Result<()> = Ok(());
    while let Some(r) = set.join_next().await {
        let r = r
            .map_err(|e| anyhow!("backfill worker task failed: {e}"))
            .and_then(|r| r);
        if let (Err(e), true) = (r, result.is_ok()) {
            result = Err(e);
        }
    }
    locks.close().await;
    let tally = *tally.lock().expect("tally lock");
    (result, tally)
}

/// The chunks of one entity over `range`: fixed lengths, or about `n` documents each
/// (planned with indexed counts, logged with the number of chunks and the time planning
/// took; then also the documents counted).
pub async fn plan_chunks(
    source: &Source,
    e: &crate::mapping::Entity,
    range: Window,
    by: ChunkBy,
) -> Result<(Vec<Window>, Option<u64>)> {
    match by {
        ChunkBy::Duration(d) => Ok((window::chunks(range.from, range.to, d), None)),
        ChunkBy::Docs(n) => {
            let started = Instant::now();
            // A collection of at most `n` documents holds at most `n` in any range: one
            // chunk, and no count (each costs about a read of its documents on SecantusDB).
            // The estimate is the collection's metadata; if the source cannot give one, count.
            match source.estimated_count(e).await {
                Ok(total) if total <= n => {
                    info!(entity = %e.name, collection_docs = total, ms = started.elapsed().as_millis() as u64,
                          "backfill planned as one chunk: the whole collection holds fewer documents than --chunk-docs");
                    return Ok((vec![range], None));
                }
                Ok(_) => {}
                Err(err) => {
                    debug!(entity = %e.name, error = %format!("{err:#}"), "no estimated count; counting")
                }
            }
            let counts = std::cell::Cell::new(0u32);
            let planned = window::chunks_by_count(range.from, range.to, n, |w| {
                counts.set(counts.get() + 1);
                async move { source.count_window(e, &w).await }
            })
            .await
            .with_context(|| {
                format!(
                    "planning the backfill chunks of {} by document count",
                    e.name
                )
            })?;
            info!(entity = %e.name, chunks = planned.len(), docs = planned.iter().map(|c| c.1).sum::<u64>(),
                  counts = counts.get(), ms = started.elapsed().as_millis() as u64, "backfill chunks planned by document count");
            let docs = planned.iter().map(|c| c.1).sum();
            Ok((planned.into_iter().map(|(w, _)| w).collect(), Some(docs)))
        }
    }
}

/// The id, effective range and entities of the backfill the options ask for.
async fn new_range(
    s: &Settings,
    opts: &BackfillOptions,
    mapping: &crate::mapping::Mapping,
    source: &Source,
) -> Result<(String, Window, Vec<String>)> {
    let config = |m: String| -> anyhow::Error { Failure::Config(anyhow!(m)).into() };
    let (Some(from), Some(to)) = (&opts.from, &opts.to) else {
        return Err(config(
            "give the range with --from and --to, or --resume ID to continue a backfill".into(),
        ));
    };
    let (f, t) = timearg::parse_range(from, to, Utc::now()).map_err(Failure::Config)?;
    let (f, t) = (to_millis(f), to_millis(t));
    let mut entities = entity_names(&opts.entities, s, mapping)?;
    entities.sort();
    entities.dedup();
    let settled =
        to_millis(source.server_time().await? - chrono::TimeDelta::from_std(s.sync.settle)?);
    if f >= settled {
        return Err(config(format!(
            "--from {from} is after the source clock minus sync.settle ({}); nothing can be backfilled yet",
            fmt_ts(settled)
        )));
    }
    let id = plan_id(Window::new(f, t), opts.chunk, &entities);
    let t_eff: DateTime<Utc> = t.min(settled);
    if t_eff < t {
        warn!(to = %fmt_ts(t), until = %fmt_ts(t_eff), "--to is past the source clock minus sync.settle; the backfill stops there and the nightly run covers the rest");
    }
    Ok((id, Window::new(f, t_eff), entities))
}

/// The entities asked for (`--entity`), else `sync.entities`, else every windowed entity of
/// the mapping; each must exist (`engine::select`, the rule every command shares).
fn entity_names(
    asked: &[String],
    s: &Settings,
    mapping: &crate::mapping::Mapping,
) -> Result<Vec<String>> {
    Selection::new(mapping, asked)
        .or_configured(&s.sync.entities)
        .names()
}

/// Documents in the range, counted with the `(time, _id)` index: the progress bar's length
/// when planning did not count them.
async fn count_docs(ctx: &Ctx, plan: &Plan) -> Result<u64> {
    let mut total = 0;
    for n in &plan.entities {
        let e = ctx.mapping.entity(n)?;
        total += ctx.source.count_window(e, &plan.range).await?;
    }
    Ok(total)
}

async fn worker(
    ctx: Arc<Ctx>,
    ledger: Arc<Ledger>,
    locks: Arc<LaneLocks>,
    abort: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    reads_ahead: bool,
) -> Result<()> {
    // The chunk this worker will likely claim next, its first pages read while the current
    // one is written (as `run` reads its next window ahead).
    let mut ahead: Option<(String, Opened)> = None;
    loop {
        if ctx.stop.load(Ordering::SeqCst) || abort.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(chunk) = ledger.claim(&locks).await? else {
            return Ok(());
        };
        ctx.set_fence(Some(chunk.fence(&locks, &ledger.id, &ledger.holder)));
        let opened = ahead
            .take()
            .filter(|(lane, _)| *lane == chunk.lane)
            .map(|a| a.1);
        if reads_ahead {
            ahead = read_ahead(&ctx, &ledger, &chunk).await?;
        }
        let result = run_chunk(&ctx, &chunk, opened).await;
        ctx.set_fence(None);
        let settled = settle(&ctx, &ledger, &locks, &chunk, result, &abort).await;
        match settled {
            Ok(c) => {
                let mut t = tally.lock().expect("tally lock");
                t.0 += 1;
                t.1.add(&c);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Record how a chunk ended in the ledger, then free its lock (in that order: a worker that
/// takes the lock next sees the chunk's final state). A chunk whose lock was lost is left
/// alone: it is no longer this worker's to record.
async fn settle(
    ctx: &Ctx,
    ledger: &Ledger,
    locks: &LaneLocks,
    chunk: &Chunk,
    result: Result<Counts>,
    abort: &AtomicBool,
) -> Result<Counts> {
    let e = match result {
        Ok(c) => return record_end(ctx, ledger, locks, chunk, Ok(c), abort).await,
        Err(e) => e,
    };
    let lost = e.chain().any(|c| c.is::<LostLane>())
        || locks.check(Duration::from_secs(10)).await.is_err();
    if !lost {
        return record_end(ctx, ledger, locks, chunk, Err(e), abort).await;
    }
    abort.store(true, Ordering::SeqCst);
    Err(e.context(format!(
        "this worker lost the lock of chunk {} of {} (its lock session ended); it stopped \
         without writing more, and another worker can take the chunk over at once",
        chunk.window, chunk.entity
    )))
}

/// [`settle`] for a chunk this worker still holds.
async fn record_end(
    ctx: &Ctx,
    ledger: &Ledger,
    locks: &LaneLocks,
    chunk: &Chunk,
    result: Result<Counts>,
    abort: &AtomicBool,
) -> Result<Counts> {
    let state = match &result {
        Ok(c) => ("done", chunk_counts(c), None),
        Err(_) if ctx.stop.load(Ordering::SeqCst) => ("pending", ChunkCounts::default(), None),
        Err(e) => {
            abort.store(true, Ordering::SeqCst);
            let msg = crate::secret::redact_uri(&format!("{e:#}"));
            ("failed", ChunkCounts::default(), Some(msg))
        }
    };
    let recorded = ledger
        .set_state(chunk, state.0, state.1, state.2.as_deref())
        .await;
    if state.0 == "done" {
        // Nobody claims a finished chunk again: its lock file can go.
        locks.unlock_and_forget(&chunk.lane).await?;
    } else {
        locks.unlock(&chunk.lane).await?;
    }
    if !recorded? {
        warn!(lane = %chunk.lane, "the chunk's ledger row no longer names this worker (rolled back meanwhile?)");
    }
    result.map_err(|e| {
        if state.0 == "failed" {
            e.context(format!("chunk {} of {}", chunk.window, chunk.entity))
        } else {
            e
        }
    })
}

/// Start reading the chunk this worker will likely claim after `current` (the ledger's
/// guess, [`Ledger::peek_next`]), on the same terms as `run` reads ahead
/// ([`pipeline::reads_ahead`]). Reading is all it does; what it read is used only if the
/// worker then claims that chunk and runs it from its start.
async fn read_ahead(
    ctx: &Ctx,
    ledger: &Ledger,
    current: &Chunk,
) -> Result<Option<(String, Opened)>> {
    let Some(next) = ledger.peek_next(current).await? else {
        return Ok(None);
    };
    let e = ctx.mapping.entity(&next.entity)?;
    if !pipeline::reads_ahead(ctx, e) {
        return Ok(None);
    }
    Ok(Some((
        next.lane,
        pipeline::open_window(ctx, e, next.window, None),
    )))
}

/// Run one chunk from its checkpoint (a chunk whose checkpoint is already complete was
/// finished by a worker that died before updating the ledger). `opened`: the chunk's pages
/// read ahead from its start, used when the checkpoint says the chunk starts from there.
async fn run_chunk(ctx: &Arc<Ctx>, c: &Chunk, opened: Option<Opened>) -> Result<Counts> {
    let e = ctx.mapping.entity(&c.entity)?.clone();
    let cp = ctx.sink.load_checkpoint(&c.lane).await?;
    if let Some(cp) = &cp {
        if cp.state.open.is_none() && cp.state.watermark.is_some_and(|w| w >= c.window.to) {
            return Ok(Counts::default());
        }
    }
    let after = cp
        .filter(|cp| cp.state.open == Some(c.window))
        .and_then(|cp| cp.last);
    let outstanding = ctx.sink.has_outstanding(&e.name).await?;
    let (lane, w) = (&c.lane, c.window);
    let opened = opened.filter(|_| after.is_none());
    info!(entity = %c.entity, chunk = %w, resumed = after.is_some(), read_ahead = opened.is_some(), "backfill chunk started");
    let r = match (after, opened) {
        (None, Some(o)) => {
            pipeline::run_opened_window(ctx, &e, lane, None, w, o, outstanding).await?
        }
        (after, _) => pipeline::run_window(ctx, &e, lane, None, w, after, outstanding).await?,
    };
    Ok(r.counts)
}

/// A progress bar on a terminal, a log line every 10 s otherwise. Progress is read from
/// the ledger, so every worker shows the whole backfill. The documents to copy are the
/// plan's count; a plan that did not count them (cut by time, or one chunk of a small
/// collection) is counted beside the copy once the first line is due, so a short backfill
/// never pays for a count and a long one never waits for it (a count costs about what
/// reading the documents costs on some servers).
async fn show_progress(ctx: Arc<Ctx>, plan: Plan, start: Progress, done: Arc<AtomicBool>) {
    let (sink, id) = (ctx.sink.clone(), plan.id.clone());
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(10)
    };
    let mut total_docs = plan.docs;
    let mut counting = total_docs.is_none().then(|| {
        let plan = plan.clone();
        tokio::spawn(async move {
            tokio::time::sleep(every).await;
            count_docs(&ctx, &plan).await
        })
    });
    let bar = terminal.then(|| {
        let b = crate::telemetry::progress::docs_bar(total_docs.unwrap_or(0), start.docs_read);
        crate::telemetry::progress::set_active(Some(b.clone()));
        b
    });
    let started = Instant::now();
    let mut last = Instant::now();
    loop {
        let finished = done.load(Ordering::SeqCst);
        if let Some(c) = counting.take_if(|c| c.is_finished()) {
            total_docs = c.await.ok().and_then(Result::ok);
        }
        if finished || last.elapsed() >= every {
            last = Instant::now();
            if let Ok(p) = Ledger::progress(&sink, &id).await {
                show_line(bar.as_ref(), &id, &p, total_docs, start, started);
            }
        }
        if finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(c) = counting {
        c.abort();
    }
    if let Some(b) = bar {
        b.finish_and_clear();
        crate::telemetry::progress::set_active(None);
    }
}

/// One update of the progress bar, or one progress log line (`total`: documents to copy,
/// when known).
fn show_line(
    bar: Option<&indicatif::ProgressBar>,
    id: &str,
    p: &Progress,
    total: Option<u64>,
    start: Progress,
    started: Instant,
) {
    let docs = p.docs_read;
    match bar {
        Some(b) => {
            b.set_length(total.unwrap_or(docs).max(docs));
            b.set_position(docs);
            b.set_message(format!("chunks {}/{}", p.done, p.total));
        }
        None => {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let rate = docs.saturating_sub(start.docs_read) as f64 / secs;
            let left = total.map(|t| t.saturating_sub(docs));
            let eta = left
                .filter(|_| rate > 0.0)
                .map(|l| (l as f64 / rate).round() as i64);
            info!(backfill = %id, chunks_done = p.done, chunks_total = p.total, chunks_running = p.running,
                  docs, docs_total = total.map_or(-1, |t| t as i64), docs_per_s = rate.round() as u64,
                  eta_s = eta.unwrap_or(-1), "backfill progress");
        }
    }
}

fn chunk_counts(c: &Counts) -> ChunkCounts {
    ChunkCounts {
        read: c.read,
        written: c.written,
        dead_lettered: c.dead_lettered,
    }
}
