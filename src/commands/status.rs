//! `tidemark status`: how far behind each entity is, as a read-only monitoring check that
//! follows the Nagios plugin guidelines (one status line with perfdata, exit 0/1/2/3).
//! It opens the target read-only (src/sink/monitor.rs) and decides whether a run is alive
//! by its lock, never by /proc.

use crate::cli::{RaiseTo, StatusArgs};
use crate::commands::setup::load_mapping;
use crate::engine::pipeline::nightly_lane;
use crate::engine::window::{fmt_ts, lag};
use crate::secret::redact_uri;
use crate::settings::Settings;
use crate::sink::lease::{self, run_lane};
use crate::sink::monitor::{self, RunRow};
use crate::sink::Sink;
use crate::source::Source;
use anyhow::{bail, Result};
use serde::Serialize;
use std::time::Duration;

pub const NAGIOS_OK: i32 = 0;
pub const NAGIOS_WARNING: i32 = 1;
pub const NAGIOS_CRITICAL: i32 = 2;
pub const NAGIOS_UNKNOWN: i32 = 3;

const STATES: [&str; 4] = ["OK", "WARNING", "CRITICAL", "UNKNOWN"];

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
    /// Result of the entity's last catch-up: ok, partial, failed, abandoned (None: never ran).
    pub last_result: Option<String>,
    /// How long that catch-up took (for a failed one: the whole run until it failed).
    pub last_duration_s: Option<f64>,
    /// When the run holding that result started.
    pub last_run_at: Option<String>,
    /// `host pid since` of the process holding the nightly lane's lock right now.
    pub running: Option<String>,
}

/// A run of `tidemark_runs` as status shows it.
#[derive(Debug, Serialize)]
pub struct RunStatus {
    pub id: String,
    pub kind: String,
    /// The recorded status, except `abandoned` for a run recorded as running whose lock is
    /// free: its process died (the next writer records it so).
    pub status: String,
    pub host: String,
    pub pid: i64,
    pub started_at: String,
    pub duration_s: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub state: &'static str,
    /// Why: the worst finding (the text after the state on the first line).
    pub summary: String,
    pub entities: Vec<EntityStatus>,
    /// The newest catch-up run.
    pub last_run: Option<RunStatus>,
    /// Runs of any kind recorded as running whose process is gone.
    pub abandoned: Vec<RunStatus>,
    /// Backfills not finished yet, with their progress and live workers.
    pub backfills: Vec<crate::sink::chunks::BackfillStatus>,
    #[serde(skip)]
    perfdata: String,
}

/// Print the check's output and return its Nagios exit code.
pub async fn status(s: &Settings, args: &StatusArgs) -> i32 {
    let result = match check_args(args) {
        Ok(()) => collect(s).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(mut st) => {
            let code = evaluate(&mut st, args);
            if args.json {
                println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
            } else {
                print_human(&st);
            }
            code
        }
        Err(e) => {
            print_unknown(&redact_uri(&format!("{e:#}")), args.json);
            NAGIOS_UNKNOWN
        }
    }
}

/// The UNKNOWN answer (also for settings that do not load).
pub fn print_unknown(msg: &str, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({ "state": "UNKNOWN", "error": msg })
        );
    } else {
        println!("TIDEMARK UNKNOWN - {msg}");
    }
}

/// Thresholds that contradict each other are a usage error, not a state.
fn check_args(a: &StatusArgs) -> Result<()> {
    if let (Some(w), Some(c)) = (a.warn, a.crit) {
        if w > c {
            bail!(
                "--warn {} is longer than --crit {}; the warning lag must be at most the critical one",
                humantime::format_duration(w),
                humantime::format_duration(c)
            );
        }
    }
    if let (Some(w), Some(c)) = (a.dead_letters_warn, a.dead_letters_crit) {
        if w > c {
            bail!("--dead-letters-warn {w} is above --dead-letters-crit {c}; the warning count must be at most the critical one");
        }
    }
    Ok(())
}

async fn collect(s: &Settings) -> Result<Status> {
    let mapping = load_mapping(s)?;
    let sink = monitor::open_read_only(&s.target.url).await?;
    let result = collect_from(s, &mapping, &sink).await;
    sink.close().await;
    result
}

