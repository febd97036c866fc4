//! Prometheus metrics: what runs report, recorded through the `metrics` facade and rendered
//! by `metrics-exporter-prometheus`, served by the daemon (`/metrics`) or written to a
//! node_exporter textfile after `tidemark run --textfile PATH`.
//!
//! Alerts read timestamps (`time() - tidemark_watermark_timestamp_seconds`), which keep
//! growing when no run happens at all; `tidemark_lag_seconds` is computed at scrape time
//! and exists only on the daemon's `/metrics`, never in a textfile (it would freeze at the
//! end-of-run value). Counters are monotonic for a process's life, and a textfile carries
//! them on from the file it replaces ([`accumulate`]), so `increase()` works on both.
//!
//! Label values are bounded: entity names from the mapping and a fixed set of results.
//! Never document ids, run ids, URIs or anything else that could grow or hold a secret.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Every metric name, for the docs and the tests.
pub const BUILD_INFO: &str = "tidemark_build_info";
pub const WATERMARK: &str = "tidemark_watermark_timestamp_seconds";
pub const LAG: &str = "tidemark_lag_seconds";
pub const BACKLOG: &str = "tidemark_backlog_documents";
pub const DEAD_OUTSTANDING: &str = "tidemark_dead_letters_outstanding";
pub const READ: &str = "tidemark_documents_read_total";
pub const WRITTEN: &str = "tidemark_rows_written_total";
pub const UNCHANGED: &str = "tidemark_rows_unchanged_total";
pub const DEAD: &str = "tidemark_documents_dead_lettered_total";
pub const PULLED: &str = "tidemark_documents_pulled_total";
pub const ENTITY_DURATION: &str = "tidemark_entity_run_duration_seconds";
pub const ENTITY_SUCCESS: &str = "tidemark_entity_last_success_timestamp_seconds";
pub const RUN_DURATION: &str = "tidemark_run_duration_seconds";
pub const RUNS: &str = "tidemark_runs_total";
pub const LAST_RUN: &str = "tidemark_last_run_timestamp_seconds";
pub const LAST_SUCCESS: &str = "tidemark_last_success_timestamp_seconds";
pub const IN_PROGRESS: &str = "tidemark_run_in_progress";
pub const FAILURES: &str = "tidemark_consecutive_failures";
pub const NEXT_RUN: &str = "tidemark_next_run_timestamp_seconds";

/// The results a run is counted under (`tidemark_runs_total{result}`).
pub const RESULTS: [&str; 4] = ["ok", "partial", "failed", "lock_held"];

/// Gauges a textfile keeps from the file it replaces when this run did not set them: a run
/// that failed before its first window still leaves the last watermark and success time (so
/// the alerts on their age keep working) and the last counted backlog and dead letters (so
/// the dead-letter alert does not resolve because the source was down).
const CARRIED_GAUGES: [&str; 7] = [
    WATERMARK,
    ENTITY_SUCCESS,
    LAST_SUCCESS,
    LAST_RUN,
    BACKLOG,
    DEAD_OUTSTANDING,
    ENTITY_DURATION,
];

/// Mode of the textfile: node_exporter runs as another user, and the units' `UMask=0027`
/// would otherwise leave the file `-rw-r-----`.
pub const TEXTFILE_MODE: u32 = 0o644;

/// The recorder is process-global; the handle renders it.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Watermarks seen so far; lag is computed from them at scrape time, so it keeps growing
/// between runs as it should.
static WATERMARKS: Mutex<BTreeMap<String, DateTime<Utc>>> = Mutex::new(BTreeMap::new());

/// The entities of the mapping in use; a textfile drops carried series of other entities
/// (an entity removed from the mapping must not keep an old watermark alive).
static ENTITIES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Install the global recorder once and return its handle. Publishes `tidemark_build_info`
/// and every `tidemark_runs_total{result}` at 0, so the first failure is an increase.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let buckets = [1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0];
        let handle = PrometheusBuilder::new()
            .set_buckets(&buckets)
            .expect("non-empty buckets")
            .install_recorder()
            .expect("no other metrics recorder is installed in tidemark");
        describe();
        gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        for r in RESULTS {
            counter!(RUNS, "result" => r).increment(0);
        }
        handle
    })
}

