//! Prometheus metrics: what a catch-up run reports, recorded through the `metrics` facade
//! and rendered by `metrics-exporter-prometheus`, served by the daemon (`/metrics`) or
//! written to a node_exporter textfile after `tidemark run --textfile PATH`.
//!
//! Label values are bounded: entity names from the mapping and a fixed set of results.
//! Never document ids, run ids, URIs or anything else that could grow or hold a secret.

use crate::engine::ctx::EntityReport;
use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Every metric name, for the docs and the tests.
pub const WATERMARK: &str = "tidemark_watermark_timestamp_seconds";
pub const LAG: &str = "tidemark_lag_seconds";
pub const READ: &str = "tidemark_documents_read_total";
pub const WRITTEN: &str = "tidemark_documents_written_total";
pub const UNCHANGED: &str = "tidemark_documents_unchanged_total";
pub const DEAD: &str = "tidemark_documents_dead_lettered_total";
pub const PULLED: &str = "tidemark_documents_pulled_total";
pub const ENTITY_DURATION: &str = "tidemark_entity_run_duration_seconds";
pub const ENTITY_SUCCESS: &str = "tidemark_entity_last_success_timestamp_seconds";
pub const RUN_DURATION: &str = "tidemark_run_duration_seconds";
pub const RUNS: &str = "tidemark_runs_total";
pub const LAST_SUCCESS: &str = "tidemark_last_success_timestamp_seconds";
pub const IN_PROGRESS: &str = "tidemark_run_in_progress";
pub const FAILURES: &str = "tidemark_consecutive_failures";
pub const NEXT_RUN: &str = "tidemark_next_run_timestamp_seconds";

/// The recorder is process-global; the handle renders it.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Watermarks seen so far; lag is computed from them at render time, so it keeps growing
/// between runs as it should.
static WATERMARKS: Mutex<BTreeMap<String, DateTime<Utc>>> = Mutex::new(BTreeMap::new());

/// Install the global recorder once and return its handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let buckets = [1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0];
        let handle = PrometheusBuilder::new()
            .set_buckets(&buckets)
            .expect("non-empty buckets")
            .install_recorder()
            .expect("no other metrics recorder is installed in tidemark");
        describe();
        handle
    })
}

fn describe() {
    describe_gauge!(
        WATERMARK,
        "End of the last finished window of the entity's nightly lane (Unix seconds)."
    );
    describe_gauge!(LAG, "Seconds between now and the entity's watermark.");
    describe_counter!(READ, "Source documents read.");
    describe_counter!(WRITTEN, "Target rows inserted or changed.");
    describe_counter!(UNCHANGED, "Target rows already identical.");
    describe_counter!(DEAD, "Documents sent to tidemark_dead_letters.");
    describe_counter!(
        PULLED,
        "Documents pulled on demand as references or dependents."
    );
    describe_gauge!(
        ENTITY_DURATION,
        "Duration of the entity's last catch-up (seconds)."
    );
    describe_gauge!(
        ENTITY_SUCCESS,
        "When the entity's last catch-up succeeded (Unix seconds)."
    );
    describe_histogram!(RUN_DURATION, "Duration of whole runs (seconds).");
    describe_counter!(RUNS, "Runs by result: ok, partial, failed, lock_held.");
    describe_gauge!(LAST_SUCCESS, "When the last run succeeded (Unix seconds).");
    describe_gauge!(IN_PROGRESS, "1 while a run is going.");
    describe_gauge!(
        FAILURES,
        "Failed runs in a row (daemon; 0 after a success)."
    );
    describe_gauge!(
        NEXT_RUN,
        "When the daemon's next scheduled run is due (Unix seconds)."
    );
}

