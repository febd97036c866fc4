//! Typed settings in layers: built-in `config/default.toml`, an optional file,
//! then `TIDEMARK__SECTION__KEY` environment variables (added last so they win).
//! Validation happens here, before anything touches a database.

use crate::secret::SecretUri;
use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod human;
mod paths;

const DEFAULTS: &str = include_str!("../config/default.toml");

/// Every setting; see `config/default.toml` for the meaning of each key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Directory for the SQLite target, reports and local server data.
    pub state_dir: PathBuf,
    /// Where every run, backfill, sweep and rollback writes its JSON report; empty = `<state_dir>/reports`.
    pub reports_dir: PathBuf,
    pub source: SourceSettings,
    pub target: TargetSettings,
    pub sync: SyncSettings,
    pub log: LogSettings,
    pub lock: LockSettings,
    pub daemon: DaemonSettings,
    pub retention: RetentionSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// MongoDB connection string (secret).
    pub uri: SecretUri,
    /// Database holding the legacy collections.
    pub database: String,
    /// Documents per page and per target transaction.
    pub batch_size: usize,
    /// Driver read preference.
    #[serde(deserialize_with = "one_of")]
    pub read_preference: ReadPref,
    /// Max documents per second read from the source (0 = unlimited).
    pub rate_limit: u64,
    /// Retries of a failed source read before the run fails.
    pub retry_attempts: u32,
    /// Connection establishment timeout.
    #[serde(with = "human")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ReadPref {
    Primary,
    PrimaryPreferred,
    Secondary,
    SecondaryPreferred,
    Nearest,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSettings {
    /// `sqlite://PATH` or `postgres://...` (secret); empty = `sqlite://<state_dir>/tidemark.db`.
    pub url: SecretUri,
    /// Pool size.
    pub max_connections: u32,
    /// Who checks the foreign keys of the rows a run writes.
    #[serde(deserialize_with = "one_of")]
    pub foreign_key_checks: ForeignKeyChecks,
    /// Batches of one window written at once on their own connections, committed in order
    /// (PostgreSQL; SQLite writes one at a time). See `sink::order`.
    pub batches_in_flight: u32,
    /// Page cache of each SQLite connection a run or backfill writes with, in MiB (SQLite's
    /// own default is 2 MB). Memory apart from tidemark's own; see `sink::sqlite_tuning`.
    pub sqlite_cache_mib: u32,
    /// SQLite: how much of the database file each connection reads through a memory map, in
    /// MiB (0 = none, SQLite's default). See `sink::sqlite_tuning`.
    pub sqlite_mmap_mib: u32,
    /// SQLite: how long the batches of a run may share one transaction, in milliseconds
    /// (0 = a commit per batch). See `sink::group`.
    pub sqlite_group_commit_ms: u32,
}

impl TargetSettings {
    /// Whether the target is SQLite (`target.url` = `sqlite:…`).
    pub fn is_sqlite(&self) -> bool {
        self.url.expose().starts_with("sqlite:")
    }
}

/// `target.foreign_key_checks`: see `config/default.toml` and docs/DEPENDENCIES.md.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ForeignKeyChecks {
    /// The database checks every row a batch inserts or updates at commit (the deferred keys).
    #[default]
    Database,
    /// The database skips the per-row checks of a batch's inserts and updates (PostgreSQL:
    /// `session_replication_role = replica`; SQLite: the writing connections open with
    /// `foreign_keys = OFF`); tidemark's own resolution (every reference looked up or pulled,
    /// the missing-reference policies) keeps them valid. Deletions keep their `ON DELETE`
    /// actions (PostgreSQL: the checks are on around them; SQLite: tidemark runs them).
    Tidemark,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSettings {
    /// Mapping file.
    pub mapping: PathBuf,
    /// Entities to sync (empty = all).
    pub entities: Vec<String>,
    /// Initial watermark.
    #[serde(deserialize_with = "crate::timearg::deserialize_instant")]
    pub start: DateTime<Utc>,
    /// Source clock minus this is the newest `to`.
    #[serde(with = "human")]
    pub settle: Duration,
    /// Re-read behind the watermark.
    #[serde(with = "human")]
    pub overlap: Duration,
    /// Longest single window.
    #[serde(with = "human")]
    pub max_window: Duration,
    /// Dead letters tolerated per run before it counts as partial.
    pub error_budget: u64,
    /// Dead-letter documents whose time field is missing or mistyped.
    pub scan_invalid_time: bool,
    /// How deep references are followed (a fork's parent's owner is depth 2).
    pub max_depth: u32,
    /// Most documents pulled on demand for one batch; beyond it rows are deferred and reported.
    pub max_pulled_per_batch: usize,
    /// Runs a deferred row is retried before it becomes a dead letter.
    pub defer_attempts: u32,
    /// Keep before-images of the rows each run changes (in `tidemark_provenance`), so
    /// `tidemark rollback --run ID` can undo a run. Off: rollback is not possible.
    pub provenance: bool,
}

