//! The target database: bulk upserts of mapped rows, with the checkpoint and
//! dead letters written in the same transaction. One enum, two backends; SQL
//! that is the same on both is written once and expanded per pool by `with_pool!`.

mod batch;
mod checkpoint;
pub mod chunks;
pub mod ddl;
pub mod dead_letters;
mod group;
pub mod lease;
mod memory;
pub mod monitor;
pub mod order;
mod pieces;
mod postgres;
pub mod probe;
pub(crate) mod provenance;
mod reach;
pub mod records;
pub mod retention;
mod retriable;
mod rows;
pub mod runs;
mod sqlite;
pub mod undo;
pub mod verify;

use crate::mapping::{Entity, TableRef, Value};
use crate::secret::SecretUri;
use crate::settings::ForeignKeyChecks;
use crate::source::Position;
use crate::span::LaneState;
use anyhow::{Context, Result};
use backon::Retryable;
use chrono::{DateTime, TimeZone, Utc};
pub use pieces::{BigParent, PIECE_ROWS};
use rows::key_text;
pub(crate) use rows::key_text_at;
use sqlx::{
    postgres::PgConnectOptions, postgres::PgPoolOptions, sqlite::SqliteConnectOptions,
    sqlite::SqlitePoolOptions, PgPool, SqlitePool,
};
use std::str::FromStr;

pub use group::GroupCommit;
use memory::sqlite_cache_budget;
pub use retriable::is_retriable_error;

/// Write transactions. On SQLite they start with `BEGIN IMMEDIATE`: a deferred transaction
/// that reads first and writes later fails with SQLITE_BUSY_SNAPSHOT (busy_timeout cannot
/// help) when another connection — a lease heartbeat, a parallel chunk — wrote in between.
pub(crate) trait BeginWrite {
    type Db: sqlx::Database;
    async fn begin_write(&self) -> sqlx::Result<sqlx::Transaction<'static, Self::Db>>;
}

impl BeginWrite for PgPool {
    type Db = sqlx::Postgres;
    async fn begin_write(&self) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        self.begin().await
    }
}

impl BeginWrite for SqlitePool {
    type Db = sqlx::Sqlite;
    /// Inside a group of batches ([`group`]) the connection already holds the write lock:
    /// the transaction becomes a savepoint of the group (its commit a `RELEASE`, durable when
    /// the group commits).
    async fn begin_write(&self) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        use sqlx::TransactionManager;
        let conn = self.acquire().await?;
        let in_group =
            <sqlx::Sqlite as sqlx::Database>::TransactionManager::get_transaction_depth(&conn) > 0;
        // `Transaction::begin` is public but hidden from sqlx's docs; it is what
        // `Pool::begin_with` does with a connection from the pool, and keeping the connection
        // in hand is what makes the depth read above still true when the statement runs.
        sqlx::Transaction::begin(conn, (!in_group).then_some("BEGIN IMMEDIATE".into())).await
    }
}