fn secs(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// Record a watermark read from the checkpoints (daemon start) without counting a run.
pub fn record_watermark(entity: &str, wm: DateTime<Utc>) {
    gauge!(WATERMARK, "entity" => entity.to_owned()).set(secs(wm));
    WATERMARKS
        .lock()
        .expect("watermarks lock")
        .insert(entity.to_owned(), wm);
}

/// Record one entity's finished catch-up.
pub fn record_entity(r: &EntityReport, finished: DateTime<Utc>) {
    let e = r.entity.clone();
    if let Some(wm) = r.watermark {
        record_watermark(&e, wm);
    }
    counter!(READ, "entity" => e.clone()).increment(r.counts.read);
    counter!(WRITTEN, "entity" => e.clone()).increment(r.counts.written);
    counter!(UNCHANGED, "entity" => e.clone()).increment(r.counts.unchanged);
    counter!(DEAD, "entity" => e.clone()).increment(r.counts.dead_lettered);
    counter!(PULLED, "entity" => e.clone()).increment(r.counts.pulled);
    gauge!(ENTITY_DURATION, "entity" => e.clone()).set(r.elapsed_ms as f64 / 1000.0);
    gauge!(ENTITY_SUCCESS, "entity" => e).set(secs(finished));
}

/// Record the end of a whole run; `result` is one of ok, partial, failed, lock_held.
pub fn record_run(result: &'static str, elapsed_ms: u64, finished: DateTime<Utc>) {
    counter!(RUNS, "result" => result).increment(1);
    histogram!(RUN_DURATION).record(elapsed_ms as f64 / 1000.0);
    if result == "ok" {
        gauge!(LAST_SUCCESS).set(secs(finished));
    }
}

pub fn set_in_progress(on: bool) {
    gauge!(IN_PROGRESS).set(if on { 1.0 } else { 0.0 });
}

pub fn set_failures(n: u32) {
    gauge!(FAILURES).set(n as f64);
}

pub fn set_next_run(t: Option<DateTime<Utc>>) {
    gauge!(NEXT_RUN).set(t.map(secs).unwrap_or(0.0));
}

/// The exposition text, with lag brought up to `now`.
pub fn render(now: DateTime<Utc>) -> String {
    let handle = install();
    let wms = WATERMARKS.lock().expect("watermarks lock").clone();
    for (entity, wm) in wms {
        let lag = (now - wm).num_milliseconds().max(0) as f64 / 1000.0;
        gauge!(LAG, "entity" => entity).set(lag);
    }
    handle.render()
}

/// Write the metrics for node_exporter's textfile collector: temp file, fsync, rename,
/// so the collector never reads half a file.
pub fn write_textfile(path: &Path, now: DateTime<Utc>) -> Result<()> {
    let text = render(now);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("--textfile {} names no file", path.display()))?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating {} for --textfile", dir.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let fail = || {
        format!(
            "writing the metrics textfile {} (--textfile); is the directory writable?",
            path.display()
        )
    };
    let mut f = std::fs::File::create(&tmp).with_context(fail)?;
    f.write_all(text.as_bytes()).with_context(fail)?;
    f.sync_all().with_context(fail)?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(fail)?;
    Ok(())
}

/// A parsed sample of the text format: `name{labels} value` (for tests and tools).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parse the Prometheus text exposition format (comments skipped; escapes not needed
/// for our bounded label values).
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || anyhow::anyhow!("metrics line {}: cannot parse `{line}`", n + 1);
        let (series, value) = line.rsplit_once(' ').ok_or_else(bad)?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| bad())?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').ok_or_else(bad)?;
                let mut labels = BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").ok_or_else(bad)?;
                    labels.insert(k.trim().to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name.to_owned(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_text_format() {
        let text = "# HELP x y\n# TYPE x gauge\nx{entity=\"users\",result=\"ok\"} 3.5\nup 1\nh_bucket{le=\"+Inf\"} 2\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "x");
        assert_eq!(s[0].labels["entity"], "users");
        assert_eq!(s[0].labels["result"], "ok");
        assert_eq!(s[0].value, 3.5);
        assert_eq!(s[2].labels["le"], "+Inf");
        assert!(parse("garbage").is_err());
    }
}
