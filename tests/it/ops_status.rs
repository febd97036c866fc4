//! `tidemark status` exit codes for each Nagios threshold, its report of the last run and
//! of a running backfill, and the node_exporter textfile written by `run --textfile`.

use crate::harness::{items_mapping, Backend, Env};
use crate::ops_util::{dead_mongo_uri, items, seed, tidemark};
use tidemark::commands::status::{NAGIOS_CRITICAL, NAGIOS_OK, NAGIOS_UNKNOWN, NAGIOS_WARNING};
use tidemark::telemetry::metrics;

fn status(env: &Env, args: &[&str]) -> (i32, String) {
    let mut all = vec!["status"];
    all.extend_from_slice(args);
    let out = tidemark(env, &env.target_url, &all).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn ops_status_exit_codes_follow_nagios() {
    // Arrange: a run that stops 30 h ago, so the lag is ~30 h.
    let env = Env::new("status", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(
            300,
            chrono::Utc::now().timestamp_millis() - 3 * 86_400_000,
            10,
        ),
    )
    .await;
    let out = tidemark(&env, &env.target_url, &["run", "--until", "-30h"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Act
    let ok = status(&env, &["--warn", "40h", "--crit", "48h"]);
    let warning = status(&env, &["--warn", "26h", "--crit", "48h"]);
    let critical = status(&env, &["--warn", "10h", "--crit", "20h"]);
    let json = status(&env, &["--json", "--warn", "26h", "--crit", "48h"]);
    let unknown = {
        let out = tidemark(&env, &env.target_url, &["status", "--warn", "26h"])
            .env("TIDEMARK__SOURCE__URI", dead_mongo_uri())
            .env("TIDEMARK__SOURCE__CONNECT_TIMEOUT", "1s")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };

    // Assert
    assert_eq!(ok.0, NAGIOS_OK, "{}", ok.1);
    assert!(ok.1.starts_with("OK"), "{}", ok.1);
    assert_eq!(warning.0, NAGIOS_WARNING, "{}", warning.1);
    assert!(warning.1.starts_with("WARNING"), "{}", warning.1);
    assert_eq!(critical.0, NAGIOS_CRITICAL, "{}", critical.1);
    assert_eq!(unknown.0, NAGIOS_UNKNOWN, "{}", unknown.1);
    assert!(unknown.1.starts_with("UNKNOWN"), "{}", unknown.1);
    let v: serde_json::Value = serde_json::from_str(&json.1).expect("status --json is JSON");
    assert_eq!(json.0, NAGIOS_WARNING);
    assert_eq!(v["state"], "WARNING");
    let items = &v["entities"][0];
    assert_eq!(items["entity"], "items");
    assert_eq!(items["last_result"], "ok");
    assert!(items["last_duration_s"].as_f64().is_some(), "{items}");
    let lag = items["lag_seconds"].as_u64().unwrap();
    assert!((30 * 3600..31 * 3600).contains(&lag), "lag {lag}");
}

#[tokio::test]
async fn ops_status_shows_an_unfinished_backfill() {
    // Arrange: a backfill interrupted by SIGKILL after its first chunk.
    let env = Env::new("stbf", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    let day = 86_400_000i64;
    let today = chrono::Utc::now().date_naive();
    let base = (today - chrono::Days::new(10))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let docs: Vec<bson::Document> = (0..20_000i64)
        .map(|i| bson::doc! { "_id": i, "t": base.timestamp_millis() + i * (4 * day / 20_000) })
        .collect();
    seed(&env, docs).await;
    let from = base.format("%Y-%m-%d").to_string();
    let to = (base + chrono::TimeDelta::days(4))
        .format("%Y-%m-%d")
        .to_string();
    let mut child = tidemark(
        &env,
        &env.target_url,
        &["backfill", "--from", &from, "--to", &to, "--chunk", "6h"],
    )
    .env("TIDEMARK__SOURCE__RATE_LIMIT", "4000")
    .spawn()
    .unwrap();
    let started = crate::ops_util::wait_for(
        &env.target_url,
        "SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE status = 'done'",
        1,
        std::time::Duration::from_secs(60),
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();

    // Act
    let (code, text) = status(&env, &[]);
    let (_, json) = status(&env, &["--json"]);

    // Assert
    assert!(started);
    assert_eq!(code, NAGIOS_OK, "{text}");
    assert!(text.contains("backfill bf-"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let bf = &v["backfills"][0];
    assert_eq!(bf["progress"]["total"], 16);
    let done = bf["progress"]["done"].as_u64().unwrap();
    assert!((1..16).contains(&done), "{bf}");
    assert!(bf["progress"]["docs_read"].as_u64().unwrap() > 0, "{bf}");
}

#[tokio::test]
async fn ops_run_writes_a_textfile() {
    let env = Env::new("textfile", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(700, chrono::Utc::now().timestamp_millis() - 86_400_000, 10),
    )
    .await;
    let path = env.dir.path().join("tidemark.prom");
    let out = tidemark(
        &env,
        &env.target_url,
        &["run", "--textfile", path.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples = metrics::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let get = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name)
            .map(|s| (s.labels.clone(), s.value))
    };
    let (labels, read) = get(metrics::READ).expect("documents read");
    assert_eq!(labels.get("entity").map(String::as_str), Some("items"));
    assert_eq!(read, 700.0);
    assert!(get(metrics::WATERMARK).is_some() && get(metrics::LAST_SUCCESS).is_some());
    // The lag at the end of the run would freeze in the file: alerts use the watermark's age.
    assert!(get(metrics::LAG).is_none());
    let ok = samples.iter().find(|s| {
        s.name == metrics::RUNS && s.labels.get("result").map(String::as_str) == Some("ok")
    });
    assert_eq!(ok.map(|s| s.value), Some(1.0));
    assert!(
        !path.with_file_name(".tidemark.prom.tmp").exists(),
        "temp file left behind"
    );
}
