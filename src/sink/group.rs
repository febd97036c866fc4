//! Group commits on SQLite: the batches a run writes on its one connection share a
//! transaction for up to `target.sqlite_group_commit_ms` (5 s by default; 0 = a commit per
//! batch), each batch in a savepoint of it.
//!
//! Why: SQLite writes every page a transaction dirtied to the WAL when it commits, and the
//! checkpoint copies it again. Rows with random keys (the source's ids) dirty about one page
//! per row and index once the indexes outgrow what one commit touches, so with a commit per
//! batch the full VizHub mapping at 200,000 vizzes wrote ~30 GB for a 1.4 GB database, and
//! 10× the data cost 16–24× the time of 20,000. Batches that commit together share their
//! pages while the page cache holds them (BENCHMARKS.md, "Session 20", "Session 21": with
//! the 512 MiB cache, 200,000 vizzes took 1:53 instead of 2:57).
//!
//! What stays true: a batch's rows and its checkpoint are in the same transaction as ever,
//! so whatever a crash undoes, the checkpoint goes back with it and the next run reads those
//! documents again. A batch that fails rolls back to its savepoint (the batches before it in
//! the group stay); a group that fails to commit is rolled back whole and the error ends the
//! run (the run stops at its first error, `commands::run`), so nothing this process believes
//! written is built upon. While a group is open, another process writing the same file waits
//! (SQLite's busy timeout, 30 s): a group commits after the batch that finds it older than
//! the interval or finds SQLite's cache spilled, when a window ends, after each entity and
//! before the sink closes.
//!
//! SQLite only, and only on a pool of one connection (`tidemark run` and the daemon): with
//! several connections (a backfill's chunks) each batch keeps its own transaction.
//!
//! **Snapshot reads.** The resolver asks the target which referenced keys it holds
//! (`existing_keys`) while the previous batch is written. On the one connection those reads
//! waited behind the writes, and SQLite's one writing thread was the whole run's critical
//! path at 200,000 vizzes (BENCHMARKS.md, "Session 24"). A group therefore opens a second,
//! read-only connection ([`GroupCommit::with_reader`]) that answers them in parallel. It sees
//! what the last group commit left, not the open group, so:
//! - a key the open group (or a batch resolved ahead of it) wrote or deleted is answered by
//!   the run's memo, which keeps every key of a batch not yet committed
//!   ([`GroupCommit::reader_has_seen`], `engine::memo::Memo::bound`);
//! - from the resolution of a batch that deletes rows until the group holding it commits,
//!   lookups go to the writing connection as before ([`GroupCommit::deletes_in`]): an
//!   `ON DELETE` action reaches rows by reference, which no memo lists, and a row reported
//!   present after it was deleted would be referenced by a row written after it;
//! - a key the reader reports absent though the open group wrote it (a row a missing-reference
//!   policy had the memo forget) is pulled again; the writer reads such a row before writing
//!   it (SQLite inserts nothing presumed new) and finds it unchanged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqlitePoolOptions};
use sqlx::{Sqlite, TransactionManager};

use super::Sink;

type Manager = <Sqlite as sqlx::Database>::TransactionManager;

/// The group of one run: when its open transaction began, and its snapshot reader.
#[derive(Debug)]
pub struct GroupCommit {
    every: Duration,
    opened: std::sync::Mutex<Option<Instant>>,
    /// The read-only connection for key lookups, once [`GroupCommit::with_reader`] opened it.
    reader: Option<SqlitePool>,
    /// Batches by their resolution's number: the last one written (in its savepoint), the
    /// last one committed, the last one that deletes rows.
    written: AtomicU64,
    committed: AtomicU64,
    deletes: AtomicU64,
}

