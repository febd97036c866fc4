//! Retention: `prune` removes the reports, ledger rows and provenance of runs older than the
//! cutoff and keeps recent runs, running runs and what `status` reads; `--dry-run` changes
//! nothing; a pruned run cannot be rolled back (a clear error, nothing changed), a kept one
//! still can; the daemon prunes after its scheduled run when `[retention]` says so.

use crate::harness::{scalar_i64, Backend};
use crate::ops_util::{signal, tidemark, wait_exit, wait_for};
use crate::trust_util::{day_two, dump_domain, exec, run_until, seed};
use bson::doc;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tidemark::commands::prune::prune;
use tidemark::commands::rollback::rollback;
use tidemark::commands::run::RunOptions;

const DAY_MS: i64 = 86_400_000;
const NINETY_DAYS: Duration = Duration::from_secs(90 * 86_400);

/// Make run `id` look `days` older: its ledger times and its report file's mtime.
async fn age(url: &str, reports: &Path, id: &str, days: i64) {
    let d = days * DAY_MS;
    exec(
        url,
        &format!(
            "UPDATE tidemark_runs SET started_at_ms = started_at_ms - {d}, \
             finished_at_ms = finished_at_ms - {d} WHERE id = '{id}'"
        ),
    )
    .await;
    for f in tidemark::sink::runs::report_files(reports).unwrap() {
        if f.run_id == id {
            set_age(&f.path, days);
        }
    }
}

