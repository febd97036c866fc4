//! The target database: bulk upserts of mapped rows, with the checkpoint and
//! dead letters written in the same transaction. One enum, two backends; SQL
//! that is the same on both is written once and expanded per pool by `with_pool!`.

pub mod chunks;
pub mod ddl;
pub mod dead_letters;
pub mod lease;
pub mod monitor;
pub mod order;
mod postgres;
pub(crate) mod provenance;
pub mod records;
mod rows;
pub mod runs;
mod sqlite;
pub mod undo;
pub mod verify;

use crate::engine::window::{LaneState, Window};
use crate::mapping::{Entity, TableRef, Value};
use crate::secret::{redact_uri, SecretUri};
use crate::settings::ForeignKeyChecks;
use crate::source::Position;
use anyhow::{anyhow, Context, Result};
use chrono::{DateTime, TimeZone, Utc};
use indexmap::IndexMap;
use provenance::Tracker;
pub(crate) use rows::key_text_at;
use rows::{key_text, last_per_key, write_rows, Rows};
use sqlx::{
    postgres::PgPoolOptions, sqlite::SqliteConnectOptions, sqlite::SqlitePoolOptions, PgPool, Row,
    SqlitePool,
};
use std::borrow::Cow;
use std::str::FromStr;
use tracing::warn;

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
    async fn begin_write(&self) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.begin_with("BEGIN IMMEDIATE").await
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
    /// Connect (creating a SQLite file and its directory if needed).
    pub async fn connect(url: &SecretUri, max_connections: u32) -> Result<Self> {
        let raw = url.expose();
        let fail = |e: sqlx::Error| {
            let text = redact_uri(&e.to_string());
            // A TLS failure needs a different fix than a missing or read-only database.
            let hint = if matches!(e, sqlx::Error::Tls(_))
                || ["certificate", "UnknownIssuer", "not valid for name", "tls"]
                    .iter()
                    .any(|w| text.contains(w))
            {
                "Check the TLS settings in target.url: sslmode=verify-full needs the host name the \
                 server's certificate was issued for and sslrootcert naming the CA that signed it \
                 (docs/OPERATIONS.md, TLS)"
            } else {
                "Check that the database exists and is writable"
            };
            anyhow!("cannot open the target {url} (target.url): {text}. {hint}")
        };
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
                .foreign_keys(true)
                .busy_timeout(std::time::Duration::from_secs(30));
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections)
                .connect_with(opts)
                .await
                .map_err(fail)?;
            Ok(Sink::Sqlite(pool))
        } else {
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(std::time::Duration::from_secs(15))
                .connect(raw)
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
    pub async fn migrate_tool_tables(&self) -> Result<()> {
        match self {
            Sink::Postgres(p) => sqlx::migrate!("./migrations/postgres").run(p).await,
            Sink::Sqlite(p) => sqlx::migrate!("./migrations/sqlite").run(p).await,
        }
        .context("applying tidemark's own migrations to the target; is the target writable?")
    }

    /// Whether every embedded migration of the tool's tables has been applied (read only).
    pub async fn tool_tables_current(&self) -> Result<bool> {
        let want = match self {
            Sink::Postgres(_) => sqlx::migrate!("./migrations/postgres").iter().count(),
            Sink::Sqlite(_) => sqlx::migrate!("./migrations/sqlite").iter().count(),
        } as i64;
        let sql = "SELECT COUNT(*) FROM _sqlx_migrations WHERE success";
        let have: Result<i64, sqlx::Error> =
            with_pool!(self, p => sqlx::query_scalar(sql).fetch_one(p).await);
        Ok(have.is_ok_and(|n| n >= want))
    }

    /// Read a lane's checkpoint (a lane that never ran has the default state).
    pub async fn load_checkpoint(&self, lane: &str) -> Result<Option<Checkpoint>> {
        let sql =
            "SELECT entity, watermark_ms, open_from_ms, open_to_ms, last_ts, last_id, run_id \
                   FROM tidemark_checkpoints WHERE lane = $1";
        let row = with_pool!(self, p => sqlx::query(sql).bind(lane).fetch_optional(p).await?.map(|r| {
            (r.get::<String, _>(0), r.get::<Option<i64>, _>(1), r.get::<Option<i64>, _>(2),
             r.get::<Option<i64>, _>(3), r.get::<Option<String>, _>(4), r.get::<Option<String>, _>(5),
             r.get::<Option<String>, _>(6))
        }));
        let Some((entity, wm, of, ot, lts, lid, run_id)) = row else {
            return Ok(None);
        };
        let open = match (of, ot) {
            (Some(f), Some(t)) if f < t => Some(Window::new(from_ms(f), from_ms(t))),
            _ => None,
        };
        let last = match (lts, lid) {
            (Some(ts), Some(id)) => Some(Position::from_json(&ts, &id)?),
            _ => None,
        };
        Ok(Some(Checkpoint {
            lane: lane.to_owned(),
            entity,
            state: LaneState {
                watermark: wm.map(from_ms),
                open,
            },
            last,
            run_id: run_id.unwrap_or_default(),
        }))
    }

    /// All checkpoints (for status).
    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let lanes: Vec<String> = with_pool!(self, p => sqlx::query_scalar("SELECT lane FROM tidemark_checkpoints ORDER BY lane")
            .fetch_all(p).await?);
        let mut out = Vec::new();
        for l in lanes {
            out.extend(self.load_checkpoint(&l).await?);
        }
        Ok(out)
    }

    /// Save a checkpoint on its own (end of a window, empty windows).
    pub async fn save_checkpoint(&self, cp: &Checkpoint) -> Result<()> {
        with_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            capture_lane_query!(cp).execute(&mut *tx).await?;
            checkpoint_query!(cp).execute(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Write one batch: dead letters, deletions, rows, child rows and checkpoint in one
    /// transaction. An error names the target and says that nothing of the batch was kept.
    pub async fn write_batch(&self, b: &BatchWrite<'_>) -> Result<BatchOutcome> {
        let entity = b.entity.map_or("tool records", |e| e.name.as_str());
        let mut b = b.clone();
        let mut deadlocks = 0;
        let written = loop {
            let out = self.write_batch_tx(&b).await;
            let Err(e) = out else { break out };
            if let Some(o) = b.order {
                // This attempt's transaction is over: the batch after it waits for the next
                // one, and gives way to it after a deadlock.
                let deadlock = order::is_deadlock(&e);
                o.next_attempt(deadlock);
                if (deadlock || e.chain().any(|c| c.is::<order::Yielded>())) && deadlocks < 5 {
                    deadlocks += 1;
                    // Wait for the batch before (if any), outside any transaction.
                    if !o.before_done().await {
                        break Err(e.context(order::PredecessorFailed));
                    }
                    continue;
                }
            }
            if e.chain().any(|c| c.is::<PresumedNewConflict>())
                && (b.optimistic_inserts || b.presume_new || b.presume_dependents_new)
            {
                b = BatchWrite {
                    presume_new: false,
                    presume_dependents_new: false,
                    optimistic_inserts: false,
                    ..b
                };
                continue;
            }
            break Err(e);
        };
        written.with_context(|| {
            format!(
                "target database: writing a batch of {entity} failed and was rolled back \
                 (the next run resumes from the last committed checkpoint)"
            )
        })
    }

    /// The ids whose records a batch clears: its documents' dead letters (`resolved`), their
    /// missing references and pending entries (`clear_refs`), and the pulled documents'
    /// missing references by entity. With [`BatchWrite::known`], only ids that can have a
    /// record, and the records the batch writes are noted first (see [`crate::sink::records`]).
    #[allow(clippy::type_complexity)]
    async fn records_to_clear<'b>(
        &self,
        b: &'b BatchWrite<'_>,
    ) -> Result<(
        Cow<'b, [String]>,
        Cow<'b, [String]>,
        IndexMap<&'b str, Vec<String>>,
    )> {
        let entity_name = b.entity.map(|e| e.name.as_str()).unwrap_or_default();
        let mut pulled: IndexMap<&str, Vec<String>> = IndexMap::new();
        for (entity, id) in b.clear_pulled {
            pulled.entry(entity.as_str()).or_default().push(id.clone());
        }
        let Some(known) = b.known else {
            return Ok((
                Cow::Borrowed(b.resolved),
                Cow::Borrowed(b.clear_refs),
                pulled,
            ));
        };
        for entity in std::iter::once(entity_name).chain(pulled.keys().copied()) {
            if !known.is_loaded(entity) {
                known.load(
                    entity,
                    self.record_ids(entity, crate::sink::records::CAP).await?,
                );
            }
        }
        for (entity, ids) in pulled.iter_mut() {
            *ids = known.may_have(entity, ids);
        }
        let written = b
            .dead
            .iter()
            .map(|d| (entity_name, d.source_id.as_str()))
            .chain(
                b.other_dead
                    .iter()
                    .map(|(e, d)| (e.as_str(), d.source_id.as_str())),
            )
            .chain(
                b.missing
                    .iter()
                    .map(|m| (m.entity.as_str(), m.source_id.as_str())),
            )
            .chain(b.deferred.iter().map(|(id, _)| (entity_name, id.as_str())));
        for (entity, id) in written {
            known.add(entity, id);
        }
        Ok((
            Cow::Owned(known.may_have(entity_name, b.resolved)),
            Cow::Owned(known.may_have(entity_name, b.clear_refs)),
            pulled,
        ))
    }

    async fn write_batch_tx(&self, b: &BatchWrite<'_>) -> Result<BatchOutcome> {
        let now = ms(Utc::now());
        let entity_name = b.entity.map(|e| e.name.as_str()).unwrap_or_default();
        let (resolved, clear_refs, pulled) = self.records_to_clear(b).await?;
        let out = with_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            if let Some(o) = b.order {
                tx.take_turn_lock(o.lock_key()).await?;
                o.locked();
            }
            if b.skip_fk_checks {
                tx.fk_checks(false).await?;
            }
            // Documents that map now clear their old dead letters first.
            tx.delete_source_ids("tidemark_dead_letters", entity_name, &resolved).await?;
            // One multi-row statement per 1,000 dead letters; a key appearing twice keeps its
            // last version (one statement may not upsert the same row twice).
            let dead = last_per_key(b.dead.iter().map(|d| (entity_name, d))
                .chain(b.other_dead.iter().map(|(e, d)| (e.as_str(), d)))
                .map(|(entity, d)| ((entity, d.source_id.as_str()), (entity, d))));
            for chunk in dead.chunks(1000) {
                let mut q = sqlx::QueryBuilder::new(DEAD_LETTER_INSERT);
                q.push_values(chunk, |mut row, (entity, d)| {
                    row.push_bind(*entity).push_bind(d.source_id.as_str()).push_bind(b.run_id)
                        .push_bind(d.error.as_str()).push_bind(d.document.as_str())
                        .push_bind(b.mapping_version).push_bind(now);
                });
                q.push(DEAD_LETTER_CONFLICT);
                q.build().persistent(false).execute(&mut *tx).await.context("recording dead letters")?;
            }
            for table in ["tidemark_missing_refs", "tidemark_pending"] {
                tx.delete_source_ids(table, entity_name, &clear_refs).await?;
            }
            for (entity, ids) in &pulled {
                tx.delete_source_ids("tidemark_missing_refs", entity, ids).await?;
            }
            // As the dead letters: one statement per 1,000, the last record per key kept.
            let missing = last_per_key(b.missing.iter()
                .map(|m| ((m.entity.as_str(), m.source_id.as_str(), m.column.as_str()), m)));
            for chunk in missing.chunks(1000) {
                let mut q = sqlx::QueryBuilder::new(MISSING_REF_INSERT);
                q.push_values(chunk, |mut row, m| {
                    row.push_bind(m.entity.as_str()).push_bind(m.source_id.as_str()).push_bind(m.column.as_str())
                        .push_bind(m.ref_entity.as_str()).push_bind(m.ref_key.as_str())
                        .push_bind(format!("{:?}", m.policy).to_lowercase()).push_bind(b.run_id).push_bind(now);
                });
                q.push(MISSING_REF_CONFLICT);
                q.build().persistent(false).execute(&mut *tx).await.context("recording missing references")?;
            }
            for (id, reason) in b.deferred {
                sqlx::query(PENDING_UPSERT)
                    .bind(entity_name).bind(id).bind(reason).bind(now).bind(b.run_id)
                    .execute(&mut *tx).await?;
            }
            let mut out = BatchOutcome::default();
            let mut trk = Tracker { on: b.provenance || b.dry_run, ..Default::default() };
            let optimistic = b.optimistic_inserts;
            // Pulled references were read absent from the target (`resolve::pull`): with
            // optimistic inserts they are inserted without reading them again (a row that
            // appeared since fails the batch with `PresumedNewConflict`, and it is written
            // again with a read first).
            for r in b.before {
                let rows = Rows {
                    rows: &r.rows, meta: &r.meta, children: &r.children, child_meta: &r.child_meta,
                    presume_new: optimistic, optimistic, ..Default::default()
                };
                let o = write_rows(&mut tx, &r.entity, rows, &mut trk).await?;
                out.pulled_written += o.written + o.child_written;
            }
            if let Some(e) = b.entity {
                let o = write_rows(&mut tx, e, Rows {
                    rows: b.rows, meta: b.row_meta, children: b.children, child_meta: b.child_meta, deletes: b.deletes, soft_deletes: b.soft_deletes,
                    presume_new: b.presume_new, optimistic, skip_fk_checks: b.skip_fk_checks,
                }, &mut trk).await?;
                out = BatchOutcome { pulled_written: out.pulled_written, ..o };
            }
            out.dependents_new = b.after.iter().any(|r| !r.rows.is_empty());
            for r in b.after {
                let rows = Rows {
                    rows: &r.rows, meta: &r.meta, children: &r.children, child_meta: &r.child_meta,
                    presume_new: b.presume_dependents_new, optimistic, ..Default::default()
                };
                let o = write_rows(&mut tx, &r.entity, rows, &mut trk).await?;
                out.pulled_written += o.written + o.child_written;
                out.dependents_new &= o.all_new || r.rows.is_empty();
            }
            if b.provenance && !b.dry_run && !trk.changes.is_empty() {
                let inserted = trk.inserted_by_table();
                let rows: Vec<ProvenanceRow> = trk
                    .changes
                    .iter()
                    .filter(|(_, c)| !c.is_insert())
                    .map(|((table, pk), c)| (table.as_str(), pk.as_str(), c.before.as_deref(), c.after_hash.as_deref(), None))
                    .chain(inserted.iter().map(|(table, list)| (*table, "", None, None, Some(list.as_str()))))
                    .collect();
                tx.insert_provenance(b.run_id, &rows, now).await.context("recording provenance")?;
            }
            // Everything but the checkpoint is sent: commit after the batch before, or not at all.
            if let Some(after) = b.order.and_then(|o| o.after.as_ref()) {
                tx.wait_turn(after).await?;
            }
            let capture = b.checkpoint.filter(|cp| !b.dry_run && !lane_captured(cp));
            if let Some(cp) = b.checkpoint {
                if let Some(cp) = capture {
                    capture_lane_query!(cp).execute(&mut *tx).await?;
                }
                checkpoint_query!(cp).execute(&mut *tx).await?;
            }
            // The connection's buffers keep the size of the largest message they carried (a
            // batch with a megabyte-sized file sends and holds a bind message that large), on
            // every pooled connection, for the life of the process: bounded by the largest
            // document ever written, not by the batch settings. Back to 8 KiB each (sqlx's
            // default) before the connection returns to the pool; regrowing them costs a few
            // reallocations per batch. Full mapping, 20 ms RSS samples, one run each: median
            // 45.7 → 44.6 MB, peak within the spread (BENCHMARKS.md, fifteenth round).
            sqlx::Connection::shrink_buffers(&mut *tx);
            if b.dry_run {
                tx.rollback().await?;
            } else {
                tx.commit().await?;
                if let Some(cp) = capture {
                    mark_lane_captured(cp);
                }
            }
            out
        });
        if !b.dry_run {
            self.analyze_grown(b).await;
        }
        Ok(out)
    }

    /// PostgreSQL plans a batch's key lookups (`… IN (SELECT * FROM UNNEST($1))`) from table
    /// statistics. A table tidemark is filling has none until autovacuum gets to it (a minute
    /// or more), and without them the planner hash-joins the keys against a full scan
    /// instead of probing the index: every batch then costs a scan of a growing child table.
    /// So a table is analyzed when the rows this process has written to it pass 1,000, then
    /// 10,000, 100,000 and so on (ANALYZE samples a bounded number of rows, and does not
    /// block writers). A failed ANALYZE only costs speed: it is logged, never an error.
    async fn analyze_grown(&self, b: &BatchWrite<'_>) {
        let Sink::Postgres(pool) = self else { return };
        let mut sizes: Vec<(&str, u64)> = Vec::new();
        fn add<'e>(
            sizes: &mut Vec<(&'e str, u64)>,
            e: &'e Entity,
            rows: usize,
            children: &[Vec<Vec<Value>>],
        ) {
            sizes.push((e.table.as_str(), rows as u64));
            for (c, rows) in e.children.iter().zip(children) {
                sizes.push((c.table.as_str(), rows.len() as u64));
            }
        }
        if let Some(e) = b.entity {
            add(&mut sizes, e, b.rows.len(), b.children);
        }
        for r in b.before.iter().chain(b.after) {
            add(&mut sizes, &r.entity, r.rows.len(), &r.children);
        }
        let o = pool.connect_options();
        let target = format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or_default()
        );
        let due: Vec<String> = {
            let mut grown = GROWN.lock().unwrap_or_else(|p| p.into_inner());
            sizes
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .filter_map(|(t, n)| {
                    let total = grown.entry(format!("{target} {t}")).or_default();
                    let before = *total;
                    *total += n;
                    let magnitude = |x: u64| if x < 1000 { 0 } else { x.ilog10() };
                    (magnitude(*total) > magnitude(before)).then(|| t.to_owned())
                })
                .collect()
        };
        for t in due {
            let sql = format!("ANALYZE {}", ddl::quote(&t));
            if let Err(e) = sqlx::query(&sql).execute(pool).await {
                warn!(table = %t, "ANALYZE failed (key lookups may be slower until autovacuum runs): {e}");
            }
        }
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
            tx.rollback().await?;
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
            tx.rollback().await?;
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
            tx.rollback().await?;
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

    /// Record the start of a run in the ledger.
    pub async fn start_run(&self, r: &RunRecord) -> Result<()> {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        with_pool!(self, p => sqlx::query(
            "INSERT INTO tidemark_runs (id, kind, dry_run, status, host, pid, started_at_ms, settings_fingerprint, mapping_version) \
             VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, $8)")
            .bind(&r.id).bind(&r.kind).bind(r.dry_run).bind(host).bind(std::process::id() as i64)
            .bind(ms(Utc::now())).bind(&r.settings_fingerprint).bind(&r.mapping_version)
            .execute(p).await.map(|_| ())?);
        Ok(())
    }

    /// Record the end of a run and its JSON report.
    pub async fn finish_run(
        &self,
        id: &str,
        status: &str,
        report: &serde_json::Value,
    ) -> Result<()> {
        with_pool!(self, p => sqlx::query("UPDATE tidemark_runs SET status = $1, finished_at_ms = $2, report = $3 WHERE id = $4")
            .bind(status).bind(ms(Utc::now())).bind(report.to_string()).bind(id)
            .execute(p).await.map(|_| ())?);
        Ok(())
    }

    /// The latest finished run's status, finish time and report per kind.
    pub async fn last_run(
        &self,
        kind: &str,
    ) -> Result<Option<(String, String, Option<i64>, i64, Option<String>)>> {
        Ok(with_pool!(self, p => sqlx::query(
            "SELECT id, status, finished_at_ms, started_at_ms, report FROM tidemark_runs WHERE kind = $1 \
             ORDER BY started_at_ms DESC LIMIT 1")
            .bind(kind).fetch_optional(p).await?
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))))
    }

    pub async fn close(&self) {
        with_pool!(self, p => p.close().await)
    }
}