fn describe() {
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label is the running tidemark's."
    );
    describe_gauge!(
        WATERMARK,
        "End of the last finished window of the entity's nightly lane (Unix seconds)."
    );
    describe_gauge!(
        LAG,
        "Seconds between the scrape and the entity's watermark (daemon only; alert on time() - tidemark_watermark_timestamp_seconds)."
    );
    describe_gauge!(
        BACKLOG,
        "Source documents at or after the entity's watermark, counted at the end of the last run."
    );
    describe_gauge!(
        DEAD_OUTSTANDING,
        "Dead letters of the entity waiting in tidemark_dead_letters, counted at the end of the last run."
    );
    describe_counter!(READ, "Source documents read.");
    describe_counter!(WRITTEN, "Target rows (main table) inserted or changed.");
    describe_counter!(UNCHANGED, "Target rows (main table) already identical.");
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
    describe_counter!(
        RUNS,
        "Runs by result: ok, partial, failed (at any stage), lock_held."
    );
    describe_gauge!(
        LAST_RUN,
        "When the last run ended, whatever its result (Unix seconds)."
    );
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

/// The entities a run works on: their counters are published at 0 (so the first dead
/// letter is an increase), and a textfile keeps carried series of these entities only.
pub fn entities<S: AsRef<str>>(names: &[S]) {
    let mut known = ENTITIES.lock().expect("entities lock");
    for n in names {
        let e = n.as_ref().to_owned();
        for name in [READ, WRITTEN, UNCHANGED, DEAD, PULLED] {
            counter!(name, "entity" => e.clone()).increment(0);
        }
        known.insert(e);
    }
}

/// Record a watermark read from the checkpoints (daemon start) without counting a run.
pub fn record_watermark(entity: &str, wm: DateTime<Utc>) {
    gauge!(WATERMARK, "entity" => entity.to_owned()).set(secs(wm));
    WATERMARKS
        .lock()
        .expect("watermarks lock")
        .insert(entity.to_owned(), wm);
}

/// What [`record_entity`] records of one entity's finished catch-up (the engine's
/// `EntityReport::totals`).
#[derive(Debug, Clone, Copy)]
pub struct EntityTotals<'a> {
    pub entity: &'a str,
    pub watermark: Option<DateTime<Utc>>,
    pub read: u64,
    pub written: u64,
    pub unchanged: u64,
    /// Dead letters, those of invalid times included.
    pub dead: u64,
    pub pulled: u64,
    pub elapsed_ms: u64,
}

/// Record one entity's finished catch-up.
pub fn record_entity(r: &EntityTotals<'_>, finished: DateTime<Utc>) {
    let e = r.entity.to_owned();
    if let Some(wm) = r.watermark {
        record_watermark(&e, wm);
    }
    counter!(READ, "entity" => e.clone()).increment(r.read);
    counter!(WRITTEN, "entity" => e.clone()).increment(r.written);
    counter!(UNCHANGED, "entity" => e.clone()).increment(r.unchanged);
    counter!(DEAD, "entity" => e.clone()).increment(r.dead);
    counter!(PULLED, "entity" => e.clone()).increment(r.pulled);
    gauge!(ENTITY_DURATION, "entity" => e.clone()).set(r.elapsed_ms as f64 / 1000.0);
    gauge!(ENTITY_SUCCESS, "entity" => e).set(secs(finished));
}

/// Record what waits for the entity after a run: source documents at or after its
/// watermark (None: not counted, e.g. never ran) and dead letters not yet retried or discarded.
pub fn record_outstanding(entity: &str, backlog: Option<u64>, dead_letters: i64) {
    if let Some(b) = backlog {
        gauge!(BACKLOG, "entity" => entity.to_owned()).set(b as f64);
    }
    gauge!(DEAD_OUTSTANDING, "entity" => entity.to_owned()).set(dead_letters.max(0) as f64);
}