fn set_age(path: &Path, days: i64) {
    let t = SystemTime::now() - Duration::from_secs(days as u64 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

async fn rows_of(url: &str, table: &str, run: &str) -> i64 {
    let col = if table == "tidemark_runs" || table == "tidemark_pruned_runs" {
        "id"
    } else {
        "run_id"
    };
    scalar_i64(
        url,
        &format!("SELECT COUNT(*) FROM {table} WHERE {col} = '{run}'"),
    )
    .await
}

/// Row counts of the tables prune touches, and the report files.
async fn snapshot(url: &str, reports: &Path) -> (Vec<i64>, Vec<String>) {
    let mut counts = Vec::new();
    for t in [
        "tidemark_runs",
        "tidemark_provenance",
        "tidemark_run_lanes",
        "tidemark_pruned_runs",
    ] {
        counts.push(scalar_i64(url, &format!("SELECT COUNT(*) FROM {t}")).await);
    }
    let mut files: Vec<String> = std::fs::read_dir(reports)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    (counts, files)
}

async fn prune_story(backend: Backend) {
    // Arrange: run A (day 0) and run B (day 1), aged 200 and 150 days; a recent record run C
    // that changed one row; a run recorded as running for a year; a file of the operator's.
    let env = seed(backend, "prune").await;
    let url = env.target_url.clone();
    let reports = env.settings().reports_path();
    let a = run_until(env.settings(), "2019-01-02", false)
        .await
        .expect("run A");
    day_two(&env).await;
    let b = run_until(env.settings(), "2019-01-03", false)
        .await
        .expect("run B");
    age(&url, &reports, &a.run_id, 200).await;
    age(&url, &reports, &b.run_id, 150).await;
    env.db
        .collection::<bson::Document>("items")
        .update_one(
            doc! { "_id": 3i64 },
            doc! { "$set": { "v": "changed again" } },
        )
        .await
        .unwrap();
    let c = tidemark::commands::run::run(
        env.settings(),
        RunOptions {
            entities: vec!["items".into()],
            ids: vec!["3".into()],
            ..Default::default()
        },
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .expect("record run C");
    // After C: starting a run records dead "running" rows as abandoned.
    let year_ago = chrono::Utc::now().timestamp_millis() - 365 * DAY_MS;
    exec(
        &url,
        &format!(
            "INSERT INTO tidemark_runs (id, kind, dry_run, status, host, pid, started_at_ms, \
             settings_fingerprint, mapping_version) VALUES ('still-running', 'backfill', FALSE, \
             'running', 'h', 1, {year_ago}, 'f', 'm')"
        ),
    )
    .await;
    std::fs::write(reports.join("notes.json"), "{}").unwrap();
    set_age(&reports.join("notes.json"), 400);
    let prov_a = rows_of(&url, "tidemark_provenance", &a.run_id).await;
    let prov_b = rows_of(&url, "tidemark_provenance", &b.run_id).await;
    let prov_c = rows_of(&url, "tidemark_provenance", &c.run_id).await;
    assert!(
        prov_a > 0 && prov_b > 0 && prov_c > 0,
        "{prov_a} {prov_b} {prov_c}"
    );
    let file_of = |id: &str| {
        tidemark::sink::runs::report_files(&reports)
            .unwrap()
            .into_iter()
            .any(|f| f.run_id == id)
    };
    assert!(file_of(&a.run_id) && file_of(&b.run_id) && file_of(&c.run_id));

    // Act 1: a dry run counts and changes nothing.
    let before = snapshot(&url, &reports).await;
    let dry = prune(&env.settings(), Some(NINETY_DAYS), true)
        .await
        .expect("prune --dry-run");
    assert_eq!(
        snapshot(&url, &reports).await,
        before,
        "a dry run changed something"
    );
    assert_eq!(dry.runs, 2, "{dry}");
    assert_eq!(
        dry.removed.ledger_rows, 1,
        "A goes, B stays for status: {dry}"
    );
    assert_eq!(
        dry.removed.provenance_records as i64,
        prov_a + prov_b,
        "{dry}"
    );
    assert!(
        dry.removed.provenance_bytes > 0 && dry.removed.lane_rows >= 2,
        "{dry}"
    );
    assert_eq!(dry.report_files, 1, "only A's report: {dry}");
    assert_eq!(
        dry.kept_for_status
            .iter()
            .map(|k| k.0.as_str())
            .collect::<Vec<_>>(),
        [b.run_id.as_str()]
    );
    let text = dry.to_string();
    for kind in ["reports:", "runs:", "provenance:", "run lanes:"] {
        assert_eq!(
            text.lines().filter(|l| l.starts_with(kind)).count(),
            1,
            "one line per kind: {text}"
        );
    }

    // Act 2: prune.
    let done = prune(&env.settings(), Some(NINETY_DAYS), false)
        .await
        .expect("prune");

    // Assert: what the dry run said went, and nothing else.
    assert_eq!((done.runs, done.removed), (dry.runs, dry.removed), "{done}");
    assert_eq!(done.report_files, dry.report_files);
    assert_eq!(rows_of(&url, "tidemark_runs", &a.run_id).await, 0);
    assert_eq!(
        rows_of(&url, "tidemark_runs", &b.run_id).await,
        1,
        "status reads B"
    );
    assert_eq!(rows_of(&url, "tidemark_runs", "still-running").await, 1);
    assert_eq!(rows_of(&url, "tidemark_runs", &c.run_id).await, 1);
    for run in [&a.run_id, &b.run_id] {
        assert_eq!(rows_of(&url, "tidemark_provenance", run).await, 0);
        assert_eq!(rows_of(&url, "tidemark_run_lanes", run).await, 0);
        assert_eq!(rows_of(&url, "tidemark_pruned_runs", run).await, 1);
    }
    assert_eq!(
        rows_of(&url, "tidemark_provenance", &c.run_id).await,
        prov_c
    );
    assert!(!file_of(&a.run_id) && file_of(&b.run_id) && file_of(&c.run_id));
    assert!(
        reports.join("notes.json").exists(),
        "not a report: never removed"
    );
    let again = prune(&env.settings(), Some(NINETY_DAYS), false)
        .await
        .unwrap();
    assert_eq!(
        (again.runs, again.removed.ledger_rows, again.report_files),
        (0, 0, 0),
        "{again}"
    );

    // A pruned run cannot be rolled back: a clear error, exit 5, nothing changed.
    let domain = dump_domain(&url).await;
    for run in [&a.run_id, &b.run_id] {
        let err = rollback(env.settings(), run, false, false)
            .await
            .expect_err("pruned");
        let msg = format!("{err:#}");
        assert_eq!(tidemark::exit::code(&err), tidemark::exit::CONFIG, "{msg}");
        assert!(
            msg.contains(run.as_str())
                && msg.contains("was pruned on")
                && msg.contains("can no longer be rolled back"),
            "{msg}"
        );
    }
    assert_eq!(
        dump_domain(&url).await,
        domain,
        "a refused rollback changed rows"
    );
    // A run that never existed still says so.
    let err = rollback(env.settings(), "no-such-run", false, false)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("there is no run no-such-run"),
        "{err:#}"
    );

    // The kept recent run still rolls back.
    let rb = rollback(env.settings(), &c.run_id, false, false)
        .await
        .expect("rollback of a kept run");
    assert_eq!(rb.tables["items"].restored, 1, "{rb}");
    assert_eq!(
        scalar_i64(
            &url,
            "SELECT COUNT(*) FROM items WHERE id = 3 AND v = 'changed 3'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn ops_prune_sqlite() {
    prune_story(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_prune_postgres() {
    prune_story(Backend::Postgres).await;
}

#[tokio::test]
async fn ops_prune_refuses_a_retention_under_a_day_and_needs_one() {
    let env = seed(Backend::Sqlite, "prune_args").await;
    let err = prune(&env.settings(), Some(Duration::from_secs(3600)), true)
        .await
        .unwrap_err();
    assert_eq!(tidemark::exit::code(&err), tidemark::exit::CONFIG);
    assert!(
        format!("{err:#}").contains("--older-than = 1h is shorter than a day"),
        "{err:#}"
    );
    let err = prune(&env.settings(), None, true).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("pass --older-than")
            && format!("{err:#}").contains("[retention] older_than"),
        "{err:#}"
    );
}

/// `[retention] older_than` set: the daemon prunes after its scheduled run.
#[tokio::test]
async fn ops_prune_the_daemon_prunes_after_a_successful_run() {
    let env = seed(Backend::Sqlite, "prune_daemon").await;
    let url = env.target_url.clone();
    let reports = env.settings().reports_path();
    let a = run_until(env.settings(), "2019-01-02", false)
        .await
        .expect("run A");
    age(&url, &reports, &a.run_id, 200).await;
    let mut child = tidemark(&env, &url, &["daemon"])
        .env("TIDEMARK__DAEMON__RUN_ON_START", "true")
        .env("TIDEMARK__DAEMON__SCHEDULE", "0 0 1 1 *")
        .env("TIDEMARK__RETENTION__OLDER_THAN", "90d")
        .spawn()
        .expect("daemon starts");
    let sql = format!(
        "SELECT COUNT(*) FROM tidemark_pruned_runs WHERE id = '{}'",
        a.run_id
    );
    let pruned = wait_for(&url, &sql, 1, Duration::from_secs(60)).await;
    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    assert!(pruned, "the daemon did not prune run A");
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert_eq!(rows_of(&url, "tidemark_runs", &a.run_id).await, 0);
    assert!(!tidemark::sink::runs::report_files(&reports)
        .unwrap()
        .iter()
        .any(|f| f.run_id == a.run_id));
}
