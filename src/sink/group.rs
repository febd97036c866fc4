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

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sqlx::sqlite::SqliteConnection;
use sqlx::{Sqlite, TransactionManager};

use super::Sink;

type Manager = <Sqlite as sqlx::Database>::TransactionManager;

/// The group of one run: when its open transaction began.
#[derive(Debug)]
pub struct GroupCommit {
    every: Duration,
    opened: std::sync::Mutex<Option<Instant>>,
}

impl GroupCommit {
    /// Groups that commit once older than `every` (after the batch that finds them so).
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            opened: Default::default(),
        }
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
        if Manager::get_transaction_depth(&conn) == 0 {
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
        Ok(())
    }
}
