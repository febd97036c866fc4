//! Manual backfill: chunked, resumable after SIGKILL, shareable by several worker
//! processes, and never moving the nightly watermark, even with a nightly run beside it.

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use crate::ops_util::{seed, stderr_of, tidemark, wait_exit, wait_for};
use std::time::Duration;
use tidemark::exit;

const DAY: i64 = 86_400_000;

/// Start of the test data: midnight 20 days ago, so `--from`/`--to` are whole dates.
fn base() -> chrono::DateTime<chrono::Utc> {
    let today = chrono::Utc::now().date_naive();
    (today - chrono::Days::new(20))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
}

fn date(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d").to_string()
}

/// `tidemark backfill` over the 4 days of test data in 6 h chunks.
fn backfill_args(from: &str, to: &str) -> Vec<String> {
    ["backfill", "--from", from, "--to", to, "--chunk", "6h"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

async fn killed_and_resumed(backend: Backend) {
    // Arrange: 40k documents over 4 days; a reference backfill into a second target.
    let env = Env::new("bfkill", backend, &items_mapping("epoch_millis")).await;
    let b = base();
    let docs: Vec<bson::Document> = (0..40_000i64)
        .map(|i| bson::doc! { "_id": i, "t": b.timestamp_millis() + i * (4 * DAY / 40_000), "v": format!("v{i}") })
        .collect();
    seed(&env, docs).await;
    let (from, to) = (date(b), date(b + chrono::TimeDelta::days(4)));
    let args = backfill_args(&from, &to);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let reference = env.second_target().await;
    let out = tidemark(&env, &reference, &args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Act: SIGKILL a rate-limited backfill mid-way, then run the same command again.
    let url = env.target_url.clone();
    let mut child = tidemark(&env, &url, &args)
        .env("TIDEMARK__SOURCE__RATE_LIMIT", "8000")
        .spawn()
        .unwrap();
    let started = wait_for(
        &url,
        "SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE status = 'done' AND docs_read > 0",
        2,
        Duration::from_secs(60),
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let done_at_kill = scalar_i64(
        &url,
        "SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE status = 'done'",
    )
    .await;
    let total = scalar_i64(&url, "SELECT COUNT(*) FROM tidemark_backfill_chunks").await;
    let resumed = tidemark(&env, &url, &args).output().unwrap();

    // Assert
    assert!(started, "the backfill never finished a chunk");
    assert!(
        done_at_kill < total,
        "the kill landed after the backfill finished; it proved nothing"
    );
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(
        env.dump(&url, "items").await,
        env.dump(&reference, "items").await
    );
    assert_eq!(scalar_i64(&url, "SELECT COUNT(*) FROM items").await, 40_000);
    assert_eq!(
        scalar_i64(
            &url,
            "SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE status <> 'done'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar_i64(
            &url,
            "SELECT COUNT(*) FROM tidemark_backfills WHERE status = 'done'"
        )
        .await,
        1
    );
    assert_eq!(
        scalar_i64(&url, "SELECT COUNT(*) FROM tidemark_checkpoints").await,
        0,
        "a backfill must leave no nightly checkpoint (and drops its own when done)"
    );
}

#[tokio::test]
async fn ops_backfill_killed_and_resumed_sqlite() {
    killed_and_resumed(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_backfill_killed_and_resumed_postgres() {
    killed_and_resumed(Backend::Postgres).await;
}

/// Three processes given the same command share one backfill: every chunk is claimed
/// once, more than one worker does work, and the target equals a single worker's.
#[tokio::test]
async fn ops_three_workers_share_one_backfill_postgres() {
    // Arrange: 30k documents spread over 3 days (one every ~8.6 s) in 3 h chunks = 24 chunks.
    let env = Env::new("bfshare", Backend::Postgres, &items_mapping("epoch_millis")).await;
    let b = base();
    let docs: Vec<bson::Document> = (0..30_000i64)
        .map(|i| bson::doc! { "_id": i, "t": b.timestamp_millis() + i * (3 * DAY / 30_000), "v": format!("v{i}") })
        .collect();
    seed(&env, docs).await;
    let (from, to) = (date(b), date(b + chrono::TimeDelta::days(3)));
    let args = ["backfill", "--from", &from, "--to", &to, "--chunk", "3h"];
    let reference = env.second_target().await;
    let out = tidemark(&env, &reference, &args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Act: three workers at once, each slowed so that the work has to be spread.
    let url = env.target_url.clone();
    let mut workers: Vec<_> = (0..3)
        .map(|_| {
            tidemark(&env, &url, &args)
                .env("TIDEMARK__SOURCE__RATE_LIMIT", "3000")
                .env("TIDEMARK__SOURCE__BATCH_SIZE", "250")
                .spawn()
                .unwrap()
        })
        .collect();
    for w in &mut workers {
        let st = wait_exit(w, Duration::from_secs(180))
            .await
            .expect("worker hangs");
        assert!(st.success(), "worker failed: {}", stderr_of(w));
    }

    // Assert
    let q = |sql: &'static str| scalar_i64(&url, sql);
    assert_eq!(
        env.dump(&url, "items").await,
        env.dump(&reference, "items").await
    );
    assert_eq!(q("SELECT COUNT(*) FROM tidemark_backfill_chunks").await, 24);
    assert_eq!(
        q("SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE attempts <> 1").await,
        0,
        "a chunk was claimed twice"
    );
    assert_eq!(
        q("SELECT SUM(docs_read)::bigint FROM tidemark_backfill_chunks").await,
        30_000,
        "documents read twice or missed"
    );
    let busy_workers =
        q("SELECT COUNT(DISTINCT pid) FROM tidemark_backfill_chunks WHERE docs_read > 0").await;
    assert!(
        busy_workers >= 2,
        "only {busy_workers} worker did any work; nothing was shared"
    );
}

/// A nightly run while a backfill of older data is running: both finish, the target is
/// what either would produce, and the nightly lane is the nightly run's alone.
#[tokio::test]
async fn ops_backfill_concurrent_with_nightly_sqlite() {
    // Arrange: 30k documents over the last 20 days; the backfill covers the first 10.
    let env = Env::new("bfnight", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    let b = base();
    let docs: Vec<bson::Document> = (0..30_000i64)
        .map(|i| bson::doc! { "_id": i, "t": b.timestamp_millis() + i * (19 * DAY / 30_000), "v": format!("v{i}") })
        .collect();
    seed(&env, docs).await;
    let reference = env.second_target().await;
    let out = tidemark(&env, &reference, &["run"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (from, to) = (date(b), date(b + chrono::TimeDelta::days(10)));

    // Act
    let url = env.target_url.clone();
    let mut backfill = tidemark(
        &env,
        &url,
        &["backfill", "--from", &from, "--to", &to, "--chunk", "1d"],
    )
    .env("TIDEMARK__SOURCE__RATE_LIMIT", "1000")
    .spawn()
    .unwrap();
    let running = wait_for(
        &url,
        "SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE status = 'running'",
        1,
        Duration::from_secs(60),
    )
    .await;
    let nightly = tidemark(&env, &url, &["run"]).output().unwrap();
    let backfill_done_during_nightly = backfill.try_wait().unwrap().is_some();
    let st = wait_exit(&mut backfill, Duration::from_secs(120))
        .await
        .expect("backfill hangs");

    // Assert
    assert!(running, "the backfill never claimed a chunk");
    assert!(
        !backfill_done_during_nightly,
        "the backfill ended before the nightly run did; they never overlapped"
    );
    assert!(
        nightly.status.success(),
        "{}",
        String::from_utf8_lossy(&nightly.stderr)
    );
    assert!(st.success(), "{}", stderr_of(&mut backfill));
    assert_eq!(
        env.dump(&url, "items").await,
        env.dump(&reference, "items").await
    );
    let lanes = scalar_i64(&url, "SELECT COUNT(*) FROM tidemark_checkpoints").await;
    assert_eq!(lanes, 1, "only the nightly lane remains");
    let wm = scalar_i64(
        &url,
        "SELECT watermark_ms FROM tidemark_checkpoints WHERE lane = 'nightly:items'",
    )
    .await;
    let wm_ref = scalar_i64(
        &reference,
        "SELECT watermark_ms FROM tidemark_checkpoints WHERE lane = 'nightly:items'",
    )
    .await;
    assert!(
        wm >= wm_ref,
        "the nightly watermark went back: {wm} < {wm_ref}"
    );
}

#[tokio::test]
async fn ops_backfill_rejects_a_reversed_range() {
    let env = Env::new("bfrev", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    let out = tidemark(
        &env,
        &env.target_url,
        &["backfill", "--from", "2020-02-01", "--to", "2020-01-01"],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(exit::CONFIG), "{err}");
    assert!(err.contains("reversed"), "{err}");
}

/// With default flags, six sparse years are cut by document count into a few chunks (not
/// one per day: 2,190 of them), a busy day in the middle into several when the count per
/// chunk is small, and the backfill writes exactly what `run` writes over the same range.
async fn sparse_years_few_chunks(backend: Backend) {
    // Arrange: 3,000 documents over six years (one every ~17.5 h) and a busy day of 4,000;
    // `run` over the range into a second target is the reference.
    let env = Env::new("bfsparse", backend, &items_mapping("epoch_millis")).await;
    let b = base() - chrono::TimeDelta::days(6 * 365);
    let span = 6 * 365 * DAY;
    let busy = b.timestamp_millis() + 1_000 * DAY;
    let docs: Vec<bson::Document> = (0..3_000i64)
        .map(|i| (i, b.timestamp_millis() + i * (span / 3_000)))
        .chain((0..4_000i64).map(|i| (10_000 + i, busy + i * (DAY / 4_000))))
        .map(|(i, t)| bson::doc! { "_id": i, "t": t, "v": format!("v{i}") })
        .collect();
    seed(&env, docs).await;
    let (from, to) = (date(b), date(b + chrono::TimeDelta::days(6 * 365 + 1)));
    let reference = env.second_target().await;
    let out = tidemark(&env, &reference, &["run", "--until", &to])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Act: at most 1,000 documents per chunk into a fresh target; then the defaults over
    // the same range into the reference (same rows again: only its plan is looked at).
    let url = env.target_url.clone();
    let small = tidemark(
        &env,
        &url,
        &[
            "backfill",
            "--from",
            &from,
            "--to",
            &to,
            "--chunk-docs",
            "1000",
        ],
    )
    .output()
    .unwrap();
    let by_default = tidemark(
        &env,
        &reference,
        &["backfill", "--from", &from, "--to", &to],
    )
    .output()
    .unwrap();

    // Assert
    for out in [&small, &by_default] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let chunks = scalar_i64(&url, "SELECT COUNT(*) FROM tidemark_backfill_chunks").await;
    assert!(
        (7..=20).contains(&chunks),
        "{chunks} chunks for 7,000 documents at 1,000 per chunk"
    );
    let busy_chunks = scalar_i64(
        &url,
        &format!(
            "SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE from_ms < {} AND to_ms > {busy}",
            busy + DAY
        ),
    )
    .await;
    assert!(
        busy_chunks >= 4,
        "the busy day is cut: {busy_chunks} chunks"
    );
    let over = scalar_i64(
        &url,
        "SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE docs_read > 1000",
    )
    .await;
    assert_eq!(over, 0, "every chunk holds at most 1,000 documents");
    let gaps = scalar_i64(
        &url,
        "SELECT COUNT(*) FROM tidemark_backfill_chunks a \
         WHERE a.to_ms < (SELECT MAX(to_ms) FROM tidemark_backfill_chunks) \
         AND NOT EXISTS (SELECT 1 FROM tidemark_backfill_chunks b WHERE b.from_ms = a.to_ms)",
    )
    .await;
    assert_eq!(gaps, 0, "the chunks are contiguous");
    assert_eq!(
        scalar_i64(&reference, "SELECT COUNT(*) FROM items").await,
        7_000
    );
    assert_eq!(
        env.dump(&url, "items").await,
        env.dump(&reference, "items").await
    );
    let default_chunks =
        scalar_i64(&reference, "SELECT COUNT(*) FROM tidemark_backfill_chunks").await;
    assert_eq!(
        default_chunks, 1,
        "7,000 documents are one chunk of the default 50,000"
    );
}

#[tokio::test]
async fn ops_backfill_sparse_years_few_chunks_sqlite() {
    sparse_years_few_chunks(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_backfill_sparse_years_few_chunks_postgres() {
    sparse_years_few_chunks(Backend::Postgres).await;
}

/// A worker reads the chunk it will claim next while it writes the current one (into
/// PostgreSQL, as `run` reads its next window ahead). Ties of documents sharing one instant
/// on both sides of every chunk boundary, paged in small batches, are copied exactly once:
/// what `run` writes, each document read by exactly one chunk.
#[tokio::test]
async fn ops_backfill_read_ahead_copies_the_edge_ties_once_postgres() {
    // Arrange: four days, one document a minute; at each midnight a tie of 300 documents at
    // the chunk's first instant and one of 300 at the previous chunk's last millisecond.
    let env = Env::new("bfahead", Backend::Postgres, &items_mapping("epoch_millis")).await;
    let b = base().timestamp_millis();
    let mut times: Vec<i64> = (0..4 * 1_440).map(|i| b + i * 60_000 + 1).collect();
    for d in 1..4 {
        times.extend(std::iter::repeat_n(b + d * DAY, 300));
        times.extend(std::iter::repeat_n(b + d * DAY - 1, 300));
    }
    let n = times.len() as i64;
    let docs: Vec<bson::Document> = times
        .iter()
        .enumerate()
        .map(|(i, &t)| bson::doc! { "_id": i as i64, "t": t, "v": format!("v{i}") })
        .collect();
    seed(&env, docs).await;
    let (from, to) = (date(base()), date(base() + chrono::TimeDelta::days(4)));
    let reference = env.second_target().await;
    let out = tidemark(&env, &reference, &["run", "--until", &to])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Act: one chunk a day, pages of 70 documents (a tie spans five pages).
    let url = env.target_url.clone();
    let args = ["backfill", "--from", &from, "--to", &to, "--chunk", "1d"];
    let out = tidemark(&env, &url, &args)
        .env("TIDEMARK__SOURCE__BATCH_SIZE", "70")
        .output()
        .unwrap();

    // Assert
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let started: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("backfill chunk started"))
        .collect();
    assert_eq!(started.len(), 4, "{err}");
    assert_eq!(
        started
            .iter()
            .filter(|l| l.contains("\"read_ahead\":true"))
            .count(),
        3,
        "every chunk after the first was read ahead: {started:?}"
    );
    assert_eq!(scalar_i64(&url, "SELECT COUNT(*) FROM items").await, n);
    assert_eq!(
        env.dump(&url, "items").await,
        env.dump(&reference, "items").await
    );
    assert_eq!(
        scalar_i64(
            &url,
            "SELECT SUM(docs_read)::bigint FROM tidemark_backfill_chunks"
        )
        .await,
        n,
        "documents read twice or missed"
    );
    for d in 0..4i64 {
        let sql = format!(
            "SELECT docs_read FROM tidemark_backfill_chunks WHERE from_ms = {}",
            b + d * DAY
        );
        let want = times
            .iter()
            .filter(|&&t| b + d * DAY <= t && t < b + (d + 1) * DAY)
            .count() as i64;
        assert_eq!(scalar_i64(&url, &sql).await, want, "chunk {d}");
    }
}