/// Record the end of a whole run; `result` is one of [`RESULTS`]. Every run is recorded
/// once, whatever stage it ended at.
pub fn record_run(result: &'static str, elapsed_ms: u64, finished: DateTime<Utc>) {
    counter!(RUNS, "result" => result).increment(1);
    histogram!(RUN_DURATION).record(elapsed_ms as f64 / 1000.0);
    gauge!(LAST_RUN).set(secs(finished));
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

/// The exposition text of a scrape (the daemon's `/metrics`), with lag brought up to `now`.
pub fn render(now: DateTime<Utc>) -> String {
    let handle = install();
    let wms = WATERMARKS.lock().expect("watermarks lock").clone();
    for (entity, wm) in wms {
        let lag = (now - wm).num_milliseconds().max(0) as f64 / 1000.0;
        gauge!(LAG, "entity" => entity).set(lag);
    }
    handle.render()
}

/// Write the metrics for node_exporter's textfile collector: counters and histograms carried
/// on from the file being replaced ([`accumulate`]), no `tidemark_lag_seconds`; written to a
/// temp file with mode 0644 (set explicitly, whatever the umask), fsynced, then renamed over
/// `path`, so the collector never reads half a file.
pub fn write_textfile(path: &Path, _now: DateTime<Utc>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("--textfile {} names no file", path.display()))?;
    let fail = || {
        format!(
            "writing the metrics textfile {} (--textfile); is the directory writable?",
            path.display()
        )
    };
    let previous = match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(fail),
    };
    let text = install().render();
    let known = ENTITIES.lock().expect("entities lock").clone();
    let text = match &previous {
        Some(prev) => accumulate(prev, &text, &known).unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), path = %path.display(),
                "the previous metrics textfile does not parse; counters start again from this run");
            text
        }),
        None => text,
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} for --textfile", dir.display()))?;
        // Readable by the collector's user, whatever the umask.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting mode 0755 on {}", dir.display()))?;
    }
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(TEXTFILE_MODE)
        .open(&tmp)
        .with_context(fail)?;
    f.set_permissions(std::fs::Permissions::from_mode(TEXTFILE_MODE))
        .with_context(fail)?;
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

/// One metric family of the text format: its HELP, TYPE and samples, in file order.
#[derive(Debug, Clone)]
struct Family {
    name: String,
    help: Option<String>,
    kind: String,
    samples: Vec<Sample>,
}

/// Split exposition text into families. A sample belongs to the family of the last TYPE
/// line when its name is the family's or a histogram/summary suffix of it.
fn families(text: &str) -> Result<Vec<Family>> {
    let mut out: Vec<Family> = Vec::new();
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
            help.insert(name.to_owned(), h.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            out.push(Family {
                name: name.to_owned(),
                help: None,
                kind: kind.trim().to_owned(),
                samples: Vec::new(),
            });
        } else if line.is_empty() || line.starts_with('#') {
            continue;
        } else {
            let s = parse(line)?.pop().expect("one sample per line");
            let belongs = out.last().is_some_and(|f| {
                s.name == f.name
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suf| s.name.strip_suffix(suf) == Some(f.name.as_str()))
            });
            if !belongs {
                out.push(Family {
                    name: s.name.clone(),
                    help: None,
                    kind: "untyped".into(),
                    samples: Vec::new(),
                });
            }
            out.last_mut().expect("a family").samples.push(s);
        }
    }
    for f in &mut out {
        f.help = help.remove(&f.name);
    }
    Ok(out)
}

