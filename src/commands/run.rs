//! `tidemark run`: catch every selected entity up, or migrate single records (`--id`).

use crate::cli::RunArgs;
use crate::commands::lifecycle::{outcome, RunLog};
use crate::commands::setup::{load_mapping, open_sink, open_sink_dry};
use crate::engine::lane::{Lease, LockOptions};
use crate::engine::pipeline::{self, Counts, Ctx, EntityReport, RowsWritten};
use crate::engine::select::Selection;
use crate::engine::window::fmt_ts;
use crate::exit::Failure;
use crate::mapping::Mapping;
use crate::settings::Settings;
use crate::sink::{GroupCommit, Sink, SqliteTuning};
use crate::source::Source;
use crate::telemetry::metrics;
use crate::timearg;
use anyhow::Result;
use serde::Serialize;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};
/// The result of `tidemark run`.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub run_id: String,
    /// Nothing was written: the counts say what a real run would have done.
    pub dry_run: bool,
    pub entities: Vec<EntityReport>,
    pub totals: Counts,
    /// Every row written: main, child and pulled (`totals.written` counts main rows only).
    pub rows_written: RowsWritten,
    pub elapsed_ms: u64,
    /// Where the JSON report was written.
    #[serde(skip)]
    pub report_file: Option<String>,
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<18} {:>8} {:>8} {:>9} {:>6} {:>8} {:>7} {:>7} {:>7} {:>8} {:>7}  watermark",
            "entity",
            "read",
            "written",
            "unchanged",
            "dead",
            "filtered",
            "deleted",
            "pulled",
            "missing",
            "deferred",
            "badtime"
        )?;
        for e in &self.entities {
            let c = &e.counts;
            writeln!(
                f,
                "{:<18} {:>8} {:>8} {:>9} {:>6} {:>8} {:>7} {:>7} {:>7} {:>8} {:>7}  {}",
                e.entity,
                c.read,
                c.written,
                c.unchanged,
                c.dead_lettered,
                c.filtered,
                c.deleted,
                c.pulled,
                c.missing_refs,
                c.deferred,
                c.invalid_time,
                e.watermark.map(fmt_ts).unwrap_or_else(|| "-".into())
            )?;
        }
        let secs = self.elapsed_ms as f64 / 1000.0;
        if self.dry_run {
            let t = &self.totals;
            writeln!(
                f,
                "DRY RUN, nothing written: would insert {}, update {}, leave {} unchanged, \
                 dead-letter {}, pull {} documents on demand ({} rows)",
                t.inserted, t.updated, t.unchanged, t.dead_lettered, t.pulled, t.pulled_written
            )?;
        }
        if let Some(p) = &self.report_file {
            writeln!(f, "report: {p}")?;
        }
        let rows = self.totals.rows_written();
        write!(
            f,
            "run {}: {} documents read, {} rows written ({} main, {} child, {} pulled) in {:.1}s ({:.0} documents/s)",
            self.run_id,
            self.totals.read,
            rows.total,
            rows.main,
            rows.child,
            rows.pulled,
            secs,
            self.totals.read as f64 / secs.max(0.001)
        )
    }
}

/// Options of a catch-up run.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    pub entities: Vec<String>,
    pub until: Option<String>,
    /// Wait for lanes held by another process instead of failing with exit code 4.
    pub wait: bool,
    /// Read, map and resolve everything but roll every batch back: nothing is written.
    pub dry_run: bool,
    /// Migrate only these records (by the entity's `id_field`), regardless of windows.
    pub ids: Vec<String>,
}

/// The settings a run's target pool is opened with. On SQLite a run writes one batch at a
/// time (`target.batches_in_flight` is 1 there) on one connection, which the resolve stage
/// shares: a SQLite connection discards its page cache whenever another connection commits,
/// so batches rotating over a pool of two found their `target.sqlite_cache_mib` cache cold
/// each time (full VizHub mapping, 50,000 vizzes, 64 MiB cache: 13.1 s of system time with
/// two connections, 10.2 s with one; BENCHMARKS.md, "SQLite that scales"). Each connection
/// also keeps a cache of its own, so one is also the least memory. A backfill sizes its own
/// pool (its chunks write at once).
fn run_pool(s: &Settings) -> Settings {
    let mut pool = s.clone();
    if s.target.is_sqlite() {
        pool.target.max_connections = 1;
    }
    pool
}

/// Whether the run's batches share SQLite transactions (`target.sqlite_group_commit_ms`,
/// `sink::group`): on the one connection of a SQLite run that writes.
fn group_commits(pool: &Settings, dry_run: bool) -> Option<GroupCommit> {
    let ms = pool.target.sqlite_group_commit_ms;
    (pool.target.is_sqlite() && pool.target.max_connections == 1 && ms > 0 && !dry_run)
        .then(|| GroupCommit::new(std::time::Duration::from_millis(u64::from(ms))))
}

