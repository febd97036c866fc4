//! One writer per lane: a second `run` exits with code 4 naming the holder, or waits
//! with `--wait`; an expired lease is taken over, a live one is not.

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use crate::ops_util::{items, seed, stderr_of, tidemark, wait_exit, wait_for};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tidemark::commands::run::RunOptions;
use tidemark::exit;

const DOCS: i64 = 20_000;

async fn two_concurrent_runs(backend: Backend) {
    // Arrange: a run slowed to ~2 s by the rate limit holds the lanes.
    let env = Env::new("lock2", backend, &items_mapping("epoch_millis")).await;
    let base = chrono::Utc::now().timestamp_millis() - 10 * 86_400_000;
    seed(&env, items(DOCS, base, 10)).await;
    let url = env.target_url.clone();
    let mut first = tidemark(&env, &url, &["run"])
        .env("TIDEMARK__SOURCE__RATE_LIMIT", "10000")
        .spawn()
        .unwrap();
    let held = wait_for(
        &url,
        "SELECT COUNT(*) FROM tidemark_locks",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(held, "the first run never took its lease");

    // Act: a second run without and then with --wait.
    let mut second = tidemark(&env, &url, &["run"]).spawn().unwrap();
    let second_status = wait_exit(&mut second, Duration::from_secs(60))
        .await
        .expect("second run hangs");
    let second_err = stderr_of(&mut second);
    let mut waiter = tidemark(&env, &url, &["run", "--wait"]).spawn().unwrap();
    let first_status = wait_exit(&mut first, Duration::from_secs(120))
        .await
        .expect("first run hangs");
    let waiter_status = wait_exit(&mut waiter, Duration::from_secs(120))
        .await
        .expect("waiting run hangs");
    let waiter_err = stderr_of(&mut waiter);

    // Assert
    assert!(
        first_status.success(),
        "first run failed: {}",
        stderr_of(&mut first)
    );
    assert_eq!(second_status.code(), Some(exit::LOCK_HELD), "{second_err}");
    assert!(second_err.contains("is held by host"), "{second_err}");
    assert!(
        second_err.contains(&format!("pid {}", first.id())),
        "{second_err}"
    );
    assert!(waiter_status.success(), "{waiter_err}");
    assert!(
        waiter_err.contains("waiting (--wait)"),
        "the waiter never waited: {waiter_err}"
    );
    assert_eq!(scalar_i64(&url, "SELECT COUNT(*) FROM items").await, DOCS);
    assert_eq!(
        scalar_i64(&url, "SELECT COUNT(*) FROM tidemark_locks").await,
        0,
        "leases not released"
    );
}

#[tokio::test]
async fn ops_two_concurrent_runs_sqlite() {
    two_concurrent_runs(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_two_concurrent_runs_postgres() {
    two_concurrent_runs(Backend::Postgres).await;
}

async fn leases_expire(backend: Backend) {
    // Arrange: the tool tables exist, the lane is held by a process on another host.
    let env = Env::new("lease", backend, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(100, chrono::Utc::now().timestamp_millis() - 86_400_000, 10),
    )
    .await;
    let run = || {
        tidemark::commands::run::run(
            env.settings(),
            RunOptions::default(),
            Arc::new(AtomicBool::new(false)),
        )
    };
    tidemark::commands::migrate::migrate(&env.settings(), false)
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    exec(
        &env.target_url,
        &format!(
            "INSERT INTO tidemark_locks (lane, holder, host, pid, acquired_at_ms, expires_at_ms) \
         VALUES ('nightly:items', 'h-1', 'otherhost', 4242, {}, {})",
            now - 60_000,
            now + 60_000
        ),
    )
    .await;

    // Act + Assert: a live lease blocks the run and is named.
    let err = run().await.expect_err("a live lease must block the run");
    assert_eq!(exit::code(&err), exit::LOCK_HELD);
    let msg = format!("{err:#}");
    assert!(
        msg.contains("otherhost") && msg.contains("pid 4242"),
        "{msg}"
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM tidemark_runs").await,
        0
    );

    // Act + Assert: once it has expired (its holder crashed), the lane is taken over.
    exec(
        &env.target_url,
        "UPDATE tidemark_locks SET expires_at_ms = 0",
    )
    .await;
    let report = run()
        .await
        .expect("an expired lease must not block the run");
    assert_eq!(report.totals.read, 100);
}

async fn exec(url: &str, sql: &str) {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    }
}

#[tokio::test]
async fn ops_leases_expire_sqlite() {
    leases_expire(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_leases_expire_postgres() {
    leases_expire(Backend::Postgres).await;
}
