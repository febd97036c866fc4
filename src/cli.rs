//! Command-line interface. Each doc comment is the command's `--help`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// `tidemark --version`: the package version, the git commit and the build date (build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TIDEMARK_GIT_COMMIT"),
    ", built ",
    env!("TIDEMARK_BUILD_DATE"),
    ")"
);

/// tidemark: incremental, time-window sync from a legacy MongoDB store into PostgreSQL or SQLite.
///
/// Exit codes: 0 ok, 1 failure, 2 usage error, 3 partial (dead letters over budget),
/// 4 another process holds the lane, 5 invalid settings or mapping, 6 source or target unreachable.
#[derive(Debug, Parser)]
#[command(
    name = "tidemark",
    version = VERSION,
    about,
    long_about,
    after_help = "Examples:\n  tidemark check-config\n  tidemark migrate\n  tidemark run\n  tidemark status --warn 26h --crit 48h\n  tidemark backfill --from 2019-01-01 --to 2020-01-01\n  tidemark completions bash > /etc/bash_completion.d/tidemark\n\nEvery subcommand's --help has examples of its own."
)]
pub struct Cli {
    /// Settings file layered over the built-in defaults (TIDEMARK__SECTION__KEY variables still win).
    #[arg(long, global = true, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,
    /// KEY=VALUE lines to read into the environment first, as the units' EnvironmentFile
    /// (e.g. /etc/tidemark/tidemark.env), so a monitoring check sees the units' settings.
    /// Variables already set in the environment win.
    #[arg(long, global = true, env = "TIDEMARK_ENV_FILE", value_name = "PATH")]
    pub env_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Catch every entity up from its watermark to the source clock minus the settle delay.
    ///
    /// Resumes an interrupted window from its last committed batch. Prints a summary per entity.
    #[command(
        after_help = "Examples:\n  tidemark run\n  tidemark run --entity vizzes --until 2026-12-01\n  tidemark run --dry-run\n  tidemark run --entity vizzes --id 6f1c0e\n  tidemark run --wait --textfile /var/lib/node_exporter/tidemark.prom"
    )]
    Run(RunArgs),
    /// Create the tool's tables and the mapped tables; apply additive changes.
    ///
    /// Destructive differences are printed with the SQL to run by hand, never applied.
    #[command(after_help = "Examples:\n  tidemark migrate --print\n  tidemark migrate")]
    Migrate {
        /// Only print the DDL that would run; change nothing.
        #[arg(long)]
        print: bool,
    },
    /// Validate settings and mapping and print the effective settings as TOML (secrets redacted).
    #[command(
        after_help = "Examples:\n  tidemark check-config\n  tidemark --config /etc/tidemark/tidemark.toml check-config\n  TIDEMARK__SYNC__SETTLE=10m tidemark check-config\n  tidemark check-config --quiet\n  tidemark check-config --connect"
    )]
    CheckConfig {
        /// Print one line when valid (for ExecStartPre); errors are printed as always.
        /// With --connect: only the checks that warn or fail.
        #[arg(long, short)]
        quiet: bool,
        /// Also test the connections: source reachable and readable, each collection, the
        /// (time, _id) indexes, target reachable and writable, tables migrated. One line per
        /// check; exit 0 when none fails, 6 when a connection fails, 5 otherwise.
        #[arg(long)]
        connect: bool,
    },
    /// A read-only monitoring check: per entity the watermark, lag, backlog and dead letters.
    ///
    /// Follows the Nagios plugin guidelines: the first line is
    /// `TIDEMARK <STATE> - <worst entity and why> | <perfdata>`, exit codes 0 OK, 1 WARNING,
    /// 2 CRITICAL, 3 UNKNOWN (target, tool tables or source absent, bad thresholds).
    /// Never creates, migrates or writes anything: a SELECT-only role is enough.
    #[command(
        after_help = "Examples:\n  tidemark status\n  tidemark status --warn 26h --crit 48h\n  tidemark status --warn 26h --crit 48h --dead-letters-warn 0 --failed-run critical\n  tidemark status --json"
    )]
    Status(StatusArgs),
    /// Backfill a time range by hand, in chunks, without moving the nightly watermark.
    ///
    /// Each (entity, chunk) has its own checkpoint and is claimed from a ledger in the target,
    /// so an interrupted backfill resumes where it stopped and several processes, on one host
    /// or many, can share one backfill. Running the same command again resumes (or joins) the
    /// same backfill; relative times (-7d) change with the clock, so resume those with --resume.
    #[command(
        after_help = "Examples:\n  tidemark backfill --from 2019-01-01 --to 2020-01-01\n  tidemark backfill --from 2019-01-01 --to 2020-01-01 --entity vizzes --chunk 7d --parallel 4\n  tidemark backfill --from -30d --to -1d --dry-run\n  tidemark backfill --resume bf-3f9a2c81d0"
    )]
    Backfill(BackfillArgs),
    /// Run the catch-up on the cron schedule of [daemon] in the settings, until SIGTERM.
    ///
    /// Runs never overlap; failed runs are retried with capped, jittered backoff. SIGTERM or
    /// SIGINT: the current batch commits and the daemon exits. SIGHUP: settings are re-read
    /// for the next run. Serves /metrics and /health on daemon.metrics_listen when set.
    #[command(
        after_help = "Examples:\n  tidemark daemon\n  TIDEMARK__DAEMON__METRICS_LISTEN=9464 tidemark daemon"
    )]
    Daemon,
    /// Demo data: generate the VizHub-V2-shaped legacy data set into the source.
    #[command(subcommand)]
    #[command(
        after_help = "Examples:\n  tidemark demo seed\n  tidemark demo seed --vizzes 5000 --seed 7"
    )]
    Demo(DemoCommand),
    /// List recent runs from the runs ledger; `runs show ID` prints one run's report.
    ///
    /// Every run, backfill, sweep, rollback and dead-letter retry has a row in tidemark_runs
    /// and a JSON report under reports_dir (dry runs: only the file).
    #[command(
        after_help = "Examples:\n  tidemark runs\n  tidemark runs --kind backfill --limit 5\n  tidemark runs show 0b7e6a52-3c1d-4f0e-9a55-2d8c1e4f7a10"
    )]
    Runs(RunsArgs),
    /// Compare source and target for a time range: counts and an order-independent hash per
    /// time bucket of the mapped content, down to the ids missing, extra or different.
    ///
    /// Source documents in [--from, --to) are mapped with the current mapping and compared
    /// with the target rows of the same keys (child rows included); target rows whose time
    /// column lies in the range without a source document are extra. Exit codes: 0 no
    /// difference, 7 differences found, others as for `run`.
    #[command(
        after_help = "Examples:\n  tidemark verify --from -1d --to now\n  tidemark verify --from 2026-11-01 --to 2026-12-01 --entity vizzes --bucket 1d --json"
    )]
    Verify(VerifyArgs),
    /// Undo one run: delete the rows it inserted, restore the rows it changed or deleted,
    /// rewind the checkpoints it moved (so the next run repeats its windows).
    ///
    /// Uses the provenance kept in tidemark_provenance (sync.provenance); rows the tool did not
    /// write are never touched. If a row was changed by someone else since the run, nothing
    /// is changed and the conflicts are listed (exit 3) unless --force. Later runs that
    /// touched the same rows or lanes must be rolled back first.
    #[command(
        after_help = "Examples:\n  tidemark rollback --run 0b7e6a52-3c1d-4f0e-9a55-2d8c1e4f7a10 --dry-run\n  tidemark rollback --run 0b7e6a52-3c1d-4f0e-9a55-2d8c1e4f7a10"
    )]
    Rollback(RollbackArgs),
    /// Inspect, retry or discard dead letters (documents that could not be mapped).
    #[command(subcommand)]
    #[command(
        after_help = "Examples:\n  tidemark dead-letters list --entity vizzes\n  tidemark dead-letters show --run 0b7e6a52-3c1d-4f0e-9a55-2d8c1e4f7a10\n  tidemark dead-letters retry --entity vizzes --dry-run\n  tidemark dead-letters discard --entity vizzes"
    )]
    DeadLetters(DeadLetterCommand),
    /// Find target rows whose source document was hard-deleted, and apply the entity's
    /// deleted rule to them (delete, or soft-delete); without a rule only report them.
    ///
    /// Compares id sets in bounded chunks: target keys paged by a keyset on the key column,
    /// each chunk looked up in the source with one `$in` query.
    #[command(
        after_help = "Examples:\n  tidemark sweep --dry-run\n  tidemark sweep --entity vizzes"
    )]
    Sweep(SweepArgs),
    /// Draw the target schema the mapping declares: every table with its columns and types,
    /// primary keys, references, child tables and their parent link, and the source
    /// collection of each table.
    ///
    /// Reads only the mapping (sync.mapping, or --mapping); connects to nothing. `mermaid`: an
    /// ER diagram (Markdown renders it); `dot`: Graphviz (pipe it to `dot -Tsvg`); `sql`: the
    /// DDL `tidemark migrate` runs on an empty target, in --dialect.
    #[command(
        after_help = "Examples:\n  tidemark schema\n  tidemark schema --format dot | dot -Tsvg > schema.svg\n  tidemark schema --format sql --dialect sqlite\n  tidemark schema --mapping config/mappings/vizhub.toml > docs/schema-vizhub.mmd"
    )]
    Schema(SchemaArgs),
    /// Remove report files, runs-ledger rows and provenance of runs that finished before
    /// the cutoff (retention). A pruned run can no longer be rolled back.
    ///
    /// Never removed: runs still running, and the ledger row (not the provenance) of each
    /// entity's newest catch-up run, which `tidemark status` reads. Checkpoints, backfills and
    /// dead letters are never touched. Without --older-than: [retention] older_than.
    #[command(
        after_help = "Examples:\n  tidemark prune --older-than 90d --dry-run\n  tidemark prune --older-than 90d\n  TIDEMARK__RETENTION__OLDER_THAN=180d tidemark prune"
    )]
    Prune(PruneArgs),
    /// Print the shell completion script for SHELL on stdout.
    ///
    /// Needs no settings. Install it where your shell looks, e.g. for bash
    /// /etc/bash_completion.d/tidemark, for zsh a file _tidemark in a folder of $fpath, for
    /// fish ~/.config/fish/completions/tidemark.fish.
    #[command(
        after_help = "Examples:\n  tidemark completions bash > /etc/bash_completion.d/tidemark\n  tidemark completions zsh > ~/.zfunc/_tidemark\n  tidemark completions fish > ~/.config/fish/completions/tidemark.fish"
    )]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout, or write one page per command into --dir.
    ///
    /// Needs no settings. The pages are made from this help text, examples included.
    #[command(
        after_help = "Examples:\n  tidemark man | man -l -\n  tidemark man --dir /usr/local/share/man/man1"
    )]
    Man {
        /// Write tidemark.1, tidemark-run.1, … into this existing folder instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `tidemark schema`'s output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemaFormat {
    /// Mermaid erDiagram.
    Mermaid,
    /// Graphviz dot.
    Dot,
    /// The DDL `tidemark migrate` runs on an empty target.
    Sql,
}