async fn collect_from(
    s: &Settings,
    mapping: &crate::mapping::Mapping,
    sink: &Sink,
) -> Result<Status> {
    let missing = monitor::missing_tables(sink).await?;
    if !missing.is_empty() {
        bail!(
            "tidemark's tables are not in the target {} (missing: {}); run `tidemark migrate` or a first `tidemark run` with a role that may create tables, \
             or grant this role SELECT on them (docs/OPERATIONS.md, Monitoring)",
            s.target.url,
            missing.join(", ")
        );
    }
    let source = crate::source::Source::connect(&s.source).await?;
    let now = source.server_time().await?;
    let runs = monitor::recent_runs(sink, RECENT_RUNS).await?;
    let mut entities = Vec::new();
    for e in &mapping.entities {
        entities.push(entity_status(sink, &source, e, &runs, now).await?);
    }
    let mut abandoned = Vec::new();
    for r in monitor::running_runs(sink).await? {
        if !lease::lane_is_held(sink, &run_lane(&r.id)).await? {
            abandoned.push(run_status(&r, Some("abandoned")));
        }
    }
    let last_run = match runs.first() {
        Some(r) if abandoned.iter().any(|a| a.id == r.id) => Some(run_status(r, Some("abandoned"))),
        Some(r) => Some(run_status(r, None)),
        None => None,
    };
    Ok(Status {
        state: "OK",
        summary: String::new(),
        entities,
        last_run,
        abandoned,
        backfills: crate::sink::chunks::unfinished(sink).await?,
        perfdata: String::new(),
    })
}

async fn entity_status(
    sink: &Sink,
    source: &Source,
    e: &crate::mapping::Entity,
    runs: &[RunRow],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<EntityStatus> {
    let lane = nightly_lane(&e.name);
    let running = if lease::lane_is_held(sink, &lane).await? {
        Some(match lease::row(sink, &lane).await? {
            Some(h) => format!("host {} pid {} since {}", h.host, h.pid, fmt_ts(h.since)),
            None => "a process that has not recorded itself yet".to_owned(),
        })
    } else {
        None
    };
    let cp = sink.load_checkpoint(&lane).await?;
    let wm = cp.as_ref().and_then(|c| c.state.watermark);
    let backlog = match wm {
        Some(w) => Some(source.count_since(e, w).await?),
        None => None,
    };
    let last = last_result(runs, &e.name);
    Ok(EntityStatus {
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
    })
}

fn run_status(r: &RunRow, status: Option<&str>) -> RunStatus {
    RunStatus {
        id: r.id.clone(),
        kind: r.kind.clone(),
        status: status.unwrap_or(&r.status).to_owned(),
        host: r.host.clone(),
        pid: r.pid,
        started_at: fmt_ts(r.started),
        duration_s: r
            .finished
            .map(|f| (f - r.started).num_milliseconds() as f64 / 1000.0),
        error: r.report["error"].as_str().map(str::to_owned),
    }
}

/// How many of the newest catch-up runs status reads (`tidemark prune` keeps the ones that
/// give an entity its last result, see [`last_run_of`]).
pub const RECENT_RUNS: i64 = 50;

/// An entity's newest finished catch-up in `runs` (newest first), and the entity's entry
/// in its report when the entity finished (None: the run failed on it).
pub fn last_run_of<'r>(
    runs: &'r [RunRow],
    entity: &str,
) -> Option<(&'r RunRow, Option<&'r serde_json::Value>)> {
    for run in runs.iter().filter(|r| r.status != "running") {
        let done = run.report["entities"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["entity"] == entity);
        if done.is_some() || run.report["failed_entity"] == entity {
            return Some((run, done));
        }
    }
    None
}

/// `(result, duration_s, run start)` of an entity's newest finished catch-up in `runs`.
fn last_result(runs: &[RunRow], entity: &str) -> Option<(String, Option<f64>, String)> {
    let (run, done) = last_run_of(runs, entity)?;
    let at = fmt_ts(run.started);
    Some(match done {
        Some(e) => (
            "ok".into(),
            e["elapsed_ms"].as_f64().map(|m| m / 1000.0),
            at,
        ),
        None => (
            run.status.clone(),
            run.finished
                .map(|f| (f - run.started).num_milliseconds() as f64 / 1000.0),
            at,
        ),
    })
}

/// One reason for a state; among findings of the worst state the summary names the one
/// with the highest `rank` (a failed run, then the largest lag, then the most dead letters).
struct Finding {
    code: i32,
    rank: (u8, u64),
    text: String,
}

