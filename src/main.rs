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
    cap_malloc_arenas();
    spawn_malloc_trim();
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

/// glibc gives each thread that allocates concurrently its own malloc arena (up to 8 per
/// core), and each arena keeps its freed pages: with the runtime's workers and the blocking
/// pool's mapping threads, the full VizHub mapping peaked at 178 MB RSS, against 130 MB with
/// two arenas (its wall time within the noise; the flat run ~6 % slower in an A/B, 51 against
/// 59 MB: BENCHMARKS.md, sixth round). An operator's own `MALLOC_ARENA_MAX` wins. No crate sets this (it is one libc call); other allocators
/// (musl, macOS) do not have arenas of this kind.
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// glibc returns freed memory to the kernel only from the top of an arena's heap: pages freed
/// in the middle stay resident until something reuses them. Over a long run (batches of
/// documents of every size, pages read ahead, COPY data) that is 10 MB or more of the
/// process's peak RSS that no data structure holds (the full VizHub mapping: 104 → 94 MB,
/// BENCHMARKS.md, tenth round). Once a second, a thread of its own hands those pages back
/// (`malloc_trim` releases whole free pages inside the heaps too, since glibc 2.8). A page
/// reused afterwards is faulted in again: at once a second the flat mapping's CPU did not
/// move measurably in alternating runs. No crate does this (it is one libc call); other
/// allocators manage their own pages.
fn spawn_malloc_trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let every = std::env::var("TIDEMARK_MALLOC_TRIM_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1000);
        if every == 0 {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_millis(every));
                // SAFETY: malloc_trim only returns free memory to the kernel; it takes the
                // allocator's own locks and may be called from any thread at any time.
                unsafe {
                    libc::malloc_trim(0);
                }
            });
        // Without the thread the process only keeps more memory; nothing to report.
        drop(spawned);
    }
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