/// Expand one body for either pool type (SQL identical on both backends). The one pool
/// macro of the crate: every module of `sink` uses it.
macro_rules! with_pool {
    ($sink:expr, $pool:ident => $body:expr) => {
        match $sink {
            $crate::sink::Sink::Postgres($pool) => $body,
            $crate::sink::Sink::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use with_pool;

/// A connected target.
#[derive(Clone, Debug)]
pub enum Sink {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// A lane's saved position.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub lane: String,
    pub entity: String,
    pub state: LaneState,
    /// Last `(time, _id)` written inside `state.open`.
    pub last: Option<Position>,
    pub run_id: String,
}

/// A document that could not be mapped, kept whole.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub source_id: String,
    pub error: String,
    /// Relaxed extended JSON of the raw document.
    pub document: String,
}

/// Everything one batch writes, committed together.
#[derive(Default, Clone)]
pub struct BatchWrite<'a> {
    pub entity: Option<&'a Entity>,
    /// Mapped rows, already de-duplicated on the primary key.
    pub rows: &'a [Vec<Value>],
    /// The canonical key and hash of each of `rows` when computed ahead
    /// (`pipeline::prepare`); empty: computed while writing.
    pub row_meta: &'a [(String, String)],
    /// Per child table of the entity: the complete new set of child rows of `rows`' parents.
    pub children: &'a [Vec<Vec<Value>>],
    /// The same as `row_meta` for each child table's rows (empty: computed while writing).
    pub child_meta: &'a [Vec<(String, String)>],
    /// Parents of `rows` whose child rows are not in `children`: the writer maps and writes
    /// them in pieces ([`BigParent`]).
    pub big: &'a [BigParent<'a>],
    /// Primary keys of rows to delete (deleted rule with action `delete`).
    pub deletes: &'a [Vec<Value>],
    /// Primary keys to soft-delete, with the deletion time.
    pub soft_deletes: &'a [(Vec<Value>, Value)],
    pub dead: &'a [DeadLetter],
    /// Source ids that now map cleanly: their old dead letters are removed.
    pub resolved: &'a [String],
    pub checkpoint: Option<&'a Checkpoint>,
    pub run_id: &'a str,
    pub mapping_version: &'a str,
    /// Entities pulled on demand, written before `rows` (deepest references first).
    pub before: &'a [EntityRows],
    /// Dependents of `rows`, written after them.
    pub after: &'a [EntityRows],
    /// Dead letters of other entities (pulled documents that could not be mapped).
    pub other_dead: &'a [(String, DeadLetter)],
    /// References that could not be resolved.
    pub missing: &'a [MissingRef],
    /// Documents held back for a later run: `(source_id, reason)`.
    pub deferred: &'a [(String, String)],
    /// Source ids written cleanly: their missing-reference and pending records are cleared.
    pub clear_refs: &'a [String],
    /// `(entity, source id)` of pulled documents written: their missing-reference records
    /// are cleared (before `missing` is written, so a reference still missing stays recorded).
    pub clear_pulled: &'a [(String, String)],
    /// Which documents have records this run knows of (see [`crate::sink::records`]): only their
    /// ids are sent to the clearing deletes above, and the records written are added. `None`:
    /// every id is sent.
    pub known: Option<&'a crate::sink::records::Known>,
    /// Roll the transaction back instead of committing it: the batch is counted, not kept.
    pub dry_run: bool,
    /// Record what the batch changes in `tidemark_provenance` (for `tidemark rollback`).
    pub provenance: bool,
    /// The previous batch found none of its rows stored (a first load): insert the rows
    /// without reading them first; if one turns out to exist, the batch's transaction is
    /// rolled back and the batch written again the usual way (read, then upsert).
    pub presume_new: bool,
    /// The same for the dependents (`after`): their rows are inserted without reading them
    /// first; one that exists rolls the batch back and it is written again the usual way.
    /// (A viz pulls its content, commits and events: on a first load none of them exists,
    /// and reading them back cost one query per dependent table per batch.)
    pub presume_dependents_new: bool,
    /// Rows known to be absent (read as absent in this transaction, or child rows of parents
    /// that were not stored) are inserted without a savepoint: a key that exists anyway
    /// (another writer inserted it since the read; a child row stored under another parent)
    /// rolls the batch back, and it is written again with a savepoint around each such
    /// insert. Saves two round-trips per insert (about 8,400 on the benchmark's full
    /// mapping), where such conflicts almost never happen.
    pub optimistic_inserts: bool,
    /// `target.foreign_key_checks = "tidemark"`: the batch's inserts and updates run with
    /// PostgreSQL's per-row foreign-key checks off (`session_replication_role = replica`);
    /// deletions of an entity's rows turn them back on around the statement, so its
    /// `ON DELETE` actions (cascades to child tables, references set to NULL) still run.
    pub skip_fk_checks: bool,
    /// This batch's place among the window's batches in flight (PostgreSQL; see [`order`]):
    /// it takes its advisory lock first and commits only after the batch before it.
    pub order: Option<&'a order::Order>,
    /// Checked in the batch's transaction just before it commits: the lane is still this
    /// process's ([`lease::Fence`]; backfill chunks).
    pub fence: Option<&'a lease::Fence>,
}

/// A batch that presumed a first load found a row already stored; its transaction is rolled
/// back and [`Sink::write_batch`] writes the batch again without the presumption. (Undoing
/// only the insert needs a savepoint: two more round-trips on every batch to save work on
/// the rare batch that guessed wrong.)
#[derive(Debug, thiserror::Error)]
#[error("a row presumed new already exists")]
pub(crate) struct PresumedNewConflict;

/// Rows of one entity, written as a unit (main rows plus child tables).
#[derive(Debug)]
pub struct EntityRows {
    pub entity: std::sync::Arc<Entity>,
    pub rows: Vec<Vec<Value>>,
    pub children: Vec<Vec<Vec<Value>>>,
    /// Canonical key and hash of each row and of each child row, when computed ahead (as
    /// [`BatchWrite::row_meta`] and [`BatchWrite::child_meta`]).
    pub meta: Vec<(String, String)>,
    pub child_meta: Vec<Vec<(String, String)>>,
}

