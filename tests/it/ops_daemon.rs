//! The daemon: its cron schedule (pure), its runner under a paused clock (no overlap,
//! capped backoff), its metrics endpoint scraped and parsed, and graceful shutdown
//! mid-batch (the batch commits, the checkpoint is saved, nothing is lost).

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use crate::ops_util::{free_port, items, seed, signal, stderr_of, tidemark, wait_exit, wait_for};
use bson::doc;
use chrono::{TimeZone, Utc};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidemark::commands::daemon::{self, Outcome, Policy, State};
use tidemark::telemetry::metrics;

#[test]
fn ops_schedule_fires_at_the_configured_times() {
    let t = Utc.with_ymd_and_hms(2026, 3, 1, 2, 30, 0).unwrap();
    let next = tidemark::schedule::upcoming("0 30 2 * * *", t, 3).unwrap();
    assert_eq!(
        next,
        vec![
            Utc.with_ymd_and_hms(2026, 3, 2, 2, 30, 0).unwrap(),
            Utc.with_ymd_and_hms(2026, 3, 3, 2, 30, 0).unwrap(),
            Utc.with_ymd_and_hms(2026, 3, 4, 2, 30, 0).unwrap(),
        ]
    );
    let every15 = tidemark::schedule::upcoming("*/15 * * * * *", t, 2).unwrap();
    assert_eq!(every15[1] - every15[0], chrono::TimeDelta::seconds(15));
    // Five-field cron, as in a crontab, fires at second 0 and loads; a broken expression is
    // rejected with both forms in the message.
    let five = tidemark::schedule::upcoming("30 2 * * *", t, 3).unwrap();
    assert_eq!(five, next);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("five.toml");
    std::fs::write(&file, "[daemon]\nschedule = \"30 2 * * *\"\n").unwrap();
    tidemark::settings::Settings::load(Some(&file)).expect("five-field schedule loads");
    std::fs::write(&file, "[daemon]\nschedule = \"30 25 * * *\"\n").unwrap();
    let err = format!(
        "{:#}",
        tidemark::settings::Settings::load(Some(&file)).unwrap_err()
    );
    assert!(
        err.contains("daemon.schedule")
            && err.contains("five fields")
            && err.contains("seconds first"),
        "{err}"
    );
}

/// Under a paused clock: a failing run is retried after 10 s, 20 s, 40 s (capped at 40 s,
/// plus at most 20% jitter), ticks during a run are skipped, and success resets the count.
#[tokio::test(start_paused = true)]
async fn ops_runner_backs_off_and_never_overlaps() {
    let state = Arc::new(State::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let running = Arc::new(AtomicU32::new(0));
    let max_parallel = Arc::new(AtomicU32::new(0));
    let policy = Policy {
        initial: Duration::from_secs(10),
        max: Duration::from_secs(40),
    };
    let (c, r, m) = (calls.clone(), running.clone(), max_parallel.clone());
    let run = move || {
        let (c, r, m) = (c.clone(), r.clone(), m.clone());
        async move {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(n, Ordering::SeqCst);
            let attempt = {
                let mut calls = c.lock().unwrap();
                calls.push(tokio::time::Instant::now());
                calls.len()
            };
            tokio::time::sleep(Duration::from_secs(1)).await; // each run takes 1 s
            r.fetch_sub(1, Ordering::SeqCst);
            if attempt <= 4 {
                Outcome::Retry(format!("source down (attempt {attempt})"))
            } else {
                Outcome::Ok
            }
        }
    };
    let t0 = tokio::time::Instant::now();
    let task = tokio::spawn(daemon::runner(rx, state.clone(), policy, stop.clone(), run));

    // Act: one tick, then more ticks while the run and its retries are under way.
    assert!(daemon::tick(&state, &tx));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let skipped_mid_run = !daemon::tick(&state, &tx);
    tokio::time::sleep(Duration::from_secs(300)).await;
    let failures_after = state.failures.load(Ordering::SeqCst);
    let queued_after = daemon::tick(&state, &tx);
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    task.await.unwrap();

    // Assert
    let calls = calls.lock().unwrap().clone();
    assert!(skipped_mid_run, "a tick during a run must be skipped");
    assert_eq!(max_parallel.load(Ordering::SeqCst), 1, "runs overlapped");
    assert_eq!(
        calls.len(),
        6,
        "4 failures, 1 success, then 1 run for the later tick"
    );
    let gaps: Vec<f64> = calls
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() - 1.0)
        .collect();
    for (i, base) in [10.0, 20.0, 40.0, 40.0].iter().enumerate() {
        assert!(
            gaps[i] >= *base - 0.01 && gaps[i] <= base * 1.2 + 0.2,
            "retry {} came after {:.2}s, expected {base}s + up to 20%: {gaps:?}",
            i + 1,
            gaps[i]
        );
    }
    assert_eq!(failures_after, 0, "success must reset the failure count");
    assert!(queued_after);
    assert!(calls[0] - t0 < Duration::from_millis(10));
}

fn daemon_cmd(env: &Env, port: u16) -> std::process::Command {
    let mut c = tidemark(env, &env.target_url, &["daemon"]);
    c.env("TIDEMARK__DAEMON__SCHEDULE", "0 0 0 1 1 *") // once a year: only run_on_start runs
        .env("TIDEMARK__DAEMON__RUN_ON_START", "true")
        .env("TIDEMARK__DAEMON__METRICS_LISTEN", port.to_string())
        .env("TIDEMARK__DAEMON__SHUTDOWN_GRACE", "60s");
    c
}

pub async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

fn value(samples: &[metrics::Sample], name: &str, entity: Option<&str>) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && entity.is_none_or(|e| s.labels.get("entity").map(String::as_str) == Some(e))
        })
        .map(|s| s.value)
}

