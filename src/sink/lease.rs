//! Lane locks held with the target's own locking, and the lease rows that show who holds them.
//!
//! A lane is held by something whose liveness is the holder's own, so no process ever has to
//! guess whether another one is alive (no /proc, no clocks of other hosts):
//! - PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on one dedicated connection
//!   per process, kept open for as long as lanes are held. The server frees it when that
//!   session ends for any reason (exit, crash, kill -9, a cut connection, pg_terminate_backend).
//! - SQLite: a POSIX record lock on `<database>.lanes/<lane>.lock`; the kernel frees it when
//!   the holding process exits, whatever its pid namespace.
//!
//! `tidemark_locks` rows (holder, host, pid, since) are kept beside the locks only to say who
//! holds a lane; they decide nothing. Backfill chunks are lanes too (`backfill:<id>:…`), held
//! the same way; their claim rows are in `tidemark_backfill_chunks` ([`super::chunks`]).
//!
//! A batch written under a lane can carry a [`Fence`]: its transaction checks, just before
//! it commits, that the lock is still granted to this process's lock session (and, for a
//! chunk, that the claim row still names this holder), so a holder that lost its lock
//! writes nothing more.

use super::{from_ms, ms, with_pool, Sink};
use anyhow::{anyhow, Context, Result};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::Mutex;

/// Who holds a lane, as its lease row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub lane: String,
    /// The holder's token (a run id for `run` and `rollback`).
    pub holder: String,
    pub host: String,
    pub pid: i64,
    pub since: DateTime<Utc>,
}

/// The lane locks of this process on one target.
///
/// `held` is a mutex-guarded map because PostgreSQL advisory locks are re-entrant within
/// a session: without it two tasks of this process (two backfill workers) would both
/// "take" the same lane on the shared connection.
pub struct LaneLocks {
    kind: Kind,
    held: Mutex<HashMap<String, Held>>,
    /// PostgreSQL: the backend pid of the lock session, which [`Fence`]s look up in `pg_locks`.
    backend_pid: Option<i32>,
}

/// What a batch's transaction checks just before it commits (see `Sink::write_batch`): that
/// the lane it writes is still this process's. Without it, a holder whose lock session was
/// cut could commit batches until its watchdog noticed, while another process already wrote
/// the same lane.
#[derive(Debug, Clone, Default)]
pub struct Fence {
    /// The lane, for the error message.
    pub lane: String,
    /// PostgreSQL: the lock session's backend pid and the lane's advisory key, which must
    /// still be granted to that session in `pg_locks`. None on SQLite, whose lock files are
    /// held until the process itself exits (and then it writes nothing).
    pub lock: Option<(i32, i64)>,
    /// A backfill chunk whose ledger row must still name this holder. On PostgreSQL the row
    /// is locked (`FOR UPDATE`) until the batch commits, so a new claim of the chunk, which
    /// rewrites the row, waits for this commit and then reads its checkpoint.
    pub claim: Option<ChunkClaim>,
}

/// A backfill chunk's ledger row, by key, and the holder token it must name.
#[derive(Debug, Clone)]
pub struct ChunkClaim {
    pub backfill_id: String,
    pub entity: String,
    pub from_ms: i64,
    pub holder: String,
}

/// A batch found at commit that its lane is no longer this process's: it was rolled back.
#[derive(Debug, thiserror::Error)]
#[error("this process no longer holds lane {lane} ({why}); the batch was rolled back and nothing of it was written")]
pub struct LostLane {
    pub lane: String,
    pub why: &'static str,
}

impl Fence {
    /// The advisory key and pid for `pg_locks`: `(pid, classid, objid)` of a bigint key.
    pub fn pg_lock_parts(&self) -> Option<(i32, i64, i64)> {
        self.lock.map(|(pid, key)| {
            let k = key as u64;
            (pid, (k >> 32) as i64, (k & 0xffff_ffff) as i64)
        })
    }
}

enum Kind {
    /// The dedicated session holding every advisory lock of this process (None once it died).
    Postgres(Mutex<Option<PgConnection>>),
    /// The folder of lock files; None for an in-memory database (private to this process).
    Sqlite(Option<PathBuf>),
}

