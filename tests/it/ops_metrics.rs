//! Metrics an alert can use, from real runs: the textfile stays cumulative, readable and
//! complete across failed runs; the daemon counts runs that fail before any window and is
//! not ready before it has connected; the shipped dashboard and alerts name only metrics
//! the program exports. Logs: JSON keys unique, no dependency noise, a quiet check-config.

use crate::harness::{items_mapping, Backend, Env};
use crate::ops_util::{dead_mongo_uri, free_port, items, seed, signal, tidemark, wait_exit};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tidemark::telemetry::metrics::{self as prom, Sample};

/// `tidemark run --textfile PATH` under the harshest umask a unit could set.
fn run_textfile(env: &Env, path: &Path, extra_env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new("sh");
    c.args(["-c", "umask 077 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_tidemark"))
        .args(["run", "--textfile", path.to_str().unwrap()])
        .envs(env.env_vars(&env.target_url))
        .env("TIDEMARK__LOCK__LEASE", "3s")
        .env("TIDEMARK__SOURCE__CONNECT_TIMEOUT", "1s")
        .env_remove("RUST_LOG");
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn read(path: &Path) -> Vec<Sample> {
    prom::parse(&std::fs::read_to_string(path).unwrap()).expect("valid exposition format")
}

fn get(samples: &[Sample], name: &str, label: (&str, &str)) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && (label.0.is_empty()
                    || s.labels.get(label.0).map(String::as_str) == Some(label.1))
        })
        .map(|s| s.value)
}

