//! An independent oracle: random source histories driven through `run` and `backfill`
//! (in-process, `--parallel`, as processes killed at random instants, two processes sharing
//! one backfill), and the target compared table by table with a reference model
//! (`oracle_model.rs`; the histories: `oracle_gen.rs`). `verify`'s verdict must agree with
//! the model: clean on the model's target, and exactly the damaged key after one damage.
//!
//! Seeded and reproducible: a failure names its seed and how to replay it.
//! `TIDEMARK_ORACLE_CASES=n` runs n cases per backend group (default: `DEFAULT_CASES`),
//! `TIDEMARK_ORACLE_SEED=s` replays one case (on the backend the seed belongs to).

use crate::harness::{Backend, Env};
use crate::oracle_gen::{base, iso, step, Change, HOUR};
use crate::oracle_model::{model, target, Table, MAPPING};
use bson::{doc, Document};
use chrono::{TimeZone, Utc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tidemark::commands::backfill::{backfill, BackfillOptions};
use tidemark::commands::run::RunOptions;
use tidemark::settings::{ForeignKeyChecks, Settings};

/// Cases per test by default: SQLite cases (seeds 1..=n) and PostgreSQL cases (seeds
/// 100001..), a few hundred in all, about five minutes of CI on two cores.
const DEFAULT_CASES: u64 = 160;
const PG_SEEDS: u64 = 100_000;

pub(crate) async fn strings(url: &str, sql: &str) -> Table {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar::<_, String>(sql)
            .fetch_all(&mut c)
            .await
            .unwrap()
            .into_iter()
            .collect()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar::<_, String>(sql)
            .fetch_all(&mut c)
            .await
            .unwrap()
            .into_iter()
            .collect()
    }
}

async fn write(env: &Env, changed: Vec<Change>) {
    for c in changed {
        env.db
            .collection::<Document>(c.coll)
            .replace_one(c.filter, c.doc)
            .upsert(true)
            .await
            .unwrap();
    }
}

/// How one step reaches the target.
#[derive(Debug)]
enum Drive {
    /// `run --until`, in-process.
    Run,
    /// `backfill --parallel n` over everything so far, in-process.
    Backfill(usize),
    /// `tidemark run` as a process, SIGKILLed after the delay, then run again in-process.
    KilledRun(Duration),
    /// Two `tidemark backfill` processes on the same range at once (the first SIGKILLed
    /// after the delay, if any), then the backfill once more in-process to finish it.
    TwoBackfills(Option<Duration>),
}

fn pick_drive(rng: &mut ChaCha8Rng) -> Drive {
    let delay = |rng: &mut ChaCha8Rng| Duration::from_millis(rng.gen_range(0..600));
    match rng.gen_range(0..8) {
        0..=2 => Drive::Run,
        3 | 4 => Drive::Backfill(rng.gen_range(1..4)),
        5 | 6 => Drive::KilledRun(delay(rng)),
        _ => {
            let kill = rng.gen_bool(0.5).then(|| delay(rng));
            Drive::TwoBackfills(kill)
        }
    }
}

/// The binary with this case's settings (as environment variables, which win), and the file
/// its log goes to: a pipe nobody reads until the process ends fills up (64 KiB) and stops a
/// chatty process mid-write (it hung `oracle_vizhub` once).
fn process(env: &Env, s: &Settings, args: &[&str]) -> (Command, std::path::PathBuf) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let log = env.dir.path().join(format!(
        "process-{}.log",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut c = Command::new(env!("CARGO_BIN_EXE_tidemark"));
    c.args(args)
        .envs(env.env_vars(&env.target_url))
        .env("TIDEMARK__SYNC__START", iso(base() - HOUR))
        .env(
            "TIDEMARK__SOURCE__BATCH_SIZE",
            s.source.batch_size.to_string(),
        )
        .env(
            "TIDEMARK__SYNC__MAX_WINDOW",
            format!("{}s", s.sync.max_window.as_secs()),
        )
        .env("TIDEMARK__SYNC__OVERLAP", "1h")
        .env("TIDEMARK__SYNC__ERROR_BUDGET", "1000000")
        // Slow enough for a kill to land mid-run on a small source.
        .env("TIDEMARK__SOURCE__RATE_LIMIT", "300")
        .env("TIDEMARK__LOCK__LEASE", "1s")
        .env(
            "TIDEMARK__TARGET__SQLITE_GROUP_COMMIT_MS",
            s.target.sqlite_group_commit_ms.to_string(),
        )
        .env(
            "TIDEMARK__TARGET__FOREIGN_KEY_CHECKS",
            match s.target.foreign_key_checks {
                ForeignKeyChecks::Database => "database",
                ForeignKeyChecks::Tidemark => "tidemark",
            },
        )
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("process log file"));
    (c, log)
}