enum Held {
    Advisory(i64),
    /// Kept only for its lock: dropping it closes the file, which frees the lane.
    File(#[allow(dead_code)] FileLock),
    Memory,
}

/// An open, locked lane file. POSIX record locks belong to the process, not the file
/// handle: a second handle of this process would "take" the lane again and closing it
/// would free the first one's lock. `FILES_HELD` keeps one handle per path per process.
struct FileLock {
    path: PathBuf,
    /// Held open only for its lock; closing it releases the lock.
    _file: std::fs::File,
}

/// Lock files this process holds, across every [`LaneLocks`] (a std mutex: held only
/// for a set lookup, never across an await).
static FILES_HELD: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

impl Drop for FileLock {
    fn drop(&mut self) {
        let mut held = FILES_HELD.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|p| p != &self.path);
    }
}

/// The advisory lock key of a lane: stable across versions, hosts and processes.
pub fn advisory_key(lane: &str) -> i64 {
    let digest = Sha256::digest(format!("tidemark lane\0{lane}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// The lock a run holds for its whole life (see `RunAlive` in `engine/lane.rs`).
pub fn run_lane(run_id: &str) -> String {
    format!("run:{run_id}")
}

/// The database file of a SQLite pool (None for an in-memory database).
pub fn sqlite_path(pool: &sqlx::SqlitePool) -> Option<PathBuf> {
    let opts = pool.connect_options();
    let file = opts.get_filename();
    let name = file.to_string_lossy();
    if name.is_empty() || name == ":memory:" || name.starts_with("file:sqlx-in-memory") {
        return None;
    }
    Some(file.to_path_buf())
}

/// The folder of lane lock files beside a SQLite database: `<database>.lanes`.
pub fn lock_dir(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lanes");
    PathBuf::from(name)
}

/// A lane's lock file name: the lane with unusual characters escaped (hashed if very long).
pub fn lock_file_name(lane: &str) -> String {
    let mut out = String::new();
    for b in lane.bytes() {
        if b.is_ascii_alphanumeric() || b"._:-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > 200 {
        out = hex::encode(Sha256::digest(lane.as_bytes()));
    }
    out + ".lock"
}

impl LaneLocks {
    /// Prepare this process's lane locks on `sink` (on PostgreSQL: open the dedicated session).
    pub async fn open(sink: &Sink) -> Result<Self> {
        let kind = match sink {
            Sink::Postgres(pool) => {
                let opts = pool
                    .connect_options()
                    .as_ref()
                    .clone()
                    .application_name("tidemark lane locks");
                let mut conn = PgConnection::connect_with(&opts)
                    .await
                    .context("opening the connection that holds tidemark's lane locks")?;
                let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                    .fetch_one(&mut conn)
                    .await
                    .context("reading the lock session's backend pid")?;
                (Kind::Postgres(Mutex::new(Some(conn))), Some(pid))
            }
            Sink::Sqlite(pool) => (Kind::Sqlite(sqlite_path(pool).map(|p| lock_dir(&p))), None),
        };
        let (kind, backend_pid) = kind;
        Ok(LaneLocks {
            kind,
            held: Mutex::new(HashMap::new()),
            backend_pid,
        })
    }

    /// The fence of a lane this process holds (see [`Fence`]).
    pub fn fence(&self, lane: &str, claim: Option<ChunkClaim>) -> Fence {
        Fence {
            lane: lane.to_owned(),
            lock: self.backend_pid.map(|pid| (pid, advisory_key(lane))),
            claim,
        }
    }

    /// Take `lane` if nobody (in this process or another) holds it.
    pub async fn try_lock(&self, lane: &str) -> Result<bool> {
        let mut held = self.held.lock().await;
        if held.contains_key(lane) {
            return Ok(false);
        }
        let got = match &self.kind {
            Kind::Postgres(conn) => {
                let key = advisory_key(lane);
                let mut guard = conn.lock().await;
                let c = guard.as_mut().ok_or_else(lost_session)?;
                let ok: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(c)
                    .await
                    .context("taking a lane's advisory lock")?;
                ok.then_some(Held::Advisory(key))
            }
            Kind::Sqlite(None) => Some(Held::Memory),
            Kind::Sqlite(Some(dir)) => lock_file(dir, lane)?.map(Held::File),
        };
        Ok(match got {
            Some(h) => {
                held.insert(lane.to_owned(), h);
                true
            }
            None => false,
        })
    }

    /// Give `lane` back (nothing happens if this process does not hold it).
    pub async fn unlock(&self, lane: &str) -> Result<()> {
        let Some(h) = self.held.lock().await.remove(lane) else {
            return Ok(());
        };
        if let (Held::Advisory(key), Kind::Postgres(conn)) = (h, &self.kind) {
            if let Some(c) = conn.lock().await.as_mut() {
                sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(key)
                    .execute(c)
                    .await?;
            }
        }
        Ok(())
    }

    /// Give `lane` back and delete its lock file (SQLite): for run locks, which nobody
    /// takes again once the run's row is finished.
    pub async fn unlock_and_forget(&self, lane: &str) -> Result<()> {
        if let Kind::Sqlite(Some(dir)) = &self.kind {
            if self.held.lock().await.contains_key(lane) {
                let _ = std::fs::remove_file(dir.join(lock_file_name(lane)));
            }
        }
        self.unlock(lane).await
    }

    /// Whether the locks are still ours: on PostgreSQL, whether the holding session answers
    /// within `limit` (a cut or terminated session has lost every lock it held).
    pub async fn check(&self, limit: Duration) -> Result<()> {
        let Kind::Postgres(conn) = &self.kind else {
            return Ok(());
        };
        let mut guard = conn.lock().await;
        let c = guard.as_mut().ok_or_else(lost_session)?;
        let ping = tokio::time::timeout(limit, sqlx::query("SELECT 1").execute(c)).await;
        match ping {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                *guard = None;
                Err(anyhow!(e).context("the session holding the lane locks ended"))
            }
            Err(_) => Err(anyhow!(
                "the session holding the lane locks did not answer within {limit:?}"
            )),
        }
    }

    /// Close the PostgreSQL session (freeing its locks) and the lock files.
    pub async fn close(&self) {
        self.held.lock().await.clear();
        if let Kind::Postgres(conn) = &self.kind {
            if let Some(c) = conn.lock().await.take() {
                let _ = c.close().await;
            }
        }
    }
}

fn lost_session() -> anyhow::Error {
    anyhow!("the session holding the lane locks was lost; its lanes are free for other processes")
}

/// Open and lock `<dir>/<lane>.lock`; None if another process (or this one) holds it.
fn lock_file(dir: &Path, lane: &str) -> Result<Option<FileLock>> {
    use rustix::fs::{fcntl_lock, FlockOperation};
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the lane lock folder {}", dir.display()))?;
    let path = dir.join(lock_file_name(lane));
    let mut held = FILES_HELD.lock().unwrap_or_else(|e| e.into_inner());
    if held.contains(&path) {
        return Ok(None);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the lane lock file {}", path.display()))?;
    match fcntl_lock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            held.push(path.clone());
            Ok(Some(FileLock { path, _file: file }))
        }
        Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::ACCESS => Ok(None),
        Err(e) => Err(anyhow!(e).context(format!("cannot lock {}", path.display()))),
    }
}

/// Whether some process holds `lane`, asked without taking anything or creating any file
/// (for `status`; run it in a process that holds no lane locks of this target: closing a
/// file releases the POSIX locks its process holds on it).
pub async fn lane_is_held(sink: &Sink, lane: &str) -> Result<bool> {
    match sink {
        Sink::Postgres(p) => {
            let key = advisory_key(lane) as u64;
            let sql = "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                       AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                       AND classid::text::bigint = $1 AND objid::text::bigint = $2 AND objsubid = 1";
            let n: i64 = sqlx::query_scalar(sql)
                .bind((key >> 32) as i64)
                .bind((key & 0xffff_ffff) as i64)
                .fetch_one(p)
                .await?;
            Ok(n > 0)
        }
        Sink::Sqlite(pool) => {
            let Some(db) = sqlite_path(pool) else {
                return Ok(false);
            };
            let path = lock_dir(&db).join(lock_file_name(lane));
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(anyhow!(e).context(format!("cannot read {}", path.display()))),
            };
            let probe = rustix::process::Flock::from(rustix::process::FlockType::WriteLock);
            let blocker = rustix::process::fcntl_getlk(&file, &probe)
                .with_context(|| format!("cannot test the lock on {}", path.display()))?;
            Ok(blocker.is_some())
        }
    }
}

