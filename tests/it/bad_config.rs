//! Bad settings fail before any write, with an exit code and a message that names the setting.

use std::process::Command;

fn run_with(envs: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .args(args)
        .env(
            "TIDEMARK__TARGET__URL",
            format!("sqlite://{}/t.db", dir.path().display()),
        )
        .env("TIDEMARK__SOURCE__CONNECT_TIMEOUT", "1s")
        .envs(envs.iter().copied())
        .output()
        .expect("spawn tidemark");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_key_in_environment_is_named() {
    let (code, err) = run_with(&[("TIDEMARK__SOURCE__BATCH_SIZ", "5")], &["check-config"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("batch_siz"), "{err}");
}

#[test]
fn unknown_key_in_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[sync]\noverlapp = \"1h\"\n").unwrap();
    let (code, err) = run_with(&[], &["--config", f.to_str().unwrap(), "check-config"]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("overlapp") && err.contains("bad.toml"),
        "{err}"
    );
}

#[test]
fn wrong_type_is_named() {
    let (code, err) = run_with(
        &[("TIDEMARK__SOURCE__BATCH_SIZE", "lots")],
        &["check-config"],
    );
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("batch_size"), "{err}");
    let (code, err) = run_with(&[("TIDEMARK__SYNC__OVERLAP", "-5m")], &["check-config"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("overlap"), "{err}");
}

#[test]
fn unreachable_source_is_named_and_password_hidden() {
    let (code, err) = run_with(
        &[(
            "TIDEMARK__SOURCE__URI",
            "mongodb://admin:hunter2@127.0.0.1:1/",
        )],
        &["run"],
    );
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("source.uri"), "{err}");
    assert!(!err.contains("hunter2"), "password leaked: {err}");
}

#[test]
fn unwritable_target_is_named() {
    let (code, err) = run_with(
        &[("TIDEMARK__TARGET__URL", "sqlite:///proc/tidemark-nope/t.db")],
        &["run"],
    );
    assert!(code == 6 || code == 5, "{code}: {err}");
    assert!(err.contains("target.url"), "{err}");
}

#[test]
fn unknown_entity_is_named() {
    let (code, err) = run_with(&[], &["run", "--entity", "vizes"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("vizes") && err.contains("vizzes"), "{err}");
}
