//! Helpers shared by the operations tests (`ops_*`): spawning the binary against an
//! isolated environment, polling the target while a process runs, sending signals.

use crate::harness::Env;
use bson::{doc, Document};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `tidemark` binary with `args`, pointed at `env`'s source and the given target.
pub fn tidemark(env: &Env, target: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tidemark"));
    c.args(args)
        .envs(env.env_vars(target))
        .env("TIDEMARK__LOCK__LEASE", "3s")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// `n` documents for `items_mapping("epoch_millis")`, `per_sec` sharing each second from `base_ms`.
pub fn items(n: i64, base_ms: i64, per_sec: i64) -> Vec<Document> {
    (0..n)
        .map(|i| doc! { "_id": i, "t": base_ms + (i / per_sec) * 1000, "v": format!("value {i}") })
        .collect()
}

/// Insert the items and their `(t, _id)` index.
pub async fn seed(env: &Env, docs: Vec<Document>) {
    env.insert("items", docs).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
}

/// A scalar from the target, or None while the table does not exist yet.
pub async fn try_i64(url: &str, sql: &str) -> Option<i64> {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let path = url.trim_start_matches("sqlite://");
        if !std::path::Path::new(path).exists() {
            return None;
        }
        let mut c = sqlx::SqliteConnection::connect(url).await.ok()?;
        sqlx::query_scalar(sql).fetch_one(&mut c).await.ok()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.ok()?;
        sqlx::query_scalar(sql).fetch_one(&mut c).await.ok()
    }
}

/// Poll until `sql` returns at least `min`, or give up after `limit`.
pub async fn wait_for(url: &str, sql: &str, min: i64, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if try_i64(url, sql).await.is_some_and(|n| n >= min) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Wait for a child without blocking the runtime; None if it is still running after `limit`.
pub async fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Everything the child wrote to stderr (after it exited).
pub fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Send a signal by name (TERM, INT, KILL) with the system `kill`.
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill(1)")
        .success();
    assert!(ok, "kill -{sig} {} failed", child.id());
}

/// A free TCP port on 127.0.0.1 (released before use; good enough for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A MongoDB URI on which nothing listens (for UNKNOWN / unavailable cases).
pub fn dead_mongo_uri() -> String {
    format!(
        "mongodb://127.0.0.1:{}/?serverSelectionTimeoutMS=500",
        free_port()
    )
}