/// Start a prepared process.
fn spawn((mut c, log): (Command, std::path::PathBuf)) -> (std::process::Child, std::path::PathBuf) {
    (c.spawn().expect("spawn tidemark"), log)
}

/// Wait for a child; kill it first after `kill`. Returns its log when it failed on its own.
async fn finish(
    (mut child, log): (std::process::Child, std::path::PathBuf),
    kill: Option<Duration>,
) -> Option<String> {
    if let Some(d) = kill {
        tokio::time::sleep(d).await;
        let _ = child.kill();
    }
    let st = crate::ops_util::wait_exit(&mut child, Duration::from_secs(120))
        .await
        .expect("a tidemark process ran for two minutes");
    (kill.is_none() && !st.success()).then(|| std::fs::read_to_string(&log).unwrap_or_default())
}

async fn run_in_process(s: &Settings, until: &str, seed: u64) {
    let opts = RunOptions {
        until: Some(until.to_owned()),
        ..Default::default()
    };
    tidemark::commands::run::run(s.clone(), opts, Default::default())
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: run: {e:#}"));
}

async fn backfill_in_process(s: &Settings, until: &str, parallel: usize, seed: u64) {
    let opts = BackfillOptions {
        from: Some(iso(base() - HOUR)),
        to: Some(until.to_owned()),
        entities: Vec::new(),
        chunk: tidemark::engine::window::ChunkBy::Duration(Duration::from_secs(1800)),
        parallel,
        resume: None,
    };
    backfill(s.clone(), opts, Arc::new(AtomicBool::new(false)))
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: backfill: {e:#}"));
}

async fn drive(env: &Env, s: &Settings, how: &Drive, until: &str, seed: u64) {
    match how {
        Drive::Run => run_in_process(s, until, seed).await,
        Drive::Backfill(p) => backfill_in_process(s, until, *p, seed).await,
        Drive::KilledRun(after) => {
            let child = spawn(process(env, s, &["run", "--until", until]));
            finish(child, Some(*after)).await;
            run_in_process(s, until, seed).await;
        }
        Drive::TwoBackfills(kill) => {
            let from = iso(base() - HOUR);
            let args = ["backfill", "--from", &from, "--to", until, "--chunk", "30m"];
            let a = spawn(process(env, s, &args));
            let b = spawn(process(env, s, &args));
            let (ea, eb) = tokio::join!(finish(a, *kill), finish(b, None));
            if let Some(e) = ea.or(eb) {
                panic!("seed {seed}: a backfill process failed: {e}");
            }
            backfill_in_process(s, until, 1, seed).await;
        }
    }
}

async fn one_case(seed: u64, backend: Backend) {
    one_case_grouped(seed, backend, 0).await;
}

/// A case whose runs group their SQLite batches for up to `group_ms` (`sink::group`).
async fn one_case_grouped(seed: u64, backend: Backend, group_ms: u32) {
    one_case_checked(seed, backend, group_ms, ForeignKeyChecks::Database).await;
}

/// A case whose writes have their foreign keys checked by `checks`.
async fn one_case_checked(seed: u64, backend: Backend, group_ms: u32, checks: ForeignKeyChecks) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let env = Env::new("oracle", backend, MAPPING).await;
    env.index("accounts", doc! { "t": 1, "_id": 1 }).await;
    env.index("notes", doc! { "at": 1, "_id": 1 }).await;
    env.index("studies", doc! { "updatedAt": 1, "_id": 1 })
        .await;
    env.index("labels", doc! { "ts": 1, "_id": 1 }).await;
    let mut src = crate::oracle_model::Source::default();
    let steps = rng.gen_range(2..4);
    let mut s = env.settings();
    s.sync.start = Utc.timestamp_millis_opt(base() - HOUR).unwrap();
    s.sync.error_budget = 1_000_000;
    s.lock.lease = Duration::from_secs(1);
    s.target.sqlite_group_commit_ms = group_ms;
    s.target.foreign_key_checks = checks;
    let mut how = Vec::new();
    for k in 0..steps {
        let from = base() + k as i64 * HOUR;
        let changed = step(&mut rng, &mut src, k, from);
        write(&env, changed).await;
        s.source.batch_size = rng.gen_range(1..8);
        s.sync.max_window = Duration::from_secs([600, 1500, 3600][rng.gen_range(0..3)]);
        let until = iso(from + HOUR);
        let d = pick_drive(&mut rng);
        how.push(format!(
            "{d:?} until {until} (batch {}, window {:?})",
            s.source.batch_size, s.sync.max_window
        ));
        drive(&env, &s, &d, &until, seed).await;
    }
    let replay = format!(
        "replay: TIDEMARK_ORACLE_SEED={seed} cargo test --test it oracle_{} -- --nocapture",
        if backend == Backend::Sqlite {
            "sqlite"
        } else {
            "postgres"
        }
    );
    let want = model(&src).tables;
    let got = target(&env.target_url).await;
    for (t, w) in &want {
        let g = &got[t];
        let missing: Vec<_> = w.difference(g).collect();
        let extra: Vec<_> = g.difference(w).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "seed {seed} ({backend:?}; {}): table {t}: missing {missing:?}, extra {extra:?}\n\
             source documents of those keys: {:#?}\n{replay}",
            how.join("; "),
            sources_of(&src, missing.iter().chain(&extra))
        );
    }
    if backend == Backend::Sqlite {
        // SQLite's own check of every foreign key, whoever checked them while writing.
        let dangling = crate::fault_kill::texts(
            &env.target_url,
            "SELECT \"table\" || ' -> ' || parent FROM pragma_foreign_key_check",
        )
        .await;
        assert!(
            dangling.is_empty(),
            "seed {seed}: rows point at nothing: {dangling:?}\n{replay}"
        );
    }
    verify_agrees(&env, &s, seed, &mut rng, steps as i64, &how, &replay).await;
}

