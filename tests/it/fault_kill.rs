//! SIGKILL of `tidemark run` at ≥ 20 seeded-random instants across a multi-entity run with
//! dependencies (the VizHub demo mapping and data): after a final run, every table equals
//! an uninterrupted run's. Set TIDEMARK_FAULT_SEED to replay a failure.

use crate::fault_util::Mongod;
use crate::harness::{Backend, Env};
use crate::ops_util::wait_exit;
use rand::{Rng, SeedableRng};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

pub fn fault_seed() -> u64 {
    std::env::var("TIDEMARK_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// An environment seeded with the demo data set and the VizHub mapping.
pub async fn demo_env(mongo: &str, name: &str, backend: Backend, vizzes: usize, seed: u64) -> Env {
    let mapping = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/mappings/vizhub.toml"
    ))
    .unwrap();
    let env = Env::new_at(mongo, name, backend, &mapping).await;
    tidemark::commands::demo::seed(
        &env.db,
        &tidemark::commands::demo::SeedOptions { vizzes, seed },
    )
    .await
    .expect("demo seed");
    env
}

/// `tidemark run` against `env`'s source and `target`, output discarded.
pub fn run_cmd(env: &Env, target: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tidemark"));
    c.arg("run")
        .envs(env.env_vars(target))
        .env("TIDEMARK__SYNC__START", "2015-01-01T00:00:00Z")
        .env("TIDEMARK__SOURCE__BATCH_SIZE", "200")
        .env("TIDEMARK__SYNC__ERROR_BUDGET", "100000")
        .env("TIDEMARK__LOCK__LEASE", "3s")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Every mapped table plus the dead letters and missing references, as sorted text.
pub async fn dump_all(env: &Env, url: &str) -> Vec<(String, Vec<String>)> {
    let mapping = tidemark::mapping::Mapping::load(&env.mapping_path).unwrap();
    let mut out = Vec::new();
    for e in &mapping.entities {
        for t in std::iter::once(&e.table).chain(e.children.iter().map(|c| &c.table)) {
            out.push((t.clone(), env.dump(url, t).await));
        }
    }
    for (name, sql) in [
        (
            "tidemark_dead_letters",
            // The error text may differ: a document dead-lettered both by the invalid-time scan
            // and as a pulled reference keeps the message of whichever wrote last.
            "SELECT entity || '|' || source_id FROM tidemark_dead_letters ORDER BY 1",
        ),
        // tidemark_missing_refs is not compared. A document reached only through pulls (older
        // than the run's start) gets a record when it is pulled at the depth limit
        // (`sync.max_depth`: its own references are not followed). That depth depends on
        // which batch reached it first, so on where the kills fell. Records of resolvable
        // references are cleared on the next write (`deps::fork_chains_and_cycles_*`).
    ] {
        out.push((name.to_owned(), texts(url, sql).await));
    }
    out
}

pub async fn texts(url: &str, sql: &str) -> Vec<String> {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_all(&mut c).await.unwrap()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_all(&mut c).await.unwrap()
    }
}

/// Compare two dumps table by table; the message names the first differences.
pub fn assert_same(got: &[(String, Vec<String>)], want: &[(String, Vec<String>)], ctx: &str) {
    let mut diffs = Vec::new();
    for ((t, a), (_, b)) in got.iter().zip(want) {
        if a != b {
            let missing: Vec<_> = b.iter().filter(|r| !a.contains(r)).take(3).collect();
            let extra: Vec<_> = a.iter().filter(|r| !b.contains(r)).take(3).collect();
            diffs.push(format!(
                "{t}: {} rows vs {} expected; missing e.g. {missing:?}; extra e.g. {extra:?}",
                a.len(),
                b.len()
            ));
        }
    }
    assert!(diffs.is_empty(), "{ctx}\n{}", diffs.join("\n"));
}

/// Rows in the mapped tables; a table the killed run had not created yet counts 0 (a kill
/// can land before the first run's migration finishes).
async fn table_rows(env: &Env) -> usize {
    let mapping = tidemark::mapping::Mapping::load(&env.mapping_path).unwrap();
    let mut n = 0;
    for e in &mapping.entities {
        for t in std::iter::once(&e.table).chain(e.children.iter().map(|c| &c.table)) {
            n += crate::harness::try_count(&env.target_url, t)
                .await
                .unwrap_or(0) as usize;
        }
    }
    n
}