const DEAD_LETTER_INSERT: &str = "INSERT INTO tidemark_dead_letters \
    (entity, source_id, run_id, error, document, mapping_version, created_at_ms) ";
const DEAD_LETTER_CONFLICT: &str = " ON CONFLICT (entity, source_id) DO UPDATE SET run_id = excluded.run_id, \
    error = excluded.error, document = excluded.document, mapping_version = excluded.mapping_version, \
    created_at_ms = excluded.created_at_ms";

const MISSING_REF_INSERT: &str = "INSERT INTO tidemark_missing_refs \
    (entity, source_id, column_name, ref_entity, ref_key, policy, run_id, seen_at_ms) ";
const MISSING_REF_CONFLICT: &str = " ON CONFLICT (entity, source_id, column_name) DO UPDATE SET ref_entity = excluded.ref_entity, ref_key = excluded.ref_key, \
    policy = excluded.policy, run_id = excluded.run_id, seen_at_ms = excluded.seen_at_ms";

const PENDING_UPSERT: &str = "INSERT INTO tidemark_pending \
    (entity, source_id, reason, attempts, first_seen_ms, last_seen_ms, run_id) VALUES ($1, $2, $3, 1, $4, $4, $5) \
    ON CONFLICT (entity, source_id) DO UPDATE SET reason = excluded.reason, \
    attempts = tidemark_pending.attempts + 1, last_seen_ms = excluded.last_seen_ms, run_id = excluded.run_id";