/// A reference whose target does not exist in the source.
#[derive(Debug, Clone)]
pub struct MissingRef {
    pub entity: String,
    pub source_id: String,
    pub column: String,
    pub ref_entity: String,
    pub ref_key: String,
    pub policy: crate::mapping::spec::MissingPolicy,
}

/// What a batch changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows inserted or changed.
    pub written: u64,
    /// Of `written`: rows that did not exist (known when provenance or dry-run read them first).
    pub inserted: u64,
    /// Of `written`: rows that existed with other content (same condition).
    pub updated: u64,
    /// Rows already identical in the target.
    pub unchanged: u64,
    /// Rows removed or soft-deleted by the deleted rule.
    pub deleted: u64,
    /// Child rows inserted or changed.
    pub child_written: u64,
    /// Child rows removed because their element left the source array.
    pub child_removed: u64,
    /// Rows of entities pulled on demand (references and dependents) inserted or changed.
    pub pulled_written: u64,
    /// None of the entity's rows was stored before this batch (the next batch of the window
    /// may then try [`BatchWrite::presume_new`]).
    pub all_new: bool,
    /// There were dependents (`after`) and none of their rows was stored before this batch
    /// (the next batch may then try [`BatchWrite::presume_dependents_new`]).
    pub dependents_new: bool,
}

/// A row of the runs ledger.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: String,
    pub kind: String,
    pub dry_run: bool,
    pub settings_fingerprint: String,
    pub mapping_version: String,
}

