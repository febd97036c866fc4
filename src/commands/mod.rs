//! The commands: one module per subcommand, and [`execute`], which dispatches to them.
//! This is the only layer that prints, chooses exit codes, or writes the run ledger and
//! the report file ([`lifecycle`]); everything below returns values and errors.

pub mod backfill;
pub mod check_config;
pub mod check_connect;
pub mod daemon;
pub mod dead_letters;
pub mod demo;
pub mod lifecycle;
pub mod migrate;
pub mod prune;
pub mod record;
pub mod rollback;
pub mod run;
pub mod runs;
pub mod schema;
pub mod setup;
pub mod status;
pub mod sweep;
pub mod verify;

use crate::cli::{BackfillArgs, Cli, Command, DemoCommand, VerifyArgs};
use crate::engine::window::ChunkBy;
use crate::exit::{self, Failure};
use crate::settings::Settings;
use crate::telemetry::metrics;
use crate::{secret, telemetry};
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Run the command line to its end and return the process's exit code; an error is printed
/// (redacted) on stderr and mapped to its exit code ([`exit::code`]).
pub async fn execute(cli: Cli) -> i32 {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(err) => {
            let msg = secret::redact_uri(&format!("{err:#}"));
            if telemetry::to_journal() {
                // Priority 3 in the journal, so `journalctl -p err` finds it.
                tracing::error!(exit_code = exit::code(&err), "{msg}");
            } else {
                eprintln!("error: {msg}");
            }
            exit::code(&err)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<i32> {
    if let Some(code) = describe_cli(&cli.command)? {
        return Ok(code);
    }
    let config = cli.config.clone();
    let settings = match Settings::load(config.as_deref()) {
        Ok(s) => s,
        Err(e) => return settings_failed(&cli.command, e),
    };
    telemetry::init(settings.log.format, &settings.log.level);
    let stop = Arc::new(AtomicBool::new(false));
    spawn_signal_watch(stop.clone());
    match cli.command {
        Command::Run(args) => run::execute(settings, args, stop).await,
        Command::Backfill(args) => backfill_command(settings, args, stop).await,
        Command::Daemon => {
            daemon::daemon(config, settings, stop).await?;
            Ok(exit::OK)
        }
        Command::Migrate { print } => {
            print!("{}", migrate::migrate(&settings, print).await?);
            Ok(exit::OK)
        }
        Command::CheckConfig { quiet, connect } => {
            print!(
                "{}",
                check_config::check_config(&settings, quiet || connect)?
            );
            if !connect {
                return Ok(exit::OK);
            }
            let mapping = setup::load_mapping(&settings)?;
            let checks = check_connect::check_connect(&settings, &mapping).await;
            print!("{}", checks.render(quiet));
            Ok(checks.exit_code())
        }
        Command::Status(args) => Ok(status::status(&settings, &args).await),
        Command::Runs(args) => runs::runs(&settings, args).await,
        Command::Rollback(args) => {
            let report = rollback::rollback(settings, &args.run, args.dry_run, args.force).await?;
            println!("{report}");
            Ok(exit::OK)
        }
        Command::DeadLetters(cmd) => dead_letters::execute(settings, cmd).await,
        Command::Verify(args) => verify_command(settings, args).await,
        Command::Sweep(args) => sweep::execute(settings, args).await,
        Command::Schema(args) => {
            print!("{}", schema::schema(&settings, &args)?);
            Ok(exit::OK)
        }
        Command::Prune(args) => {
            println!(
                "{}",
                prune::prune(&settings, args.older_than, args.dry_run).await?
            );
            Ok(exit::OK)
        }
        Command::Demo(DemoCommand::Touch { percent, seed }) => {
            let source = crate::source::Source::connect(&settings.source)
                .await
                .map_err(Failure::Unavailable)?;
            println!("{}", demo::touch(&source.db, percent, seed).await?);
            Ok(exit::OK)
        }
        // Answered by `describe_cli`, before the settings were loaded.
        Command::Completions { .. } | Command::Man { .. } => Ok(exit::OK),
        Command::Demo(DemoCommand::Seed {
            vizzes,
            seed,
            force,
        }) => {
            let source = crate::source::Source::connect(&settings.source)
                .await
                .map_err(Failure::Unavailable)?;
            demo::check_database(&source.db, force).await?;
            let report = demo::seed(&source.db, &demo::SeedOptions { vizzes, seed }).await?;
            println!("{report}");
            Ok(exit::OK)
        }
    }
}

/// Completions and man pages describe the command line only: they are answered here,
/// without settings (`Some(exit code)`); every other command gives `None`. A reader that
/// closes the pipe early (`| head`) is not an error.
fn describe_cli(command: &Command) -> Result<Option<i32>> {
    let stdout_done = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e),
        _ => Ok(exit::OK),
    };
    match command {
        Command::Completions { shell } => Ok(Some(stdout_done(crate::cli::write_completions(
            *shell,
            &mut std::io::stdout(),
        ))?)),
        Command::Man { dir: None } => Ok(Some(stdout_done(crate::cli::write_man(
            &mut std::io::stdout(),
        ))?)),
        Command::Man { dir: Some(dir) } => {
            let pages = crate::cli::write_man_pages(dir).map_err(|e| {
                Failure::Config(anyhow::anyhow!(
                    "cannot write man pages into {}: {e}; give an existing, writable folder",
                    dir.display()
                ))
            })?;
            println!("{} man pages written into {}", pages.len(), dir.display());
            Ok(Some(exit::OK))
        }
        _ => Ok(None),
    }
}

