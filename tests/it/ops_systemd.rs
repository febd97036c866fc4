//! The units in `systemd/` pass `systemd-analyze verify` (when it is installed) and keep
//! the promises the operations guide makes about them.

use std::path::Path;
use std::process::Command;

const UNITS: [&str; 3] = [
    "tidemark.service",
    "tidemark.timer",
    "tidemark-daemon.service",
];

fn unit(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("systemd")
            .join(name),
    )
    .unwrap_or_else(|e| panic!("systemd/{name}: {e}"))
}

#[test]
fn ops_units_keep_their_promises() {
    let oneshot = unit("tidemark.service");
    for line in [
        "Type=oneshot",
        "SuccessExitStatus=4",
        "ExecStartPre=/usr/local/bin/tidemark check-config --quiet",
        "StateDirectory=tidemark",
        // node_exporter, another user, reads the 0644 textfile under it.
        "StateDirectoryMode=0755",
        "User=tidemark",
        "EnvironmentFile=/etc/tidemark/tidemark.env",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(
            oneshot.lines().any(|l| l == line),
            "tidemark.service lacks {line}"
        );
    }
    let timer = unit("tidemark.timer");
    for line in [
        "Persistent=true",
        "RandomizedDelaySec=30min",
        "Unit=tidemark.service",
    ] {
        assert!(
            timer.lines().any(|l| l == line),
            "tidemark.timer lacks {line}"
        );
    }
    let daemon = unit("tidemark-daemon.service");
    for line in [
        "ExecStart=/usr/local/bin/tidemark daemon",
        "ExecStartPre=/usr/local/bin/tidemark check-config --quiet",
        "Restart=on-failure",
        "RestartPreventExitStatus=5",
    ] {
        assert!(
            daemon.lines().any(|l| l == line),
            "tidemark-daemon.service lacks {line}"
        );
    }
    let env = unit("tidemark.env.example");
    assert!(env.contains("TIDEMARK__SOURCE__URI=") && env.contains("TIDEMARK__TARGET__URL="));
}

/// The shipped Nagios command sees what the units see: their settings file, their
/// EnvironmentFile and their working directory (a relative SQLite URL resolves there).
#[test]
fn ops_check_command_loads_the_units_settings() {
    let service = unit("tidemark.service");
    let check = unit("check_tidemark");
    let value = |key: &str| {
        service
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("tidemark.service has no {key}"))
            .to_owned()
    };
    let config = value("Environment=TIDEMARK_CONFIG=");
    let env_file = value("EnvironmentFile=");
    let workdir = value("WorkingDirectory=");
    let exec = check
        .lines()
        .find(|l| l.starts_with("exec "))
        .expect("check_tidemark execs tidemark");
    assert!(
        exec.contains(&format!("--config {config} "))
            && exec.contains(&format!("--env-file {env_file} "))
            && exec.ends_with(" status \"$@\""),
        "{exec}"
    );
    assert!(
        check
            .lines()
            .any(|l| l.starts_with(&format!("cd {workdir} "))),
        "check_tidemark does not run in {workdir}"
    );
    let ops =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/OPERATIONS.md"))
            .unwrap();
    assert!(
        ops.contains("command_line sudo -u tidemark /usr/local/lib/nagios/plugins/check_tidemark"),
        "OPERATIONS.md does not document the shipped check command"
    );
}

#[test]
fn ops_units_pass_systemd_analyze_verify() {
    let probe = Command::new("systemd-analyze").arg("--version").output();
    if !probe.is_ok_and(|o| o.status.success()) {
        println!("SKIPPED: systemd-analyze is not installed (apt-get install systemd); units not verified");
        return;
    }
    // Arrange: the units, with ExecStart pointing at the binary just built (verify checks it exists).
    let dir = tempfile::tempdir().unwrap();
    for name in UNITS {
        let text = unit(name).replace("/usr/local/bin/tidemark", env!("CARGO_BIN_EXE_tidemark"));
        std::fs::write(dir.path().join(name), text).unwrap();
    }

    // Act
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(UNITS.iter().map(|u| dir.path().join(u)))
        .output()
        .unwrap();

    // Assert: success, and no key ignored as unknown (which verify only warns about).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{err}"
    );
    for bad in ["Unknown", "ignoring", "Failed", "not executable"] {
        assert!(
            !err.contains(bad),
            "systemd-analyze verify complained:\n{err}"
        );
    }
}
