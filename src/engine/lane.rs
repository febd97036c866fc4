//! One writer per lane. Before `run` (or `rollback`) touches an entity's nightly lane it
//! takes the lane's lock, held with the target's own locking (see [`crate::sink::lease`]):
//! a PostgreSQL session advisory lock, or an OS file lock beside a SQLite database. Whether
//! the holder is alive is the lock's own business — the database or the kernel frees it when
//! the holder's session or process ends — so nothing here reads /proc or compares clocks.
//!
//! A second process finds the lane taken and waits (`--wait`) or exits with
//! [`Failure::LockHeld`] naming the holder from its `tidemark_locks` row (host, pid, since).
//! A watchdog checks every `lock.lease / 3` that the holding session still answers; if it
//! was cut, the lanes may already be someone else's and the run stops after its batch.

use crate::engine::window::fmt_ts;
use crate::exit::Failure;
use crate::sink::lease::{self, LaneLocks, LeaseRow};
use crate::sink::Sink;
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

/// This machine's name as stored in lease rows.
pub fn this_host() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// How to behave when a lane is taken.
#[derive(Debug, Clone, Copy)]
pub struct LockOptions {
    /// `lock.lease`: the watchdog checks the lock session every third of it, and the
    /// waiting loop polls at that pace.
    pub lease: Duration,
    /// Wait for the lanes instead of failing with [`Failure::LockHeld`].
    pub wait: bool,
}

/// Lanes held by this process until released (or until it exits).
pub struct Lease {
    sink: Sink,
    /// Shared with the watchdog, which pings the PostgreSQL session through it.
    locks: Arc<LaneLocks>,
    holder: String,
    lanes: Vec<String>,
    /// Set by the watchdog when the lock session stopped answering: the lanes may be free.
    lost: Arc<AtomicBool>,
    watchdog: JoinHandle<()>,
}

/// Why a lane could not be taken: who holds it, as far as its lease row says.
struct Busy {
    lane: String,
    row: Option<LeaseRow>,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.row {
            Some(r) => write!(
                f,
                "lane {} is held by host {} pid {} since {}",
                self.lane,
                r.host,
                r.pid,
                fmt_ts(r.since)
            ),
            None => write!(
                f,
                "lane {} is held by another tidemark process (it has not recorded itself in tidemark_locks yet)",
                self.lane
            ),
        }
    }
}

/// Take every lane in `lanes` (in sorted order) or none of them, under a fresh holder token.
pub async fn acquire(
    sink: &Sink,
    lanes: &[String],
    opts: LockOptions,
    stop: Arc<AtomicBool>,
) -> Result<Lease> {
    let holder = uuid::Uuid::new_v4().to_string();
    acquire_as(sink, lanes, &holder, opts, stop).await
}

/// Take every lane in `lanes` as `holder` (a run id lets `status` tie a run to its lanes).
///
/// `stop` ends a wait early; the watchdog sets it if the lock session is lost, so the
/// pipeline stops after its current batch rather than write on a lane it may no longer own.
pub async fn acquire_as(
    sink: &Sink,
    lanes: &[String],
    holder: &str,
    opts: LockOptions,
    stop: Arc<AtomicBool>,
) -> Result<Lease> {
    let mut lanes = lanes.to_vec();
    lanes.sort();
    lanes.dedup();
    let locks = Arc::new(LaneLocks::open(sink).await?);
    let poll = (opts.lease / 3).clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut announced = false;
    loop {
        let Some(busy) = take_all(sink, &locks, &lanes).await? else {
            break;
        };
        if !opts.wait {
            locks.close().await;
            return Err(Failure::LockHeld(format!(
                "{busy}; another tidemark process is writing this lane. \
                 Run again later or pass --wait to queue behind it (the lane frees itself as soon as that process or its database session ends)"
            ))
            .into());
        }
        if !announced {
            info!(lane = %busy.lane, holder = %busy, "lane is held; waiting (--wait)");
            announced = true;
        }
        if stop.load(Ordering::SeqCst) {
            locks.close().await;
            anyhow::bail!("stopped by signal while waiting: {busy}");
        }
        tokio::time::sleep(poll).await;
    }
    let host = this_host();
    for lane in &lanes {
        if let Some(previous) = lease::record(sink, lane, holder, &host).await? {
            // Its lock was free, so that holder is gone without cleaning up its row.
            info!(lane, previous_holder = %previous, "took a lane whose previous holder ended without releasing it");
        }
    }
    let lost = Arc::new(AtomicBool::new(false));
    let watchdog = tokio::spawn(watchdog(locks.clone(), opts.lease, lost.clone(), stop));
    Ok(Lease {
        sink: sink.clone(),
        locks,
        holder: holder.to_owned(),
        lanes,
        lost,
        watchdog,
    })
}