const CHECKPOINT_UPSERT: &str = "INSERT INTO tidemark_checkpoints \
    (lane, entity, watermark_ms, open_from_ms, open_to_ms, last_ts, last_id, run_id, updated_at_ms) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
    ON CONFLICT (lane) DO UPDATE SET entity = excluded.entity, watermark_ms = excluded.watermark_ms, \
    open_from_ms = excluded.open_from_ms, open_to_ms = excluded.open_to_ms, last_ts = excluded.last_ts, \
    last_id = excluded.last_id, run_id = excluded.run_id, updated_at_ms = excluded.updated_at_ms";

/// Keep a lane's checkpoint as it was before the run first moves it (for rollback).
const LANE_CAPTURE: &str = "INSERT INTO tidemark_run_lanes \
    (run_id, lane, entity, existed, watermark_ms, open_from_ms, open_to_ms, last_ts, last_id, prev_run_id) \
    SELECT CAST($1 AS TEXT), CAST($2 AS TEXT), CAST($3 AS TEXT), c.lane IS NOT NULL, c.watermark_ms, c.open_from_ms, \
    c.open_to_ms, c.last_ts, c.last_id, c.run_id \
    FROM (SELECT 1 AS one) AS o LEFT JOIN tidemark_checkpoints c ON c.lane = $2 WHERE TRUE \
    ON CONFLICT (run_id, lane) DO NOTHING";

