//! Command-line usage errors exit with the documented code: 2 (clap's, docs/OPERATIONS.md
//! "Exit codes"), except under `status`, a Nagios check, where a wrong command line is
//! UNKNOWN (3) with a `TIDEMARK UNKNOWN` line; `--help` and `--version` exit 0.

use std::process::{Command, Output};
use tidemark::exit;

fn tidemark(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[test]
fn cli_usage_errors_exit_with_the_documented_codes() {
    // Act
    let unknown_flag = tidemark(&["run", "--no-such-flag"]);
    let unknown_command = tidemark(&["no-such-command"]);
    let status_typo = tidemark(&["status", "--warnn", "2d"]);
    let status_typo_json = tidemark(&["status", "--json", "--critt", "2d"]);
    let help = tidemark(&["--help"]);
    let sub_help = tidemark(&["backfill", "--help"]);
    let version = tidemark(&["--version"]);

    // Assert
    let err = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let out = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(exit::USAGE, 2);
    assert_eq!(
        unknown_flag.status.code(),
        Some(exit::USAGE),
        "{}",
        err(&unknown_flag)
    );
    assert!(err(&unknown_flag).contains("--no-such-flag"));
    assert_eq!(unknown_command.status.code(), Some(exit::USAGE));
    assert_eq!(status_typo.status.code(), Some(3), "{}", err(&status_typo));
    assert!(
        out(&status_typo).starts_with("TIDEMARK UNKNOWN - ")
            && out(&status_typo).contains("--warnn"),
        "{}",
        out(&status_typo)
    );
    assert_eq!(status_typo_json.status.code(), Some(3));
    let j: serde_json::Value = serde_json::from_str(out(&status_typo_json).trim()).unwrap();
    assert_eq!(j["state"], "UNKNOWN");
    for ok in [&help, &sub_help, &version] {
        assert_eq!(ok.status.code(), Some(exit::OK), "{}", err(ok));
        assert!(!out(ok).is_empty());
    }
}
