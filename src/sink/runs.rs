//! Run reports: every run, backfill, sweep, rollback and dead-letter retry leaves a row in
//! `tidemark_runs` and a JSON file under `reports_dir` (dry runs only the file: they write
//! nothing to the target). `tidemark runs` lists the ledger, `tidemark runs show ID` prints
//! one report. Error texts pass through `redact_uri`, so no secret reaches a report.

use crate::secret::redact_uri;
use crate::sink::with_pool;
use crate::sink::{from_ms, ms, RunRecord, Sink};
use crate::span::fmt_ts;
use anyhow::{anyhow, Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value as J};
use sqlx::Row;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One row of the runs ledger.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: String,
    pub kind: String,
    pub dry_run: bool,
    pub status: String,
    pub host: String,
    pub pid: i64,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub settings_fingerprint: String,
    pub mapping_version: String,
    pub report: Option<J>,
}

type RawRow = (
    String,
    String,
    bool,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    String,
    String,
    Option<String>,
);

const COLUMNS: &str = "id, kind, dry_run, status, host, pid, started_at_ms, finished_at_ms, \
    settings_fingerprint, mapping_version, report";

fn to_row(r: RawRow) -> RunRow {
    RunRow {
        id: r.0,
        kind: r.1,
        dry_run: r.2,
        status: r.3,
        host: r.4,
        pid: r.5,
        started_at: fmt_ts(from_ms(r.6)),
        finished_at: r.7.map(|t| fmt_ts(from_ms(t))),
        settings_fingerprint: r.8,
        mapping_version: r.9,
        report: r.10.and_then(|t| serde_json::from_str(&t).ok()),
    }
}

/// The latest runs, newest first (optionally of one kind).
pub async fn list(sink: &Sink, kind: Option<&str>, limit: i64) -> Result<Vec<RunRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM tidemark_runs WHERE ($1 IS NULL OR kind = $1) \
         ORDER BY started_at_ms DESC, id LIMIT $2"
    );
    let kind = kind.map(str::to_owned);
    let rows: Vec<RawRow> =
        with_pool!(sink, p => sqlx::query_as(&sql).bind(kind).bind(limit).fetch_all(p).await?);
    Ok(rows.into_iter().map(to_row).collect())
}

/// One run of the ledger.
pub async fn get(sink: &Sink, id: &str) -> Result<Option<RunRow>> {
    let sql = format!("SELECT {COLUMNS} FROM tidemark_runs WHERE id = $1");
    let row: Option<RawRow> =
        with_pool!(sink, p => sqlx::query_as(&sql).bind(id).fetch_optional(p).await?);
    Ok(row.map(to_row))
}