pub fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl Sink {
    /// Connect (creating a SQLite file and its directory if needed), with SQLite's own
    /// page cache: for commands that read or write little.
    pub async fn connect(url: &SecretUri, max_connections: u32) -> Result<Self> {
        Self::connect_tuned(url, max_connections, SqliteTuning::default()).await
    }

    /// Connect for writing batches: on SQLite each connection gets the page cache and memory
    /// map of `tuning` and the settings of [`sqlite_tuning`]. PostgreSQL ignores it.
    pub async fn connect_tuned(
        url: &SecretUri,
        max_connections: u32,
        tuning: SqliteTuning,
    ) -> Result<Self> {
        let raw = url.expose();
        // What happened and what to do (authentication, refused, missing database, TLS…).
        let fail = |e: sqlx::Error| anyhow::Error::new(reach::unreachable(url, &e));
        if raw.starts_with("sqlite:") {
            let path = raw
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let path = path.split('?').next().unwrap_or(path);
            if let Some(dir) = std::path::Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).with_context(|| {
                    format!(
                        "cannot create {} for the SQLite target (target.url)",
                        dir.display()
                    )
                })?;
            }
            let opts = SqliteConnectOptions::from_str(raw)
                .map_err(fail)?
                .create_if_missing(true)
                // SQLite's 4 KiB pages: 16 KiB took ~20 % off the 20,000-viz demo job but
                // made the 200,000-viz full mapping ~10 % slower (BENCHMARKS.md, fifteenth
                // round), likely because random-key inserts into large tables dirty about one
                // page per row either way and the 2 MB cache holds a quarter as many pages.
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                .foreign_keys(!tuning.tidemark_checks_references)
                .busy_timeout(std::time::Duration::from_secs(30));
            let opts = sqlite_tuning(opts, tuning);
            // Switching a new file to WAL needs an exclusive lock and SQLite answers "database
            // is locked" at once, without its busy timeout, while another process holds one
            // (two backfill workers starting together on a new target: found by the oracle
            // test, `oracle_sqlite` seed 115). Opening again after a moment succeeds.
            let opts = &opts;
            let pool = (|| async move {
                SqlitePoolOptions::new()
                    .max_connections(max_connections)
                    // A run writes and reads on one connection (`commands::run`): the resolve
                    // stage waits while a batch commits, which may take longer than sqlx's
                    // 30 s default on a loaded machine or a document of 500,000 child rows.
                    .acquire_timeout(std::time::Duration::from_secs(600))
                    // Never closed behind tidemark's back: a connection may hold a group of
                    // batches not committed yet (`group`), which closing would undo.
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .connect_with(opts.clone())
                    .await
            })
            .retry(crate::retry::sqlite_start_race(10))
            .when(|e| e.to_string().contains("database is locked"))
            .await
            .map_err(fail)?;
            Ok(Sink::Sqlite(pool))
        } else {
            let opts = PgConnectOptions::from_str(raw).map_err(fail)?;
            reach::probe_postgres(url, &opts).await?;
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(reach::CONNECT_TIMEOUT)
                .connect_with(opts)
                .await
                .map_err(fail)?;
            Ok(Sink::Postgres(pool))
        }
    }

    /// Check, before anything is written, that the target accepts the mode of
    /// `target.foreign_key_checks` (`"tidemark"` needs the right to set
    /// `session_replication_role`).
    pub async fn check_foreign_key_checks(&self, mode: ForeignKeyChecks) -> Result<()> {
        let Sink::Postgres(p) = self else {
            return Ok(());
        };
        if mode == ForeignKeyChecks::Database {
            return Ok(());
        }
        let mut tx = p.begin().await?;
        tx.fk_checks(false).await?;
        tx.rollback().await?;
        Ok(())
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Sink::Postgres(_) => "postgres",
            Sink::Sqlite(_) => "sqlite",
        }
    }

    /// Create or upgrade the tool's own tables (embedded sqlx migrations).
    ///
    /// sqlx serialises concurrent migrators on PostgreSQL (an advisory lock) but not on SQLite:
    /// two processes starting at once on a new SQLite target (two backfill workers) both
    /// apply the first migration and the loser fails on `_sqlx_migrations`' key or on a table
    /// that now exists (found by the oracle test, `oracle_sqlite` seed 4). Applied
    /// migrations are skipped, so the loser tries again after the winner's commit.
    pub async fn migrate_tool_tables(&self) -> Result<()> {
        (|| async move {
            match self {
                Sink::Postgres(p) => sqlx::migrate!("./migrations/postgres").run(p).await,
                Sink::Sqlite(p) => sqlx::migrate!("./migrations/sqlite").run(p).await,
            }
        })
        .retry(crate::retry::sqlite_start_race(5))
        .when(|_| matches!(self, Sink::Sqlite(_)))
        .await
        .context("applying tidemark's own migrations to the target; is the target writable?")
    }

    /// Whether every embedded migration of the tool's tables has been applied (read only).
    pub async fn tool_tables_current(&self) -> Result<bool> {
        let (have, want) = self.tool_migrations().await?;
        Ok(have >= want)
    }

    /// How many of the tool's embedded migrations the target has applied (0 when it has no
    /// migrations table), and how many there are (read only).
    pub async fn tool_migrations(&self) -> Result<(i64, i64)> {
        let want = match self {
            Sink::Postgres(_) => sqlx::migrate!("./migrations/postgres").iter().count(),
            Sink::Sqlite(_) => sqlx::migrate!("./migrations/sqlite").iter().count(),
        } as i64;
        let sql = "SELECT COUNT(*) FROM _sqlx_migrations WHERE success";
        let have: Result<i64, sqlx::Error> =
            with_pool!(self, p => sqlx::query_scalar(sql).fetch_one(p).await);
        Ok((have.unwrap_or(0), want))
    }

    /// Whole rows of `t` whose `by` columns match one of `keys` (read only).
    pub async fn select_rows(
        &self,
        t: TableRef<'_>,
        by: &[usize],
        keys: &[Vec<Value>],
    ) -> Result<Vec<Vec<Value>>> {
        Ok(with_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            let rows = tx.select_rows(t, by, keys).await?;
            // Read only: a commit ends it as a rollback would, and inside a group of batches
            // it releases the savepoint (a rolled-back one would stay open until the group
            // commits, and SQLite journals every page written under it).
            tx.commit().await?;
            rows
        }))
    }

    /// Up to `limit` whole rows of `t` ordered by column `order` after `after`, optionally
    /// restricted to column `range.0` in `[range.1, range.2)` (read only; keyset paging).
    pub async fn scan_rows(
        &self,
        t: TableRef<'_>,
        order: usize,
        after: Option<&Value>,
        range: Option<(usize, &Value, &Value)>,
        limit: usize,
    ) -> Result<Vec<Vec<Value>>> {
        Ok(with_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            let rows = tx.scan_rows(t, order, after, range, limit).await?;
            // Read only: a commit ends it as a rollback would, and inside a group of batches
            // it releases the savepoint (a rolled-back one would stay open until the group
            // commits, and SQLite journals every page written under it).
            tx.commit().await?;
            rows
        }))
    }

    /// Which of `keys` exist in column `col` of table `t`.
    pub async fn existing_keys(
        &self,
        t: TableRef<'_>,
        col: usize,
        keys: &[Value],
    ) -> Result<std::collections::HashSet<String>> {
        let probe = TableRef {
            name: t.name,
            columns: t.columns,
            pk: std::slice::from_ref(&col),
        };
        let keys: Vec<Vec<Value>> = keys.iter().map(|k| vec![k.clone()]).collect();
        let found = with_pool!(self, p => {
            let mut tx = p.begin().await?;
            let found = tx.select_keys(probe, &[col], &keys).await?;
            // Read only: committed for the reason `select_rows` gives.
            tx.commit().await?;
            found
        });
        Ok(found.into_iter().map(|k| key_text(&k)).collect())
    }

    /// Outstanding rows of one of the tool's per-entity tables (dead letters, missing refs, pending).
    pub async fn count_for(&self, table: &str, entity: &str) -> Result<i64> {
        let sql = match table {
            "tidemark_dead_letters" | "tidemark_missing_refs" | "tidemark_pending" => {
                format!("SELECT COUNT(*) FROM {table} WHERE entity = $1")
            }
            other => anyhow::bail!("not a per-entity tool table: {other}"),
        };
        Ok(
            with_pool!(self, p => sqlx::query_scalar::<_, i64>(&sql).bind(entity).fetch_one(p).await?),
        )
    }

    /// Source ids of `entity` with a dead letter, a missing reference or a pending record;
    /// `None` when there are more than `cap` (see [`crate::sink::records`]).
    pub async fn record_ids(
        &self,
        entity: &str,
        cap: usize,
    ) -> Result<Option<std::collections::HashSet<String>>> {
        let sql = "SELECT source_id FROM tidemark_dead_letters WHERE entity = $1 \
                   UNION SELECT source_id FROM tidemark_missing_refs WHERE entity = $1 \
                   UNION SELECT source_id FROM tidemark_pending WHERE entity = $1 LIMIT $2";
        let ids: Vec<String> = with_pool!(self, p => sqlx::query_scalar(sql)
            .bind(entity).bind(cap as i64 + 1).fetch_all(p).await
            .with_context(|| format!("reading which documents of {entity} have records"))?);
        Ok((ids.len() <= cap).then(|| ids.into_iter().collect()))
    }

    /// Pending documents of an entity: `(source_id, attempts)`.
    pub async fn pending(&self, entity: &str) -> Result<Vec<(String, i64)>> {
        Ok(with_pool!(self, p => sqlx::query_as::<_, (String, i64)>(
            "SELECT source_id, attempts FROM tidemark_pending WHERE entity = $1 ORDER BY source_id")
            .bind(entity).fetch_all(p).await?))
    }

    /// Number of outstanding dead letters of an entity.
    pub async fn dead_letter_count(&self, entity: &str) -> Result<i64> {
        Ok(
            with_pool!(self, p => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM tidemark_dead_letters WHERE entity = $1")
            .bind(entity).fetch_one(p).await?),
        )
    }

    /// Whether `entity` has dead letters, missing-reference or pending records: then every
    /// batch also clears the records of the documents it writes cleanly.
    pub async fn has_outstanding(&self, entity: &str) -> Result<bool> {
        for table in [
            "tidemark_dead_letters",
            "tidemark_missing_refs",
            "tidemark_pending",
        ] {
            if self.count_for(table, entity).await? > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Commit a group of batches still open (closing its connection would undo it); false,
    /// with the error logged, if that commit failed.
    async fn commit_last_group(&self) -> bool {
        match self.commit_group(None).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "the last group of batches did not commit");
                false
            }
        }
    }

    /// SQLite, at the end of a run: copy the whole WAL into the database file and empty it
    /// (`wal_checkpoint(TRUNCATE)`), so that the file alone holds everything the run
    /// committed. Closing the last connection should do the same, yet 16 of 27 large runs
    /// left a WAL of up to 400 MB beside the file (why was not pinned down; BENCHMARKS.md,
    /// "Session 21"), and a copy of the file alone then missed the run's last rows. A reader
    /// or writer of another process keeps part of the WAL (SQLite waits for it up to its busy
    /// timeout, then leaves the rest for later); nothing is lost either way, so a failure is
    /// only logged. No-op on PostgreSQL and on a pool with no open connection.
    pub async fn checkpoint_wal(&self) {
        let Sink::Sqlite(p) = self else { return };
        if p.is_closed() || p.size() == 0 {
            return;
        }
        if !self.commit_last_group().await {
            return;
        }
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(p)
            .await
        {
            Ok((0, _, _)) => {}
            Ok((_, log, done)) => tracing::info!(
                wal_pages = log,
                copied = done,
                "another connection kept part of the WAL; SQLite copies the rest later"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "checkpointing the WAL at the end of the run failed")
            }
        }
    }

    pub async fn close(&self) {
        // A group of batches still open commits first: closing the connection would undo it.
        self.commit_last_group().await;
        with_pool!(self, p => p.close().await)
    }
}