#[tokio::test]
async fn ops_textfile_is_cumulative_readable_and_survives_failed_runs() {
    // Arrange
    let env = Env::new("promfile", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(700, chrono::Utc::now().timestamp_millis() - 86_400_000, 10),
    )
    .await;
    let path = env.dir.path().join("metrics").join("tidemark.prom");
    let dead = dead_mongo_uri();

    // Act: a good run, a run whose source is down, one whose mapping is missing, a good run.
    let first = run_textfile(&env, &path, &[]);
    let after_first = read(&path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    std::thread::sleep(Duration::from_millis(1100));
    let down = run_textfile(&env, &path, &[("TIDEMARK__SOURCE__URI", &dead)]);
    let after_down = read(&path);
    let no_mapping = run_textfile(
        &env,
        &path,
        &[("TIDEMARK__SYNC__MAPPING", "/nonexistent/mapping.toml")],
    );
    let after_config = read(&path);
    let last = run_textfile(&env, &path, &[]);
    let after_last = read(&path);

    // Assert
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(first.status.success(), "{}", err(&first));
    assert!(!down.status.success(), "{}", err(&down));
    assert!(!no_mapping.status.success(), "{}", err(&no_mapping));
    assert!(last.status.success(), "{}", err(&last));
    assert_eq!(
        mode, 0o644,
        "node_exporter must be able to read the textfile"
    );
    assert_eq!(dir_mode, 0o755);
    assert!(
        !path.with_file_name(".tidemark.prom.tmp").exists(),
        "temp file left behind"
    );

    let runs = |s: &[Sample], r| get(s, prom::RUNS, ("result", r));
    assert_eq!(runs(&after_first, "ok"), Some(1.0));
    for r in ["failed", "partial", "lock_held"] {
        assert_eq!(runs(&after_first, r), Some(0.0), "{r} starts at 0");
    }
    assert_eq!(
        get(&after_first, prom::READ, ("entity", "items")),
        Some(700.0)
    );
    assert_eq!(
        get(&after_first, prom::WRITTEN, ("entity", "items")),
        Some(700.0)
    );
    assert_eq!(
        get(&after_first, prom::DEAD_OUTSTANDING, ("entity", "items")),
        Some(0.0)
    );
    assert!(get(&after_first, prom::BACKLOG, ("entity", "items")).is_some());
    assert_eq!(
        get(
            &after_first,
            prom::BUILD_INFO,
            ("version", env!("CARGO_PKG_VERSION"))
        ),
        Some(1.0)
    );
    assert!(
        after_first.iter().all(|s| s.name != prom::LAG),
        "a textfile must not freeze the end-of-run lag"
    );
    let wm = get(&after_first, prom::WATERMARK, ("entity", "items")).expect("watermark");
    let success = get(&after_first, prom::LAST_SUCCESS, ("", "")).expect("last success");
    let first_end = get(&after_first, prom::LAST_RUN, ("", "")).expect("last run");

    // The source was down: counted as failed, the rest carried on unchanged.
    assert_eq!(runs(&after_down, "failed"), Some(1.0), "{}", err(&down));
    assert_eq!(runs(&after_down, "ok"), Some(1.0));
    assert_eq!(
        get(&after_down, prom::READ, ("entity", "items")),
        Some(700.0)
    );
    assert_eq!(
        get(&after_down, prom::WATERMARK, ("entity", "items")),
        Some(wm)
    );
    assert_eq!(
        get(&after_down, prom::LAST_SUCCESS, ("", "")),
        Some(success)
    );
    assert!(get(&after_down, prom::LAST_RUN, ("", "")).unwrap() > first_end);
    // A configuration failure is a failed run too.
    assert_eq!(
        runs(&after_config, "failed"),
        Some(2.0),
        "{}",
        err(&no_mapping)
    );
    // Counters never go back.
    assert_eq!(runs(&after_last, "ok"), Some(2.0));
    assert_eq!(runs(&after_last, "failed"), Some(2.0));
    assert_eq!(
        get(&after_last, prom::READ, ("entity", "items")),
        Some(700.0)
    );
    assert!(get(&after_last, prom::LAST_SUCCESS, ("", "")).unwrap() > success);
}

/// Every `tidemark_*` name in `text` (histogram series keep their suffix).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("tidemark_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The PromQL of the dashboard: every panel target's `expr` and every variable's query.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        // The data-source variable's query is a plugin type, not PromQL.
        serde_json::Value::Object(m) if m.get("type").is_some_and(|t| t == "datasource") => {}
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition" | "query", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn ops_dashboard_and_alerts_name_only_exported_metrics() {
    // Arrange: what a textfile run and the daemon's /metrics export.
    let env = Env::new("promnames", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(300, chrono::Utc::now().timestamp_millis() - 86_400_000, 10),
    )
    .await;
    let path = env.dir.path().join("tidemark.prom");
    let out = run_textfile(&env, &path, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut exported: BTreeSet<String> = read(&path).into_iter().map(|s| s.name).collect();
    let port = free_port();
    let mut daemon = tidemark(&env, &env.target_url, &["daemon"])
        .env("TIDEMARK__DAEMON__SCHEDULE", "0 0 0 1 1 *")
        .env("TIDEMARK__DAEMON__RUN_ON_START", "true")
        .env("TIDEMARK__DAEMON__METRICS_LISTEN", port.to_string())
        .spawn()
        .unwrap();
    let mut scraped = Vec::new();
    for _ in 0..600 {
        if let Some((200, body)) = crate::ops_daemon::get(port, "/metrics").await {
            scraped = prom::parse(&body).unwrap();
            if get(&scraped, prom::RUNS, ("result", "ok")).unwrap_or(0.0) >= 1.0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(&daemon, "TERM");
    wait_exit(&mut daemon, Duration::from_secs(60)).await;
    exported.extend(scraped.into_iter().map(|s| s.name));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/tidemark.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let alerts = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap();
    let exprs: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect();

    // Assert
    for name in [prom::LAG, prom::FAILURES, prom::NEXT_RUN, prom::BUILD_INFO] {
        assert!(exported.contains(name), "{name} not exported: {exported:?}");
    }
    assert!(
        queries.len() >= 12,
        "dashboard queries not found: {queries:?}"
    );
    assert!(exprs.len() >= 6, "alert expressions not found: {exprs:?}");
    let mut unknown = BTreeMap::new();
    for (what, text) in queries
        .iter()
        .map(|q| ("dashboard", q.as_str()))
        .chain(exprs.iter().map(|e| ("alerts.yml", *e)))
    {
        let names = metric_names(text);
        assert!(
            !names.is_empty(),
            "{what}: `{text}` names no tidemark metric"
        );
        for n in names {
            if !exported.contains(&n) {
                unknown.insert(n, format!("{what}: {text}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "queries name metrics tidemark does not export: {unknown:#?}\nexported: {exported:#?}"
    );
}

#[tokio::test]
async fn ops_daemon_with_its_source_down_counts_failures_and_is_not_ready() {
    // Arrange: the source is down from the start.
    let env = Env::new("promdown", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    let port = free_port();
    let mut daemon = tidemark(&env, &env.target_url, &["daemon"])
        .env("TIDEMARK__SOURCE__URI", dead_mongo_uri())
        .env("TIDEMARK__SOURCE__CONNECT_TIMEOUT", "1s")
        .env("TIDEMARK__DAEMON__SCHEDULE", "0 0 0 1 1 *")
        .env("TIDEMARK__DAEMON__RUN_ON_START", "true")
        .env("TIDEMARK__DAEMON__BACKOFF_INITIAL", "1s")
        .env("TIDEMARK__DAEMON__METRICS_LISTEN", port.to_string())
        .spawn()
        .unwrap();

    // Act: the first answer of /health, then scrape until a failed run is counted.
    let mut first_health = None;
    let mut failed = 0.0;
    let mut health = None;
    for _ in 0..600 {
        if first_health.is_none() {
            first_health = crate::ops_daemon::get(port, "/health").await;
        }
        if let Some((200, body)) = crate::ops_daemon::get(port, "/metrics").await {
            let s = prom::parse(&body).unwrap();
            failed = get(&s, prom::RUNS, ("result", "failed")).unwrap_or(0.0);
            if failed >= 1.0 {
                health = crate::ops_daemon::get(port, "/health").await;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(&daemon, "TERM");
    wait_exit(&mut daemon, Duration::from_secs(60)).await;

    // Assert
    let (code, body) = first_health.expect("/health answered");
    assert_eq!(code, 503, "not ready before a connection succeeded: {body}");
    assert!(failed >= 1.0, "a run that cannot connect is a failed run");
    let (code, body) = health.expect("/health answered");
    assert_eq!(code, 503, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "failing", "{h}");
    assert_eq!(h["connected"], false, "{h}");
}

/// Keys of one JSON object, failing on a duplicate (serde_json keeps the last silently).
struct UniqueKeys(Vec<String>);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    if keys.contains(&k) {
                        return Err(serde::de::Error::custom(format!("duplicate key `{k}`")));
                    }
                    m.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(UniqueKeys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

#[tokio::test]
async fn ops_json_logs_have_unique_keys_and_no_dependency_noise() {
    // Arrange: PostgreSQL, where migrating an existing schema makes sqlx log a notice.
    let env = Env::new("logkeys", Backend::Postgres, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(50, chrono::Utc::now().timestamp_millis() - 86_400_000, 10),
    )
    .await;

    // Act
    let mut logs = String::new();
    for _ in 0..2 {
        let out = tidemark(&env, &env.target_url, &["run"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        logs.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let quiet = tidemark(&env, &env.target_url, &["check-config", "--quiet"])
        .output()
        .unwrap();
    let bad = tidemark(&env, &env.target_url, &["check-config", "--quiet"])
        .env("TIDEMARK__SYNC__MAPPING", "/nonexistent/mapping.toml")
        .output()
        .unwrap();

    // Assert
    let mut events = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let keys: UniqueKeys = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON with unique keys ({e}): {line}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let target = v["target"].as_str().unwrap_or_default();
        assert!(
            target.starts_with("tidemark") || v["level"] == "WARN" || v["level"] == "ERROR",
            "a dependency logs below WARN: {line}"
        );
        assert!(keys.0.contains(&"message".to_owned()), "{line}");
        events += 1;
    }
    assert!(events >= 2, "no log events parsed: {logs}");
    assert!(logs.contains("run started"), "{logs}");
    assert!(!logs.contains("_sqlx_migrations"), "{logs}");
    assert!(
        quiet.status.success(),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
    let stdout = String::from_utf8_lossy(&quiet.stdout);
    assert_eq!(stdout.lines().count(), 1, "check-config --quiet: {stdout}");
    assert!(stdout.contains("OK"), "{stdout}");
    assert_eq!(bad.status.code(), Some(5));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/mapping.toml"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