/// Locks that keep one writer per lane (see `src/engine/lane.rs`, `src/sink/lease.rs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockSettings {
    /// A run checks every third of this time that the session holding its lane locks still
    /// answers (and `--wait` polls at that pace). Liveness itself is the lock's: a dead
    /// holder's lanes and chunks are free at once, a frozen one keeps them.
    #[serde(with = "human")]
    pub lease: Duration,
}

/// `tidemark daemon`: schedule, metrics endpoint, retries and shutdown.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSettings {
    /// Cron expression evaluated in UTC: five fields (`min hour day-of-month month
    /// day-of-week`) or six with seconds first ([`crate::schedule::with_seconds`]).
    pub schedule: String,
    /// Run a catch-up as soon as the daemon starts, before the first scheduled time.
    pub run_on_start: bool,
    /// Address of the `/metrics` and `/health` endpoint; empty = off. A bare port binds 127.0.0.1.
    pub metrics_listen: String,
    /// First retry delay after a failed run; doubles after each further failure.
    #[serde(with = "human")]
    pub backoff_initial: Duration,
    /// Longest retry delay (before jitter).
    #[serde(with = "human")]
    pub backoff_max: Duration,
    /// After SIGTERM/SIGINT, how long the current batch may take to commit before the daemon exits anyway.
    #[serde(with = "human")]
    pub shutdown_grace: Duration,
}

/// `[retention]`: how long run reports, ledger rows and provenance are kept (`tidemark prune`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Age beyond which `tidemark prune` (without --older-than) and the daemon, after each
    /// successful scheduled run, prune; "" or "off" = never (the default).
    pub older_than: String,
}

/// The shortest retention `prune` accepts: a day, so a typo ("90m" for "90d") cannot take
/// the rollback of last night's run away.
pub const MIN_RETENTION: Duration = Duration::from_secs(24 * 3600);

impl RetentionSettings {
    /// `older_than` read: None when off.
    pub fn older_than(&self) -> Result<Option<Duration>> {
        let text = self.older_than.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let d = humantime::parse_duration(text).map_err(|e| {
            anyhow::anyhow!(
                "retention.older_than = {text:?} is not a duration ({e}); use e.g. \"90d\", or \"off\""
            )
        })?;
        check_retention(d, "retention.older_than")?;
        Ok(Some(d))
    }
}

