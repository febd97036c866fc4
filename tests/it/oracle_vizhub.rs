//! The oracle's second domain: the VizHub mapping (`config/mappings/vizhub.toml`) on small
//! random demo data sets (`demo seed` with a random size and seed: forks with dangling
//! parents, shared seconds, dirt, oversized content). The reference here is not a model but
//! an uninterrupted in-process `run` into a fresh target; the case drives the same source
//! through a random mix of in-process runs, `backfill --parallel`, processes SIGKILLed at
//! random instants and two backfill processes sharing one range, then every table, the dead
//! letters and the pending entries must equal the reference's, and `verify` must find
//! nothing. Seeded: `TIDEMARK_ORACLE_SEED=s` replays one case, `TIDEMARK_ORACLE_VIZHUB_CASES=n`
//! runs more.

use crate::fault_kill::{assert_same, demo_env, dump_all};
use crate::harness::{mongo_uri, Backend, Env};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;
use tidemark::commands::backfill::{backfill, BackfillOptions};

const DEFAULT_CASES: u64 = 6;
const FROM: &str = "2010-01-01T00:00:00Z";

/// A tidemark process of the case, its log in a file of the case's folder: a pipe nobody
/// reads until the process ends fills up (64 KiB) and stops a chatty process mid-write.
fn process(env: &Env, batch: usize, args: &[&str]) -> (Command, std::path::PathBuf) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let log = env.dir.path().join(format!(
        "process-{}.log",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut c = Command::new(env!("CARGO_BIN_EXE_tidemark"));
    c.args(args)
        .envs(env.env_vars(&env.target_url))
        .env("TIDEMARK__SYNC__START", FROM)
        .env("TIDEMARK__SOURCE__BATCH_SIZE", batch.to_string())
        .env("TIDEMARK__SYNC__ERROR_BUDGET", "1000000")
        .env("TIDEMARK__SOURCE__RATE_LIMIT", "2000")
        .env("TIDEMARK__LOCK__LEASE", "1s")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("process log file"));
    (c, log)
}

async fn finish(
    (mut child, log): (std::process::Child, std::path::PathBuf),
    kill: Option<Duration>,
    seed: u64,
) {
    if let Some(d) = kill {
        tokio::time::sleep(d).await;
        let _ = child.kill();
    }
    let st = crate::ops_util::wait_exit(&mut child, Duration::from_secs(300))
        .await
        .expect("a tidemark process ran for five minutes");
    assert!(
        kill.is_some() || st.success(),
        "seed {seed}: a tidemark process failed: {}",
        {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        }
    );
}

fn settings(env: &Env, batch: usize) -> tidemark::settings::Settings {
    let mut s = env.settings();
    s.sync.start = FROM.parse().unwrap();
    s.source.batch_size = batch;
    s.sync.error_budget = 1_000_000;
    s.lock.lease = Duration::from_secs(1);
    s
}

async fn backfill_in_process(
    s: &tidemark::settings::Settings,
    to: &str,
    parallel: usize,
    seed: u64,
) {
    let opts = BackfillOptions {
        from: Some(FROM.into()),
        to: Some(to.into()),
        entities: Vec::new(),
        chunk: tidemark::engine::window::ChunkBy::Duration(Duration::from_secs(180 * 86_400)),
        parallel,
        resume: None,
    };
    backfill(s.clone(), opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: backfill: {e:#}"));
}

async fn one_case(seed: u64, backend: Backend) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let vizzes = rng.gen_range(5..60);
    let env = demo_env(&mongo_uri(), "oracle_viz", backend, vizzes, seed).await;
    let batch = rng.gen_range(3..40);
    let s = settings(&env, batch);
    // The end of the range: now, as a fixed instant for every process of the case.
    let to = tidemark::span::fmt_ts(chrono::Utc::now());
    let mut how = Vec::new();
    for _ in 0..rng.gen_range(1..3) {
        let kill = Duration::from_millis(rng.gen_range(50..1500));
        match rng.gen_range(0..4) {
            0 => {
                how.push("run".to_owned());
                let opts = tidemark::commands::run::RunOptions {
                    until: Some(to.clone()),
                    ..Default::default()
                };
                tidemark::commands::run::run(s.clone(), opts, Default::default())
                    .await
                    .unwrap_or_else(|e| panic!("seed {seed}: run: {e:#}"));
            }
            1 => {
                let p = rng.gen_range(1..4);
                how.push(format!("backfill --parallel {p}"));
                backfill_in_process(&s, &to, p, seed).await;
            }
            2 => {
                how.push(format!("run killed after {kill:?}"));
                let (mut c, log) = process(&env, batch, &["run", "--until", &to]);
                finish((c.spawn().unwrap(), log), Some(kill), seed).await;
            }
            _ => {
                how.push(format!("two backfill processes, one killed after {kill:?}"));
                let args = ["backfill", "--from", FROM, "--to", &to, "--chunk", "180d"];
                let (mut a, a_log) = process(&env, batch, &args);
                let (mut b, b_log) = process(&env, batch, &args);
                let (a, b) = ((a.spawn().unwrap(), a_log), (b.spawn().unwrap(), b_log));
                tokio::join!(finish(a, Some(kill), seed), finish(b, None, seed));
            }
        }
    }
    // Finish: a backfill of the whole range (resuming any killed one), then a run.
    backfill_in_process(&s, &to, 2, seed).await;
    let opts = tidemark::commands::run::RunOptions {
        until: Some(to.clone()),
        ..Default::default()
    };
    tidemark::commands::run::run(s.clone(), opts, Default::default())
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: run: {e:#}"));

    let reference = env.second_target().await;
    let mut rs = s.clone();
    rs.target.url = tidemark::secret::SecretUri::new(reference.clone());
    rs.state_dir = env.dir.path().join("reference");
    std::fs::create_dir_all(&rs.state_dir).unwrap();
    let opts = tidemark::commands::run::RunOptions {
        until: Some(to.clone()),
        ..Default::default()
    };
    tidemark::commands::run::run(rs, opts, Default::default())
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: reference run: {e:#}"));
    let ctx = format!(
        "seed {seed} ({backend:?}, {vizzes} vizzes, batch {batch}: {}); replay: \
         TIDEMARK_ORACLE_SEED={seed} cargo test --test it oracle_vizhub",
        how.join("; ")
    );
    let got = dump_all(&env, &env.target_url).await;
    let want = dump_all(&env, &reference).await;
    assert_same(&got, &want, &ctx);

    let v = tidemark::commands::verify::verify(
        &s,
        &tidemark::commands::verify::VerifyOptions {
            from: FROM.into(),
            to,
            entities: Vec::new(),
            bucket: Duration::from_secs(30 * 86_400),
            limit: 100,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{ctx}: verify: {e:#}"));
    assert_eq!(v.differences, 0, "{ctx}: verify reports {v}");
}

fn cases(offset: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("TIDEMARK_ORACLE_SEED") {
        let s: u64 = s.parse().expect("TIDEMARK_ORACLE_SEED is a number");
        return if (s > 900_000) == (offset == 900_000) && s > 500_000 {
            vec![s]
        } else {
            vec![]
        };
    }
    let n: u64 = std::env::var("TIDEMARK_ORACLE_VIZHUB_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    (1..=n).map(|i| i + offset).collect()
}

#[tokio::test]
async fn oracle_vizhub_sqlite() {
    for seed in cases(500_000) {
        one_case(seed, Backend::Sqlite).await;
    }
}

#[tokio::test]
async fn oracle_vizhub_postgres() {
    for seed in cases(900_000) {
        one_case(seed, Backend::Postgres).await;
    }
}
