//! Build script: puts the git commit and the build date into `tidemark --version`
//! (`TIDEMARK_GIT_COMMIT`, `TIDEMARK_BUILD_DATE`). From a tarball without `.git` (or without
//! git) the commit is "unknown" unless the packager sets TIDEMARK_GIT_COMMIT; the date honours
//! SOURCE_DATE_EPOCH for reproducible builds.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `git ARGS` in this package's folder; None when that folder is not the top of a git work
/// tree (a tarball, even one unpacked inside some other repository) or git is missing.
fn git(args: &[&str]) -> Option<String> {
    let dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let top = run_git(&dir, &["rev-parse", "--show-toplevel"])?;
    if std::fs::canonicalize(&top).ok()? != std::fs::canonicalize(&dir).ok()? {
        return None;
    }
    run_git(&dir, args)
}

fn run_git(dir: &std::path::Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=TIDEMARK_GIT_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // Re-run when HEAD moves (a commit, a checkout), not on every edit: a rerun rebuilds the
    // whole crate. HEAD and the branch's ref may live elsewhere (worktrees, packed refs).
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["rev-parse", "--symbolic-full-name", "HEAD"])
            .and_then(|r| git(&["rev-parse", "--git-path", &r])),
        git(&["rev-parse", "--git-path", "packed-refs"]),
    ]
    .into_iter()
    .flatten()
    {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = std::env::var("TIDEMARK_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let built = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .unwrap_or_else(SystemTime::now);
    let date = humantime::format_rfc3339_seconds(built).to_string();
    println!("cargo:rustc-env=TIDEMARK_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=TIDEMARK_BUILD_DATE={}", &date[..10]);
}
