//! `check-config` as an operator meets it: TOML output without secrets, `--connect` against a
//! good and broken setups (closed port, missing database, unknown role, missing collection),
//! paths that do not depend on the working directory, and a run summary that counts every row.

use crate::harness::{pg_admin_url, scalar_i64, Backend, Env};
use crate::ops_util::{free_port, tidemark};
use crate::trust_util::{seed, MAPPING};
use std::time::{Duration, Instant};

/// Exit code, stdout and stderr of `tidemark ARGS` against `env` with `target`, plus `extra`
/// variables.
fn check(env: &Env, target: &str, extra: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let out = tidemark(env, target, args)
        .envs(extra.iter().copied())
        .output()
        .expect("spawn tidemark");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `postgres://…/NAME` on the test server.
fn pg_url_of(name: &str) -> String {
    let admin = pg_admin_url();
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

#[tokio::test]
async fn ops_check_config_prints_toml_without_secrets() {
    // Arrange: passwords in the source URI, a token in the target URL's options.
    let env = seed(Backend::Sqlite, "check_toml").await;
    let source = format!(
        "mongodb://reader:Src-Pa55word@{}",
        env.mongo.trim_start_matches("mongodb://")
    );
    let target =
        "postgres://app:Tgt-Pa55word@db.internal:5432/v3?sslmode=require&password=Qs-T0ken-9";

    // Act
    let (code, out, err) = check(
        &env,
        target,
        &[
            ("TIDEMARK__SOURCE__URI", source.as_str()),
            ("TIDEMARK__SYNC__MAX_WINDOW", "30d"),
        ],
        &["check-config"],
    );

    // Assert: TOML that reads back, with the durations as written, and no secret anywhere.
    assert_eq!(code, 0, "{out}{err}");
    let v: toml::Value = toml::from_str(&out).unwrap_or_else(|e| panic!("not TOML: {e}\n{out}"));
    assert_eq!(v["sync"]["max_window"].as_str(), Some("30d"), "{out}");
    assert_eq!(v["sync"]["overlap"].as_str(), Some("1h"), "{out}");
    assert_eq!(
        v["source"]["database"].as_str(),
        Some(env.name.as_str()),
        "{out}"
    );
    for secret in ["Src-Pa55word", "Tgt-Pa55word", "Qs-T0ken-9"] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret} shown:\n{out}{err}"
        );
    }
    assert!(out.contains("reader:***@"), "{out}");
}

#[tokio::test]
async fn ops_check_connect_good_setup_sqlite_then_postgres() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        // Arrange: a seeded source with its index; a fresh target.
        let env = seed(backend, "check_good").await;

        // Act: before and after `migrate`.
        let before = check(&env, &env.target_url, &[], &["check-config", "--connect"]);
        let (code, _, err) = check(&env, &env.target_url, &[], &["migrate"]);
        assert_eq!(code, 0, "{err}");
        let after = check(&env, &env.target_url, &[], &["check-config", "--connect"]);
        eprintln!(
            "{backend:?} before migrate:\n{}\n{backend:?} after:\n{}",
            before.1, after.1
        );

        // Assert
        assert_eq!(before.0, 0, "{backend:?}: {}{}", before.1, before.2);
        assert!(!before.1.contains("FAIL  "), "{}", before.1);
        assert!(before.1.contains("`tidemark migrate`"), "{}", before.1);
        assert_eq!(after.0, 0, "{backend:?}: {}{}", after.1, after.2);
        for needle in [
            "OK    source reachable and authenticated",
            "OK    collection items (entity items): readable",
            "OK    collection owners (entity owners): readable",
            "OK    index (t, _id) on items",
            "OK    target reachable and authenticated",
            "OK    target schema writable",
            "OK    tidemark's own tables migrated",
            "OK    mapped tables present and up to date",
            " 0 WARN, 0 FAIL",
        ] {
            assert!(
                after.1.contains(needle),
                "{backend:?}: `{needle}` missing:\n{}",
                after.1
            );
        }
        if backend == Backend::Sqlite {
            // The check created nothing: before migrate, the file did not exist.
            assert!(before.1.contains("does not exist yet"), "{}", before.1);
        }

        // A target migrated by an older tidemark (its newest migration not applied yet) is
        // told apart from one never migrated.
        crate::trust_util::exec(
            &env.target_url,
            "DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)",
        )
        .await;
        let older = check(&env, &env.target_url, &[], &["check-config", "--connect"]);
        assert_eq!(older.0, 0, "{backend:?}: {}{}", older.1, older.2);
        assert!(
            older.1.contains("WARN  tidemark's own tables: ")
                && older
                    .1
                    .contains("migrations applied (written by an older tidemark)")
                && older.1.contains("would apply the other 1"),
            "{backend:?}: {}",
            older.1
        );
    }
}