/// Set the state, the summary and the perfdata from the thresholds; returns the exit code.
pub fn evaluate(st: &mut Status, a: &StatusArgs) -> i32 {
    let mut findings = Vec::new();
    for e in &st.entities {
        findings.extend(lag_finding(&e.entity, e.lag_seconds, a));
        let dead = e.dead_letters.max(0) as u64;
        let over = |n: Option<u64>| n.is_some_and(|n| dead > n);
        if over(a.dead_letters_crit) || over(a.dead_letters_warn) {
            let (code, flag, n) = if over(a.dead_letters_crit) {
                (NAGIOS_CRITICAL, "--dead-letters-crit", a.dead_letters_crit)
            } else {
                (NAGIOS_WARNING, "--dead-letters-warn", a.dead_letters_warn)
            };
            findings.push(Finding {
                code,
                rank: (0, dead),
                text: format!(
                    "{} has {dead} dead letters (more than {flag} {})",
                    e.entity,
                    n.unwrap_or_default()
                ),
            });
        }
    }
    if let (Some(raise), Some(r)) = (a.failed_run, &st.last_run) {
        if r.status == "failed" || r.status == "abandoned" {
            let why = if r.status == "abandoned" {
                format!(
                    "the last run (started {} on host {} pid {}) was abandoned: its process died without finishing",
                    r.started_at, r.host, r.pid
                )
            } else {
                format!(
                    "the last run (started {}) failed: {}",
                    r.started_at,
                    r.error.as_deref().unwrap_or("see `tidemark runs`")
                )
            };
            findings.push(Finding {
                code: if raise == RaiseTo::Critical {
                    NAGIOS_CRITICAL
                } else {
                    NAGIOS_WARNING
                },
                rank: (2, 0),
                text: why,
            });
        }
    }
    let code = findings.iter().map(|f| f.code).max().unwrap_or(NAGIOS_OK);
    st.state = STATES[code as usize];
    st.summary = summary(st, &findings, code);
    st.perfdata = perfdata(st, a);
    code
}

fn lag_finding(entity: &str, lag: Option<u64>, a: &StatusArgs) -> Option<Finding> {
    let human = |d: Duration| humantime::format_duration(d).to_string();
    let Some(l) = lag.map(Duration::from_secs) else {
        let code = if a.crit.is_some() {
            NAGIOS_CRITICAL
        } else if a.warn.is_some() {
            NAGIOS_WARNING
        } else {
            return None;
        };
        return Some(Finding {
            code,
            rank: (1, u64::MAX),
            text: format!("{entity} never ran (no watermark yet)"),
        });
    };
    let (code, flag, limit) = match (a.warn, a.crit) {
        (_, Some(c)) if l > c => (NAGIOS_CRITICAL, "--crit", c),
        (Some(w), _) if l > w => (NAGIOS_WARNING, "--warn", w),
        _ => return None,
    };
    Some(Finding {
        code,
        rank: (1, l.as_secs()),
        text: format!("{entity} lag {} is over {flag} {}", human(l), human(limit)),
    })
}

fn summary(st: &Status, findings: &[Finding], code: i32) -> String {
    let mut worst: Vec<&Finding> = findings.iter().filter(|f| f.code == code).collect();
    worst.sort_by_key(|f| std::cmp::Reverse(f.rank));
    if let Some(first) = worst.first() {
        return match worst.len() {
            1 => first.text.clone(),
            n => format!("{} (and {} more)", first.text, n - 1),
        };
    }
    let most = st
        .entities
        .iter()
        .filter_map(|e| e.lag_seconds.map(|l| (l, &e.entity)))
        .max();
    match most {
        Some((l, e)) => format!(
            "{} entities within thresholds; largest lag {e} {}",
            st.entities.len(),
            humantime::format_duration(Duration::from_secs(l))
        ),
        None => format!("{} entities, none ran yet", st.entities.len()),
    }
}

