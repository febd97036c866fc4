//! `tidemark rollback --run ID [--dry-run] [--force]`: undo one run from its provenance.
//!
//! Rows the run inserted are deleted, rows it changed or deleted get their before-image
//! back, and every lane the run moved gets its previous checkpoint back (a backfill chunk
//! goes back to `pending`), so the next run repeats the window. Rows the tool never wrote
//! have no provenance and are never touched. A row changed by someone else since the run
//! (its content no longer matches what the run left) is a conflict: reported and left
//! alone unless `--force`. Later runs that touched the same rows or lanes must be rolled
//! back first (newest first). Everything happens in one transaction; with `--dry-run`
//! that transaction is rolled back, so the report says exactly what would happen.

use crate::commands::lifecycle::{outcome, RunLog};
use crate::exit::Failure;
use crate::settings::Settings;
pub use crate::sink::undo::{RollbackReport, TableTally};
use anyhow::{anyhow, Result};
use std::time::Instant;

/// `tidemark rollback`.
pub async fn rollback(
    mut s: Settings,
    run: &str,
    dry_run: bool,
    force: bool,
) -> Result<RollbackReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    // The undo runs in one transaction on one connection, and the lease's heartbeat needs a
    // second; on SQLite the pool's connections share the page cache budget
    // (`SqliteTuning::of`), so a pool of two gives the undo half of it instead of a
    // quarter (a dry run of a 200,000-viz run: 66 s against 81 s; BENCHMARKS.md, "Session 25").
    if s.target.is_sqlite() {
        s.target.max_connections = s.target.max_connections.min(2);
    }
    let mapping = crate::commands::setup::load_mapping(&s)?;
    let sink = crate::commands::setup::open_sink_dry(&s, &mapping).await?;
    if let Some(p) = crate::sink::retention::pruned(&sink, run).await? {
        sink.close().await;
        return Err(crate::commands::prune::pruned_error(&p));
    }
    let target = crate::sink::runs::get(&sink, run).await?.ok_or_else(|| {
        Failure::Config(anyhow!(
            "there is no run {run} in tidemark_runs; `tidemark runs` lists them (dry runs wrote nothing to roll back)"
        ))
    })?;
    if target.status == "rolled_back" {
        return Err(Failure::Config(anyhow!("run {run} is already rolled back")).into());
    }
    let started_ms = chrono::DateTime::parse_from_rfc3339(&target.started_at)
        .map(|d| d.timestamp_millis())
        .unwrap_or(0);
    let later = crate::sink::undo::later_runs(&sink, run, started_ms).await?;
    if !later.is_empty() {
        let ids: Vec<&str> = later.iter().map(|(id, _)| id.as_str()).collect();
        return Err(Failure::Config(anyhow!(
            "later runs touched the same rows or checkpoints: {}. Roll them back first, newest first \
             (tidemark rollback --run {}), then this one",
            ids.join(", "),
            ids[0]
        ))
        .into());
    }
    let lanes_of_run = crate::sink::undo::lanes_of_run(&sink, run).await?;
    let nightly: Vec<String> = lanes_of_run
        .iter()
        .map(|l| l.0.clone())
        .filter(|l| l.starts_with("nightly:"))
        .collect();
    let lease = if dry_run || nightly.is_empty() {
        None
    } else {
        let opts = crate::engine::lane::LockOptions {
            lease: s.lock.lease,
            wait: false,
        };
        Some(crate::engine::lane::acquire(&sink, &nightly, opts, Default::default()).await?)
    };
    let log = RunLog::start(&s, &sink, "rollback", dry_run, &mapping.version, started_at).await?;
    let id = log.id().to_owned();
    let mut rep = RollbackReport {
        run_id: id.clone(),
        rolled_back_run: run.to_owned(),
        dry_run,
        ..Default::default()
    };
    let result = crate::sink::undo::undo_run(
        &sink,
        &mapping,
        run,
        &lanes_of_run,
        force,
        dry_run,
        &mut rep,
    )
    .await;
    rep.elapsed_ms = started.elapsed().as_millis() as u64;
    let mut json = serde_json::to_value(&rep)?;
    let mut status = outcome(&result, &mut json, false);
    if result.is_ok() && rep.conflict_count > 0 && !force {
        status = "partial";
    }
    let file = log.finish(&sink, status, &json).await;
    rep.report_file = file.ok().map(|p| p.display().to_string());
    if let Some(l) = lease {
        let _ = l.release().await;
    }
    sink.close().await;
    result?;
    if rep.conflict_count > 0 && !force {
        println!("{rep}");
        return Err(Failure::Partial(format!(
            "{} row(s) were changed by someone else since run {run}; nothing was rolled back. \
             Inspect them, then run again with --force to overwrite them with their state before the run",
            rep.conflict_count
        ))
        .into());
    }
    Ok(rep)
}