/// The final source documents whose key text starts a row of `rows` (for a failure's message).
fn sources_of<'a>(
    src: &crate::oracle_model::Source,
    rows: impl Iterator<Item = &'a &'a String>,
) -> Vec<Document> {
    let keys: Vec<&str> = rows.map(|r| r.split('|').next().unwrap()).collect();
    let all = src
        .accounts
        .values()
        .chain(src.notes.values())
        .chain(src.studies.values())
        .chain(src.labels.values());
    all.filter(|d| {
        ["_id", "accountId", "studyId", "labelId"]
            .iter()
            .filter_map(|f| d.get(*f))
            .any(|id| keys.contains(&crate::oracle_model::key_of(id).0.as_str()))
    })
    .cloned()
    .collect()
}

/// `verify`'s verdict must agree with the model: nothing on the target the model produced,
/// and exactly the damaged key after one random row is damaged by hand.
async fn verify_agrees(
    env: &Env,
    s: &Settings,
    seed: u64,
    rng: &mut ChaCha8Rng,
    steps: i64,
    how: &[String],
    replay: &str,
) {
    use tidemark::commands::verify::{verify, VerifyOptions};
    let opts = || VerifyOptions {
        from: iso(base() - 2 * HOUR),
        to: iso(base() + (steps + 1) * HOUR),
        entities: Vec::new(),
        bucket: Duration::from_secs(3600),
        limit: 1000,
    };
    let clean = verify(s, &opts())
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: verify: {e:#}"));
    assert_eq!(
        clean.differences,
        0,
        "seed {seed} ({}): the target equals the model, yet verify reports {clean}{}\n{replay}",
        how.join("; "),
        serde_json::to_string_pretty(
            &clean
                .entities
                .iter()
                .map(|e| &e.details)
                .collect::<Vec<_>>()
        )
        .unwrap()
    );
    // Damage one row the model says must be there, of a randomly chosen kind.
    let url = &env.target_url;
    let pick = |t: &str, k: &str| format!("SELECT {k} FROM {t} ORDER BY {k} LIMIT 1");
    let kinds: [(&str, &str, &str); 5] = [
        (
            "notes",
            "id",
            "UPDATE notes SET body = 'damaged by the oracle' WHERE id = '{}'",
        ),
        (
            "studies",
            "study_id",
            "UPDATE studies SET title = 'damaged by the oracle' WHERE study_id = '{}'",
        ),
        (
            "accounts",
            "account_id",
            "UPDATE accounts SET name = 'damaged by the oracle' WHERE account_id = '{}'",
        ),
        (
            "labels",
            "label_id",
            "DELETE FROM labels WHERE label_id = '{}'",
        ),
        (
            "members",
            "study_id",
            "UPDATE members SET account = NULL WHERE study_id = '{}'",
        ),
    ];
    let start = rng.gen_range(0..kinds.len());
    for i in 0..kinds.len() {
        let (table, key, update) = kinds[(start + i) % kinds.len()];
        let sql = if table == "members" {
            "SELECT study_id FROM members WHERE account IS NOT NULL ORDER BY study_id LIMIT 1"
                .into()
        } else {
            pick(table, key)
        };
        let Some(victim) = strings(url, &sql).await.into_iter().next() else {
            continue;
        };
        crate::trust_util::exec(url, &update.replace("{}", &victim.replace('\'', "''"))).await;
        let damaged = verify(s, &opts())
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: verify: {e:#}"));
        let named: Vec<&String> = damaged
            .entities
            .iter()
            .flat_map(|e| e.different.iter().chain(&e.missing).chain(&e.extra))
            .collect();
        assert!(
            damaged.differences >= 1 && named.iter().all(|k| k.contains(victim.as_str())),
            "seed {seed}: {table} row {victim} was damaged, verify reports {damaged}\n{replay}"
        );
        return;
    }
}

/// The seeds of one group: `TIDEMARK_ORACLE_SEED` alone if it belongs to the group.
fn cases(offset: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("TIDEMARK_ORACLE_SEED") {
        let s: u64 = s.parse().expect("TIDEMARK_ORACLE_SEED is a number");
        let pg = s > PG_SEEDS && s <= 500_000;
        return if pg == (offset == PG_SEEDS) && s <= 500_000 {
            vec![s]
        } else {
            vec![]
        };
    }
    let n: u64 = std::env::var("TIDEMARK_ORACLE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    (1..=n).map(|i| i + offset).collect()
}

#[tokio::test]
async fn oracle_sqlite() {
    for seed in cases(0) {
        one_case(seed, Backend::Sqlite).await;
    }
}

/// A quarter as many cases again on SQLite with the batches of each run grouped into
/// transactions of up to 1, 20 or 200 ms (by seed: commits after each batch, every few
/// batches, at window ends): the same model, the same kills and backfills.
#[tokio::test]
async fn oracle_sqlite_grouped_batches() {
    for seed in cases(50_000)
        .into_iter()
        .filter(|s| s % 4 == 1 || std::env::var("TIDEMARK_ORACLE_SEED").is_ok())
    {
        one_case_grouped(seed, Backend::Sqlite, [1, 20, 200][(seed % 3) as usize]).await;
    }
}

/// A quarter as many cases again on SQLite with `target.foreign_key_checks = "tidemark"`:
/// no foreign key is checked by SQLite on the writing connections, so nothing but tidemark's
/// own resolution keeps the references valid; the model and `PRAGMA foreign_key_check`
/// (`target`) judge the result, kills and backfills included.
#[tokio::test]
async fn oracle_sqlite_tidemark_checks_references() {
    for seed in cases(60_000)
        .into_iter()
        .filter(|s| s % 4 == 1 || std::env::var("TIDEMARK_ORACLE_SEED").is_ok())
    {
        let group_ms = [0, 20, 5000][(seed % 3) as usize];
        one_case_checked(seed, Backend::Sqlite, group_ms, ForeignKeyChecks::Tidemark).await;
    }
}

#[tokio::test]
async fn oracle_postgres() {
    // A quarter as many cases on PostgreSQL (each creates a database).
    for seed in cases(PG_SEEDS)
        .into_iter()
        .filter(|s| s % 4 == 1 || std::env::var("TIDEMARK_ORACLE_SEED").is_ok())
    {
        one_case(seed, Backend::Postgres).await;
    }
}