#[tokio::test]
async fn ops_check_connect_closed_ports_fail_fast_as_refused() {
    // Arrange: nothing listens on either port.
    let env = seed(Backend::Sqlite, "check_refused").await;
    let target = format!(
        "postgres://postgres:Pw-Hidden-1@127.0.0.1:{}/db",
        free_port()
    );
    let source = format!("mongodb://u:Pw-Hidden-2@127.0.0.1:{}/", free_port());

    // Act
    let started = Instant::now();
    let (code, out, err) = check(
        &env,
        &target,
        &[("TIDEMARK__SOURCE__URI", source.as_str())],
        &["check-config", "--connect"],
    );
    let took = started.elapsed();
    eprintln!("closed ports after {took:?}:\n{out}{err}");

    // Assert: both FAIL as refused, at once, exit 6, no password.
    assert_eq!(code, tidemark::exit::UNAVAILABLE, "{out}{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        out.contains("FAIL  source reachable and authenticated (ping): connection refused"),
        "{out}"
    );
    assert!(
        out.contains("FAIL  target reachable and authenticated: connection refused"),
        "{out}"
    );
    assert!(out.contains("What to do:"), "{out}");
    assert!(
        !out.contains("Pw-Hidden") && !err.contains("Pw-Hidden"),
        "{out}{err}"
    );

    // And `run` says the same, without waiting for a pool timeout.
    let started = Instant::now();
    let (code, _, err) = check(&env, &target, &[], &["run"]);
    assert_eq!(code, tidemark::exit::UNAVAILABLE, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.contains("connection refused") && err.contains("target.url"),
        "{err}"
    );
    assert!(!err.contains("pool timed out"), "{err}");
}

#[tokio::test]
async fn ops_check_connect_names_a_missing_database_and_an_unknown_role() {
    // Arrange
    let env = seed(Backend::Sqlite, "check_pgnames").await;
    let missing_db = pg_url_of(&format!("{}_nosuch", env.name));
    let admin = pg_admin_url();
    let rest = admin
        .split_once('@')
        .map(|(_, r)| r)
        .expect("user@host in the PG URL");
    let unknown_role = format!("postgres://tm_no_such_role:pw-x@{rest}");

    // Act
    let db = check(&env, &missing_db, &[], &["check-config", "--connect"]);
    let role = check(&env, &unknown_role, &[], &["check-config", "--connect"]);
    let run = check(&env, &missing_db, &[], &["run"]);
    eprintln!("missing database:\n{}\nunknown role:\n{}", db.1, role.1);

    // Assert
    assert_eq!(db.0, tidemark::exit::UNAVAILABLE, "{}", db.1);
    assert!(
        db.1.contains(&format!("database \"{}_nosuch\" does not exist", env.name)),
        "{}",
        db.1
    );
    assert!(db.1.contains("createdb"), "{}", db.1);
    assert_eq!(role.0, tidemark::exit::UNAVAILABLE, "{}", role.1);
    assert!(
        role.1.contains("authentication failed") && role.1.contains("tm_no_such_role"),
        "{}",
        role.1
    );
    assert!(
        run.2.contains("does not exist") && !run.2.contains("Kind:"),
        "{}",
        run.2
    );
}