/// Lock each lane; on the first one held elsewhere, give back what was taken.
async fn take_all(sink: &Sink, locks: &LaneLocks, lanes: &[String]) -> Result<Option<Busy>> {
    for (i, lane) in lanes.iter().enumerate() {
        if !locks.try_lock(lane).await? {
            for l in &lanes[..i] {
                locks.unlock(l).await?;
            }
            let row = lease::row(sink, lane).await?;
            return Ok(Some(Busy {
                lane: lane.clone(),
                row,
            }));
        }
    }
    Ok(None)
}

async fn watchdog(
    locks: Arc<LaneLocks>,
    lease: Duration,
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    loop {
        tokio::time::sleep(lease / 3).await;
        if let Err(e) = locks.check(lease).await {
            error!(error = %format!("{e:#}"), "lane locks lost: another process may take the lanes; stopping after the current batch");
            lost.store(true, Ordering::SeqCst);
            stop.store(true, Ordering::SeqCst);
            return;
        }
    }
}

impl Lease {
    /// The lanes this lease covers.
    pub fn lanes(&self) -> &[String] {
        &self.lanes
    }

    /// The fence the batches of `lane` check just before they commit: on PostgreSQL, the
    /// lane's advisory lock still granted to this process's lock session. A run whose lock
    /// session was cut (a DBA, a proxy, a network partition) writes nothing more, even in
    /// the moments before its watchdog notices. None for a lane this lease does not hold.
    pub fn fence(&self, lane: &str) -> Option<lease::Fence> {
        self.lanes
            .iter()
            .any(|l| l == lane)
            .then(|| self.locks.fence(lane, None))
    }

    /// Whether the watchdog found the lock session gone.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Delete our lease rows, then free the lanes.
    pub async fn release(self) -> Result<()> {
        self.watchdog.abort();
        let mut result = Ok(());
        for lane in &self.lanes {
            if let Err(e) = lease::erase(&self.sink, lane, &self.holder).await {
                result = Err(e);
            }
        }
        self.locks.close().await;
        result
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Without `release` (a panic, an early return) the locks go with `locks`: the
        // PostgreSQL session closes and the lock files are closed.
        self.watchdog.abort();
    }
}

/// A run's own lock (`run:<id>`), taken before its `tidemark_runs` row is written and
/// freed after the row is finished: while it is held the run is alive. A row still
/// `running` whose lock is free belongs to a process that died.
pub struct RunAlive {
    locks: LaneLocks,
    lane: String,
}

/// Take the lock of run `run_id` (call before `Sink::start_run`).
pub async fn run_alive(sink: &Sink, run_id: &str) -> Result<RunAlive> {
    let locks = LaneLocks::open(sink).await?;
    if !locks.try_lock(&lease::run_lane(run_id)).await? {
        anyhow::bail!("run id {run_id} is already held by another process");
    }
    Ok(RunAlive {
        locks,
        lane: lease::run_lane(run_id),
    })
}

impl RunAlive {
    /// Record as `abandoned` every run still marked running whose lock is free (call after
    /// this run's own row is written). Returns their ids.
    pub async fn record_abandoned(&self, sink: &Sink) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for id in lease::running_run_ids(sink).await? {
            let lane = lease::run_lane(&id);
            if !self.locks.try_lock(&lane).await? {
                continue;
            }
            let marked = lease::mark_abandoned(sink, &id).await;
            self.locks.unlock_and_forget(&lane).await?;
            if marked? {
                warn!(run_id = %id, "a run recorded as running has no live process (its run lock is free); recorded it as abandoned");
                done.push(id);
            }
        }
        Ok(done)
    }

    /// Free the run's lock (after its row is finished).
    pub async fn release(self) {
        if let Err(e) = self.locks.unlock_and_forget(&self.lane).await {
            warn!(error = %format!("{e:#}"), "could not free the run lock; it frees when the process exits");
        }
        self.locks.close().await;
    }
}