#[tokio::test]
async fn ops_daemon_metrics_scraped_and_parsed() {
    // Arrange
    let env = Env::new("metrics", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(1500, Utc::now().timestamp_millis() - 3 * 86_400_000, 10),
    )
    .await;
    let port = free_port();
    let mut child = daemon_cmd(&env, port).spawn().unwrap();

    // Act: scrape until the first run is counted.
    let mut samples = Vec::new();
    for _ in 0..600 {
        if let Some((200, body)) = get(port, "/metrics").await {
            samples = metrics::parse(&body).expect("valid exposition format");
            let ok = samples.iter().find(|s| {
                s.name == metrics::RUNS && s.labels.get("result").map(String::as_str) == Some("ok")
            });
            if ok.is_some_and(|s| s.value >= 1.0) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = get(port, "/health").await;
    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(60))
        .await
        .expect("daemon ignores SIGTERM");

    // Assert
    let now = Utc::now().timestamp() as f64;
    assert_eq!(
        value(&samples, metrics::READ, Some("items")),
        Some(1500.0),
        "{samples:?}"
    );
    assert_eq!(
        value(&samples, metrics::WRITTEN, Some("items")),
        Some(1500.0)
    );
    assert_eq!(value(&samples, metrics::DEAD, Some("items")), Some(0.0));
    let wm = value(&samples, metrics::WATERMARK, Some("items")).expect("watermark gauge");
    assert!(
        (now - 120.0..=now + 1.0).contains(&wm),
        "watermark {wm} is not about now ({now})"
    );
    let lag = value(&samples, metrics::LAG, Some("items")).expect("lag gauge");
    assert!((0.0..120.0).contains(&lag), "lag {lag}");
    assert!(value(&samples, metrics::LAST_SUCCESS, None).unwrap() > now - 120.0);
    assert_eq!(value(&samples, metrics::IN_PROGRESS, None), Some(0.0));
    assert!(samples
        .iter()
        .any(|s| s.name.starts_with(metrics::RUN_DURATION)));
    let runs: Vec<_> = samples.iter().filter(|s| s.name == metrics::RUNS).collect();
    for s in &runs {
        let ok = s.labels.get("result").map(String::as_str) == Some("ok");
        assert_eq!(s.value, if ok { 1.0 } else { 0.0 }, "{s:?}");
    }
    assert_eq!(
        runs.len(),
        metrics::RESULTS.len(),
        "every result is published: {runs:?}"
    );
    for s in &samples {
        for k in s.labels.keys() {
            assert!(
                ["entity", "result", "le", "quantile", "version"].contains(&k.as_str()),
                "unbounded label {k} in {s:?}"
            );
        }
    }
    let (code, body) = health.expect("/health answered");
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(status.code(), Some(0), "{}", stderr_of(&mut child));
}

/// SIGTERM during a rate-limited run: the daemon exits 0, the checkpoint holds the last
/// committed position, the target holds exactly the documents up to it, and the next run
/// finishes the job with nothing lost or doubled.
#[tokio::test]
async fn ops_daemon_graceful_shutdown_mid_batch() {
    // Arrange: 60k documents; batches of 500 at 10k docs/s.
    const DOCS: i64 = 60_000;
    let env = Env::new("graceful", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(DOCS, Utc::now().timestamp_millis() - 10 * 86_400_000, 10),
    )
    .await;
    let url = env.target_url.clone();
    let mut child = daemon_cmd(&env, free_port())
        .env("TIDEMARK__SOURCE__RATE_LIMIT", "10000")
        .spawn()
        .unwrap();
    assert!(
        wait_for(
            &url,
            "SELECT COUNT(*) FROM items",
            2000,
            Duration::from_secs(60)
        )
        .await,
        "the daemon never started writing"
    );

    // Act
    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;

    // Assert: a clean, bounded exit with the position saved.
    let status = status.expect("the daemon did not exit within 60 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", stderr_of(&mut child));
    let rows = scalar_i64(&url, "SELECT COUNT(*) FROM items").await;
    assert!(
        rows < DOCS,
        "the run finished before SIGTERM; the test proved nothing"
    );
    let last_id: String = scalar_text(
        &url,
        "SELECT last_id FROM tidemark_checkpoints WHERE lane = 'nightly:items'",
    )
    .await;
    let last_ts: String = scalar_text(
        &url,
        "SELECT last_ts FROM tidemark_checkpoints WHERE lane = 'nightly:items'",
    )
    .await;
    let (id, ts) = (number(&last_id), number(&last_ts));
    let upto = env
        .db
        .collection::<bson::Document>("items")
        .count_documents(
            doc! { "$or": [ { "t": { "$lt": ts } }, { "t": ts, "_id": { "$lte": id } } ] },
        )
        .await
        .unwrap() as i64;
    assert_eq!(
        rows, upto,
        "rows must be exactly the documents up to the checkpoint"
    );
    assert_eq!(
        scalar_i64(&url, "SELECT COUNT(*) FROM tidemark_locks").await,
        0,
        "lease not released"
    );

    let done = tidemark(&env, &url, &["run"]).output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(
        scalar_i64(&url, "SELECT COUNT(DISTINCT id) FROM items").await,
        DOCS
    );
    assert_eq!(scalar_i64(&url, "SELECT COUNT(*) FROM items").await, DOCS);
}

async fn scalar_text(url: &str, sql: &str) -> String {
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
    sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
}

/// The integer inside canonical extended JSON (`{"$numberLong":"42"}` or `42`).
fn number(json: &str) -> i64 {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    match &v {
        serde_json::Value::Object(m) => m
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
        _ => v.as_i64().unwrap(),
    }
}
