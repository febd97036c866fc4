//! One writer per backfill chunk, decided by the target's own locking (as the nightly lanes
//! in `ops_lock.rs`): workers in different pid namespaces never take the same chunk; a
//! frozen (SIGSTOP) holder keeps its chunk; a killed holder's chunk is taken over at once,
//! long before `lock.lease`; a holder whose PostgreSQL lock session is cut writes nothing
//! more and stops, and the chunk is finished exactly by another worker.

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use crate::ops_lock::unshare_unavailable;
use crate::ops_util::{seed, signal, stderr_of, tidemark, wait_exit, wait_for};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DAY: i64 = 86_400_000;
/// Documents over 3 days, in 3 h chunks: 24 chunks of 1,250 documents.
const DOCS: i64 = 30_000;
const CHUNKS: i64 = 24;

struct Setup {
    env: Env,
    args: Vec<String>,
    reference: String,
}

/// 30k documents over 3 days, and the same backfill by one undisturbed worker into a second
/// target (the reference the shared or interrupted backfill must equal).
async fn setup(name: &str, backend: Backend) -> Setup {
    let env = Env::new(name, backend, &items_mapping("epoch_millis")).await;
    let today = chrono::Utc::now().date_naive();
    let b = (today - chrono::Days::new(20))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let docs: Vec<bson::Document> = (0..DOCS)
        .map(|i| bson::doc! { "_id": i, "t": b.timestamp_millis() + i * (3 * DAY / DOCS), "v": format!("v{i}") })
        .collect();
    seed(&env, docs).await;
    let date = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d").to_string();
    let args: Vec<String> = [
        "backfill",
        "--from",
        &date(b),
        "--to",
        &date(b + chrono::TimeDelta::days(3)),
        "--chunk",
        "3h",
        "--parallel",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let reference = env.second_target().await;
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tidemark(&env, &reference, &a).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Setup {
        env,
        args,
        reference,
    }
}

impl Setup {
    /// A backfill worker, slowed to `rate` documents a second in pages of 100.
    fn worker(&self, rate: &str) -> Command {
        let a: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut c = tidemark(&self.env, &self.env.target_url, &a);
        c.env("TIDEMARK__SOURCE__RATE_LIMIT", rate)
            .env("TIDEMARK__SOURCE__BATCH_SIZE", "100");
        c
    }

    async fn q(&self, sql: &str) -> i64 {
        scalar_i64(&self.env.target_url, sql).await
    }

    /// The target equals the reference, every chunk is done, no document was missed.
    async fn assert_exact(&self) {
        let url = &self.env.target_url;
        assert_eq!(
            self.env.dump(url, "items").await,
            self.env.dump(&self.reference, "items").await
        );
        assert_eq!(self.q("SELECT COUNT(*) FROM items").await, DOCS);
        assert_eq!(
            self.q("SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE status = 'done'")
                .await,
            CHUNKS
        );
    }

    /// Wait until `pid` holds a chunk, and return that chunk's `from_ms`.
    async fn chunk_held_by(&self, pid: u32) -> i64 {
        let sql = format!(
            "SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE status = 'running' AND pid = {pid}"
        );
        let held = wait_for(&self.env.target_url, &sql, 1, Duration::from_secs(60)).await;
        assert!(held, "worker {pid} never claimed a chunk");
        self.q(&format!(
            "SELECT MIN(from_ms) FROM tidemark_backfill_chunks WHERE status = 'running' AND pid = {pid}"
        ))
        .await
    }
}

async fn exit_ok(child: &mut Child, what: &str) {
    let st = wait_exit(child, Duration::from_secs(240))
        .await
        .unwrap_or_else(|| panic!("{what} hangs"));
    assert!(st.success(), "{what} failed: {}", stderr_of(child));
}

async fn two_pid_namespaces(backend: Backend) {
    if let Some(why) = unshare_unavailable() {
        println!("SKIPPED: `unshare -p -f --mount-proc` is not available here ({why})");
        return;
    }
    // Arrange: worker A here, worker B in its own pid namespace (it cannot see A's pid).
    let s = setup("chunkns", backend).await;
    let mut a = s.worker("4000").spawn().unwrap();
    s.chunk_held_by(a.id()).await;

    // Act
    let inner = s.worker("4000");
    let mut b = Command::new("unshare");
    b.args(["-p", "-f", "--mount-proc"])
        .arg(inner.get_program())
        .args(inner.get_args())
        .envs(inner.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut b = b.spawn().unwrap();
    exit_ok(&mut a, "worker A").await;
    exit_ok(&mut b, "worker B (other pid namespace)").await;

    // Assert: every chunk claimed once, by one of two workers that both worked.
    s.assert_exact().await;
    assert_eq!(
        s.q("SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE attempts <> 1")
            .await,
        0,
        "a chunk was claimed twice"
    );
    assert_eq!(
        s.q("SELECT CAST(SUM(docs_read) AS BIGINT) FROM tidemark_backfill_chunks")
            .await,
        DOCS,
        "documents read twice or missed"
    );
    let busy = s
        .q("SELECT COUNT(DISTINCT pid) FROM tidemark_backfill_chunks WHERE docs_read > 0")
        .await;
    assert!(busy >= 2, "only {busy} worker did any work");
}

#[tokio::test]
async fn ops_chunks_workers_in_two_pid_namespaces_never_share_a_chunk_sqlite() {
    two_pid_namespaces(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_chunks_workers_in_two_pid_namespaces_never_share_a_chunk_postgres() {
    two_pid_namespaces(Backend::Postgres).await;
}

async fn stopped_holder(backend: Backend) {
    // Arrange: A holds a chunk, then is frozen for longer than lock.lease (3 s here).
    let s = setup("chunkstop", backend).await;
    let mut a = s.worker("2000").spawn().unwrap();
    let held = s.chunk_held_by(a.id()).await;
    freeze_outside_a_transaction(&s, &a).await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Act: B does everything else and leaves; then A wakes up.
    let mut b = s.worker("0").spawn().unwrap();
    exit_ok(&mut b, "worker B").await;
    let held_after_b = s
        .q(&format!(
            "SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE from_ms = {held} \
             AND status = 'running' AND pid = {} AND attempts = 1",
            a.id()
        ))
        .await;
    let others_done = s
        .q(&format!(
            "SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE from_ms <> {held} AND status = 'done'"
        ))
        .await;
    signal(&a, "CONT");
    exit_ok(&mut a, "worker A").await;

    // Assert: the frozen holder kept its chunk, B finished the rest, A then finished it.
    assert_eq!(held_after_b, 1, "the stopped holder's chunk was taken");
    assert_eq!(others_done, CHUNKS - 1);
    s.assert_exact().await;
    assert_eq!(
        s.q("SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE attempts <> 1")
            .await,
        0
    );
}

/// SIGSTOP `a`. On SQLite, a process frozen inside a write transaction keeps the database's
/// single write lock and every other writer fails with "database is locked" (SQLite's
/// nature, not the chunk's lock): thaw and freeze again until it froze between commits.
async fn freeze_outside_a_transaction(s: &Setup, a: &Child) {
    use sqlx::Connection;
    for _ in 0..50 {
        signal(a, "STOP");
        let url = &s.env.target_url;
        if !url.starts_with("sqlite:") {
            return;
        }
        let mut c = sqlx::SqliteConnection::connect(&format!("{url}?mode=rw"))
            .await
            .unwrap();
        let free = sqlx::query("BEGIN IMMEDIATE").execute(&mut c).await.is_ok();
        let _ = sqlx::query("ROLLBACK").execute(&mut c).await;
        if free {
            return;
        }
        signal(a, "CONT");
        tokio::time::sleep(Duration::from_millis(70)).await;
    }
    panic!("the holder was inside a write transaction at every try");
}

#[tokio::test]
async fn ops_chunks_a_stopped_holder_keeps_its_chunk_sqlite() {
    stopped_holder(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_chunks_a_stopped_holder_keeps_its_chunk_postgres() {
    stopped_holder(Backend::Postgres).await;
}

async fn killed_holder(backend: Backend) {
    // Arrange: A holds a chunk under a lease of an hour, and is killed mid-chunk.
    let s = setup("chunkkill", backend).await;
    let mut a = s
        .worker("2000")
        .env("TIDEMARK__LOCK__LEASE", "1h")
        .spawn()
        .unwrap();
    let held = s.chunk_held_by(a.id()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&a, "KILL");
    a.wait().unwrap();

    // Act: at once, with an hour of lease left on paper.
    let started = Instant::now();
    let mut b = s
        .worker("0")
        .env("TIDEMARK__LOCK__LEASE", "1h")
        .spawn()
        .unwrap();
    exit_ok(&mut b, "worker B").await;

    // Assert: B took the dead holder's chunk over (a second attempt) and the result is exact.
    assert!(started.elapsed() < Duration::from_secs(120));
    assert_eq!(
        s.q(&format!(
            "SELECT attempts FROM tidemark_backfill_chunks WHERE from_ms = {held}"
        ))
        .await,
        2,
        "the killed holder's chunk was not taken over"
    );
    s.assert_exact().await;
}

#[tokio::test]
async fn ops_chunks_a_killed_holder_is_taken_over_at_once_sqlite() {
    killed_holder(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_chunks_a_killed_holder_is_taken_over_at_once_postgres() {
    killed_holder(Backend::Postgres).await;
}

#[tokio::test]
async fn ops_chunks_a_holder_whose_lock_session_is_cut_stops_without_writing_postgres() {
    // Arrange: A works slowly: 500 documents a second in batches of 50, a commit every
    // 0.1 s, 2.5 s a chunk.
    let s = setup("chunkcut", Backend::Postgres).await;
    let mut a = s
        .worker("500")
        .env("TIDEMARK__SOURCE__BATCH_SIZE", "50")
        .spawn()
        .unwrap();
    let held = s.chunk_held_by(a.id()).await;
    let lane_written =
        format!("SELECT COUNT(*) FROM tidemark_checkpoints WHERE lane LIKE '%:items:{held}'");
    assert!(wait_for(&s.env.target_url, &lane_written, 1, Duration::from_secs(30)).await);

    // Act: the DBA terminates A's lock sessions (its chunk locks and its run lock).
    let killed = s
        .q(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
            WHERE application_name = 'tidemark lane locks' AND datname = current_database()",
        )
        .await;
    let cut_ms = chrono::Utc::now().timestamp_millis();
    let cut_at = Instant::now();
    let a_status = wait_exit(&mut a, Duration::from_secs(60))
        .await
        .expect("A hangs after losing its locks");
    let a_stopped_in = cut_at.elapsed();
    let a_err = stderr_of(&mut a);
    let last_commit_ms = s
        .q(&format!(
            "SELECT MAX(updated_at_ms) FROM tidemark_checkpoints WHERE lane LIKE '%:items:{held}'"
        ))
        .await;
    let done_after_cut = s
        .q(&format!(
            "SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE from_ms = {held} AND status = 'done'"
        ))
        .await;
    let mut b = s.worker("0").spawn().unwrap();
    exit_ok(&mut b, "worker B").await;

    // Assert: A's next commit failed its fence, so it stopped with nothing committed after
    // the cut (it would otherwise have gone on committing every 0.1 s until its chunk
    // ended); B took the chunk over and finished everything exactly.
    assert!(killed >= 1, "no lock session of A found");
    assert!(!a_status.success(), "A went on after losing its locks");
    assert!(
        last_commit_ms <= cut_ms + 50,
        "A committed {} ms after its lock session was cut",
        last_commit_ms - cut_ms
    );
    assert_eq!(
        done_after_cut, 0,
        "A's chunk was recorded done after the cut"
    );
    assert!(a_err.contains("lost the lock of chunk"), "{a_err}");
    assert!(
        a_err.contains("no longer holds lane"),
        "not stopped by the fence: {a_err}"
    );
    assert!(
        a_stopped_in < Duration::from_secs(10),
        "A took {a_stopped_in:?} to stop"
    );
    s.assert_exact().await;
    assert_eq!(
        s.q(&format!(
            "SELECT attempts FROM tidemark_backfill_chunks WHERE from_ms = {held}"
        ))
        .await,
        2
    );
}