/// Say in `tidemark_locks` that `holder` (this host and pid) holds `lane` from now on.
/// Returns the previous holder's token if its row was still there (it never released).
pub async fn record(sink: &Sink, lane: &str, holder: &str, host: &str) -> Result<Option<String>> {
    let previous = with_pool!(sink, p => sqlx::query_scalar::<_, String>(
        "SELECT holder FROM tidemark_locks WHERE lane = $1").bind(lane).fetch_optional(p).await?);
    let now = ms(Utc::now());
    let sql = "INSERT INTO tidemark_locks (lane, holder, host, pid, acquired_at_ms, expires_at_ms) \
               VALUES ($1, $2, $3, $4, $5, $5) \
               ON CONFLICT (lane) DO UPDATE SET holder = excluded.holder, host = excluded.host, \
               pid = excluded.pid, acquired_at_ms = excluded.acquired_at_ms, expires_at_ms = excluded.expires_at_ms";
    with_pool!(sink, p => sqlx::query(sql).bind(lane).bind(holder).bind(host)
        .bind(std::process::id() as i64).bind(now).execute(p).await?.rows_affected());
    Ok(previous.filter(|h| h != holder))
}

/// Delete `holder`'s row of `lane` (a row another holder has since written is left alone).
pub async fn erase(sink: &Sink, lane: &str, holder: &str) -> Result<()> {
    with_pool!(sink, p => sqlx::query("DELETE FROM tidemark_locks WHERE lane = $1 AND holder = $2")
        .bind(lane).bind(holder).execute(p).await?.rows_affected());
    Ok(())
}