impl GroupCommit {
    /// Groups that commit once older than `every` (after the batch that finds them so).
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            opened: Default::default(),
            reader: None,
            written: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
        }
    }

    /// Open the snapshot reader on `sink`'s file, whose writing connection has `writer`'s
    /// tuning. Its page cache is a quarter of the writer's, at most 64 MiB (SQLite's own 2 MB
    /// when the writer has that): a reader's cache is emptied whenever the writer commits, so
    /// a small one does. If it cannot be opened, the lookups stay on the writing connection
    /// (slower, nothing else changes) and a warning says why.
    pub async fn with_reader(mut self, sink: &Sink, writer: super::SqliteTuning) -> Self {
        let Sink::Sqlite(p) = sink else {
            return self;
        };
        let cache_mib = match writer.cache_mib {
            0 => 0,
            c => (c / 4).clamp(1, 64),
        };
        let mut opts = (*p.connect_options()).clone().read_only(true);
        if cache_mib > 0 {
            opts = opts.pragma("cache_size", format!("-{}", u64::from(cache_mib) * 1024));
        }
        match SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(600))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await
        {
            Ok(reader) => self.reader = Some(reader),
            Err(e) => tracing::warn!(
                error = %e,
                "could not open a read-only SQLite connection for the run's key lookups; they wait behind the writes"
            ),
        }
        self
    }

    /// Close the snapshot reader (before the run's last checkpoint of the WAL).
    pub async fn close_reader(&self) {
        if let Some(r) = &self.reader {
            r.close().await;
        }
    }

    /// Batch `batch` (a resolution's number) deletes rows: lookups go to the writing
    /// connection until it has committed.
    pub fn deletes_in(&self, batch: u64) {
        self.deletes.fetch_max(batch, Ordering::SeqCst);
    }

    /// Batch `batch` is written in the open group (committed with it).
    pub fn written(&self, batch: u64) {
        self.written.fetch_max(batch, Ordering::SeqCst);
    }

    /// With a snapshot reader: the last batch it sees committed (the memo keeps the keys
    /// of the later ones). None without one.
    pub fn reader_has_seen(&self) -> Option<u64> {
        self.reader
            .as_ref()
            .map(|_| self.committed.load(Ordering::SeqCst))
    }

    /// The reader, when it may answer a lookup now: no batch that deletes rows waits for
    /// its commit.
    fn reader_for_lookups(&self) -> Option<&SqlitePool> {
        let r = self.reader.as_ref()?;
        (self.committed.load(Ordering::SeqCst) >= self.deletes.load(Ordering::SeqCst)).then_some(r)
    }

    fn opened(&self) -> Option<Instant> {
        *self.opened.lock().expect("group clock")
    }

    fn set_opened(&self, at: Option<Instant>) {
        *self.opened.lock().expect("group clock") = at;
    }
}

/// Pages SQLite wrote to the WAL before a commit because its cache was full of dirty pages
/// (`SQLITE_DBSTATUS_CACHE_SPILL`), since the last call (which starts the count again).
async fn spilled_pages(conn: &mut SqliteConnection) -> Result<i32> {
    let mut handle = conn.lock_handle().await?;
    let (mut cur, mut high) = (0, 0);
    // SAFETY: as in `sqlite_in_transaction`; the two out-pointers are live locals.
    let rc = unsafe {
        libsqlite3_sys::sqlite3_db_status(
            handle.as_raw_handle().as_ptr(),
            libsqlite3_sys::SQLITE_DBSTATUS_CACHE_SPILL,
            &mut cur,
            &mut high,
            1,
        )
    };
    if rc != libsqlite3_sys::SQLITE_OK {
        bail!("sqlite3_db_status(CACHE_SPILL) failed with code {rc}");
    }
    Ok(cur)
}

/// Whether SQLite itself has a transaction open on `conn` (not only sqlx's count of them):
/// a transaction SQLite rolled back on its own (an I/O error, a full disk) is seen here.
async fn sqlite_in_transaction(conn: &mut SqliteConnection) -> Result<bool> {
    let mut handle = conn.lock_handle().await?;
    // SAFETY: the handle is the connection's live `sqlite3*`, locked for this call;
    // sqlite3_get_autocommit only reads its state. sqlx keeps its own equivalent private.
    let autocommit =
        unsafe { libsqlite3_sys::sqlite3_get_autocommit(handle.as_raw_handle().as_ptr()) };
    Ok(autocommit == 0)
}

