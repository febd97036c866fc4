//! `tidemark status`: how far behind each entity is, for people and for monitoring.
//! Exit codes follow the Nagios plugin convention.

use crate::commands::setup::load_mapping;
use crate::engine::pipeline::nightly_lane;
use crate::engine::window::{fmt_ts, lag};
use crate::secret::redact_uri;
use crate::settings::Settings;
use crate::sink::{from_ms, Sink};
use crate::source::Source;
use anyhow::Result;
use serde::Serialize;
use std::time::Duration;

pub const NAGIOS_OK: i32 = 0;
pub const NAGIOS_WARNING: i32 = 1;
pub const NAGIOS_CRITICAL: i32 = 2;
pub const NAGIOS_UNKNOWN: i32 = 3;

#[derive(Debug, Serialize)]
pub struct EntityStatus {
    pub entity: String,
    pub watermark: Option<String>,
    pub lag_seconds: Option<u64>,
    /// Documents at or after the watermark (counted with the index).
    pub backlog: Option<u64>,
    pub dead_letters: i64,
    /// Unresolved references recorded (tidemark_missing_refs).
    pub missing_refs: i64,
    /// Documents held back for a later run (tidemark_pending).
    pub pending: i64,
    pub open_window: Option<String>,
    /// Result of the entity's last catch-up: ok, partial, failed (None: never ran).
    pub last_result: Option<String>,
    /// How long that catch-up took (for a failed one: the whole run until it failed).
    pub last_duration_s: Option<f64>,
    /// When the run holding that result started.
    pub last_run_at: Option<String>,
    /// `host pid since` of a process writing the nightly lane right now.
    pub running: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub state: &'static str,
    pub entities: Vec<EntityStatus>,
    pub last_run: Option<serde_json::Value>,
    /// Backfills not finished yet, with their progress and live workers.
    pub backfills: Vec<crate::sink::chunks::BackfillStatus>,
}

/// Print the status and return the Nagios exit code.
pub async fn status(
    s: &Settings,
    json: bool,
    warn: Option<Duration>,
    crit: Option<Duration>,
) -> i32 {
    match collect(s).await {
        Ok(st) => {
            let worst = st
                .entities
                .iter()
                .map(|e| e.lag_seconds)
                .collect::<Vec<_>>();
            let code = classify(&worst, warn, crit);
            let st = Status {
                state: ["OK", "WARNING", "CRITICAL", "UNKNOWN"][code as usize],
                ..st
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
            } else {
                print_human(&st);
            }
            code
        }
        Err(e) => {
            let msg = redact_uri(&format!("{e:#}"));
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "state": "UNKNOWN", "error": msg })
                );
            } else {
                println!("UNKNOWN: {msg}");
            }
            NAGIOS_UNKNOWN
        }
    }
}

/// Nagios state from per-entity lags; an entity that never ran is CRITICAL when thresholds are set.
pub fn classify(lags: &[Option<u64>], warn: Option<Duration>, crit: Option<Duration>) -> i32 {
    let mut code = NAGIOS_OK;
    for l in lags {
        let l = l.map(Duration::from_secs);
        if crit.is_some_and(|c| l.is_none_or(|l| l > c)) {
            return NAGIOS_CRITICAL;
        }
        if warn.is_some_and(|w| l.is_none_or(|l| l > w)) {
            code = NAGIOS_WARNING;
        }
    }
    code
}

async fn collect(s: &Settings) -> Result<Status> {
    let mapping = load_mapping(s)?;
    let sink = Sink::connect(&s.target.url, 1).await?;
    sink.migrate_tool_tables().await?;
    let source = Source::connect(&s.source).await?;
    let now = source.server_time().await?;
    let history = run_history(&sink).await?;
    let leases = crate::engine::lane::live(&sink).await?;
    let mut entities = Vec::new();
    for e in &mapping.entities {
        let last = last_result(&history, &e.name);
        let running = leases
            .iter()
            .find(|h| h.lane == nightly_lane(&e.name))
            .map(|h| format!("host {} pid {} since {}", h.host, h.pid, fmt_ts(h.since)));
        let cp = sink.load_checkpoint(&nightly_lane(&e.name)).await?;
        let wm = cp.as_ref().and_then(|c| c.state.watermark);
        let backlog = match wm {
            Some(w) => Some(source.count_since(e, w).await?),
            None => None,
        };
        entities.push(EntityStatus {
            entity: e.name.clone(),
            watermark: wm.map(fmt_ts),
            lag_seconds: lag(wm, now).map(|d| d.as_secs()),
            backlog,
            dead_letters: sink.dead_letter_count(&e.name).await?,
            missing_refs: sink.count_for("tidemark_missing_refs", &e.name).await?,
            pending: sink.count_for("tidemark_pending", &e.name).await?,
            open_window: cp.and_then(|c| c.state.open).map(|w| w.to_string()),
            last_result: last.as_ref().map(|l| l.0.clone()),
            last_duration_s: last.as_ref().and_then(|l| l.1),
            last_run_at: last.map(|l| l.2),
            running,
        });
    }
    let last_run = sink
        .last_run("run")
        .await?
        .map(|(id, status, fin, start, _)| {
            serde_json::json!({
                "id": id, "status": status, "started_at": fmt_ts(from_ms(start)),
                "duration_s": fin.map(|f| (f - start) as f64 / 1000.0),
            })
        });
    let backfills = crate::sink::chunks::unfinished(&sink).await?;
    sink.close().await;
    Ok(Status {
        state: "OK",
        entities,
        last_run,
        backfills,
    })
}