/// The SQL dialect of `tidemark schema --format sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SqlDialect {
    Postgres,
    Sqlite,
}

#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = SchemaFormat::Mermaid)]
    pub format: SchemaFormat,
    /// The mapping file to draw (default: sync.mapping from the settings).
    #[arg(long, value_name = "PATH")]
    pub mapping: Option<PathBuf>,
    /// SQL dialect of --format sql (default: the target.url's backend).
    #[arg(long, value_enum)]
    pub dialect: Option<SqlDialect>,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Prune what finished longer ago than this (e.g. 90d, 26w); at least 1d.
    /// Default: [retention] older_than.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub older_than: Option<std::time::Duration>,
    /// Count what would be removed (per kind, with the bytes of the files); change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args, Clone, Default)]
pub struct StatusArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Lag above which the state is WARNING (e.g. 26h); an entity that never ran is WARNING too.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warn: Option<std::time::Duration>,
    /// Lag above which the state is CRITICAL (e.g. 48h); an entity that never ran is CRITICAL too.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub crit: Option<std::time::Duration>,
    /// WARNING when an entity has more than N dead letters (0: any dead letter).
    #[arg(long, value_name = "N")]
    pub dead_letters_warn: Option<u64>,
    /// CRITICAL when an entity has more than N dead letters.
    #[arg(long, value_name = "N")]
    pub dead_letters_crit: Option<u64>,
    /// The state when the newest catch-up run failed or was abandoned (its process died).
    #[arg(long, value_enum, value_name = "STATE")]
    pub failed_run: Option<RaiseTo>,
}

