//! `tidemark prune --older-than 90d [--dry-run]`: retention. Removes the report files,
//! ledger rows and provenance of runs that finished before the cutoff, so a nightly timer
//! does not grow them forever; the daemon calls [`prune`] after each successful scheduled
//! run when `[retention] older_than` is set.
//!
//! What is never removed, whatever its age: a run still recorded as running (and its
//! report), and the ledger row of each entity's newest finished catch-up run among those
//! `tidemark status` reads (its last result and last run time); that run's provenance goes
//! like any other, so it cannot be rolled back either. Checkpoints, backfill ledgers, dead
//! letters, missing references and pending rows are not touched: resuming a window or a
//! backfill reads only those. A pruned run is recorded in `tidemark_pruned_runs`, so
//! `tidemark rollback` says it was pruned instead of doing a partial rollback.

use crate::commands::setup::load_mapping;
use crate::commands::status::{last_run_of, RECENT_RUNS};
use crate::exit::Failure;
use crate::settings::{check_retention, Settings};
use crate::sink::retention::{self, OldRun, Removed};
use crate::sink::{monitor, runs, Sink};
use crate::span::fmt_ts;
use anyhow::{anyhow, Result};
use chrono::{DateTime, Utc};
use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

/// What was (or, dry, would be) pruned.
#[derive(Debug, Default, Clone)]
pub struct PruneReport {
    pub dry_run: bool,
    pub cutoff: Option<DateTime<Utc>>,
    /// Runs that finished before the cutoff and lose their provenance now.
    pub runs: u64,
    pub removed: Removed,
    /// Ledger rows kept because `status` reads them: `(run id, entities)`.
    pub kept_for_status: Vec<(String, Vec<String>)>,
    pub report_files: u64,
    pub report_bytes: u64,
}

impl fmt::Display for PruneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        let cutoff = self.cutoff.map(fmt_ts).unwrap_or_default();
        if self.dry_run {
            writeln!(f, "DRY RUN, nothing changed (cutoff {cutoff}):")?;
        }
        writeln!(
            f,
            "reports:    {verb} {} file(s), {} bytes",
            self.report_files, self.report_bytes
        )?;
        let kept: Vec<String> = self
            .kept_for_status
            .iter()
            .map(|(id, es)| format!("{id} ({})", es.join(", ")))
            .collect();
        writeln!(
            f,
            "runs:       {verb} {} ledger row(s) of runs finished before {cutoff}; kept {} for status{}",
            self.removed.ledger_rows,
            kept.len(),
            if kept.is_empty() {
                String::new()
            } else {
                format!(": {}", kept.join("; "))
            }
        )?;
        writeln!(
            f,
            "provenance: {verb} {} record(s), ~{} bytes, of {} run(s) (they can no longer be rolled back)",
            self.removed.provenance_records, self.removed.provenance_bytes, self.runs
        )?;
        write!(
            f,
            "run lanes:  {verb} {} checkpoint capture(s)",
            self.removed.lane_rows
        )
    }
}

/// `tidemark prune`: `older_than` from the flag, else from `[retention] older_than`.
pub async fn prune(
    s: &Settings,
    older_than: Option<Duration>,
    dry_run: bool,
) -> Result<PruneReport> {
    let older_than = match older_than {
        Some(d) => {
            check_retention(d, "--older-than").map_err(Failure::Config)?;
            d
        }
        None => s.retention.older_than().map_err(Failure::Config)?.ok_or_else(|| {
            Failure::Config(anyhow!(
                "no retention given: pass --older-than (e.g. --older-than 90d) or set [retention] older_than"
            ))
        })?,
    };
    let cutoff = Utc::now()
        - chrono::Duration::from_std(older_than)
            .map_err(|e| Failure::Config(anyhow!("--older-than is too long: {e}")))?;
    let mapping = load_mapping(s)?;
    let sink = if dry_run {
        crate::commands::setup::open_sink_dry(s, &mapping).await?
    } else {
        // Only the tool's tables matter here (an older target gets tidemark_pruned_runs).
        let sink = Sink::connect(&s.target.url, 1)
            .await
            .map_err(Failure::Unavailable)?;
        sink.migrate_tool_tables().await?;
        sink
    };
    let result = prune_target(s, &sink, &mapping, cutoff, dry_run).await;
    sink.close().await;
    result
}

async fn prune_target(
    s: &Settings,
    sink: &Sink,
    mapping: &crate::mapping::Mapping,
    cutoff: DateTime<Utc>,
    dry_run: bool,
) -> Result<PruneReport> {
    let mut rep = PruneReport {
        dry_run,
        cutoff: Some(cutoff),
        ..Default::default()
    };
    // What status reads: each entity's newest finished run among the newest catch-ups.
    let recent = monitor::recent_runs(sink, RECENT_RUNS).await?;
    let mut for_status: Vec<(String, Vec<String>)> = Vec::new();
    for e in &mapping.entities {
        if let Some((run, _)) = last_run_of(&recent, &e.name) {
            match for_status.iter_mut().find(|(id, _)| *id == run.id) {
                Some((_, es)) => es.push(e.name.clone()),
                None => for_status.push((run.id.clone(), vec![e.name.clone()])),
            }
        }
    }
    let old = retention::old_runs(sink, cutoff).await?;
    let mut keep_files: HashSet<String> = monitor::running_runs(sink)
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect();
    for run in &old {
        let status_needs = for_status.iter().find(|(id, _)| *id == run.id);
        if let Some(kept) = status_needs {
            keep_files.insert(run.id.clone());
            if run.pruned_before {
                continue;
            }
            rep.kept_for_status.push(kept.clone());
        }
        rep.runs += u64::from(!run.pruned_before);
        rep.removed += prune_one(sink, run, status_needs.is_some(), dry_run).await?;
    }
    for f in runs::report_files(&s.reports_path())? {
        if keep_files.contains(&f.run_id) || DateTime::<Utc>::from(f.modified) >= cutoff {
            continue;
        }
        if !dry_run {
            std::fs::remove_file(&f.path).map_err(|e| {
                anyhow!(
                    "cannot remove the report {} (reports_dir): {e}",
                    f.path.display()
                )
            })?;
        }
        rep.report_files += 1;
        rep.report_bytes += f.bytes;
    }
    Ok(rep)
}

async fn prune_one(sink: &Sink, run: &OldRun, keep_row: bool, dry_run: bool) -> Result<Removed> {
    if dry_run {
        retention::count(sink, run, keep_row).await
    } else {
        retention::prune_run(sink, run, keep_row).await
    }
}

/// The error `rollback` (and `runs show`) give for a run whose provenance was pruned.
pub fn pruned_error(p: &retention::PrunedRun) -> anyhow::Error {
    Failure::Config(anyhow!(
        "run {} ({} {}, started {}, finished {}) was pruned on {} by `tidemark prune` (it was older \
         than the retention): its provenance is gone, so it can no longer be rolled back. Nothing \
         was changed. Runs that can still be rolled back: `tidemark runs`",
        p.id,
        p.kind,
        p.status,
        fmt_ts(p.started),
        p.finished.map(fmt_ts).unwrap_or_else(|| "-".into()),
        fmt_ts(p.pruned)
    ))
    .into()
}
