//! The `tidemark` binary: parse the command line and hand it to [`tidemark::commands`].

use anyhow::{Context, Result};
use clap::error::{ContextKind, ErrorKind};
use clap::Parser;
use tidemark::cli::{Cli, Command};
use tidemark::commands::status;

fn main() {
    let cli = Cli::try_parse().unwrap_or_else(|e| usage_exit(e));
    // Before the runtime starts: setting variables is only sound while one thread runs.
    if let Some(path) = &cli.env_file {
        if let Err(e) = load_env_file(path) {
            let msg = format!("{e:#}");
            if let Command::Status(args) = &cli.command {
                status::print_unknown(&msg, args.json);
                std::process::exit(status::NAGIOS_UNKNOWN);
            }
            eprintln!("error: {msg}");
            std::process::exit(tidemark::exit::CONFIG);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(tidemark::commands::execute(cli));
    std::process::exit(code);
}

/// A command line clap refused (or `--help`, `--version`). Help and version print and exit 0;
/// a usage error exits [`tidemark::exit::USAGE`] (2) as documented, except under `status`,
/// a monitoring check, where it is Nagios UNKNOWN (3): a check whose command line is wrong
/// must not read as CRITICAL (the Nagios plugin guidelines).
fn usage_exit(e: clap::Error) -> ! {
    let help = matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
    let under_status = e
        .get(ContextKind::Usage)
        .is_some_and(|u| u.to_string().split_whitespace().nth(2) == Some("status"));
    if help || !under_status {
        let _ = e.print();
        std::process::exit(if help {
            tidemark::exit::OK
        } else {
            tidemark::exit::USAGE
        });
    }
    let msg = e.kind().as_str().unwrap_or("invalid command line");
    let detail = e.render().to_string();
    let first = detail
        .lines()
        .find(|l| l.starts_with("error:"))
        .map(|l| l.trim_start_matches("error:").trim())
        .unwrap_or(msg);
    status::print_unknown(
        &format!("{first} (see tidemark status --help)"),
        std::env::args().any(|a| a == "--json"),
    );
    let _ = e.print();
    std::process::exit(status::NAGIOS_UNKNOWN);
}

/// Read `--env-file` (the units' EnvironmentFile) into the environment; variables already
/// set win.
fn load_env_file(path: &std::path::Path) -> Result<()> {
    let lines = dotenvy::from_path_iter(path)
        .with_context(|| format!("cannot read --env-file {}", path.display()))?;
    for line in lines {
        let (key, value) = line.with_context(|| {
            format!(
                "--env-file {} has a line that is not KEY=VALUE",
                path.display()
            )
        })?;
        if std::env::var_os(&key).is_none() {
            std::env::set_var(key, value);
        }
    }
    Ok(())
}

/// jemalloc, not glibc's malloc, for Rust and C alike (the bundled SQLite's allocations too:
/// jemalloc provides `malloc` itself). On the full VizHub mapping glibc's `malloc`/`free` were
/// ~12 % of tidemark's CPU, and its arenas kept freed pages in the middle of their heaps
/// (it took two arenas and a `malloc_trim` thread to hold the peak near 100 MB). jemalloc,
/// in alternating runs on one machine (BENCHMARKS.md, twelfth round): tidemark's CPU on the
/// full mapping 30–32 → 23–25 s, peak RSS 98–101 → 82–89 MB; the flat mapping 5–10 % faster
/// at the same RSS. With jemalloc for Rust only, SQLite's allocations stayed with glibc, now
/// without the arena cap: the flat run into SQLite peaked at 55–63 MB against 54–55 MB. Its
/// settings below ([`MALLOC_CONF`]).
#[cfg(all(feature = "jemalloc", target_os = "linux", not(target_env = "msvc")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its start; an operator's `MALLOC_CONF` environment variable
/// overrides them (docs/OPERATIONS.md, Memory).
/// - `narenas:1`: one arena. tidemark's threads are few (two runtime workers, the mapping
///   threads); more arenas each keep their own free pages (full mapping, 100 ms decay: 95 MB
///   with 2 arenas, 82 MB with 1, no measurable difference in time).
/// - `dirty_decay_ms:100`, `muzzy_decay_ms:0`, `background_thread:true`: freed pages go back
///   to the kernel within ~0.1 s, by a background thread, not on the allocating path.
///   jemalloc's default (10 s) kept 124 MB, 300 ms 87 MB; 0 ms (at once) kept 78 MB but
///   tripled the system CPU (3 → 11 s, `madvise` on every free) and cost the run 5 s.
#[cfg(all(feature = "jemalloc", target_os = "linux", not(target_env = "msvc")))]
#[allow(non_upper_case_globals)]
#[export_name = "malloc_conf"]
pub static MALLOC_CONF: &[u8] =
    b"narenas:1,background_thread:true,dirty_decay_ms:100,muzzy_decay_ms:0\0";