/// A state a status option raises the check to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RaiseTo {
    Warning,
    Critical,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Only these entities (repeatable); default: sync.entities, else every windowed entity.
    #[arg(long = "entity", value_name = "NAME")]
    pub entities: Vec<String>,
    /// Stop windows at this time instead of now minus settle (RFC 3339, date, or -7d).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub until: Option<String>,
    /// If another process holds an entity's lane, wait for it instead of exiting with code 4.
    #[arg(long)]
    pub wait: bool,
    /// Read, map and resolve dependencies, then roll every batch back: nothing is written,
    /// not even checkpoints or the runs ledger. Prints (and reports) what would be inserted,
    /// updated, unchanged, dead-lettered and pulled. The target must already be migrated.
    #[arg(long)]
    pub dry_run: bool,
    /// Migrate only the record whose id_field is ID (repeatable), with what it depends on,
    /// regardless of windows and without moving the checkpoint. Needs exactly one --entity.
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<String>,
    /// After the run, write Prometheus metrics to this node_exporter textfile (atomically).
    #[arg(long, value_name = "PATH", env = "TIDEMARK_TEXTFILE")]
    pub textfile: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// Start of the range, inclusive (RFC 3339, date, or relative like -30d).
    #[arg(
        long,
        value_name = "TIME",
        required_unless_present = "resume",
        allow_hyphen_values = true
    )]
    pub from: Option<String>,
    /// End of the range, exclusive (RFC 3339, date, or relative like -1d).
    #[arg(
        long,
        value_name = "TIME",
        required_unless_present = "resume",
        allow_hyphen_values = true
    )]
    pub to: Option<String>,
    /// Only these entities (repeatable); default: sync.entities, else every windowed entity.
    #[arg(long = "entity", value_name = "NAME")]
    pub entities: Vec<String>,
    /// Cut the range into chunks of this length (one checkpoint lane, one unit of work), e.g.
    /// 6h, 1d, 7d. Default: chunks of about --chunk-docs documents each, planned with indexed
    /// counts, so sparse years become a few chunks and a busy day several.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub chunk: Option<std::time::Duration>,
    /// Documents per chunk when --chunk is not given (per entity; documents sharing one
    /// instant stay in one chunk).
    #[arg(long, value_name = "N", default_value_t = crate::span::DEFAULT_CHUNK_DOCS, conflicts_with = "chunk")]
    pub chunk_docs: u64,
    /// Chunks run at the same time by this process.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub parallel: usize,
    /// Resume or join the backfill with this id (printed at start and by `tidemark status`).
    #[arg(long, value_name = "ID", conflicts_with_all = ["from", "to", "entities"])]
    pub resume: Option<String>,
    /// Read, map and resolve every chunk but write nothing (no ledger, no checkpoints);
    /// chunks run one after another in this process. Prints what would be written.
    #[arg(long, conflicts_with = "resume")]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    #[command(subcommand)]
    pub command: Option<RunsCommand>,
    /// Only runs of this kind: run, record, backfill, sweep, rollback, retry.
    #[arg(long)]
    pub kind: Option<String>,
    /// How many runs to list, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Print one run's full report (JSON).
    #[command(after_help = "Examples:\n  tidemark runs show 0b7e6a52-3c1d-4f0e-9a55-2d8c1e4f7a10")]
    Show {
        /// The run id (first column of `tidemark runs`).
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Start of the range, inclusive (RFC 3339, date, or relative like -1d).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub from: String,
    /// End of the range, exclusive.
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub to: String,
    /// Only these entities (repeatable); default: every windowed entity.
    #[arg(long = "entity", value_name = "NAME")]
    pub entities: Vec<String>,
    /// Width of a hash bucket.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub bucket: std::time::Duration,
    /// Ids listed per kind of difference (all are counted).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The run to undo (see `tidemark runs`).
    #[arg(long = "run", value_name = "ID")]
    pub run: String,
    /// Do everything in a transaction that is rolled back: report what would happen.
    #[arg(long)]
    pub dry_run: bool,
    /// Also overwrite rows that were changed by someone else since the run.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args, Clone, Default)]
pub struct DeadLetterFilter {
    /// Only dead letters of this entity.
    #[arg(long)]
    pub entity: Option<String>,
    /// Only dead letters written by this run.
    #[arg(long = "run", value_name = "ID")]
    pub run: Option<String>,
    /// Only these source ids (relaxed extended JSON of _id, as listed; repeatable).
    #[arg(long = "id", value_name = "SOURCE_ID")]
    pub ids: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters: entity, source id, run, error.
    #[command(
        after_help = "Examples:\n  tidemark dead-letters list\n  tidemark dead-letters list --entity vizzes --limit 20 --json"
    )]
    List {
        #[command(flatten)]
        filter: DeadLetterFilter,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print dead letters in full, with the raw document.
    #[command(
        after_help = "Examples:\n  tidemark dead-letters show --entity vizzes\n  tidemark dead-letters show --run 0b7e6a52-3c1d-4f0e-9a55-2d8c1e4f7a10"
    )]
    Show {
        #[command(flatten)]
        filter: DeadLetterFilter,
    },
    /// Map the documents again with the current mapping (after a fix) and write what now
    /// succeeds; the source document is fetched again by _id (the stored copy is used if the
    /// source lost it). What still fails stays, with the new error.
    #[command(
        after_help = "Examples:\n  tidemark dead-letters retry --entity vizzes --dry-run\n  tidemark dead-letters retry --entity vizzes"
    )]
    Retry {
        #[command(flatten)]
        filter: DeadLetterFilter,
        /// Map and write in transactions that are rolled back: report only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters (they are gone for good; the documents stay in the source).
    #[command(
        after_help = "Examples:\n  tidemark dead-letters discard --run 0b7e6a52-3c1d-4f0e-9a55-2d8c1e4f7a10\n  tidemark dead-letters discard --all"
    )]
    Discard {
        #[command(flatten)]
        filter: DeadLetterFilter,
        /// Required when no filter is given: discard every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Only these entities (repeatable); default: every windowed entity with a key column.
    #[arg(long = "entity", value_name = "NAME")]
    pub entities: Vec<String>,
    /// Find and report, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Target keys compared per source query.
    #[arg(long, default_value_t = 1000)]
    pub chunk: usize,
}