/// Settings that do not load: a configuration error (exit 5), except that a monitoring
/// check answers UNKNOWN (3) on its first line, and a run with `--textfile` still records
/// itself as failed there.
fn settings_failed(command: &Command, e: anyhow::Error) -> Result<i32> {
    if let Command::Status(args) = command {
        let msg = secret::redact_uri(&format!("settings: {e:#}"));
        status::print_unknown(&msg, args.json);
        return Ok(status::NAGIOS_UNKNOWN);
    }
    // A run that cannot even load its settings is a failed run for monitoring too.
    if let Command::Run(args) = command {
        if let Some(path) = &args.textfile {
            metrics::install();
            metrics::record_run("failed", 0, chrono::Utc::now());
            if let Err(te) = metrics::write_textfile(path, chrono::Utc::now()) {
                eprintln!("metrics textfile not written: {te:#}");
            }
        }
    }
    Err(Failure::Config(e).into())
}

/// `tidemark backfill`: a dry run maps a range without writing, a real one runs its chunks.
async fn backfill_command(
    settings: Settings,
    args: BackfillArgs,
    stop: Arc<AtomicBool>,
) -> Result<i32> {
    if args.dry_run {
        let (Some(from), Some(to)) = (&args.from, &args.to) else {
            return Err(Failure::Config(anyhow::anyhow!("--dry-run needs --from and --to")).into());
        };
        let chunk = ChunkBy::from_args(args.chunk, Some(args.chunk_docs))?;
        let report =
            backfill::backfill_dry_run(settings, from, to, args.entities, chunk, stop).await?;
        println!("{report}");
        return Ok(exit::OK);
    }
    let report = backfill::backfill(
        settings,
        backfill::BackfillOptions {
            from: args.from,
            to: args.to,
            entities: args.entities,
            chunk: ChunkBy::from_args(args.chunk, Some(args.chunk_docs))?,
            parallel: args.parallel,
            resume: args.resume,
        },
        stop,
    )
    .await?;
    println!("{report}");
    Ok(exit::OK)
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

/// `tidemark verify`: exit 0 when source and target agree, 7 otherwise.
pub async fn verify_command(s: Settings, args: VerifyArgs) -> Result<i32> {
    let opts = verify::VerifyOptions {
        from: args.from,
        to: args.to,
        entities: args.entities,
        bucket: args.bucket,
        limit: args.limit,
    };
    let rep = verify::verify(&s, &opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!("{rep}");
    }
    Ok(if rep.differences == 0 {
        exit::OK
    } else {
        verify::DIFFERENCES
    })
}