/// The lease row of `lane`, if any (its holder may have died: ask [`lane_is_held`]).
pub async fn row(sink: &Sink, lane: &str) -> Result<Option<LeaseRow>> {
    let sql = "SELECT holder, host, pid, acquired_at_ms FROM tidemark_locks WHERE lane = $1";
    let r: Option<(String, String, i64, i64)> =
        with_pool!(sink, p => sqlx::query_as(sql).bind(lane).fetch_optional(p).await?);
    Ok(r.map(|(holder, host, pid, since)| LeaseRow {
        lane: lane.to_owned(),
        holder,
        host,
        pid,
        since: from_ms(since),
    }))
}

/// Every lease row, by lane.
pub async fn rows(sink: &Sink) -> Result<Vec<LeaseRow>> {
    let sql = "SELECT lane, holder, host, pid, acquired_at_ms FROM tidemark_locks ORDER BY lane";
    let r: Vec<(String, String, String, i64, i64)> =
        with_pool!(sink, p => sqlx::query_as(sql).fetch_all(p).await?);
    Ok(r.into_iter()
        .map(|(lane, holder, host, pid, since)| LeaseRow {
            lane,
            holder,
            host,
            pid,
            since: from_ms(since),
        })
        .collect())
}

/// Ids of the runs recorded as running (their processes may have died since).
pub async fn running_run_ids(sink: &Sink) -> Result<Vec<String>> {
    Ok(with_pool!(sink, p => sqlx::query_scalar::<_, String>(
        "SELECT id FROM tidemark_runs WHERE status = 'running'").fetch_all(p).await?))
}

/// Mark the run `id` abandoned if it is still recorded as running: its process lost its
/// lanes without finishing (it died, or its lock session was cut).
pub async fn mark_abandoned(sink: &Sink, id: &str) -> Result<bool> {
    let sql = "UPDATE tidemark_runs SET status = 'abandoned', finished_at_ms = $1 \
               WHERE id = $2 AND status = 'running'";
    let n = with_pool!(sink, p => sqlx::query(sql).bind(ms(Utc::now())).bind(id).execute(p).await?.rows_affected());
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_file_names_are_stable() {
        assert_eq!(advisory_key("nightly:items"), advisory_key("nightly:items"));
        assert_ne!(advisory_key("nightly:items"), advisory_key("nightly:users"));
        assert_eq!(lock_file_name("nightly:items"), "nightly:items.lock");
        assert_eq!(lock_file_name("a/b c"), "a%2Fb%20c.lock");
        assert_eq!(lock_file_name(&"x".repeat(300)).len(), 64 + 5);
        assert_eq!(
            lock_dir(Path::new("/var/lib/tidemark/t.db")),
            PathBuf::from("/var/lib/tidemark/t.db.lanes")
        );
    }

    #[test]
    fn a_lane_file_is_held_once_per_process() {
        // POSIX locks never conflict within a process; the registry must.
        let dir = tempfile::tempdir().unwrap();
        let first = lock_file(dir.path(), "nightly:x").unwrap();
        assert!(first.is_some());
        assert!(lock_file(dir.path(), "nightly:x").unwrap().is_none());
        drop(first);
        assert!(lock_file(dir.path(), "nightly:x").unwrap().is_some());
    }
}