/// `tidemark run` from the command line: run, write the metrics textfile when asked, print
/// the report.
pub async fn execute(s: Settings, args: RunArgs, stop: Arc<AtomicBool>) -> Result<i32> {
    if args.textfile.is_some() {
        metrics::install();
    }
    let opts = RunOptions {
        entities: args.entities,
        until: args.until,
        wait: args.wait,
        dry_run: args.dry_run,
        ids: args.ids,
    };
    let result = run(s, opts, stop).await;
    if let Some(path) = &args.textfile {
        // A textfile failure must not hide the run's own error.
        match (metrics::write_textfile(path, chrono::Utc::now()), &result) {
            (Err(e), Ok(_)) => return Err(e),
            (Err(e), Err(_)) => {
                tracing::error!(error = %format!("{e:#}"), "metrics textfile not written")
            }
            _ => {}
        }
    }
    println!("{}", result?);
    Ok(crate::exit::OK)
}

/// `tidemark run`: catch every selected entity up (or, with `ids`, migrate single records).
/// Every run that is not a dry run is counted in the metrics once, by its result, whatever
/// stage it ended at (settings, connection, lanes, a window, the report).
pub async fn run(s: Settings, opts: RunOptions, stop: Arc<AtomicBool>) -> Result<RunReport> {
    let started = Instant::now();
    let dry_run = opts.dry_run;
    let result = run_counted(s, opts, stop).await;
    if !dry_run {
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => match crate::exit::code(e) {
                crate::exit::LOCK_HELD => "lock_held",
                crate::exit::PARTIAL => "partial",
                _ => "failed",
            },
        };
        let elapsed = started.elapsed().as_millis() as u64;
        metrics::record_run(label, elapsed, chrono::Utc::now());
        metrics::set_in_progress(false);
    }
    result
}

/// Publish what waits for each entity after a run: its backlog in the source (documents at
/// or after the watermark) and its outstanding dead letters. Best effort: a failure only
/// leaves the gauges as they were.
pub async fn observe_outstanding(
    sink: &Sink,
    source: &Source,
    mapping: &Mapping,
    names: &[String],
) {
    for n in names {
        let result: Result<()> = async {
            let e = mapping.entity(n)?;
            let wm = sink
                .load_checkpoint(&pipeline::nightly_lane(n))
                .await?
                .and_then(|c| c.state.watermark);
            let backlog = match wm {
                Some(w) => Some(source.count_since(e, w).await?),
                None => None,
            };
            let dead = sink.dead_letter_count(n).await?;
            metrics::record_outstanding(n, backlog, dead);
            Ok(())
        }
        .await;
        if let Err(e) = result {
            warn!(entity = %n, error = %crate::secret::redact_uri(&format!("{e:#}")), "backlog and dead letters not counted for the metrics");
        }
    }
}

async fn run_counted(s: Settings, opts: RunOptions, stop: Arc<AtomicBool>) -> Result<RunReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let mapping = load_mapping(&s)?;
    let chosen = Selection::new(&mapping, &opts.entities).or_configured(&s.sync.entities);
    let names = if opts.ids.is_empty() {
        chosen.windows()?
    } else {
        vec![chosen.one()?]
    };
    if !opts.dry_run {
        metrics::entities(&names);
    }
    let until = parse_until(opts.until.as_deref())?;
    let source = Source::connect(&s.source)
        .await
        .map_err(Failure::Unavailable)?;
    let pool = run_pool(&s);
    let sink = if opts.dry_run {
        open_sink_dry(&pool, &mapping).await?
    } else {
        open_sink(&pool, &mapping).await?
    };
    let lease = take_lanes(&s, &sink, &opts, &names, stop.clone()).await?;
    if !opts.dry_run {
        metrics::set_in_progress(true);
    }
    let kind = if opts.ids.is_empty() { "run" } else { "record" };
    let log = RunLog::start(&s, &sink, kind, opts.dry_run, &mapping.version, started_at).await?;
    let run_id = log.id().to_owned();
    info!(run_id = %run_id, dry_run = opts.dry_run, target_url = %s.target.url, source_uri = %s.source.uri, "run started");
    let group = match group_commits(&pool, opts.dry_run) {
        Some(g) => Some(g.with_reader(&sink, SqliteTuning::of(&pool.target)).await),
        None => None,
    };
    let mut ctx = Ctx::new(s, mapping, source, sink, run_id, stop);
    ctx.dry_run = opts.dry_run;
    ctx.group = group;
    let ctx = Arc::new(ctx);
    let mut done = catch_up_each(&ctx, &names, &opts.ids, until, lease.as_ref()).await?;
    if let Some(lease) = lease.as_ref().filter(|l| l.is_lost()) {
        if done.result.is_ok() {
            done.result = Err(anyhow::anyhow!(
                "the lease on {:?} was lost during the run (another process took a lane over after it expired); \
                 check lock.lease against how long the target stalls",
                lease.lanes()
            ));
        }
    }
    let (report, result) = write_report(&ctx, &log, done, started).await?;
    if !opts.dry_run {
        observe_outstanding(&ctx.sink, &ctx.source, &ctx.mapping, &names).await;
    }
    if let Some(lease) = lease {
        if let Err(e) = lease.release().await {
            warn!(error = %format!("{e:#}"), "could not release the lane leases; they expire after lock.lease");
        }
    }
    if let Some(g) = &ctx.group {
        g.close_reader().await;
    }
    if !opts.dry_run {
        ctx.sink.checkpoint_wal().await;
    }
    ctx.sink.close().await;
    result.map(|_| report)
}

