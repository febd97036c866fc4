//! Retention in the target (`tidemark prune`): which finished runs are older than a cutoff,
//! what pruning them would remove, and the pruning itself, one run per transaction: its
//! provenance (`tidemark_provenance`) and lane captures (`tidemark_run_lanes`) go, its ledger
//! row goes unless the caller keeps it, and a row in `tidemark_pruned_runs` records when,
//! so `tidemark rollback` can tell a pruned run from one that never existed.

use super::{from_ms, ms, with_pool, BeginWrite, Sink};
use anyhow::Result;
use chrono::{DateTime, Utc};

/// A finished run older than the cutoff.
#[derive(Debug, Clone)]
pub struct OldRun {
    pub id: String,
    pub kind: String,
    pub status: String,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// Pruned before (its ledger row was kept): only its row can still go.
    pub pruned_before: bool,
}

/// What pruning one run removes (or, counted, would remove).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub ledger_rows: u64,
    pub provenance_records: u64,
    /// Characters of before-images, after-hashes and inserted-key lists in those records.
    pub provenance_bytes: u64,
    pub lane_rows: u64,
}

impl std::ops::AddAssign for Removed {
    fn add_assign(&mut self, o: Removed) {
        self.ledger_rows += o.ledger_rows;
        self.provenance_records += o.provenance_records;
        self.provenance_bytes += o.provenance_bytes;
        self.lane_rows += o.lane_rows;
    }
}

/// A run whose provenance was pruned.
#[derive(Debug, Clone)]
pub struct PrunedRun {
    pub id: String,
    pub kind: String,
    pub status: String,
    pub started: DateTime<Utc>,
    pub finished: Option<DateTime<Utc>>,
    pub pruned: DateTime<Utc>,
}

/// Runs that are not running and finished before `cutoff`, oldest first. A run still
/// recorded as running is never among them, however old (its process may be alive).
pub async fn old_runs(sink: &Sink, cutoff: DateTime<Utc>) -> Result<Vec<OldRun>> {
    let sql = "SELECT r.id, r.kind, r.status, r.started_at_ms, r.finished_at_ms, \
               p.id IS NOT NULL FROM tidemark_runs r LEFT JOIN tidemark_pruned_runs p ON p.id = r.id \
               WHERE r.status <> 'running' AND r.finished_at_ms IS NOT NULL AND r.finished_at_ms < $1 \
               ORDER BY r.started_at_ms, r.id";
    let rows: Vec<(String, String, String, i64, Option<i64>, bool)> =
        with_pool!(sink, p => sqlx::query_as(sql).bind(ms(cutoff)).fetch_all(p).await?);
    Ok(rows
        .into_iter()
        .map(
            |(id, kind, status, started_ms, finished_ms, pruned_before)| OldRun {
                id,
                kind,
                status,
                started_ms,
                finished_ms,
                pruned_before,
            },
        )
        .collect())
}

const COUNT_PROVENANCE: &str = "SELECT COUNT(*), COALESCE(SUM(COALESCE(LENGTH(before_image), 0) \
    + COALESCE(LENGTH(after_hash), 0) + COALESCE(LENGTH(inserted), 0)), 0) \
    FROM tidemark_provenance WHERE run_id = $1";
const COUNT_LANES: &str = "SELECT COUNT(*) FROM tidemark_run_lanes WHERE run_id = $1";

/// What [`prune_run`] would remove for `run` (read only).
pub async fn count(sink: &Sink, run: &OldRun, keep_row: bool) -> Result<Removed> {
    let (records, bytes): (i64, i64) = with_pool!(sink, p => sqlx::query_as(COUNT_PROVENANCE)
        .bind(&run.id).fetch_one(p).await?);
    let lanes: i64 =
        with_pool!(sink, p => sqlx::query_scalar(COUNT_LANES).bind(&run.id).fetch_one(p).await?);
    Ok(Removed {
        ledger_rows: u64::from(!keep_row),
        provenance_records: records as u64,
        provenance_bytes: bytes as u64,
        lane_rows: lanes as u64,
    })
}

/// Prune one run in one transaction: record it in `tidemark_pruned_runs` (first time only),
/// delete its provenance and lane captures, and its ledger row unless `keep_row`. A run that
/// went back to `running` meanwhile (it cannot; ids are never reused) is left alone.
pub async fn prune_run(sink: &Sink, run: &OldRun, keep_row: bool) -> Result<Removed> {
    let mut out = Removed::default();
    with_pool!(sink, p => {
        let mut tx = p.begin_write().await?;
        sqlx::query(
            "INSERT INTO tidemark_pruned_runs (id, kind, status, started_at_ms, finished_at_ms, pruned_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING")
            .bind(&run.id).bind(&run.kind).bind(&run.status).bind(run.started_ms)
            .bind(run.finished_ms).bind(ms(Utc::now()))
            .execute(&mut *tx).await?;
        let (records, bytes): (i64, i64) = sqlx::query_as(COUNT_PROVENANCE)
            .bind(&run.id).fetch_one(&mut *tx).await?;
        out.provenance_records = sqlx::query("DELETE FROM tidemark_provenance WHERE run_id = $1")
            .bind(&run.id).execute(&mut *tx).await?.rows_affected();
        debug_assert_eq!(out.provenance_records, records as u64);
        out.provenance_bytes = bytes as u64;
        out.lane_rows = sqlx::query("DELETE FROM tidemark_run_lanes WHERE run_id = $1")
            .bind(&run.id).execute(&mut *tx).await?.rows_affected();
        if !keep_row {
            out.ledger_rows = sqlx::query("DELETE FROM tidemark_runs WHERE id = $1 AND status <> 'running'")
                .bind(&run.id).execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
    });
    Ok(out)
}

/// The record of a pruned run, if `id` was pruned.
pub async fn pruned(sink: &Sink, id: &str) -> Result<Option<PrunedRun>> {
    let row: Option<(String, String, String, i64, Option<i64>, i64)> = with_pool!(sink, p => sqlx::query_as(
        "SELECT id, kind, status, started_at_ms, finished_at_ms, pruned_at_ms FROM tidemark_pruned_runs WHERE id = $1")
        .bind(id).fetch_optional(p).await?);
    Ok(row.map(|(id, kind, status, s, f, p)| PrunedRun {
        id,
        kind,
        status,
        started: from_ms(s),
        finished: f.map(from_ms),
        pruned: from_ms(p),
    }))
}
