//! The `tidemark` binary: parse the CLI, load settings, init logging, dispatch.

use anyhow::Result;
use clap::Parser;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tidemark::cli::{Cli, Command, DemoCommand};
use tidemark::exit::{self, Failure};
use tidemark::settings::Settings;
use tidemark::trust;
use tidemark::{app, backfill, daemon, prom, secret, status, telemetry};

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(err) => {
            let msg = secret::redact_uri(&format!("{err:#}"));
            eprintln!("error: {msg}");
            exit::code(&err)
        }
    };
    std::process::exit(code);
}

async fn dispatch(cli: Cli) -> Result<i32> {
    let config = cli.config.clone();
    let settings = Settings::load(config.as_deref()).map_err(Failure::Config)?;
    telemetry::init(settings.log.format, &settings.log.level);
    let stop = Arc::new(AtomicBool::new(false));
    spawn_signal_watch(stop.clone());
    match cli.command {
        Command::Run(args) => {
            if args.textfile.is_some() {
                prom::install();
            }
            let result = app::run(
                settings,
                app::RunOptions {
                    entities: args.entities,
                    until: args.until,
                    wait: args.wait,
                    dry_run: args.dry_run,
                    ids: args.ids,
                },
                stop,
            )
            .await;
            if let Some(path) = &args.textfile {
                // A textfile failure must not hide the run's own error.
                match (prom::write_textfile(path, chrono::Utc::now()), &result) {
                    (Err(e), Ok(_)) => return Err(e),
                    (Err(e), Err(_)) => {
                        tracing::error!(error = %format!("{e:#}"), "metrics textfile not written")
                    }
                    _ => {}
                }
            }
            println!("{}", result?);
            Ok(exit::OK)
        }
        Command::Backfill(args) if args.dry_run => {
            let (Some(from), Some(to)) = (&args.from, &args.to) else {
                return Err(
                    Failure::Config(anyhow::anyhow!("--dry-run needs --from and --to")).into(),
                );
            };
            let report =
                app::backfill_dry_run(settings, from, to, args.entities, args.chunk, stop).await?;
            println!("{report}");
            Ok(exit::OK)
        }
        Command::Backfill(args) => {
            let report = backfill::backfill(
                settings,
                backfill::BackfillOptions {
                    from: args.from,
                    to: args.to,
                    entities: args.entities,
                    chunk: args.chunk,
                    parallel: args.parallel,
                    resume: args.resume,
                },
                stop,
            )
            .await?;
            println!("{report}");
            Ok(exit::OK)
        }
        Command::Daemon => {
            daemon::daemon(config, settings, stop).await?;
            Ok(exit::OK)
        }
        Command::Migrate { print } => {
            print!("{}", app::migrate(&settings, print).await?);
            Ok(exit::OK)
        }
        Command::CheckConfig => {
            print!("{}", app::check_config(&settings)?);
            Ok(exit::OK)
        }
        Command::Status { json, warn, crit } => {
            Ok(status::status(&settings, json, warn, crit).await)
        }
        Command::Runs(args) => trust::runs(&settings, args).await,
        Command::Rollback(args) => {
            let report =
                tidemark::rollback::rollback(settings, &args.run, args.dry_run, args.force).await?;
            println!("{report}");
            Ok(exit::OK)
        }
        Command::DeadLetters(cmd) => trust::dead_letters(settings, cmd).await,
        Command::Verify(args) => trust::verify(settings, args).await,
        Command::Sweep(args) => trust::sweep(settings, args).await,
        Command::Demo(DemoCommand::Seed { vizzes, seed }) => {
            let source = tidemark::source::Source::connect(&settings.source)
                .await
                .map_err(Failure::Unavailable)?;
            let report =
                tidemark::demo::seed(&source.db, &tidemark::demo::SeedOptions { vizzes, seed })
                    .await?;
            println!("{report}");
            Ok(exit::OK)
        }
    }
}

/// First SIGINT/SIGTERM: finish the current batch, save the checkpoint, exit. Second: exit now.
fn spawn_signal_watch(stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("second signal: exiting without waiting for the current batch");
                std::process::exit(130);
            }
            tracing::warn!("signal received: stopping after the current batch commits");
        }
    });
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