#[derive(Debug, Subcommand)]
pub enum DemoCommand {
    /// Drop and re-create the demo collections in source.database (deterministic for a seed).
    ///
    /// Refuses a database that holds collections `demo seed` did not create (it would drop
    /// same-named ones there), unless --force.
    #[command(
        after_help = "Examples:\n  tidemark demo seed\n  tidemark demo seed --vizzes 5000 --seed 7"
    )]
    Seed {
        /// Number of vizzes (documentInfo documents); other collections scale with it.
        #[arg(long, default_value_t = 10_000)]
        vizzes: usize,
        /// Random seed; the same seed and size give the same documents.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Seed even though the database holds collections demo seed did not create
        /// (those are left alone; same-named demo collections are dropped).
        #[arg(long)]
        force: bool,
    },
    /// Simulate a night of application writes: change a share of the seeded vizzes (title,
    /// one file's text, time stamps set to now), as the next run will see them.
    #[command(
        after_help = "Examples:\n  tidemark demo touch\n  tidemark demo touch --percent 5 --seed 2"
    )]
    Touch {
        /// Share of the vizzes (documentInfo documents with an id) to change, in percent.
        #[arg(long, default_value_t = 1.0)]
        percent: f64,
        /// Random seed choosing which vizzes change.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// Shell completions for `shell` (`tidemark completions SHELL`), written to `out`. Built in
/// memory first: clap_complete panics on a failed write (a closed pipe, `| head`).
pub fn write_completions(
    shell: clap_complete::Shell,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "tidemark", &mut script);
    out.write_all(&script)
}

