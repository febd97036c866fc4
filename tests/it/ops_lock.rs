//! One writer per lane: a second `run` exits with code 4 naming the holder, or waits
//! with `--wait`. Whether the holder is alive is decided by the target's own lock (a
//! PostgreSQL session advisory lock, a file lock beside a SQLite database): a holder in
//! another pid namespace or stopped with SIGSTOP keeps its lane; a killed holder or one
//! whose session was terminated frees it at once; a lease row alone blocks nothing.

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use crate::ops_util::{items, seed, signal, stderr_of, tidemark, wait_exit, wait_for};
use crate::trust_util::exec;
use std::process::{Child, Command};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tidemark::commands::migrate::migrate;
use tidemark::commands::run::{run, RunOptions};
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

/// A `tidemark run` slowed by the rate limit, once it holds its lane (its lease row is written
/// right after the lock is taken).
async fn slow_holder(env: &Env, docs_per_sec: &str) -> Child {
    let child = tidemark(env, &env.target_url, &["run"])
        .env("TIDEMARK__SOURCE__RATE_LIMIT", docs_per_sec)
        .spawn()
        .unwrap();
    let held = wait_for(
        &env.target_url,
        "SELECT COUNT(*) FROM tidemark_locks",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(held, "the first run never took its lane");
    child
}

async fn seeded(name: &str, backend: Backend) -> Env {
    let env = Env::new(name, backend, &items_mapping("epoch_millis")).await;
    let base = chrono::Utc::now().timestamp_millis() - 10 * 86_400_000;
    seed(&env, items(DOCS, base, 10)).await;
    env
}

/// Why `unshare -p -f --mount-proc` cannot be used here, if it cannot.
pub(crate) fn unshare_unavailable() -> Option<String> {
    match Command::new("unshare")
        .args(["-p", "-f", "--mount-proc", "true"])
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Err(e) => Some(e.to_string()),
    }
}

async fn holder_in_another_pid_namespace(backend: Backend) {
    if let Some(why) = unshare_unavailable() {
        println!("SKIPPED: `unshare -p -f --mount-proc` is not available here ({why})");
        return;
    }
    // Arrange: A holds the lanes; B will not see A's pid (another pid namespace, own /proc).
    let env = seeded("lockns", backend).await;
    let mut first = slow_holder(&env, "10000").await;

    // Act
    let second = tidemark(&env, &env.target_url, &["run"]);
    let program = second.get_program().to_owned();
    let mut b = Command::new("unshare");
    b.args(["-p", "-f", "--mount-proc"])
        .arg(program)
        .arg("run")
        .envs(second.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut b = b.spawn().unwrap();
    let b_status = wait_exit(&mut b, Duration::from_secs(60))
        .await
        .expect("second run hangs");
    let b_err = stderr_of(&mut b);
    let a_status = wait_exit(&mut first, Duration::from_secs(120))
        .await
        .expect("first run hangs");

    // Assert: B was refused, naming A; A finished undisturbed.
    assert_eq!(b_status.code(), Some(exit::LOCK_HELD), "{b_err}");
    assert!(b_err.contains(&format!("pid {}", first.id())), "{b_err}");
    assert!(a_status.success(), "{}", stderr_of(&mut first));
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        DOCS
    );
}