impl Sink {
    /// Before a batch: open the group's transaction unless it is open. An open group that
    /// is gone from the connection (closed, or rolled back by SQLite) is an error: batches
    /// this run counted as written were lost with it, so the run must stop.
    pub async fn begin_group(&self, g: &GroupCommit) -> Result<()> {
        let Sink::Sqlite(p) = self else { return Ok(()) };
        let mut conn = p.acquire().await?;
        let depth = Manager::get_transaction_depth(&conn);
        let live = sqlite_in_transaction(&mut conn).await?;
        match (g.opened(), depth, live) {
            (Some(_), 1, true) => Ok(()),
            (None, 0, false) => {
                spilled_pages(&mut conn).await?;
                Manager::begin(&mut conn, Some("BEGIN IMMEDIATE".into()))
                    .await
                    .context("opening a group of batches")?;
                g.set_opened(Some(Instant::now()));
                Ok(())
            }
            (opened, depth, live) => {
                // Leave nothing half open behind the error.
                if depth > 0 {
                    conn.close_on_drop();
                }
                g.set_opened(None);
                bail!(
                    "the SQLite transaction that groups this run's batches is not as the run left it \
                     (group open: {}, transactions on the connection: {depth}, SQLite in a transaction: {live}); \
                     the batches since its last commit are not in the target. The run stops here; the \
                     next run reads them again from the last saved checkpoint",
                    opened.is_some()
                )
            }
        }
    }

    /// After a batch: commit the group once it is older than its interval, or as soon as
    /// SQLite's page cache could not hold its dirty pages (it spilled some to the WAL: the
    /// next batches would read them back, and pages shared no more than with a commit).
    pub async fn end_batch_in_group(&self, g: &GroupCommit) -> Result<()> {
        let (Sink::Sqlite(p), Some(at)) = (self, g.opened()) else {
            return Ok(());
        };
        let due = at.elapsed() >= g.every || spilled_pages(&mut *p.acquire().await?).await? > 0;
        if due {
            self.commit_group(Some(g)).await?;
        }
        Ok(())
    }

    /// Commit the open group now, if one is open (a no-op on PostgreSQL and without one).
    /// A commit that fails rolls the whole group back and is returned: the caller stops.
    pub async fn commit_group(&self, g: Option<&GroupCommit>) -> Result<()> {
        let Sink::Sqlite(p) = self else { return Ok(()) };
        if let Some(g) = g {
            g.set_opened(None);
        }
        // A group lives on an open connection: none open (or the pool closed), none to commit.
        if p.is_closed() || p.size() == 0 {
            return Ok(());
        }
        let mut conn = p.acquire().await?;
        // Read before the commit: a batch written after it is not in this group.
        let written = g.map(|g| g.written.load(Ordering::SeqCst));
        let seen = |g: Option<&GroupCommit>| {
            if let (Some(g), Some(w)) = (g, written) {
                g.committed.fetch_max(w, Ordering::SeqCst);
            }
        };
        if Manager::get_transaction_depth(&conn) == 0 {
            seen(g);
            return Ok(());
        }
        if let Err(e) = Manager::commit(&mut conn).await {
            // COMMIT can fail with the transaction still open (a deferred foreign key
            // violated): undo it all; if even that fails, the connection goes.
            if Manager::rollback(&mut conn).await.is_err() {
                conn.close_on_drop();
            }
            return Err(anyhow::Error::new(e).context(
                "committing a group of batches (rolled back whole: the next run reads them again \
                 from the last saved checkpoint)",
            ));
        }
        seen(g);
        Ok(())
    }

    /// Which of `keys` exist in column `col` of `t`, for the resolution of a run's batch:
    /// on the group's snapshot reader when it may answer, else as [`Sink::existing_keys`].
    pub async fn existing_keys_in_run(
        &self,
        g: Option<&GroupCommit>,
        t: super::TableRef<'_>,
        col: usize,
        keys: &[crate::mapping::Value],
    ) -> Result<std::collections::HashSet<String>> {
        match g.and_then(GroupCommit::reader_for_lookups) {
            Some(r) => Sink::Sqlite(r.clone()).existing_keys(t, col, keys).await,
            None => self.existing_keys(t, col, keys).await,
        }
    }
}