/// The man page of tidemark (section 1), written to `out`.
pub fn write_man(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    clap_mangen::Man::new(Cli::command()).render(out)
}

/// One man page per command and subcommand (`tidemark.1`, `tidemark-run.1`, …) in `dir`,
/// which must exist; returns the files written.
pub fn write_man_pages(dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    use clap::CommandFactory;
    clap_mangen::generate_to(Cli::command(), dir)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .collect();
    pages.sort();
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command and subcommand shows examples in its --help, and each example is a
    /// valid command line (a renamed flag breaks this test, not a reader's copy and paste).
    #[test]
    fn every_subcommand_help_has_examples_that_parse() {
        fn walk(cmd: &clap::Command, path: &str, checked: &mut usize) {
            let help = cmd
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            let examples: Vec<&str> = help
                .lines()
                .filter_map(|l| l.strip_prefix("  "))
                .filter(|l| l.contains("tidemark"))
                .collect();
            assert!(
                help.starts_with("Examples:") && !examples.is_empty(),
                "`{path} --help` shows no examples"
            );
            for example in examples {
                // Leading VAR=value assignments are the shell's, not tidemark's.
                // ... and what follows a pipe or a redirection too.
                let argv: Vec<&str> = example
                    .split_whitespace()
                    .skip_while(|w| w.contains('=') && !w.starts_with('-'))
                    .take_while(|w| !matches!(*w, "|" | ">" | ">>" | "<"))
                    .collect();
                assert_eq!(argv[0], "tidemark", "{path}: `{example}`");
                if let Err(e) = Cli::try_parse_from(&argv) {
                    panic!("{path}: example `{example}` does not parse: {e}");
                }
                *checked += 1;
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), checked);
            }
        }
        let mut checked = 0;
        walk(&Cli::command(), "tidemark", &mut checked);
        assert!(checked > 30, "{checked}");
    }

    #[test]
    fn completions_and_man_pages_cover_every_subcommand() {
        let mut bash = Vec::new();
        write_completions(clap_complete::Shell::Bash, &mut bash).unwrap();
        let bash = String::from_utf8(bash).unwrap();
        let mut man = Vec::new();
        write_man(&mut man).unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(
            man.starts_with(".ie") || man.contains(".TH tidemark 1"),
            "{man}"
        );
        let dir = tempfile::tempdir().unwrap();
        let pages = write_man_pages(dir.path()).unwrap();
        for sub in Cli::command().get_subcommands() {
            let name = sub.get_name();
            assert!(bash.contains(name), "bash completion lacks {name}");
            // roff writes a hyphen as `\-`.
            assert!(
                man.replace("\\-", "-").contains(name),
                "man page lacks {name}"
            );
            assert!(
                pages
                    .iter()
                    .any(|p| p.ends_with(format!("tidemark-{name}.1"))),
                "no man page tidemark-{name}.1 in {pages:?}"
            );
        }
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")) && VERSION.contains("commit "));
    }

    /// The `args` of every container in deploy/kubernetes/ (written as flow sequences, which
    /// are JSON) parse as tidemark command lines, so a renamed flag breaks this test, not a
    /// cluster's nightly run.
    #[test]
    fn kubernetes_manifests_use_valid_command_lines() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("deploy/kubernetes") {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for line in text.lines() {
                let Some(args) = line.trim().strip_prefix("args: ") else {
                    continue;
                };
                let args: Vec<String> = serde_json::from_str(args).unwrap_or_else(|e| {
                    panic!("{}: `{line}` is not a flow list: {e}", path.display())
                });
                let argv = std::iter::once("tidemark".to_owned()).chain(args);
                if let Err(e) = Cli::try_parse_from(argv) {
                    panic!("{}: `{line}` does not parse: {e}", path.display());
                }
                checked += 1;
            }
        }
        assert!(
            checked >= 4,
            "found only {checked} container command lines in {}",
            dir.display()
        );
    }
}