/// How tidemark opens SQLite beyond WAL and `synchronous = NORMAL`, measured on the full
/// VizHub mapping (BENCHMARKS.md, "SQLite that scales"). A first load inserts rows with
/// random keys (the source's ids) into a primary key and the reference indexes of each
/// table; once those outgrow SQLite's 2 MB page cache, every row re-reads a page per index
/// from the OS, every batch spills dirty pages to the WAL before its commit, and the
/// checkpoint copies each page again — the system time that made 10× the data cost 17×.
/// - `cache_size`: `cache_mib` MiB per connection (0 keeps SQLite's 2 MB). A run writes on
///   one connection, so the cache stays warm from batch to batch (a connection discards its
///   cache when another one commits).
/// - `temp_store = memory`: each multi-row upsert opens a statement journal (it may fail
///   halfway and must undo only itself); in memory instead of a temporary file, which took
///   12 % of the demo job's samples in `pwrite` (perf, 20,000 vizzes).
/// - `wal_autocheckpoint = 100000` pages (SQLite's default 1,000): a page that several
///   batches change between two checkpoints is copied into the database once, and the
///   checkpoint's `fsync` comes ten times less often than with 10,000. At 200,000 vizzes
///   10,000 pages (40 MB) left the checkpoint 21 % of all CPU samples; 100,000 cut the bytes
///   written through system calls by 25 % (39.2 → 29.2 GiB) and read by 33 % at 200k, by 20 %
///   and 61–70 % at 20k (exact counts, `/proc/PID/io`); the times, six alternating runs each
///   on a machine whose speed varied up to 2×, moved within that noise (median wall 214 s
///   against 236 s, CPU 172 against 180 s). 1,000,000 (no checkpoint until the end) was
///   slower (every read searches a larger WAL index). BENCHMARKS.md, "Session 19".
/// - `journal_size_limit` 64 MiB: a WAL of up to 100,000 pages is 400 MB on disk; after a
///   checkpoint lets it start over, SQLite cuts the file back to this size, so a long-lived
///   connection (the daemon) does not keep the largest WAL a first load needed.
/// - `mmap_size`: `mmap_mib` MiB (`target.sqlite_mmap_mib`, off by default; see there).
pub(crate) fn sqlite_tuning(opts: SqliteConnectOptions, t: SqliteTuning) -> SqliteConnectOptions {
    let mut opts = opts
        .pragma("temp_store", "memory")
        .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string())
        .pragma("journal_size_limit", (64u64 << 20).to_string());
    if t.mmap_mib > 0 {
        opts = opts.pragma("mmap_size", (u64::from(t.mmap_mib) << 20).to_string());
    }
    if t.cache_mib == 0 {
        return opts;
    }
    // A negative cache_size is in KiB.
    opts.pragma("cache_size", format!("-{}", u64::from(t.cache_mib) * 1024))
}