/// `extra`: more settings for every run (as environment variables).
async fn kill_at_random_instants(backend: Backend, extra: &[(&str, &str)]) {
    let kills = env_usize("TIDEMARK_FAULT_KILLS", 20);
    let vizzes = env_usize("TIDEMARK_FAULT_VIZZES", 2000);
    let seed = fault_seed();
    eprintln!("fault_kill seed = {seed} (TIDEMARK_FAULT_SEED={seed} replays it)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // Arrange: the demo data set on a private server, and an uninterrupted run as the reference.
    let mongo = Mongod::start();
    let env = demo_env(&mongo.uri(), "kill", backend, vizzes, seed % 1000).await;
    let reference = env.second_target().await;
    let t = Instant::now();
    let ok = run_cmd(&env, &reference).status().expect("spawn");
    assert!(ok.success(), "uninterrupted run failed (seed {seed})");
    let full = t.elapsed();
    let t = Instant::now();
    let ok = run_cmd(&env, &reference).status().expect("spawn");
    assert!(
        ok.success(),
        "second uninterrupted run failed (seed {seed})"
    );
    let startup = t.elapsed();

    // Act: SIGKILL each run at a random instant after its start-up; the instants are drawn
    // so the runs' work adds up to about two whole runs, so kills land in every phase
    // (users, vizzes with their pulled references and dependents, contents, commits, events).
    // (About one run until session 13: on a machine three times slower, a restarted run's
    // own overhead ate most of its slice, and one kill series in two left only three states.)
    let span = (full.saturating_sub(startup) * 4 / kills as u32).max(Duration::from_millis(20));
    // A kill that finds the process already gone shortens the instants after it: a resumed
    // run can be much quicker than `startup`, a run with nothing to do, which on this data
    // (documents with bad times) includes a probe of the whole time range that a run with
    // work ahead of it no longer makes (session 18); fixed instants then missed 11 of 20.
    let mut scale = 1.0;
    let mut mid_run = 0;
    let mut states = std::collections::BTreeSet::new();
    for _ in 0..kills {
        let at = (startup.mul_f64(0.5) + span.mul_f64(rng.gen::<f64>())).mul_f64(scale);
        let mut child = run_cmd(&env, &env.target_url)
            .envs(extra.iter().copied())
            .spawn()
            .expect("spawn");
        tokio::time::sleep(at).await;
        if child.try_wait().unwrap().is_none() {
            mid_run += 1;
        } else {
            scale *= 0.6;
        }
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        states.insert(table_rows(&env).await);
    }
    let log = env.dir.path().join("final.log");
    let mut last = run_cmd(&env, &env.target_url)
        .envs(extra.iter().copied())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn");
    let st = wait_exit(&mut last, Duration::from_secs(120)).await;
    if !st.is_some_and(|s| s.success()) {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        panic!(
            "final run failed: {st:?} (seed {seed}):\n{}",
            tail.join("\n")
        );
    }

    // Assert
    eprintln!(
        "fault_kill: {kills} kills, {mid_run} mid-run, {} distinct target states, full run {full:?}",
        states.len()
    );
    assert!(
        mid_run >= kills / 2,
        "only {mid_run} kills hit a running process (seed {seed})"
    );
    // At least four distinct states after the kills: the start, two or more partial syncs,
    // the end. (Five until session 5: the lanes after vizzes now skip what the vizzes lane
    // pulled, so the run's share that changes rows is done in fewer, larger steps per
    // restarted run, and five missed in about one run of three.)
    assert!(
        states.len() >= 4,
        "kills did not land across the run: {states:?} (seed {seed})"
    );
    if std::env::var("TIDEMARK_FAULT_KEEP").is_ok() && backend == Backend::Sqlite {
        let keep = std::path::Path::new("/tmp").join(format!("tidemark-fault-{seed}"));
        std::fs::create_dir_all(&keep).unwrap();
        for f in ["target.db", "second.db"] {
            std::fs::copy(env.dir.path().join(f), keep.join(f)).ok();
        }
        eprintln!("kept the targets in {}", keep.display());
    }
    let got = dump_all(&env, &env.target_url).await;
    let want = dump_all(&env, &reference).await;
    assert!(
        want.iter().map(|(_, r)| r.len()).sum::<usize>() > 5000,
        "the reference is too small to prove anything"
    );
    assert_same(
        &got,
        &want,
        &format!("after {kills} kills ({mid_run} mid-run), seed {seed}"),
    );
}

/// SQLite with a commit per batch (`target.sqlite_group_commit_ms = 0`; the default groups
/// batches for 5 s, which on this small set makes most runs one group).
#[tokio::test]
async fn sigkill_at_random_instants_sqlite() {
    kill_at_random_instants(
        Backend::Sqlite,
        &[("TIDEMARK__TARGET__SQLITE_GROUP_COMMIT_MS", "0")],
    )
    .await;
}

/// The same with the batches grouped into transactions of up to 300 ms (`sink::group`):
/// a kill loses whole groups only, and the checkpoint goes back with them.
#[tokio::test]
async fn sigkill_at_random_instants_sqlite_grouped_batches() {
    kill_at_random_instants(
        Backend::Sqlite,
        &[("TIDEMARK__TARGET__SQLITE_GROUP_COMMIT_MS", "300")],
    )
    .await;
}

#[tokio::test]
async fn sigkill_at_random_instants_postgres() {
    kill_at_random_instants(Backend::Postgres, &[]).await;
}