/// A retention of at least [`MIN_RETENTION`]; `what` names the setting or flag.
pub fn check_retention(d: Duration, what: &str) -> Result<()> {
    if d < MIN_RETENTION {
        bail!(
            "{what} = {} is shorter than a day; keep at least \"1d\" (typical: \"90d\")",
            humantime::format_duration(d)
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    #[serde(deserialize_with = "one_of")]
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Human,
    Json,
}

impl Settings {
    /// The directory run reports are written to.
    /// Batches one window may write at once on PostgreSQL: `target.batches_in_flight`, as
    /// far as the pool leaves a connection for the resolve stage and one more (ANALYZE, the
    /// lease) beside them (a batch waiting for the one before it holds its connection).
    pub fn batches_in_flight(&self) -> usize {
        (self.target.batches_in_flight as usize).min(
            (self.target.max_connections as usize)
                .saturating_sub(2)
                .max(1),
        )
    }

    pub fn reports_path(&self) -> PathBuf {
        if self.reports_dir.as_os_str().is_empty() {
            self.state_dir.join("reports")
        } else {
            self.reports_dir.clone()
        }
    }

    /// Load defaults, then `file` (if any), then the environment; relative paths of the
    /// file resolve against its folder ([`paths`]).
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            if !path.exists() {
                bail!(
                    "config file {} does not exist; pass an existing file to --config",
                    path.display()
                );
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("TIDEMARK")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("sync.entities")
                .try_parsing(true),
        );
        let origin = file
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in defaults".into());
        let cfg = builder
            .build()
            .with_context(|| format!("reading settings ({origin} + TIDEMARK__* environment)"))?;
        let from_file = paths::FromFile::of(&cfg, file)?;
        let mut settings: Settings = cfg.try_deserialize().map_err(|e| {
            anyhow::anyhow!(
                "invalid setting in {origin} or TIDEMARK__* environment: {e}. \
                 See config/default.toml for every valid key and its type"
            )
        })?;
        paths::resolve(&mut settings, &from_file);
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<()> {
        let s = &self.source;
        if s.batch_size == 0 || s.batch_size > 50_000 {
            bail!(
                "source.batch_size = {} is out of range; use a value between 1 and 50000",
                s.batch_size
            );
        }
        if s.database.is_empty() {
            bail!("source.database is empty; name the legacy database");
        }
        let url = self.target.url.expose();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres:")
            || url.starts_with("postgresql:"))
        {
            bail!(
                "target.url = {} has an unsupported scheme; use sqlite://PATH or postgres://user@host/db",
                self.target.url
            );
        }
        if !s.uri.expose().starts_with("mongodb://")
            && !s.uri.expose().starts_with("mongodb+srv://")
        {
            bail!(
                "source.uri = {} is not a MongoDB URI; it must start with mongodb:// or mongodb+srv://",
                s.uri
            );
        }
        if self.sync.max_window.is_zero() {
            bail!("sync.max_window must be longer than 0s, e.g. \"30d\"");
        }
        if self.target.max_connections == 0 {
            bail!("target.max_connections must be at least 1");
        }
        if self.target.sqlite_cache_mib > 16_384 {
            bail!(
                "target.sqlite_cache_mib = {} is out of range: use 0 (SQLite's own 2 MB) to 16384; the default is 512",
                self.target.sqlite_cache_mib
            );
        }
        // The SQLite tidemark links caps a map at 2 GiB less 64 KiB (SQLITE_MAX_MMAP_SIZE)
        // and would shorten a larger one without a word.
        if self.target.sqlite_mmap_mib > 2047 {
            bail!(
                "target.sqlite_mmap_mib = {} is out of range: use 0 (no memory map, the default) to 2047, \
                 the largest map SQLite allows; a map larger than the database file costs nothing",
                self.target.sqlite_mmap_mib
            );
        }
        // Another process writing the same file waits for a group up to SQLite's busy
        // timeout (30 s): the bound keeps a group well inside it.
        if self.target.sqlite_group_commit_ms > 10_000 {
            bail!(
                "target.sqlite_group_commit_ms = {} is out of range: use 0 (a commit per batch) to 10000; \
                 the default is 5000",
                self.target.sqlite_group_commit_ms
            );
        }
        if !(1..=8).contains(&self.target.batches_in_flight) {
            bail!(
                "target.batches_in_flight = {} is out of range: use 1 (one batch after the other) to 8; the default is 2",
                self.target.batches_in_flight
            );
        }
        validate_log_level(&self.log.level)?;
        self.validate_ops()?;
        Ok(())
    }
}

/// An enum setting read from its text, so a bad value gets serde's message with the valid
/// values ("unknown variant `xml`, expected one of `auto`, `human`, `json`"); the config
/// crate's own enum reader names none ("enum LogFormat does not have variant constructor xml").
fn one_of<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let text = String::deserialize(d)?;
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(&text))
        .map_err(serde::de::Error::custom)
}