/// [`sqlite_tuning`]'s checkpoint interval, in WAL pages.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 100_000;

/// The memory a SQLite connection that writes batches may use beside tidemark's own
/// (`target.sqlite_cache_mib`, `target.sqlite_mmap_mib`); zero for both is SQLite's own
/// defaults (2 MB of cache, no map), which the light commands use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SqliteTuning {
    pub cache_mib: u32,
    pub mmap_mib: u32,
    /// Open the connections with SQLite's foreign-key enforcement off
    /// (`target.foreign_key_checks = "tidemark"`; set by the commands that write batches,
    /// never by `rollback`, which relies on the database's `ON DELETE` actions). SQLite
    /// cannot switch it inside a transaction, so it is the connection's for its life, and
    /// the writer runs the `ON DELETE SET NULL` of the rows it deletes itself
    /// ([`TableOps::runs_delete_actions`]).
    pub tidemark_checks_references: bool,
}

impl SqliteTuning {
    /// The tuning `target.*` asks for, for each connection of a pool of
    /// `t.max_connections`: the page cache lowered to a quarter of the memory this process
    /// may use ([`sqlite_cache_budget`]; logged when lowered), then shared among the pool's
    /// connections, at least 2 MiB each. Every SQLite connection keeps a cache of its own,
    /// so `target.sqlite_cache_mib` per connection let `verify` on its pool of four read a
    /// 200,000-viz target with 2.1 GB resident (BENCHMARKS.md, "Session 25"); and a cache is
    /// emptied whenever another connection commits, so a pool that writes on several gains
    /// nothing from large ones. A run writes on a pool of one and keeps the whole budget.
    pub fn of(t: &crate::settings::TargetSettings) -> Self {
        let budget = sqlite_cache_budget(t.sqlite_cache_mib);
        let cache_mib = match budget {
            0 => 0,
            b => b.div_ceil(t.max_connections.max(1)).max(2),
        };
        Self {
            cache_mib,
            mmap_mib: t.sqlite_mmap_mib,
            tidemark_checks_references: false,
        }
    }
}

