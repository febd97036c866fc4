//! The life of one entry in the runs ledger, written once for every command that changes
//! (or, dry, would change) the target: `run`, `run --id`, `backfill`, `sweep`, `rollback`,
//! `dead-letters retry`. [`RunLog::start`] opens the ledger row (`status = 'running'`; a dry
//! run writes nothing to the target), [`outcome`] turns the command's result into a status
//! and puts its error (redacted) into the report, and [`RunLog::finish`] closes the row and
//! writes the report file (`tidemark runs show ID` reads either).

use crate::commands::setup::fingerprint;
use crate::engine::lane::{self, RunAlive};
use crate::settings::Settings;
use crate::sink::{runs, RunRecord, Sink};
use anyhow::Result;
use chrono::{DateTime, Utc};
use serde_json::Value as J;
use std::path::PathBuf;

/// One run's ledger entry, from its start to its report.
pub struct RunLog {
    pub record: RunRecord,
    started_at: DateTime<Utc>,
    reports_dir: PathBuf,
    /// The run's own lock, held from before its row is written until it is finished, so
    /// `status` and later runs can tell a live run from a dead one (a mutex only so that
    /// `finish(&self)` can give it back; never contended).
    alive: tokio::sync::Mutex<Option<RunAlive>>,
}

impl RunLog {
    /// A new run id; the ledger row is written unless the run is dry.
    pub async fn start(
        s: &Settings,
        sink: &Sink,
        kind: &str,
        dry_run: bool,
        mapping_version: &str,
        started_at: DateTime<Utc>,
    ) -> Result<RunLog> {
        let log = RunLog::new(s, kind, dry_run, mapping_version, started_at);
        if !dry_run {
            let alive = lane::run_alive(sink, &log.record.id).await?;
            sink.start_run(&log.record).await?;
            if let Err(e) = alive.record_abandoned(sink).await {
                tracing::warn!(error = %format!("{e:#}"), "could not check for abandoned runs");
            }
            *log.alive.lock().await = Some(alive);
        }
        Ok(log)
    }

    /// A run that never has a ledger row (a dry backfill): only its report file.
    /// `started_at`: when the command started (a dry run's report file shows it).
    pub fn new(
        s: &Settings,
        kind: &str,
        dry_run: bool,
        mapping_version: &str,
        started_at: DateTime<Utc>,
    ) -> RunLog {
        RunLog {
            record: RunRecord {
                id: uuid::Uuid::new_v4().to_string(),
                kind: kind.into(),
                dry_run,
                settings_fingerprint: fingerprint(s),
                mapping_version: mapping_version.to_owned(),
            },
            started_at,
            reports_dir: s.reports_path(),
            alive: tokio::sync::Mutex::new(None),
        }
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// Close the ledger row with `status` and `report` and write the report file (a dry
    /// run: only the file).
    pub async fn finish(&self, sink: &Sink, status: &str, report: &J) -> Result<PathBuf> {
        if self.record.dry_run {
            runs::finish_dry(
                &self.reports_dir,
                &self.record,
                crate::engine::lane::this_host(),
                self.started_at,
                status,
                report,
            )
        } else {
            let written =
                runs::finish(sink, &self.reports_dir, &self.record.id, status, report).await;
            if let Some(alive) = self.alive.lock().await.take() {
                alive.release().await;
            }
            written
        }
    }
}

/// The ledger status of a command's result, with the error (redacted) put into the report
/// as `error`. `partial_counts`: whether an error with exit code 3 (some windows committed)
/// is `partial` rather than `failed`; commands that cannot commit part of their work
/// record every error as `failed`.
pub fn outcome<T>(result: &Result<T>, report: &mut J, partial_counts: bool) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => {
            report["error"] = J::String(crate::secret::redact_uri(&format!("{e:#}")));
            if partial_counts && crate::exit::code(e) == crate::exit::PARTIAL {
                "partial"
            } else {
                "failed"
            }
        }
    }
}