/// `lag_<entity>=<s>s;<warn>;<crit>` and `dead_letters_<entity>=<n>;<warn>;<crit>` per entity
/// (a lag that does not exist yet is `U`, as the guidelines say).
fn perfdata(st: &Status, a: &StatusArgs) -> String {
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs().to_string()).unwrap_or_default();
    let num = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_default();
    let mut out = Vec::new();
    for e in &st.entities {
        let lag = e.lag_seconds.map(|l| format!("{l}s")).unwrap_or("U".into());
        out.push(format!(
            "{}={lag};{};{}",
            label("lag", &e.entity),
            secs(a.warn),
            secs(a.crit)
        ));
        out.push(format!(
            "{}={};{};{}",
            label("dead_letters", &e.entity),
            e.dead_letters,
            num(a.dead_letters_warn),
            num(a.dead_letters_crit)
        ));
    }
    out.join(" ")
}

/// A perfdata label, quoted when it holds characters the format reserves.
fn label(metric: &str, entity: &str) -> String {
    let l = format!("{metric}_{entity}");
    if l.chars().any(|c| c == ' ' || c == '=' || c == '\'') {
        format!("'{}'", l.replace('\'', "''"))
    } else {
        l
    }
}

fn print_human(st: &Status) {
    println!("TIDEMARK {} - {} | {}", st.state, st.summary, st.perfdata);
    println!(
        "{:<20} {:<26} {:>10} {:>9} {:>6} {:>8} {:>7}  {:<9} {:>9}",
        "entity", "watermark", "lag", "backlog", "dead", "missing", "pending", "last run", "took"
    );
    for e in &st.entities {
        println!(
            "{:<20} {:<26} {:>10} {:>9} {:>6} {:>8} {:>7}  {:<9} {:>9}{}{}",
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
        println!(
            "last run: {} {} started {} on host {} pid {}{}",
            r.id,
            r.status,
            r.started_at,
            r.host,
            r.pid,
            r.duration_s
                .map(|d| format!(", took {d:.1}s"))
                .unwrap_or_default()
        );
    }
    for r in &st.abandoned {
        println!(
            "abandoned: {} run {} started {} on host {} pid {} is recorded as running but its process is gone",
            r.kind, r.id, r.started_at, r.host, r.pid
        );
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

    fn st(lags: &[Option<u64>], dead: &[i64]) -> Status {
        Status {
            state: "OK",
            summary: String::new(),
            entities: lags
                .iter()
                .zip(dead)
                .enumerate()
                .map(|(i, (l, d))| EntityStatus {
                    entity: format!("e{i}"),
                    watermark: None,
                    lag_seconds: *l,
                    backlog: None,
                    dead_letters: *d,
                    missing_refs: 0,
                    pending: 0,
                    open_window: None,
                    last_result: None,
                    last_duration_s: None,
                    last_run_at: None,
                    running: None,
                })
                .collect(),
            last_run: None,
            abandoned: vec![],
            backfills: vec![],
            perfdata: String::new(),
        }
    }

    fn args(w: u64, c: u64) -> StatusArgs {
        StatusArgs {
            warn: Some(Duration::from_secs(w * 3600)),
            crit: Some(Duration::from_secs(c * 3600)),
            ..Default::default()
        }
    }

    #[test]
    fn nagios_thresholds() {
        let h = |x: u64| Some(x * 3600);
        let a = args(26, 48);
        assert_eq!(evaluate(&mut st(&[h(1), h(2)], &[0, 0]), &a), NAGIOS_OK);
        assert_eq!(
            evaluate(&mut st(&[h(1), h(30)], &[0, 0]), &a),
            NAGIOS_WARNING
        );
        assert_eq!(
            evaluate(&mut st(&[h(50), h(1)], &[0, 0]), &a),
            NAGIOS_CRITICAL
        );
        assert_eq!(evaluate(&mut st(&[None], &[0]), &a), NAGIOS_CRITICAL);
        let none = StatusArgs::default();
        assert_eq!(evaluate(&mut st(&[None], &[0]), &none), NAGIOS_OK);
    }

    #[test]
    fn first_line_names_the_worst_entity_and_carries_perfdata() {
        let mut s = st(&[Some(3600), Some(30 * 3600)], &[0, 4]);
        let a = StatusArgs {
            dead_letters_warn: Some(0),
            ..args(26, 48)
        };
        assert_eq!(evaluate(&mut s, &a), NAGIOS_WARNING);
        assert_eq!(
            s.summary,
            "e1 lag 1day 6h is over --warn 1day 2h (and 1 more)"
        );
        assert_eq!(
            s.perfdata,
            "lag_e0=3600s;93600;172800 dead_letters_e0=0;0; lag_e1=108000s;93600;172800 dead_letters_e1=4;0;"
        );
    }
}