/// Table operations inside an open transaction; one impl per backend.
pub(crate) trait TableOps {
    /// Upsert; returns rows inserted or changed (identical rows are left alone).
    async fn upsert_rows(&mut self, t: TableRef<'_>, rows: &[Vec<Value>]) -> Result<u64>;
    /// Write rows that a read in this transaction found absent (a plain insert where the
    /// backend makes that cheaper; the upsert if one appeared meanwhile).
    async fn insert_new(&mut self, t: TableRef<'_>, rows: &[Vec<Value>]) -> Result<u64> {
        match self.try_insert(t, rows).await? {
            Some(n) => Ok(n),
            None => self.upsert_rows(t, rows).await,
        }
    }
    /// Insert rows none of which may exist, undone (to a savepoint) if one does: Some(rows
    /// written), or None (also where the backend gains nothing over the upsert: SQLite).
    async fn try_insert(&mut self, _t: TableRef<'_>, _rows: &[Vec<Value>]) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Insert rows presumed new without a savepoint: a key that exists fails the whole
    /// transaction with [`PresumedNewConflict`] (the caller writes the batch again). Or
    /// None where the backend gains nothing over reading first (SQLite).
    async fn insert_presumed(
        &mut self,
        t: TableRef<'_>,
        rows: &[Vec<Value>],
    ) -> Result<Option<u64>> {
        self.try_insert(t, rows).await
    }
    /// Primary keys of rows whose `by` columns match one of `keys`.
    async fn select_keys(
        &mut self,
        t: TableRef<'_>,
        by: &[usize],
        keys: &[Vec<Value>],
    ) -> Result<Vec<Vec<Value>>>;
    /// Whole rows (every column, in table order) whose `by` columns match one of `keys`.
    async fn select_rows(
        &mut self,
        t: TableRef<'_>,
        by: &[usize],
        keys: &[Vec<Value>],
    ) -> Result<Vec<Vec<Value>>>;
    /// Up to `limit` whole rows whose `by` columns equal `key`, in primary-key order, after
    /// the row whose primary key is `after` (a keyset page of one parent's child rows).
    async fn select_page(
        &mut self,
        t: TableRef<'_>,
        by: &[usize],
        key: &[Value],
        after: Option<&[Value]>,
        limit: usize,
    ) -> Result<Vec<Vec<Value>>>;
    /// Up to `limit` whole rows ordered by column `order` and after `after`; with `range`,
    /// only rows whose column `range.0` lies in `[range.1, range.2)`.
    async fn scan_rows(
        &mut self,
        t: TableRef<'_>,
        order: usize,
        after: Option<&Value>,
        range: Option<(usize, &Value, &Value)>,
        limit: usize,
    ) -> Result<Vec<Vec<Value>>>;
    /// Delete rows whose `by` columns match one of `keys`.
    async fn delete_keys(
        &mut self,
        t: TableRef<'_>,
        by: &[usize],
        keys: &[Vec<Value>],
    ) -> Result<u64>;
    /// Delete the rows of one of the tool's per-entity tables (dead letters, missing refs,
    /// pending) for these source ids of `entity`.
    async fn delete_source_ids(&mut self, table: &str, entity: &str, ids: &[String]) -> Result<()>;
    /// Record what a batch changed in `tidemark_provenance` (plain inserts: a batch writes
    /// each row at most once, so no record can clash with another).
    async fn insert_provenance(
        &mut self,
        run_id: &str,
        changes: &[ProvenanceRow<'_>],
        now: i64,
    ) -> Result<()>;
    /// Set one column of the row with primary key `key`.
    async fn set_column(
        &mut self,
        t: TableRef<'_>,
        col: usize,
        key: &[Value],
        value: &Value,
    ) -> Result<u64>;
    /// Turn the target's per-row foreign-key checks (and `ON DELETE` actions) on or off for
    /// the rest of the transaction ([`BatchWrite::skip_fk_checks`]; PostgreSQL only).
    async fn fk_checks(&mut self, _on: bool) -> Result<()> {
        Ok(())
    }
    /// Whether the database runs the foreign keys' `ON DELETE` actions on this connection.
    /// PostgreSQL always does (its checks are turned back on around deletions); a SQLite
    /// connection opened for `target.foreign_key_checks = "tidemark"` does not, and the
    /// writer runs them itself ([`TableOps::set_null`]).
    async fn runs_delete_actions(&mut self) -> Result<bool> {
        Ok(true)
    }
    /// `UPDATE t SET c = NULL WHERE c IN keys`, `c` being `t`'s one key column (a column
    /// that references deleted rows: their `ON DELETE SET NULL`).
    async fn set_null(&mut self, t: TableRef<'_>, keys: &[Vec<Value>]) -> Result<u64>;
    /// Take this batch's advisory lock, which the batch after it waits on ([`order`];
    /// PostgreSQL only: elsewhere batches are written one after the other).
    async fn take_turn_lock(&mut self, _key: i64) -> Result<()> {
        Ok(())
    }
    /// Check, just before commit, that the batch's lane is still this process's
    /// ([`lease::Fence`]); fails with [`lease::LostLane`] when it is not.
    async fn check_fence(&mut self, f: &lease::Fence) -> Result<()>;
    /// Wait until the batch before this one is committed ([`order::wait_turn`]).
    async fn wait_turn(
        &mut self,
        _after: &(i64, tokio::sync::watch::Receiver<order::Turn>),
    ) -> Result<()> {
        Ok(())
    }
}

/// One record of `tidemark_provenance`: table, canonical key, before-image, after-hash, and
/// for a batch's inserted rows of one table (key '' then), the JSON list of [key, after-hash].
pub(crate) type ProvenanceRow<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

#[cfg(test)]
mod tests {
    use super::*;

    async fn pragma(sink: &Sink, name: &str) -> i64 {
        let Sink::Sqlite(p) = sink else {
            panic!("a SQLite sink")
        };
        sqlx::query_scalar(&format!("PRAGMA {name}"))
            .fetch_one(p)
            .await
            .expect("pragma")
    }

    #[tokio::test]
    async fn a_tuned_sqlite_connection_has_its_cache_memory_journals_and_checkpoint() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = SecretUri::new(format!("sqlite://{}/t.db", dir.path().display()));
        let tuning = SqliteTuning {
            cache_mib: 64,
            mmap_mib: 256,
            ..Default::default()
        };
        let tuned = Sink::connect_tuned(&url, 1, tuning).await.expect("connect");
        assert_eq!(pragma(&tuned, "cache_size").await, -64 * 1024);
        assert_eq!(pragma(&tuned, "temp_store").await, 2, "2 = memory");
        assert_eq!(pragma(&tuned, "wal_autocheckpoint").await, 100_000);
        assert_eq!(pragma(&tuned, "journal_size_limit").await, 64 << 20);
        assert_eq!(pragma(&tuned, "mmap_size").await, 256 << 20);
        tuned.close().await;
        // Zero keeps SQLite's own cache (-2000 = 2,000 KiB) and no map; the light commands
        // use that.
        let plain = Sink::connect(&url, 1).await.expect("connect");
        assert_eq!(pragma(&plain, "cache_size").await, -2000);
        assert_eq!(pragma(&plain, "mmap_size").await, 0);
        plain.close().await;
    }

    /// `target.sqlite_cache_mib` is the budget of a whole pool: `verify`'s pool of four held
    /// four full caches (2.1 GB resident at 200,000 vizzes).
    #[tokio::test]
    async fn the_connections_of_a_pool_share_the_cache_budget() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = crate::settings::Settings::load(None).expect("default settings");
        s.target.url = SecretUri::new(format!("sqlite://{}/t.db", dir.path().display()));
        s.target.sqlite_cache_mib = 64;
        for (connections, each) in [(1u32, 64i64), (4, 16), (5, 13), (64, 2)] {
            s.target.max_connections = connections;
            let tuning = SqliteTuning::of(&s.target);
            assert_eq!(
                i64::from(tuning.cache_mib),
                each,
                "{connections} connections"
            );
            if connections != 4 {
                continue;
            }
            let sink = Sink::connect_tuned(&s.target.url, connections, tuning)
                .await
                .expect("connect");
            let Sink::Sqlite(p) = &sink else {
                unreachable!("a SQLite url")
            };
            // Hold all four at once, so each is a connection of its own.
            let mut held = Vec::new();
            for _ in 0..connections {
                held.push(p.acquire().await.expect("acquire"));
            }
            for c in &mut held {
                let size: i64 = sqlx::query_scalar("PRAGMA cache_size")
                    .fetch_one(&mut **c)
                    .await
                    .expect("pragma");
                assert_eq!(size, -16 * 1024, "each connection's share, in KiB");
            }
            drop(held);
            sink.close().await;
        }
        s.target.sqlite_cache_mib = 0;
        assert_eq!(
            SqliteTuning::of(&s.target).cache_mib,
            0,
            "0 keeps SQLite's own"
        );
    }
}