/// A finished (or failed) catch-up run: status, start, end and its JSON report.
struct PastRun {
    status: String,
    started_ms: i64,
    finished_ms: Option<i64>,
    report: serde_json::Value,
}

/// The latest catch-up runs, newest first (enough to find every entity's last result).
async fn run_history(sink: &Sink) -> Result<Vec<PastRun>> {
    let sql = "SELECT status, started_at_ms, finished_at_ms, report FROM tidemark_runs \
               WHERE kind = 'run' AND status <> 'running' ORDER BY started_at_ms DESC LIMIT 50";
    let rows: Vec<(String, i64, Option<i64>, Option<String>)> =
        crate::sink::with_pool!(sink, p => sqlx::query_as(sql).fetch_all(p).await?);
    Ok(rows
        .into_iter()
        .map(|(status, started_ms, finished_ms, report)| PastRun {
            status,
            started_ms,
            finished_ms,
            report: report
                .and_then(|r| serde_json::from_str(&r).ok())
                .unwrap_or_default(),
        })
        .collect())
}

/// `(result, duration_s, run start)` of an entity's newest catch-up in `history`.
fn last_result(history: &[PastRun], entity: &str) -> Option<(String, Option<f64>, String)> {
    for run in history {
        let at = fmt_ts(from_ms(run.started_ms));
        let done = run.report["entities"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["entity"] == entity);
        if let Some(e) = done {
            let secs = e["elapsed_ms"].as_f64().map(|m| m / 1000.0);
            return Some(("ok".into(), secs, at));
        }
        if run.report["failed_entity"] == entity {
            let secs = run
                .finished_ms
                .map(|f| (f - run.started_ms) as f64 / 1000.0);
            return Some((run.status.clone(), secs, at));
        }
    }
    None
}

fn print_human(st: &Status) {
    println!("{}", st.state);
    println!(
        "{:<20} {:<26} {:>10} {:>9} {:>6} {:>8} {:>7}  {:<8} {:>9}",
        "entity", "watermark", "lag", "backlog", "dead", "missing", "pending", "last run", "took"
    );
    for e in &st.entities {
        println!(
            "{:<20} {:<26} {:>10} {:>9} {:>6} {:>8} {:>7}  {:<8} {:>9}{}{}",
            e.entity,
            e.watermark.as_deref().unwrap_or("never ran"),
            e.lag_seconds
                .map(|l| humantime::format_duration(Duration::from_secs(l)).to_string())
                .unwrap_or("-".into()),
            e.backlog.map(|b| b.to_string()).unwrap_or("-".into()),
            e.dead_letters,
            e.missing_refs,
            e.pending,
            e.last_result.as_deref().unwrap_or("-"),
            e.last_duration_s
                .map(|s| format!("{s:.1}s"))
                .unwrap_or("-".into()),
            e.running
                .as_ref()
                .map(|r| format!("  (running now: {r})"))
                .unwrap_or_default(),
            e.open_window
                .as_ref()
                .map(|w| format!("  (interrupted window {w})"))
                .unwrap_or_default()
        );
    }
    if let Some(r) = &st.last_run {
        println!("last run: {r}");
    }
    for b in &st.backfills {
        let p = &b.progress;
        println!(
            "backfill {} {} of {}: {}/{} chunks done, {} running, {} failed, {} documents read; workers: {}",
            b.id,
            b.range,
            b.entities.join(", "),
            p.done,
            p.total,
            p.running,
            p.failed,
            p.docs_read,
            if b.workers.is_empty() {
                "none (resume with: tidemark backfill --resume ID)".to_owned()
            } else {
                b.workers.join(", ")
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nagios_thresholds() {
        let h = |x: u64| Some(x * 3600);
        let (w, c) = (
            Some(Duration::from_secs(26 * 3600)),
            Some(Duration::from_secs(48 * 3600)),
        );
        assert_eq!(classify(&[h(1), h(2)], w, c), NAGIOS_OK);
        assert_eq!(classify(&[h(1), h(30)], w, c), NAGIOS_WARNING);
        assert_eq!(classify(&[h(50), h(1)], w, c), NAGIOS_CRITICAL);
        assert_eq!(classify(&[None], w, c), NAGIOS_CRITICAL);
        assert_eq!(classify(&[None], None, None), NAGIOS_OK);
    }
}