fn render_families(fams: &[Family]) -> String {
    let mut out = String::new();
    for f in fams {
        if let Some(h) = &f.help {
            out.push_str(&format!("# HELP {} {}\n", f.name, h));
        }
        out.push_str(&format!("# TYPE {} {}\n", f.name, f.kind));
        for s in &f.samples {
            out.push_str(&s.name);
            if !s.labels.is_empty() {
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{v}\""))
                    .collect();
                out.push_str(&format!("{{{}}}", labels.join(",")));
            }
            out.push_str(&format!(" {}\n", s.value));
        }
        out.push('\n');
    }
    out
}

/// The textfile to write after a run: `current` (this process's metrics) with the file it
/// replaces folded in. Counters and histograms are summed per series, and series only the
/// previous file has are kept, so they stay monotonic across runs (a removed file is a
/// counter reset, which `increase()` handles). The timestamp gauges in [`CARRIED_GAUGES`]
/// are kept from the previous file when this run did not set them. Carried series of an
/// entity outside `known` are dropped (when `known` is not empty).
pub fn accumulate(previous: &str, current: &str, known: &BTreeSet<String>) -> Result<String> {
    let prev = families(previous).context("the previous textfile")?;
    let mut cur = families(current).context("this run's metrics")?;
    let keep =
        |s: &Sample| known.is_empty() || s.labels.get("entity").is_none_or(|e| known.contains(e));
    let cumulative = |kind: &str| kind == "counter" || kind == "histogram";
    for p in &prev {
        let carried = cumulative(&p.kind) || CARRIED_GAUGES.contains(&p.name.as_str());
        match cur.iter_mut().find(|c| c.name == p.name) {
            Some(c) if c.kind == p.kind => {
                for ps in &p.samples {
                    match c
                        .samples
                        .iter_mut()
                        .find(|cs| cs.name == ps.name && cs.labels == ps.labels)
                    {
                        Some(cs) if cumulative(&c.kind) => cs.value += ps.value,
                        Some(_) => {}
                        None if carried && keep(ps) => c.samples.push(ps.clone()),
                        None => {}
                    }
                }
            }
            Some(_) => {}
            None if carried => {
                let mut p = p.clone();
                p.samples.retain(|s| keep(s));
                if !p.samples.is_empty() {
                    cur.push(p);
                }
            }
            None => {}
        }
    }
    Ok(render_families(&cur))
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

    fn value(text: &str, name: &str, label: (&str, &str)) -> Option<f64> {
        parse(text)
            .unwrap()
            .into_iter()
            .find(|s| {
                s.name == name
                    && (label.0.is_empty()
                        || s.labels.get(label.0).map(String::as_str) == Some(label.1))
            })
            .map(|s| s.value)
    }

    const PREVIOUS: &str = "\
# HELP tidemark_runs_total Runs by result.
# TYPE tidemark_runs_total counter
tidemark_runs_total{result=\"ok\"} 4
tidemark_runs_total{result=\"failed\"} 2

# TYPE tidemark_documents_dead_lettered_total counter
tidemark_documents_dead_lettered_total{entity=\"users\"} 3
tidemark_documents_dead_lettered_total{entity=\"gone\"} 9

# TYPE tidemark_watermark_timestamp_seconds gauge
tidemark_watermark_timestamp_seconds{entity=\"users\"} 1000
tidemark_watermark_timestamp_seconds{entity=\"gone\"} 500

# TYPE tidemark_last_success_timestamp_seconds gauge
tidemark_last_success_timestamp_seconds 1100

# TYPE tidemark_build_info gauge
tidemark_build_info{version=\"0.0.9\"} 1

# TYPE tidemark_run_duration_seconds histogram
tidemark_run_duration_seconds_bucket{le=\"1\"} 1
tidemark_run_duration_seconds_bucket{le=\"+Inf\"} 4
tidemark_run_duration_seconds_sum 30.5
tidemark_run_duration_seconds_count 4
";

    /// A run that failed before its first window: it counted one failed run and set nothing else.
    const FAILED_RUN: &str = "\
# HELP tidemark_runs_total Runs by result.
# TYPE tidemark_runs_total counter
tidemark_runs_total{result=\"ok\"} 0
tidemark_runs_total{result=\"failed\"} 1

# TYPE tidemark_build_info gauge
tidemark_build_info{version=\"0.1.0\"} 1

# TYPE tidemark_run_duration_seconds histogram
tidemark_run_duration_seconds_bucket{le=\"1\"} 1
tidemark_run_duration_seconds_bucket{le=\"+Inf\"} 1
tidemark_run_duration_seconds_sum 0.2
tidemark_run_duration_seconds_count 1
";

    #[test]
    fn a_textfile_carries_counters_and_timestamps_on_from_the_file_it_replaces() {
        let known: BTreeSet<String> = ["users".to_owned()].into();
        let out = accumulate(PREVIOUS, FAILED_RUN, &known).unwrap();
        // Counters summed per series, series of the previous file kept (entity in the mapping).
        assert_eq!(value(&out, RUNS, ("result", "failed")), Some(3.0), "{out}");
        assert_eq!(value(&out, RUNS, ("result", "ok")), Some(4.0), "{out}");
        assert_eq!(value(&out, DEAD, ("entity", "users")), Some(3.0), "{out}");
        // Histograms summed bucket by bucket.
        let bucket = |le| value(&out, "tidemark_run_duration_seconds_bucket", ("le", le));
        assert_eq!(bucket("1"), Some(2.0));
        assert_eq!(bucket("+Inf"), Some(5.0));
        assert_eq!(
            value(&out, "tidemark_run_duration_seconds_count", ("", "")),
            Some(5.0)
        );
        assert_eq!(
            value(&out, "tidemark_run_duration_seconds_sum", ("", "")),
            Some(30.7)
        );
        // Timestamps kept so their age keeps growing; other gauges are this run's only.
        assert_eq!(value(&out, WATERMARK, ("entity", "users")), Some(1000.0));
        assert_eq!(value(&out, LAST_SUCCESS, ("", "")), Some(1100.0));
        assert_eq!(value(&out, BUILD_INFO, ("version", "0.0.9")), None, "{out}");
        assert_eq!(value(&out, BUILD_INFO, ("version", "0.1.0")), Some(1.0));
        // An entity no longer in the mapping is not carried.
        assert!(!out.contains("\"gone\""), "{out}");
        // Written again, it parses the same way (no drift across many runs).
        assert_eq!(accumulate("", &out, &known).unwrap(), out);
        let twice = accumulate(&out, FAILED_RUN, &known).unwrap();
        assert_eq!(value(&twice, RUNS, ("result", "failed")), Some(4.0));
    }

    #[test]
    fn gauges_set_by_this_run_win_over_the_previous_file() {
        let current = "# TYPE tidemark_watermark_timestamp_seconds gauge\ntidemark_watermark_timestamp_seconds{entity=\"users\"} 2000\n";
        let out = accumulate(PREVIOUS, current, &BTreeSet::new()).unwrap();
        assert_eq!(value(&out, WATERMARK, ("entity", "users")), Some(2000.0));
        // Without a known mapping nothing is dropped.
        assert_eq!(value(&out, WATERMARK, ("entity", "gone")), Some(500.0));
    }

    #[test]
    fn the_exporters_text_round_trips() {
        install();
        entities(&["round_trip"]);
        record_run("ok", 1500, Utc::now());
        let text = install().render();
        let fams = families(&text).unwrap();
        let runs = fams.iter().find(|f| f.name == RUNS).expect("runs family");
        assert_eq!(runs.kind, "counter");
        assert!(runs.help.as_deref().is_some_and(|h| h.contains("failed")));
        let hist = fams
            .iter()
            .find(|f| f.name == RUN_DURATION)
            .expect("histogram");
        assert_eq!(hist.kind, "histogram");
        assert!(hist.samples.iter().any(|s| s.name.ends_with("_bucket")));
        let again = render_families(&fams);
        assert_eq!(parse(&again).unwrap(), parse(&text).unwrap());
    }
}