/// `log.level`: comma-separated `LEVEL` or `TARGET=LEVEL` directives. tracing would take a
/// bare word such as "verbose" as a target name and silently log at its default instead.
fn validate_log_level(level: &str) -> Result<()> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            bail!(
                "log.level = {level:?}: `{directive}` is not a level; use one of {} or \
                 TARGET=LEVEL directives, e.g. \"tidemark=debug,info\"",
                LEVELS.join(", ")
            );
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(level)
        .map_err(|e| anyhow::anyhow!("log.level = {level:?} is not a valid filter: {e}; e.g. \"info\" or \"tidemark=debug,info\""))?;
    Ok(())
}

impl Settings {
    /// `[lock]` and `[daemon]`: checked at load so `check-config` catches a bad schedule.
    fn validate_ops(&self) -> Result<()> {
        if self.lock.lease < Duration::from_secs(1) {
            bail!(
                "lock.lease = {:?} is too short; use at least \"1s\" (default \"30s\")",
                self.lock.lease
            );
        }
        let d = &self.daemon;
        crate::schedule::parse_schedule(&d.schedule).map_err(|e| {
            anyhow::anyhow!(
                "daemon.schedule = {:?} is not a valid cron expression: {e}. \
                 Use five fields (minute hour day-of-month month day-of-week), e.g. \"30 2 * * *\" \
                 for 02:30 UTC daily, or six with seconds first, e.g. \"0 30 2 * * *\"",
                d.schedule
            )
        })?;
        if !d.metrics_listen.is_empty() {
            crate::schedule::listen_addr(&d.metrics_listen)?;
        }
        self.retention.older_than()?;
        if d.backoff_initial.is_zero() || d.backoff_max < d.backoff_initial {
            bail!(
                "daemon.backoff_initial must be above 0s and at most daemon.backoff_max (now {:?} and {:?})",
                d.backoff_initial,
                d.backoff_max
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Enum settings list their valid values; a log level tracing would misread is refused.
    #[test]
    fn bad_enums_and_log_levels_name_the_valid_values() {
        let dir = tempfile::tempdir().unwrap();
        let load = |toml: &str| {
            let file = dir.path().join("s.toml");
            std::fs::write(&file, toml).unwrap();
            Settings::load(Some(&file)).map_err(|e| format!("{e:#}"))
        };
        let err = load("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(
            err.contains("log.format") && err.contains("`auto`, `human`, `json`"),
            "{err}"
        );
        let err = load("[source]\nread_preference = \"nearst\"\n").unwrap_err();
        assert!(
            err.contains("`primaryPreferred`") && err.contains("`nearest`"),
            "{err}"
        );
        let err = load("[target]\nforeign_key_checks = \"none\"\n").unwrap_err();
        assert!(err.contains("`database` or `tidemark`"), "{err}");
        let err = load("[log]\nlevel = \"verbose\"\n").unwrap_err();
        assert!(
            err.contains("`verbose` is not a level") && err.contains("trace, debug, info"),
            "{err}"
        );
        assert!(load("[log]\nlevel = \"tidemark=verbose\"\n").is_err());
        let s = load("[log]\nformat = \"json\"\nlevel = \"tidemark=debug, INFO\"\n").unwrap();
        assert_eq!(s.log.format, LogFormat::Json);
    }

    /// Relative paths of a settings file point into its folder; the SQLite default follows
    /// `state_dir`; absolute paths and the defaults' stay as written.
    #[test]
    fn relative_paths_of_a_file_resolve_against_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(
            &file,
            "state_dir = \"st\"\nreports_dir = \"/abs/r\"\n[sync]\nmapping = \"m/x.toml\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&file)).unwrap();
        assert_eq!(s.state_dir, dir.path().join("st"));
        assert_eq!(s.reports_dir, PathBuf::from("/abs/r"));
        assert_eq!(s.sync.mapping, dir.path().join("m/x.toml"));
        let db = dir.path().join("st/tidemark.db");
        assert_eq!(s.target.url.expose(), format!("sqlite://{}", db.display()));
        std::fs::write(&file, "[target]\nurl = \"sqlite:data/y.db\"\n").unwrap();
        let s = Settings::load(Some(&file)).unwrap();
        let db = dir.path().join("data/y.db");
        assert_eq!(s.target.url.expose(), format!("sqlite://{}", db.display()));
        assert_eq!(
            s.state_dir,
            PathBuf::from("state"),
            "a default stays relative"
        );
        let d = Settings::load(None).unwrap();
        assert_eq!(d.target.url.expose(), "sqlite://state/tidemark.db");
    }

    /// `[retention] older_than`: off by default, a duration of at least a day otherwise.
    #[test]
    fn retention_is_off_by_default_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        let load = |toml: &str| {
            let file = dir.path().join("s.toml");
            std::fs::write(&file, toml).unwrap();
            Settings::load(Some(&file)).map_err(|e| format!("{e:#}"))
        };
        let s = Settings::load(None).unwrap();
        assert_eq!(s.retention.older_than().unwrap(), None);
        let s = load("[retention]\nolder_than = \"90d\"\n").unwrap();
        assert_eq!(
            s.retention.older_than().unwrap(),
            Some(Duration::from_secs(90 * 86400))
        );
        let s = load("[retention]\nolder_than = \"off\"\n").unwrap();
        assert_eq!(s.retention.older_than().unwrap(), None);
        let err = load("[retention]\nolder_than = \"90\"\n").unwrap_err();
        assert!(
            err.contains("retention.older_than") && err.contains("90d"),
            "{err}"
        );
        let err = load("[retention]\nolder_than = \"90m\"\n").unwrap_err();
        assert!(err.contains("shorter than a day"), "{err}");
        let err = load("[retention]\nolder = \"90d\"\n").unwrap_err();
        assert!(err.contains("older"), "{err}");
    }

    /// `target.<key>`: `default` when unset, `too_big` refused with the key named, `edge`
    /// accepted.
    fn check_bounded_target_key(
        key: &str,
        get: fn(&Settings) -> u32,
        default: u32,
        too_big: u32,
        edge: u32,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        assert_eq!(get(&Settings::load(None).unwrap()), default);
        std::fs::write(&file, format!("[target]\n{key} = {too_big}\n")).unwrap();
        let err = format!("{:#}", Settings::load(Some(&file)).unwrap_err());
        assert!(err.contains(&format!("target.{key} = {too_big}")), "{err}");
        std::fs::write(&file, format!("[target]\n{key} = {edge}\n")).unwrap();
        assert_eq!(get(&Settings::load(Some(&file)).unwrap()), edge);
    }

    #[test]
    fn the_sqlite_cache_is_512_mib_by_default_and_bounded() {
        check_bounded_target_key(
            "sqlite_cache_mib",
            |s| s.target.sqlite_cache_mib,
            512,
            20000,
            0,
        );
    }

    #[test]
    fn the_sqlite_memory_map_is_off_by_default_and_bounded() {
        check_bounded_target_key(
            "sqlite_mmap_mib",
            |s| s.target.sqlite_mmap_mib,
            0,
            4096,
            2047,
        );
    }

    #[test]
    fn sqlite_group_commits_are_5_s_by_default_and_bounded() {
        check_bounded_target_key(
            "sqlite_group_commit_ms",
            |s| s.target.sqlite_group_commit_ms,
            5000,
            10_001,
            10_000,
        );
    }

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::load(None).expect("defaults are valid");
        assert_eq!(s.source.batch_size, 1000);
        assert_eq!(s.sync.settle, Duration::from_secs(300));
        assert_eq!(s.target.foreign_key_checks, ForeignKeyChecks::Database);
    }

    #[test]
    fn tidemark_may_check_references_on_either_target() {
        let mut s = Settings::load(None).expect("defaults are valid");
        s.target.foreign_key_checks = ForeignKeyChecks::Tidemark;
        s.validate().expect("SQLite takes it");
        s.target.url = SecretUri::new("postgres://u@h/db");
        s.validate().expect("PostgreSQL takes it");
    }
}
