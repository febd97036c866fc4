//! SIGKILL at several moments, then a run to completion, yields exactly the target
//! of an uninterrupted run: nothing lost, nothing doubled.

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use bson::{doc, Document};
use std::process::{Command, Stdio};
use std::time::Duration;

const DOCS: i64 = 60_000;

fn tidemark(env: &Env, target: &str, rate_limit: u64) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tidemark"));
    c.arg("run")
        .envs(env.env_vars(target))
        .env("TIDEMARK__SOURCE__RATE_LIMIT", rate_limit.to_string())
        // A commit per batch, so that kills within this ~3 s run leave partial targets
        // behind (the default groups SQLite's batches for 5 s: a kill that early would
        // only ever find an empty target). Kills with groups: `fault_kill`, the oracle.
        .env("TIDEMARK__TARGET__SQLITE_GROUP_COMMIT_MS", "0");
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

async fn crash_resume(backend: Backend) {
    // Arrange: 60k documents, many sharing timestamps (10 per second).
    let env = Env::new("crash", backend, &items_mapping("epoch_millis")).await;
    let base = chrono::Utc::now().timestamp_millis() - 30 * 86_400_000;
    let docs: Vec<Document> = (0..DOCS)
        .map(|i| doc! { "_id": i, "t": base + (i / 10) * 1000, "v": format!("value {i}") })
        .collect();
    env.insert("items", docs).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let reference = env.second_target().await;
    let ok = tidemark(&env, &reference, 0).status().expect("spawn");
    assert!(ok.success(), "uninterrupted run failed");

    // Act: kill -9 at several moments of a rate-limited run (~3 s), then finish.
    let mut partial_states = 0;
    for delay_ms in [400u64, 900, 1400, 2000, 2600] {
        let mut child = tidemark(&env, &env.target_url, 20_000)
            .spawn()
            .expect("spawn");
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let finished_early = child.try_wait().unwrap().is_some();
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        if !finished_early {
            let n = rows_if_table(&env.target_url).await;
            if n > 0 && n < DOCS {
                partial_states += 1;
            }
        }
    }
    let done = tidemark(&env, &env.target_url, 0).status().expect("spawn");
    assert!(done.success());

    // Assert
    assert!(
        partial_states >= 1,
        "no kill landed mid-run; the test proved nothing"
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        DOCS
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(DISTINCT id) FROM items").await,
        DOCS
    );
    assert_eq!(
        env.dump(&env.target_url, "items").await,
        env.dump(&reference, "items").await
    );
}

async fn rows_if_table(url: &str) -> i64 {
    let exists = if url.starts_with("sqlite:") {
        scalar_i64(
            url,
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'items'",
        )
        .await
    } else {
        scalar_i64(
            url,
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'items'",
        )
        .await
    };
    if exists == 0 {
        0
    } else {
        scalar_i64(url, "SELECT COUNT(*) FROM items").await
    }
}

#[tokio::test]
async fn crash_resume_sqlite() {
    crash_resume(Backend::Sqlite).await;
}

#[tokio::test]
async fn crash_resume_postgres() {
    crash_resume(Backend::Postgres).await;
}
