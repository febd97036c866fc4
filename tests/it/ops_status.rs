//! `tidemark status` as a Nagios check: exit codes and the first line for each threshold,
//! read-only (never creates, migrates or writes; a SELECT-only role is enough), UNKNOWN
//! when the target or the tool tables are absent, dead-letter and failed-run options,
//! bad thresholds rejected; its report of a running backfill; and the node_exporter
//! textfile written by `run --textfile`.

use crate::harness::{items_mapping, pg_admin_url, scalar_i64, Backend, Env};
use crate::ops_util::{dead_mongo_uri, items, seed, tidemark};
use crate::trust_util::exec;
use tidemark::commands::status::{NAGIOS_CRITICAL, NAGIOS_OK, NAGIOS_UNKNOWN, NAGIOS_WARNING};
use tidemark::telemetry::metrics;

fn status(env: &Env, args: &[&str]) -> (i32, String) {
    let mut all = vec!["status"];
    all.extend_from_slice(args);
    let out = tidemark(env, &env.target_url, &all).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn ops_status_exit_codes_follow_nagios() {
    // Arrange: a run that stops 30 h ago, so the lag is ~30 h.
    let env = Env::new("status", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(
            300,
            chrono::Utc::now().timestamp_millis() - 3 * 86_400_000,
            10,
        ),
    )
    .await;
    let out = tidemark(&env, &env.target_url, &["run", "--until", "-30h"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Act
    let ok = status(&env, &["--warn", "40h", "--crit", "48h"]);
    let warning = status(&env, &["--warn", "26h", "--crit", "48h"]);
    let critical = status(&env, &["--warn", "10h", "--crit", "20h"]);
    let json = status(&env, &["--json", "--warn", "26h", "--crit", "48h"]);
    let unknown = {
        let out = tidemark(&env, &env.target_url, &["status", "--warn", "26h"])
            .env("TIDEMARK__SOURCE__URI", dead_mongo_uri())
            .env("TIDEMARK__SOURCE__CONNECT_TIMEOUT", "1s")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };

    // Assert
    assert_eq!(ok.0, NAGIOS_OK, "{}", ok.1);
    assert!(
        ok.1.starts_with("TIDEMARK OK - 1 entities within thresholds; largest lag items 1day 6h"),
        "{}",
        ok.1
    );
    assert_eq!(warning.0, NAGIOS_WARNING, "{}", warning.1);
    let first = warning.1.lines().next().unwrap();
    assert!(
        first.starts_with("TIDEMARK WARNING - items lag 1day 6h")
            && first.contains("over --warn 1day 2h | lag_items=108"),
        "{first}"
    );
    assert!(
        first.ends_with("s;93600;172800 dead_letters_items=0;;"),
        "{first}"
    );
    assert_eq!(critical.0, NAGIOS_CRITICAL, "{}", critical.1);
    assert!(
        critical.1.starts_with("TIDEMARK CRITICAL - items lag"),
        "{}",
        critical.1
    );
    assert_eq!(unknown.0, NAGIOS_UNKNOWN, "{}", unknown.1);
    assert!(
        unknown.1.starts_with("TIDEMARK UNKNOWN - "),
        "{}",
        unknown.1
    );
    let v: serde_json::Value = serde_json::from_str(&json.1).expect("status --json is JSON");
    assert_eq!(json.0, NAGIOS_WARNING);
    assert_eq!(v["state"], "WARNING");
    let items = &v["entities"][0];
    assert_eq!(items["entity"], "items");
    assert_eq!(items["last_result"], "ok");
    assert!(items["last_duration_s"].as_f64().is_some(), "{items}");
    let lag = items["lag_seconds"].as_u64().unwrap();
    assert!((30 * 3600..31 * 3600).contains(&lag), "lag {lag}");
}

#[tokio::test]
async fn ops_status_shows_an_unfinished_backfill() {
    // Arrange: a backfill interrupted by SIGKILL after its first chunk.
    let env = Env::new("stbf", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    let day = 86_400_000i64;
    let today = chrono::Utc::now().date_naive();
    let base = (today - chrono::Days::new(10))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let docs: Vec<bson::Document> = (0..20_000i64)
        .map(|i| bson::doc! { "_id": i, "t": base.timestamp_millis() + i * (4 * day / 20_000) })
        .collect();
    seed(&env, docs).await;
    let from = base.format("%Y-%m-%d").to_string();
    let to = (base + chrono::TimeDelta::days(4))
        .format("%Y-%m-%d")
        .to_string();
    let mut child = tidemark(
        &env,
        &env.target_url,
        &["backfill", "--from", &from, "--to", &to, "--chunk", "6h"],
    )
    .env("TIDEMARK__SOURCE__RATE_LIMIT", "4000")
    .spawn()
    .unwrap();
    let started = crate::ops_util::wait_for(
        &env.target_url,
        "SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE status = 'done'",
        1,
        std::time::Duration::from_secs(60),
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();

    // Act
    let (code, text) = status(&env, &[]);
    let (_, json) = status(&env, &["--json"]);

    // Assert
    assert!(started);
    assert_eq!(code, NAGIOS_OK, "{text}");
    assert!(text.contains("backfill bf-"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let bf = &v["backfills"][0];
    assert_eq!(bf["progress"]["total"], 16);
    let done = bf["progress"]["done"].as_u64().unwrap();
    assert!((1..16).contains(&done), "{bf}");
    assert!(bf["progress"]["docs_read"].as_u64().unwrap() > 0, "{bf}");
}

#[tokio::test]
async fn ops_run_writes_a_textfile() {
    let env = Env::new("textfile", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(700, chrono::Utc::now().timestamp_millis() - 86_400_000, 10),
    )
    .await;
    let path = env.dir.path().join("tidemark.prom");
    let out = tidemark(
        &env,
        &env.target_url,
        &["run", "--textfile", path.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples = metrics::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let get = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name)
            .map(|s| (s.labels.clone(), s.value))
    };
    let (labels, read) = get(metrics::READ).expect("documents read");
    assert_eq!(labels.get("entity").map(String::as_str), Some("items"));
    assert_eq!(read, 700.0);
    assert!(get(metrics::WATERMARK).is_some() && get(metrics::LAST_SUCCESS).is_some());
    // The lag at the end of the run would freeze in the file: alerts use the watermark's age.
    assert!(get(metrics::LAG).is_none());
    let ok = samples.iter().find(|s| {
        s.name == metrics::RUNS && s.labels.get("result").map(String::as_str) == Some("ok")
    });
    assert_eq!(ok.map(|s| s.value), Some(1.0));
    assert!(
        !path.with_file_name(".tidemark.prom.tmp").exists(),
        "temp file left behind"
    );
}

/// `tidemark status` with `args` against `target`, run from `cwd`: (exit code, stdout).
fn status_at(env: &Env, target: &str, cwd: &std::path::Path, args: &[&str]) -> (i32, String) {
    let mut all = vec!["status"];
    all.extend_from_slice(args);
    let out = tidemark(env, target, &all)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn ops_status_never_creates_a_missing_sqlite_target() {
    // Arrange: no target file; one check names it, one relies on the default URL.
    let env = Env::new("stnofile", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    let absent = env.dir.path().join("absent").join("t.db");
    let cwd = tempfile::tempdir().unwrap();

    // Act
    let named = status_at(
        &env,
        &format!("sqlite://{}", absent.display()),
        cwd.path(),
        &["--warn", "26h", "--crit", "48h"],
    );
    let default = {
        let out = tidemark(&env, "unused", &["status", "--crit", "48h"])
            .env_remove("TIDEMARK__TARGET__URL")
            .current_dir(cwd.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };

    // Assert: UNKNOWN saying the file is missing, and nothing created.
    assert_eq!(named.0, NAGIOS_UNKNOWN, "{}", named.1);
    assert!(
        named.1.starts_with("TIDEMARK UNKNOWN - the SQLite target")
            && named.1.contains("does not exist"),
        "{}",
        named.1
    );
    assert!(!absent.exists() && !absent.parent().unwrap().exists());
    assert_eq!(default.0, Some(NAGIOS_UNKNOWN), "{}", default.1);
    // The default target lives in state_dir (TIDEMARK__STATE_DIR = the environment's folder).
    let default_db = env.dir.path().join("tidemark.db");
    assert!(
        default
            .1
            .contains(&format!("{} does not exist", default_db.display())),
        "{}",
        default.1
    );
    assert!(!cwd.path().join("state").exists(), "status created ./state");
}

#[tokio::test]
async fn ops_status_unknown_without_tool_tables_and_migrates_nothing_sqlite() {
    tool_tables_absent(Backend::Sqlite).await;
}

#[tokio::test]
async fn ops_status_unknown_without_tool_tables_and_migrates_nothing_postgres() {
    tool_tables_absent(Backend::Postgres).await;
}

async fn tool_tables_absent(backend: Backend) {
    // Arrange: a target that exists but where tidemark never ran (an empty SQLite file).
    let env = Env::new("stnotables", backend, &items_mapping("epoch_millis")).await;
    if backend == Backend::Sqlite {
        let path = env.target_url.trim_start_matches("sqlite://");
        std::fs::File::create(path).unwrap();
    }
    let tables = "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'";
    let tables = if backend == Backend::Sqlite {
        "SELECT COUNT(*) FROM sqlite_master"
    } else {
        tables
    };

    // Act
    let (code, out) = status(&env, &["--warn", "26h", "--crit", "48h"]);

    // Assert
    assert_eq!(code, NAGIOS_UNKNOWN, "{out}");
    assert!(
        out.starts_with("TIDEMARK UNKNOWN - tidemark's tables are not in the target")
            && out.contains("tidemark_runs"),
        "{out}"
    );
    assert_eq!(
        scalar_i64(&env.target_url, tables).await,
        0,
        "status created tables"
    );
}

#[tokio::test]
async fn ops_status_rejects_warn_above_crit() {
    let env = Env::new("stargs", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    let (code, out) = status(&env, &["--warn", "2d", "--crit", "1d"]);
    assert_eq!(code, NAGIOS_UNKNOWN, "{out}");
    assert!(
        out.starts_with("TIDEMARK UNKNOWN - --warn 2days is longer than --crit 1day"),
        "{out}"
    );
}

#[tokio::test]
async fn ops_status_works_with_a_select_only_role_postgres() {
    // Arrange: a run as the owner, then a role with only the grants OPERATIONS.md lists.
    let env = Env::new("strole", Backend::Postgres, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(200, chrono::Utc::now().timestamp_millis() - 86_400_000, 10),
    )
    .await;
    let out = tidemark(&env, &env.target_url, &["run"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let role = format!("{}_ro", env.name);
    let db = env.name.clone();
    for sql in [
        format!("CREATE ROLE \"{role}\" LOGIN"),
        format!("GRANT CONNECT ON DATABASE \"{db}\" TO \"{role}\""),
        format!("GRANT USAGE ON SCHEMA public TO \"{role}\""),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO \"{role}\""),
    ] {
        exec(&env.target_url, &sql).await;
    }
    let (base, _) = env.target_url.rsplit_once('/').unwrap();
    let as_role = format!("{}/{db}", base.replace("postgres@", &format!("{role}@")));
    let migrations = "SELECT COUNT(*) FROM _sqlx_migrations";
    let before = scalar_i64(&env.target_url, migrations).await;

    // Act
    let (code, text) = status_at(
        &env,
        &as_role,
        env.dir.path(),
        &["--warn", "26h", "--crit", "48h"],
    );
    let (_, json) = status_at(&env, &as_role, env.dir.path(), &["--json"]);

    // Assert: a real answer, nothing written.
    let cleanup = async {
        exec(&env.target_url, &format!("DROP OWNED BY \"{role}\"")).await;
        exec(
            &env.target_url,
            &format!("REVOKE CONNECT ON DATABASE \"{db}\" FROM \"{role}\""),
        )
        .await;
        exec(&pg_admin_url(), &format!("DROP ROLE IF EXISTS \"{role}\"")).await;
    };
    let verdict = (
        code,
        text.clone(),
        scalar_i64(&env.target_url, migrations).await,
    );
    cleanup.await;
    assert_eq!(verdict.0, NAGIOS_OK, "{}", verdict.1);
    assert!(verdict.1.starts_with("TIDEMARK OK - "), "{}", verdict.1);
    assert_eq!(verdict.2, before);
    let v: serde_json::Value = serde_json::from_str(&json).expect("status --json is JSON");
    assert_eq!(v["entities"][0]["entity"], "items", "{v}");
    assert_eq!(v["last_run"]["status"], "ok", "{v}");
}

#[tokio::test]
async fn ops_status_dead_letters_raise_the_state_only_over_the_threshold() {
    // Arrange: 3 of 103 documents cannot be mapped (a string id for a bigint key).
    let env = Env::new("stdead", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    let base = chrono::Utc::now().timestamp_millis() - 86_400_000;
    let mut docs = items(100, base, 10);
    for i in 0..3 {
        docs.push(bson::doc! { "_id": format!("bad{i}"), "t": base + 1000 * i });
    }
    seed(&env, docs).await;
    let out = tidemark(&env, &env.target_url, &["run"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Act
    let plain = status(&env, &["--warn", "26h", "--crit", "48h"]);
    let under = status(
        &env,
        &["--dead-letters-warn", "3", "--dead-letters-crit", "10"],
    );
    let warn = status(
        &env,
        &["--dead-letters-warn", "0", "--dead-letters-crit", "10"],
    );
    let crit = status(
        &env,
        &["--dead-letters-warn", "0", "--dead-letters-crit", "2"],
    );

    // Assert
    assert_eq!(plain.0, NAGIOS_OK, "{}", plain.1);
    assert_eq!(under.0, NAGIOS_OK, "{}", under.1);
    assert_eq!(warn.0, NAGIOS_WARNING, "{}", warn.1);
    assert!(
        warn.1.starts_with(
            "TIDEMARK WARNING - items has 3 dead letters (more than --dead-letters-warn 0)"
        ),
        "{}",
        warn.1
    );
    assert!(
        warn.1
            .lines()
            .next()
            .unwrap()
            .contains("dead_letters_items=3;0;10"),
        "{}",
        warn.1
    );
    assert_eq!(crit.0, NAGIOS_CRITICAL, "{}", crit.1);
}

#[tokio::test]
async fn ops_status_a_failed_last_run_raises_the_state_when_asked() {
    // Arrange: a good run, then a failed one (a trigger makes the target refuse the batch).
    let env = Env::new("stfail", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    let base = chrono::Utc::now().timestamp_millis() - 86_400_000;
    seed(&env, items(100, base, 10)).await;
    let ok_run = tidemark(&env, &env.target_url, &["run"]).output().unwrap();
    assert!(
        ok_run.status.success(),
        "{}",
        String::from_utf8_lossy(&ok_run.stderr)
    );
    let healthy = status(&env, &["--failed-run", "critical"]);
    env.insert(
        "items",
        items(10, chrono::Utc::now().timestamp_millis() - 60_000, 10)
            .into_iter()
            .enumerate()
            .map(|(i, mut d)| {
                d.insert("_id", 1_000 + i as i64);
                d
            })
            .collect(),
    )
    .await;
    exec(
        &env.target_url,
        "CREATE TRIGGER refuse BEFORE INSERT ON items BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .await;
    let failed_run = tidemark(&env, &env.target_url, &["run"]).output().unwrap();

    // Act
    let plain = status(&env, &[]);
    let warn = status(&env, &["--failed-run", "warning"]);
    let crit = status(&env, &["--failed-run", "critical"]);

    // Assert
    assert_eq!(
        healthy.0, NAGIOS_OK,
        "a good last run raised the state: {}",
        healthy.1
    );
    assert!(!failed_run.status.success());
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_runs WHERE status = 'failed'"
        )
        .await,
        1
    );
    assert_eq!(plain.0, NAGIOS_OK, "{}", plain.1);
    assert_eq!(warn.0, NAGIOS_WARNING, "{}", warn.1);
    assert!(
        warn.1
            .starts_with("TIDEMARK WARNING - the last run (started "),
        "{}",
        warn.1
    );
    assert!(
        warn.1.lines().next().unwrap().contains(") failed: "),
        "{}",
        warn.1
    );
    assert_eq!(crit.0, NAGIOS_CRITICAL, "{}", crit.1);
}

#[tokio::test]
async fn ops_status_reads_the_units_env_file() {
    // Arrange: the target is named only in an EnvironmentFile-style file, as in the units.
    let env = Env::new("stenv", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    seed(
        &env,
        items(50, chrono::Utc::now().timestamp_millis() - 3_600_000, 10),
    )
    .await;
    let out = tidemark(&env, &env.target_url, &["run"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = env.dir.path().join("tidemark.env");
    std::fs::write(
        &file,
        format!(
            "# like /etc/tidemark/tidemark.env\nTIDEMARK__TARGET__URL={}\n",
            env.target_url
        ),
    )
    .unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let run = |with_file: bool| {
        let mut c = tidemark(&env, "unused", &["status", "--crit", "48h"]);
        c.env_remove("TIDEMARK__TARGET__URL")
            .current_dir(cwd.path());
        if with_file {
            c.args(["--env-file", file.to_str().unwrap()]);
        }
        let o = c.output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };

    // Act
    let with = run(true);
    let without = run(false);

    // Assert: with the file the check finds the target; without it, UNKNOWN (not a new file).
    assert_eq!(with.0, Some(NAGIOS_OK), "{}", with.1);
    assert!(with.1.starts_with("TIDEMARK OK - "), "{}", with.1);
    assert_eq!(without.0, Some(NAGIOS_UNKNOWN), "{}", without.1);
}

#[tokio::test]
async fn ops_status_shows_a_killed_run_as_abandoned_and_the_next_run_records_it() {
    // Arrange: a slow run killed with SIGKILL while it holds its row `running`.
    let env = Env::new("staband", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    let base = chrono::Utc::now().timestamp_millis() - 10 * 86_400_000;
    seed(&env, items(20_000, base, 10)).await;
    let mut child = tidemark(&env, &env.target_url, &["run"])
        .env("TIDEMARK__SOURCE__RATE_LIMIT", "5000")
        .spawn()
        .unwrap();
    let running = crate::ops_util::wait_for(
        &env.target_url,
        "SELECT COUNT(*) FROM tidemark_runs WHERE status = 'running'",
        1,
        std::time::Duration::from_secs(30),
    )
    .await;
    let (live_code, live) = status(&env, &["--failed-run", "critical"]);
    child.kill().unwrap();
    child.wait().unwrap();

    // Act
    let (code, text) = status(&env, &["--failed-run", "critical"]);
    let (_, json) = status(&env, &["--json"]);
    let next = tidemark(&env, &env.target_url, &["run"]).output().unwrap();

    // Assert: a live run is not abandoned; a dead one is, and the next run records it.
    assert!(running);
    assert_eq!(live_code, NAGIOS_OK, "a live run was reported: {live}");
    assert_eq!(code, NAGIOS_CRITICAL, "{text}");
    assert!(
        text.starts_with("TIDEMARK CRITICAL - the last run (started ")
            && text.lines().next().unwrap().contains("was abandoned"),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["last_run"]["status"], "abandoned", "{v}");
    assert_eq!(v["abandoned"].as_array().map(Vec::len), Some(1), "{v}");
    assert!(
        next.status.success(),
        "{}",
        String::from_utf8_lossy(&next.stderr)
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_runs WHERE status = 'abandoned'"
        )
        .await,
        1
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_runs WHERE status = 'running'"
        )
        .await,
        0
    );
}