/// `--until`: where the windows stop instead of now minus `sync.settle`.
fn parse_until(until: Option<&str>) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    let at = until
        .map(|u| timearg::parse_instant(u, chrono::Utc::now()))
        .transpose()
        .map_err(Failure::Config)?;
    Ok(at.map(crate::engine::window::to_millis))
}

/// Take the entities' nightly lanes, or none: single records move no checkpoint and a dry
/// run writes nothing. When they cannot be taken the sink is closed before the error.
async fn take_lanes(
    s: &Settings,
    sink: &Sink,
    opts: &RunOptions,
    names: &[String],
    stop: Arc<AtomicBool>,
) -> Result<Option<Lease>> {
    if opts.dry_run || !opts.ids.is_empty() {
        return Ok(None);
    }
    let lanes: Vec<String> = names.iter().map(|n| pipeline::nightly_lane(n)).collect();
    let lock_opts = LockOptions {
        lease: s.lock.lease,
        wait: opts.wait,
    };
    match crate::engine::lane::acquire(sink, &lanes, lock_opts, stop).await {
        Ok(l) => Ok(Some(l)),
        Err(e) => {
            sink.close().await;
            Err(e)
        }
    }
}

/// What the entities' catch-ups gave: a report for each one that finished, in order, and
/// the error that stopped the run with the entity it stopped at.
struct Done {
    reports: Vec<EntityReport>,
    result: Result<()>,
    failed_entity: Option<String>,
}

/// Catch each entity up in turn (or, with `ids`, migrate those records of the one entity),
/// stopping at the first error; each finished entity is counted in the metrics. An error
/// here (an entity the mapping lacks) ends the run before its report.
async fn catch_up_each(
    ctx: &Arc<Ctx>,
    names: &[String],
    ids: &[String],
    until: Option<chrono::DateTime<chrono::Utc>>,
    lease: Option<&Lease>,
) -> Result<Done> {
    let mut done = Done {
        reports: Vec::new(),
        result: Ok(()),
        failed_entity: None,
    };
    for n in names {
        let e = ctx.mapping.entity(n)?;
        // Every batch of this entity's lane commits only while its lock is still ours.
        ctx.set_fence(lease.and_then(|l| l.fence(&pipeline::nightly_lane(n))));
        let r = if ids.is_empty() {
            pipeline::catch_up(ctx, e, until).await
        } else {
            crate::commands::record::migrate_records(ctx, e, ids).await
        };
        ctx.set_fence(None);
        // The entity's last batches are durable before the next entity (or the report).
        let r = match (r, ctx.commit_group().await) {
            (Ok(_), Err(e)) => Err(e),
            (r, _) => r,
        };
        match r {
            Ok(r) => {
                if !ctx.dry_run {
                    metrics::record_entity(&r.totals(), chrono::Utc::now());
                }
                done.reports.push(r);
            }
            Err(err) => {
                done.failed_entity = Some(n.clone());
                done.result = Err(err);
                break;
            }
        }
    }
    Ok(done)
}

/// The run's report, closed in the ledger and written to its file (a file that cannot be
/// written is only a warning), with the run's result.
async fn write_report(
    ctx: &Ctx,
    log: &RunLog,
    done: Done,
    started: Instant,
) -> Result<(RunReport, Result<()>)> {
    let mut totals = Counts::default();
    for r in &done.reports {
        totals.add(&r.counts);
    }
    let mut report = RunReport {
        run_id: ctx.run_id.clone(),
        dry_run: ctx.dry_run,
        entities: done.reports,
        rows_written: totals.rows_written(),
        totals,
        elapsed_ms: started.elapsed().as_millis() as u64,
        report_file: None,
    };
    let mut json = serde_json::to_value(&report)?;
    let status = outcome(&done.result, &mut json, true);
    if let Some(n) = &done.failed_entity {
        json["failed_entity"] = serde_json::Value::String(n.clone());
    }
    match log.finish(&ctx.sink, status, &json).await {
        Ok(p) => report.report_file = Some(p.display().to_string()),
        Err(e) => warn!(error = %format!("{e:#}"), "run report file not written"),
    }
    Ok((report, done.result))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_on_sqlite_pools_one_connection() {
        let mut s = Settings::load(None).expect("defaults are valid");
        s.target.url = crate::secret::SecretUri::new("sqlite://state/x.db");
        s.target.max_connections = 4;
        assert_eq!(run_pool(&s).target.max_connections, 1);
        s.target.max_connections = 1;
        assert_eq!(run_pool(&s).target.max_connections, 1);
        s.target.max_connections = 6;
        s.target.url = crate::secret::SecretUri::new("postgres://u@h/db");
        assert_eq!(
            run_pool(&s).target.max_connections,
            6,
            "PostgreSQL keeps its pool"
        );
    }
}
