//! Hostile configuration and command lines: SQL in identifiers, odd paths, absurd sizes,
//! negative or zero durations, malformed times. Each fails before any write with exit code 5
//! (or 2 for clap usage errors) and a message naming the key; none is ever executed.
//! (Reversed backfill ranges: ops_backfill; unknown keys and `-5m` overlap: bad_config.)

use std::process::Command;

fn tidemark(dir: &std::path::Path, envs: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .args(args)
        .env(
            "TIDEMARK__TARGET__URL",
            format!("sqlite://{}/t.db", dir.display()),
        )
        .env("TIDEMARK__SOURCE__CONNECT_TIMEOUT", "1s")
        .env("TIDEMARK__SOURCE__URI", crate::harness::mongo_uri())
        .env(
            "TIDEMARK__SOURCE__DATABASE",
            "tm_hostile_config_never_created",
        )
        .env_remove("RUST_LOG")
        .envs(envs.iter().copied())
        .output()
        .expect("spawn tidemark");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mapping(table: &str, column: &str, path: &str) -> String {
    format!(
        r#"
version = "hostile"
[entities.items]
collection = "items"
time_field = "t"
time_encoding = "epoch_millis"
table = {table}
primary_key = [{column}]
[entities.items.columns]
{column} = {{ path = {path}, type = "text", required = true }}
"#
    )
}

/// Runs `check-config` and `run` on a mapping; both must refuse it and the target must not
/// even be created.
fn refused(mapping_text: &str, expect_in_error: &str) {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.toml");
    std::fs::write(&m, mapping_text).unwrap();
    let m = m.to_str().unwrap();
    for args in [&["check-config"][..], &["run"][..], &["migrate"][..]] {
        let (code, err) = tidemark(dir.path(), &[("TIDEMARK__SYNC__MAPPING", m)], args);
        assert_eq!(code, 5, "{args:?}: {err}");
        assert!(
            err.contains("m.toml") && err.contains(expect_in_error),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(
        !dir.path().join("t.db").exists(),
        "nothing may be written for a refused mapping"
    );
}

#[test]
fn sql_in_a_table_name_is_refused_end_to_end() {
    refused(
        &mapping(r#""items; DROP TABLE users; --""#, r#""id""#, r#""_id""#),
        "DROP TABLE",
    );
    refused(&mapping(r#"'it"ems'"#, r#""id""#, r#""_id""#), "it\"ems");
    refused(
        &mapping(r#""tidemark_checkpoints""#, r#""id""#, r#""_id""#),
        "reserved",
    );
}

#[test]
fn sql_in_a_column_name_is_refused_end_to_end() {
    refused(
        &mapping(r#""items""#, r#""id"") VALUES (1); --""#, r#""_id""#),
        "VALUES",
    );
    refused(&mapping(r#""items""#, r#""a'b""#, r#""_id""#), "a'b");
    let long = format!("\"x{}\"", "y".repeat(70));
    refused(&mapping(r#""items""#, &long, r#""_id""#), "63");
}

#[test]
fn odd_paths_are_refused_or_read_literally() {
    refused(&mapping(r#""items""#, r#""id""#, r#""a..b""#), "a..b");
    refused(&mapping(r#""items""#, r#""id""#, r#""$where""#), "$where");
    refused(&mapping(r#""items""#, r#""id""#, r#""""#), "path");
    // Spaces, unicode and quotes in a field name are just a field name.
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.toml");
    std::fs::write(&m, mapping(r#""items""#, r#""id""#, r#""na me.ü'\"x""#)).unwrap();
    let (code, err) = tidemark(
        dir.path(),
        &[("TIDEMARK__SYNC__MAPPING", m.to_str().unwrap())],
        &["check-config"],
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn absurd_sizes_and_negative_durations_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value, name) in [
        ("TIDEMARK__SOURCE__BATCH_SIZE", "100000000000", "batch_size"),
        ("TIDEMARK__SOURCE__BATCH_SIZE", "0", "batch_size"),
        ("TIDEMARK__SOURCE__BATCH_SIZE", "-1", "batch_size"),
        ("TIDEMARK__SYNC__SETTLE", "-1s", "settle"),
        ("TIDEMARK__SYNC__MAX_WINDOW", "0s", "max_window"),
        ("TIDEMARK__SYNC__MAX_WINDOW", "-30d", "max_window"),
        ("TIDEMARK__LOCK__LEASE", "-3s", "lease"),
        ("TIDEMARK__DAEMON__BACKOFF_INITIAL", "0s", "backoff_initial"),
        ("TIDEMARK__TARGET__MAX_CONNECTIONS", "0", "max_connections"),
        ("TIDEMARK__SYNC__START", "yesterday-ish", "start"),
        ("TIDEMARK__DAEMON__SCHEDULE", "* * *; rm -rf /", "schedule"),
        (
            "TIDEMARK__DAEMON__METRICS_LISTEN",
            "0.0.0.0:99999",
            "metrics_listen",
        ),
    ] {
        let (code, err) = tidemark(dir.path(), &[(key, value)], &["check-config"]);
        assert_eq!(code, 5, "{key}={value}: {err}");
        assert!(err.contains(name), "{key}={value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn malformed_cli_times_and_unknown_entities_fail_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["run", "--until", "2020-02-30"][..],
        &["run", "--until", "tomorrow"][..],
        &["run", "--until", "-5x"][..],
        &["backfill", "--from", "2020-13-01", "--to", "2021-01-01"][..],
        &["backfill", "--from", "2020-01-01", "--to", "2020-01-01"][..],
        &[
            "backfill",
            "--from",
            "2020-01-01",
            "--to",
            "2021-01-01",
            "--entity",
            "nope",
        ][..],
        &["run", "--entity", "x\"; DROP TABLE users; --"][..],
    ] {
        let (code, err) = tidemark(dir.path(), &[], args);
        assert!(code == 5 || code == 2, "{args:?}: exit {code}: {err}");
        assert!(err.contains("error"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    for args in [
        &["status", "--warn", "-5h"][..],
        &[
            "backfill",
            "--from",
            "2020-01-01",
            "--to",
            "2021-01-01",
            "--chunk",
            "0s",
        ][..],
    ] {
        let (code, err) = tidemark(dir.path(), &[], args);
        assert!(
            code == 5 || code == 2 || code == 3,
            "{args:?}: exit {code}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn entity_batch_size_out_of_range_is_refused_before_any_write() {
    let base = mapping(r#""items""#, r#""id""#, r#""_id""#);
    for bad in ["0", "50001"] {
        let text = base.replace(
            "[entities.items]\n",
            &format!("[entities.items]\nbatch_size = {bad}\n"),
        );
        refused(&text, &format!("batch_size = {bad}"));
    }
    refused(
        &base.replace("[entities.items]\n", "[entities.items]\nbatch_size = -5\n"),
        "batch_size",
    );
}