/// Write `doc` as `<dir>/<start>-<kind>-<id>.json` (temp file, fsync, rename).
pub fn write_file(dir: &Path, row: &RunRow) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the reports directory {}", dir.display()))?;
    let stamp = row.started_at.replace([':', '-'], "").replace('.', "_");
    let path = dir.join(format!("{stamp}-{}-{}.json", row.kind, row.id));
    let text = redact_uri(&serde_json::to_string_pretty(row)?);
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)
        .with_context(|| format!("writing the run report {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// A report file in `reports_dir`, as [`write_file`] names them.
#[derive(Debug, Clone)]
pub struct ReportFile {
    pub path: PathBuf,
    /// The run id in its name.
    pub run_id: String,
    pub bytes: u64,
    pub modified: std::time::SystemTime,
}

/// The report files in `dir` (an absent folder has none). Only files named as
/// [`write_file`] names them (`<start>-<kind>-<id>.json`, the start as `20261206T023000_123Z`)
/// are listed, so whatever else an operator keeps in the folder is never taken for a report.
pub fn report_files(dir: &Path) -> Result<Vec<ReportFile>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(anyhow!(
                "cannot list the reports directory {} (reports_dir): {e}",
                dir.display()
            ))
        }
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(run_id) = report_run_id(&name) else {
            continue;
        };
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        out.push(ReportFile {
            path: e.path(),
            run_id: run_id.to_owned(),
            bytes: meta.len(),
            modified: meta.modified()?,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The run id in a report file's name `<start>-<kind>-<id>.json`, if it is one.
fn report_run_id(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".json")?;
    let (stamp, rest) = stem.split_once('-')?;
    let (kind, id) = rest.split_once('-')?;
    let stamp_ok = stamp.len() >= 15
        && stamp.as_bytes()[..8].iter().all(u8::is_ascii_digit)
        && stamp.as_bytes()[8] == b'T';
    let kind_ok = !kind.is_empty() && kind.chars().all(|c| c.is_ascii_lowercase());
    (stamp_ok && kind_ok && !id.is_empty()).then_some(id)
}

/// Close a run in the ledger and write its report file.
pub async fn finish(
    sink: &Sink,
    dir: &Path,
    run_id: &str,
    status: &str,
    report: &J,
) -> Result<PathBuf> {
    let report = redact_json(report);
    sink.finish_run(run_id, status, &report).await?;
    let row = get(sink, run_id)
        .await?
        .ok_or_else(|| anyhow!("run {run_id} vanished from tidemark_runs"))?;
    write_file(dir, &row)
}

/// A dry run's report: only the file (the target is left untouched, so no ledger row).
pub fn finish_dry(
    dir: &Path,
    rec: &RunRecord,
    host: String,
    started: DateTime<Utc>,
    status: &str,
    report: &J,
) -> Result<PathBuf> {
    let row = RunRow {
        id: rec.id.clone(),
        kind: rec.kind.clone(),
        dry_run: true,
        status: status.to_owned(),
        host,
        pid: std::process::id() as i64,
        started_at: fmt_ts(started),
        finished_at: Some(fmt_ts(Utc::now())),
        settings_fingerprint: rec.settings_fingerprint.clone(),
        mapping_version: rec.mapping_version.clone(),
        report: Some(redact_json(report)),
    };
    write_file(dir, &row)
}

fn redact_json(v: &J) -> J {
    serde_json::from_str(&redact_uri(&v.to_string())).unwrap_or_else(|_| v.clone())
}

/// A run from the ledger, or (dry runs) from its report file.
pub async fn find(sink: &Sink, dir: &Path, id: &str) -> Result<Option<RunRow>> {
    if let Some(r) = get(sink, id).await? {
        return Ok(Some(r));
    }
    let suffix = format!("-{id}.json");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().ends_with(&suffix) {
            let text = std::fs::read_to_string(e.path())?;
            let v: J = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", e.path().display()))?;
            return Ok(Some(RunRow {
                id: v["id"].as_str().unwrap_or(id).to_owned(),
                kind: v["kind"].as_str().unwrap_or_default().to_owned(),
                dry_run: v["dry_run"].as_bool().unwrap_or(true),
                status: v["status"].as_str().unwrap_or_default().to_owned(),
                host: v["host"].as_str().unwrap_or_default().to_owned(),
                pid: v["pid"].as_i64().unwrap_or_default(),
                started_at: v["started_at"].as_str().unwrap_or_default().to_owned(),
                finished_at: v["finished_at"].as_str().map(str::to_owned),
                settings_fingerprint: v["settings_fingerprint"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                mapping_version: v["mapping_version"].as_str().unwrap_or_default().to_owned(),
                report: Some(v["report"].clone()),
            }));
        }
    }
    Ok(None)
}

/// Lanes a run moved, with their checkpoint before the run (for `runs show` and rollback).
pub async fn lanes(sink: &Sink, run_id: &str) -> Result<Vec<J>> {
    let sql = "SELECT lane, entity, existed, watermark_ms FROM tidemark_run_lanes WHERE run_id = $1 ORDER BY lane";
    let rows: Vec<(String, String, bool, Option<i64>)> =
        with_pool!(sink, p => sqlx::query_as(sql).bind(run_id).fetch_all(p).await?);
    Ok(rows
        .into_iter()
        .map(|(lane, entity, existed, wm)| {
            json!({
                "lane": lane,
                "entity": entity,
                "checkpoint_before": existed,
                "watermark_before": wm.map(|w| fmt_ts(from_ms(w))),
            })
        })
        .collect())
}

/// Milliseconds now (ledger clock).
pub fn now_ms() -> i64 {
    ms(Utc::now())
}

/// The runs ledger's rows.
impl Sink {
    /// Record the start of a run in the ledger.
    pub async fn start_run(&self, r: &RunRecord) -> Result<()> {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        with_pool!(self, p => sqlx::query(
            "INSERT INTO tidemark_runs (id, kind, dry_run, status, host, pid, started_at_ms, settings_fingerprint, mapping_version) \
             VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, $8)")
            .bind(&r.id).bind(&r.kind).bind(r.dry_run).bind(host).bind(std::process::id() as i64)
            .bind(ms(Utc::now())).bind(&r.settings_fingerprint).bind(&r.mapping_version)
            .execute(p).await.map(|_| ())?);
        Ok(())
    }

    /// Record the end of a run and its JSON report.
    pub async fn finish_run(
        &self,
        id: &str,
        status: &str,
        report: &serde_json::Value,
    ) -> Result<()> {
        with_pool!(self, p => sqlx::query("UPDATE tidemark_runs SET status = $1, finished_at_ms = $2, report = $3 WHERE id = $4")
            .bind(status).bind(ms(Utc::now())).bind(report.to_string()).bind(id)
            .execute(p).await.map(|_| ())?);
        Ok(())
    }

    /// The latest finished run's status, finish time and report per kind.
    pub async fn last_run(
        &self,
        kind: &str,
    ) -> Result<Option<(String, String, Option<i64>, i64, Option<String>)>> {
        Ok(with_pool!(self, p => sqlx::query(
            "SELECT id, status, finished_at_ms, started_at_ms, report FROM tidemark_runs WHERE kind = $1 \
             ORDER BY started_at_ms DESC LIMIT 1")
            .bind(kind).fetch_optional(p).await?
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_give_their_run_id_and_nothing_else_is_a_report() {
        let row = RunRow {
            id: "0b7e6a52-3c1d-4f0e-9a55-2d8c1e4f7a10".into(),
            kind: "run".into(),
            dry_run: false,
            status: "ok".into(),
            host: "h".into(),
            pid: 1,
            started_at: "2026-12-06T02:30:00.123Z".into(),
            finished_at: None,
            settings_fingerprint: "f".into(),
            mapping_version: "m".into(),
            report: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), &row).unwrap();
        std::fs::write(dir.path().join("notes.json"), "{}").unwrap();
        std::fs::write(dir.path().join("2026-backup.json"), "{}").unwrap();
        let files = report_files(dir.path()).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!(files[0].path, path);
        assert_eq!(files[0].run_id, row.id);
        assert!(report_files(&dir.path().join("absent")).unwrap().is_empty());
    }
}