#[tokio::test]
async fn ops_check_connect_names_a_missing_collection_and_warns_of_a_missing_index() {
    // Arrange: the mapping's items collection is renamed away, and owners has no index.
    let env = Env::new(
        "check_missing",
        Backend::Sqlite,
        &MAPPING.replace("collection = \"items\"", "collection = \"itemz\""),
    )
    .await;
    env.insert("owners", vec![crate::trust_util::owner("o1")])
        .await;
    env.insert("other", vec![bson::doc! {"x": 1}]).await;

    // Act
    let (code, out, err) = check(&env, &env.target_url, &[], &["check-config", "--connect"]);
    eprintln!("missing collection:\n{out}{err}");

    // Assert: exit 5 (not a connection failure), the collection and the entity named.
    assert_eq!(code, tidemark::exit::CONFIG, "{out}{err}");
    assert!(
        out.contains("FAIL  collection itemz (entity items): does not exist"),
        "{out}"
    );

    // A windowed collection without its (time, _id) index: a WARN with the command, exit 0.
    let plain = Env::new("check_noindex", Backend::Sqlite, MAPPING).await;
    plain
        .insert("items", vec![crate::trust_util::item(1, 0, "v", "o1")])
        .await;
    plain
        .insert("owners", vec![crate::trust_util::owner("o1")])
        .await;
    let (code, out, err) = check(
        &plain,
        &plain.target_url,
        &[],
        &["check-config", "--connect"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("WARN  index (t, _id) on items: ")
            && out.contains("db.items.createIndex({\"t\": 1, \"_id\": 1})"),
        "{out}"
    );
}

#[tokio::test]
async fn ops_paths_in_a_settings_file_resolve_against_its_folder() {
    // Arrange: a settings file with relative paths, its mapping beside it; the binary runs
    // from another directory.
    let env = seed(Backend::Sqlite, "check_paths").await;
    let conf = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(conf.path().join("maps")).unwrap();
    std::fs::write(conf.path().join("maps/m.toml"), MAPPING).unwrap();
    let settings = conf.path().join("tidemark.toml");
    std::fs::write(
        &settings,
        format!(
            "state_dir = \"st\"\n[source]\nuri = \"{}\"\ndatabase = \"{}\"\n[sync]\nmapping = \"maps/m.toml\"\nstart = \"2019-01-01\"\nsettle = \"0s\"\n",
            env.mongo, env.name
        ),
    )
    .unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let bin = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidemark"))
            .arg("--config")
            .arg(&settings)
            .args(args)
            .current_dir(elsewhere.path())
            .env_remove("RUST_LOG")
            .env("TIDEMARK__LOG__FORMAT", "json")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Act
    let (code, out, err) = bin(&["check-config"]);
    let (run_code, run_out, run_err) = bin(&["run"]);

    // Assert: the paths point into the settings file's folder, and the run put the SQLite
    // default and its report there; nothing was written in the working directory.
    assert_eq!(code, 0, "{out}{err}");
    let v: toml::Value = toml::from_str(&out).unwrap();
    let st = conf.path().join("st");
    assert_eq!(v["state_dir"].as_str(), Some(st.to_str().unwrap()), "{out}");
    assert_eq!(
        v["target"]["url"].as_str(),
        Some(format!("sqlite://{}", st.join("tidemark.db").display()).as_str()),
        "{out}"
    );
    assert_eq!(run_code, 0, "{run_out}{run_err}");
    assert!(st.join("tidemark.db").exists(), "{run_out}");
    assert!(st.join("reports").read_dir().unwrap().count() >= 1);
    assert_eq!(
        elsewhere.path().read_dir().unwrap().count(),
        0,
        "the working directory got files"
    );
}

#[tokio::test]
async fn ops_run_summary_counts_every_row_written() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        // Arrange: items (main), their tags (child) and owners pulled on demand.
        let env = seed(backend, "check_summary").await;

        // Act
        let report = env.run(env.settings()).await.expect("run");
        let rows = report.rows_written;
        let count = |t: &'static str| {
            let url = env.target_url.clone();
            async move { scalar_i64(&url, &format!("SELECT COUNT(*) FROM {t}")).await as u64 }
        };
        let (items, tags, owners) = (
            count("items").await,
            count("item_tags").await,
            count("owners").await,
        );
        let line = report.to_string();

        // Assert
        assert_eq!(
            (rows.main, rows.child, rows.pulled),
            (items, tags, owners),
            "{backend:?}: {line}"
        );
        assert_eq!(rows.total, items + tags + owners);
        assert!(
            line.contains(&format!(
                "{} rows written ({items} main, {tags} child, {owners} pulled)",
                rows.total
            )),
            "{line}"
        );
    }
}

#[tokio::test]
async fn ops_check_connect_says_a_mongodb_password_is_wrong() {
    // Arrange: a private server with --auth and one user.
    let mongo = crate::fault_util::Mongod::start_with(true);
    let admin = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
    admin
        .database("admin")
        .run_command(bson::doc! { "createUser": "tm", "pwd": "Right-Pw-31", "roles": ["root"] })
        .await
        .expect("createUser through the localhost exception");
    let env = seed(Backend::Sqlite, "check_scram").await;
    let wrong = format!(
        "mongodb://tm:Wrong-Pw-42@127.0.0.1:{}/?directConnection=true&authSource=admin",
        mongo.port
    );

    // Act
    let started = Instant::now();
    let (code, out, err) = check(
        &env,
        &env.target_url,
        &[
            ("TIDEMARK__SOURCE__URI", wrong.as_str()),
            ("TIDEMARK__SOURCE__CONNECT_TIMEOUT", "3s"),
        ],
        &["check-config", "--connect"],
    );
    let (run_code, _, run_err) = check(
        &env,
        &env.target_url,
        &[
            ("TIDEMARK__SOURCE__URI", wrong.as_str()),
            ("TIDEMARK__SOURCE__CONNECT_TIMEOUT", "3s"),
        ],
        &["run"],
    );
    eprintln!(
        "wrong MongoDB password after {:?}:\n{out}{err}\nrun: {run_err}",
        started.elapsed()
    );

    // Assert: named as an authentication failure with the fix, no driver dump, no password.
    assert_eq!(code, tidemark::exit::UNAVAILABLE, "{out}{err}");
    assert!(
        out.contains("FAIL  source reachable and authenticated (ping): authentication failed"),
        "{out}"
    );
    assert!(out.contains("authSource"), "{out}");
    assert_eq!(run_code, tidemark::exit::UNAVAILABLE, "{run_err}");
    assert!(
        run_err.contains("authentication failed") && !run_err.contains("Kind:"),
        "{run_err}"
    );
    for text in [&out, &err, &run_err] {
        assert!(!text.contains("Wrong-Pw-42"), "{text}");
    }
}