macro_rules! capture_lane_query {
    ($cp:expr) => {{
        let cp: &Checkpoint = $cp;
        sqlx::query(LANE_CAPTURE)
            .bind(cp.run_id.clone())
            .bind(cp.lane.clone())
            .bind(cp.entity.clone())
    }};
}
use capture_lane_query;

macro_rules! checkpoint_query {
    ($cp:expr) => {{
        let cp: &Checkpoint = $cp;
        let (lts, lid) = match &cp.last {
            Some(p) => {
                let (a, b) = p.to_json();
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        sqlx::query(CHECKPOINT_UPSERT)
            .bind(cp.lane.clone())
            .bind(cp.entity.clone())
            .bind(cp.state.watermark.map(ms))
            .bind(cp.state.open.map(|w| ms(w.from)))
            .bind(cp.state.open.map(|w| ms(w.to)))
            .bind(lts)
            .bind(lid)
            .bind(cp.run_id.clone())
            .bind(ms(Utc::now()))
    }};
}
use checkpoint_query;

/// `(run, lane)` pairs whose lane capture ([`LANE_CAPTURE`]) this process has committed: the
/// capture keeps a lane's checkpoint as it was before the run first moved it, so once
/// committed, later batches of the run skip the statement (one round-trip per batch).
static CAPTURED: std::sync::Mutex<std::collections::BTreeSet<(String, String)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn lane_captured(cp: &Checkpoint) -> bool {
    let set = CAPTURED.lock().unwrap_or_else(|p| p.into_inner());
    set.contains(&(cp.run_id.clone(), cp.lane.clone()))
}

fn mark_lane_captured(cp: &Checkpoint) {
    let mut set = CAPTURED.lock().unwrap_or_else(|p| p.into_inner());
    if set.len() > 10_000 {
        // A daemon's old runs; forgetting one only costs its lane a repeated capture.
        set.clear();
    }
    set.insert((cp.run_id.clone(), cp.lane.clone()));
}

/// Rows written by this process per target database and table, for [`Sink::analyze_grown`].
static GROWN: std::sync::Mutex<std::collections::BTreeMap<String, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

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
    /// Take this batch's advisory lock, which the batch after it waits on ([`order`];
    /// PostgreSQL only: elsewhere batches are written one after the other).
    async fn take_turn_lock(&mut self, _key: i64) -> Result<()> {
        Ok(())
    }
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