#[tokio::test]
async fn ops_lock_holds_across_pid_namespaces_sqlite() {
    holder_in_another_pid_namespace(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_lock_holds_across_pid_namespaces_postgres() {
    holder_in_another_pid_namespace(Backend::Postgres).await;
}

async fn stopped_holder(backend: Backend) {
    // Arrange: A holds the lanes, then is frozen for longer than lock.lease (3 s here).
    let env = seeded("lockstop", backend).await;
    let mut first = slow_holder(&env, "10000").await;
    signal(&first, "STOP");
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Act
    let mut second = tidemark(&env, &env.target_url, &["run"]).spawn().unwrap();
    let b_status = wait_exit(&mut second, Duration::from_secs(60))
        .await
        .expect("second run hangs");
    let b_err = stderr_of(&mut second);
    signal(&first, "CONT");
    let a_status = wait_exit(&mut first, Duration::from_secs(120))
        .await
        .expect("first run hangs");

    // Assert: a frozen holder is still the holder.
    assert_eq!(b_status.code(), Some(exit::LOCK_HELD), "{b_err}");
    assert!(b_err.contains(&format!("pid {}", first.id())), "{b_err}");
    assert!(a_status.success(), "{}", stderr_of(&mut first));
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        DOCS
    );
}

#[tokio::test]
async fn ops_lock_a_stopped_holder_keeps_its_lane_sqlite() {
    stopped_holder(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_lock_a_stopped_holder_keeps_its_lane_postgres() {
    stopped_holder(Backend::Postgres).await;
}

async fn killed_holder(backend: Backend) {
    // Arrange: A holds the lanes and is killed mid-run.
    let env = seeded("lockkill", backend).await;
    let mut first = slow_holder(&env, "5000").await;
    signal(&first, "KILL");
    first.wait().unwrap();

    // Act: at once, with no lease to wait out.
    let started = std::time::Instant::now();
    let mut second = tidemark(&env, &env.target_url, &["run"]).spawn().unwrap();
    let b_status = wait_exit(&mut second, Duration::from_secs(120))
        .await
        .expect("second run hangs");
    let b_err = stderr_of(&mut second);

    // Assert
    assert!(b_status.success(), "{b_err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        DOCS
    );
}

#[tokio::test]
async fn ops_lock_a_killed_holder_frees_its_lane_sqlite() {
    killed_holder(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_lock_a_killed_holder_frees_its_lane_postgres() {
    killed_holder(Backend::Postgres).await;
}

#[tokio::test]
async fn ops_lock_a_terminated_session_frees_the_lane_postgres() {
    // Arrange: A holds the lanes on its lock session.
    let env = seeded("lockcut", Backend::Postgres).await;
    let mut first = slow_holder(&env, "4000").await;

    // Act: the DBA terminates A's lock session; B starts right away.
    let killed = scalar_i64(
        &env.target_url,
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'tidemark lane locks' AND datname = current_database()",
    )
    .await;
    let mut second = tidemark(&env, &env.target_url, &["run"]).spawn().unwrap();
    let b_status = wait_exit(&mut second, Duration::from_secs(120))
        .await
        .expect("second run hangs");
    let b_err = stderr_of(&mut second);
    let a_status = wait_exit(&mut first, Duration::from_secs(120))
        .await
        .expect("first run hangs");
    let a_err = stderr_of(&mut first);

    // Assert: the lane was free for B; A noticed it lost its lanes and stopped.
    // Its lane locks' session and its run lock's session.
    assert!(killed >= 1, "no lock session of A found");
    assert!(b_status.success(), "{b_err}");
    assert!(!a_status.success(), "A kept writing after losing its lanes");
    // Stopped by the fence of its next batch, or by the watchdog if no batch came first.
    assert!(
        a_err.contains("no longer holds lane nightly:items") || a_err.contains("lane locks lost"),
        "{a_err}"
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        DOCS
    );
}

async fn a_lease_row_alone_blocks_nothing(backend: Backend) {
    // Arrange: a lease row of a holder that is gone (another host, expiry far ahead).
    let env = Env::new("lease", backend, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(100, chrono::Utc::now().timestamp_millis() - 86_400_000, 10),
    )
    .await;
    migrate(&env.settings(), false).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    exec(
        &env.target_url,
        &format!(
            "INSERT INTO tidemark_locks (lane, holder, host, pid, acquired_at_ms, expires_at_ms) \
         VALUES ('nightly:items', 'h-1', 'otherhost', 4242, {}, {})",
            now - 60_000,
            now + 3_600_000
        ),
    )
    .await;

    // Act
    let report = run(
        env.settings(),
        RunOptions::default(),
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .expect("a lease row without a lock must not block the run");

    // Assert: the run went through and its own row replaced and then left the stale one.
    assert_eq!(report.totals.read, 100);
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM tidemark_locks").await,
        0
    );
}

#[tokio::test]
async fn ops_lock_a_lease_row_alone_blocks_nothing_sqlite() {
    a_lease_row_alone_blocks_nothing(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_lock_a_lease_row_alone_blocks_nothing_postgres() {
    a_lease_row_alone_blocks_nothing(Backend::Postgres).await;
}

/// A run whose lock session is cut commits nothing more: each batch checks, in its own
/// transaction just before the commit, that the lane's advisory lock is still granted to this
/// process's lock session (the fence). Without it the run would go on committing until its
/// watchdog noticed (up to `lock.lease / 3`), while another process may already hold the lane.
#[tokio::test]
async fn ops_lock_a_run_whose_lock_session_is_cut_commits_nothing_more_postgres() {
    // Arrange: A commits a batch of 50 every 0.1 s, with a watchdog that looks only every 20 s.
    let env = seeded("lockfence", Backend::Postgres).await;
    let mut a = tidemark(&env, &env.target_url, &["run"])
        .env("TIDEMARK__SOURCE__RATE_LIMIT", "500")
        .env("TIDEMARK__SOURCE__BATCH_SIZE", "50")
        .env("TIDEMARK__LOCK__LEASE", "60s")
        .spawn()
        .unwrap();
    let committed = "SELECT COUNT(*) FROM tidemark_checkpoints WHERE lane = 'nightly:items'";
    assert!(
        wait_for(&env.target_url, committed, 1, Duration::from_secs(30)).await,
        "A never committed a batch"
    );

    // Act: the DBA terminates A's lock sessions.
    let killed = scalar_i64(
        &env.target_url,
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'tidemark lane locks' AND datname = current_database()",
    )
    .await;
    let cut_ms = chrono::Utc::now().timestamp_millis();
    let a_status = wait_exit(&mut a, Duration::from_secs(60))
        .await
        .expect("A hangs after losing its lock session");
    let a_err = stderr_of(&mut a);
    let last_commit_ms = scalar_i64(
        &env.target_url,
        "SELECT MAX(updated_at_ms) FROM tidemark_checkpoints WHERE lane = 'nightly:items'",
    )
    .await;

    // Assert: A's next batch failed its fence and rolled back; nothing of A committed after
    // the cut (beyond a batch already past its fence at that instant), and A stopped.
    assert!(killed >= 1, "no lock session of A found");
    assert!(!a_status.success(), "A went on after losing its lane");
    assert!(
        a_err.contains("no longer holds lane nightly:items"),
        "not stopped by the fence: {a_err}"
    );
    assert!(
        last_commit_ms <= cut_ms + 50,
        "A committed {} ms after its lock session was cut",
        last_commit_ms - cut_ms
    );
    assert!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await < DOCS,
        "A finished before the cut: the test proves nothing"
    );
}
