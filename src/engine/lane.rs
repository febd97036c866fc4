//! One writer per lane. Before `run` touches an entity's nightly lane it takes a lease
//! on it: a row in `tidemark_locks` naming the holder (host, pid, since) with an expiry
//! that a heartbeat task pushes forward. A second process sees the row and waits or
//! exits with [`Failure::LockHeld`]; a crashed holder's row expires (on the same host it
//! is taken over as soon as the holder's pid is gone).
//!
//! The same lease row works on both backends. PostgreSQL advisory locks were weighed and
//! not used: they pin one pooled connection per lane for the whole run, vanish behind a
//! transaction-pooling proxy (PgBouncer), and cannot say who holds them.

use crate::engine::window::fmt_ts;
use crate::exit::Failure;
use crate::sink::with_pool;
use crate::sink::{from_ms, ms, Sink};
use anyhow::Result;
use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

/// Who holds a lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub lane: String,
    pub holder: String,
    pub host: String,
    pub pid: i64,
    pub since: DateTime<Utc>,
    pub expires: DateTime<Utc>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lane {} is held by host {} pid {} since {} (lease expires {})",
            self.lane,
            self.host,
            self.pid,
            fmt_ts(self.since),
            fmt_ts(self.expires)
        )
    }
}

/// This machine's name as stored in lease rows.
pub fn this_host() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether a process of this host is still running (Linux `/proc`; elsewhere assume it is).
pub fn pid_alive(pid: i64) -> bool {
    if cfg!(target_os = "linux") {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Whether a lease of `host`/`pid` belongs to a process of this host that no longer exists.
pub fn holder_is_dead(host: &str, pid: i64) -> bool {
    host == this_host() && pid != std::process::id() as i64 && !pid_alive(pid)
}

/// How to behave when a lane is taken.
#[derive(Debug, Clone, Copy)]
pub struct LockOptions {
    pub lease: Duration,
    /// Wait for the lanes instead of failing with [`Failure::LockHeld`].
    pub wait: bool,
}

/// Leases held on a set of lanes, renewed in the background until released.
pub struct Lease {
    sink: Sink,
    holder: String,
    lanes: Vec<String>,
    /// Set by the heartbeat when a renewal found fewer rows than lanes: someone took a lane over.
    lost: Arc<AtomicBool>,
    heartbeat: JoinHandle<()>,
}

const TAKE: &str = "INSERT INTO tidemark_locks (lane, holder, host, pid, acquired_at_ms, expires_at_ms) \
    VALUES ($1, $2, $3, $4, $5, $6) \
    ON CONFLICT (lane) DO UPDATE SET holder = excluded.holder, host = excluded.host, pid = excluded.pid, \
    acquired_at_ms = excluded.acquired_at_ms, expires_at_ms = excluded.expires_at_ms \
    WHERE tidemark_locks.expires_at_ms < $5";

/// Take every lane in `lanes` (in sorted order) or none of them.
///
/// `stop` ends a wait early; the heartbeat sets it if a lease is lost, so the pipeline
/// stops after its current batch rather than write on a lane it no longer owns.
pub async fn acquire(
    sink: &Sink,
    lanes: &[String],
    opts: LockOptions,
    stop: Arc<AtomicBool>,
) -> Result<Lease> {
    let mut lanes = lanes.to_vec();
    lanes.sort();
    lanes.dedup();
    let holder = uuid::Uuid::new_v4().to_string();
    let poll = (opts.lease / 3).clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut announced = false;
    loop {
        match take_all(sink, &lanes, &holder, opts.lease).await? {
            None => break,
            Some(h) if !opts.wait => {
                return Err(Failure::LockHeld(format!(
                    "{h}; another tidemark process is writing this lane. \
                     Run again later, pass --wait to queue behind it, or if that process is gone wait for its lease to expire (lock.lease)"
                ))
                .into())
            }
            Some(h) => {
                if !announced {
                    info!(lane = %h.lane, host = %h.host, pid = h.pid, since = %fmt_ts(h.since), "lane is held; waiting (--wait)");
                    announced = true;
                }
                if stop.load(Ordering::SeqCst) {
                    anyhow::bail!("stopped by signal while waiting for {h}");
                }
                tokio::time::sleep(poll).await;
            }
        }
    }
    let lost = Arc::new(AtomicBool::new(false));
    let heartbeat = tokio::spawn(heartbeat(
        sink.clone(),
        holder.clone(),
        lanes.len() as u64,
        opts.lease,
        lost.clone(),
        stop,
    ));
    Ok(Lease {
        sink: sink.clone(),
        holder,
        lanes,
        lost,
        heartbeat,
    })
}

/// Try each lane; on the first one held by someone else, give back what was taken.
async fn take_all(
    sink: &Sink,
    lanes: &[String],
    holder: &str,
    lease: Duration,
) -> Result<Option<Holder>> {
    for (i, lane) in lanes.iter().enumerate() {
        if let Some(h) = take(sink, lane, holder, lease).await? {
            for l in &lanes[..i] {
                release_lane(sink, l, holder).await?;
            }
            return Ok(Some(h));
        }
    }
    Ok(None)
}

/// Take one lane; `Some(holder)` if someone else holds a live lease on it.
async fn take(sink: &Sink, lane: &str, holder: &str, lease: Duration) -> Result<Option<Holder>> {
    let now = ms(Utc::now());
    let expires = now + lease.as_millis() as i64;
    let host = this_host();
    let pid = std::process::id() as i64;
    let taken = with_pool!(sink, p => sqlx::query(TAKE)
        .bind(lane).bind(holder).bind(&host).bind(pid).bind(now).bind(expires)
        .execute(p).await?.rows_affected());
    if taken > 0 {
        return Ok(None);
    }
    let Some(h) = current(sink, lane).await? else {
        // Released between our insert and our look: try once more.
        return Box::pin(take(sink, lane, holder, lease)).await;
    };
    if holder_is_dead(&h.host, h.pid) {
        warn!(lane, pid = h.pid, since = %fmt_ts(h.since), "taking over a lane whose holder on this host has exited");
        let stolen = with_pool!(sink, p => sqlx::query(
            "UPDATE tidemark_locks SET holder = $1, pid = $2, acquired_at_ms = $3, expires_at_ms = $4 \
             WHERE lane = $5 AND holder = $6")
            .bind(holder).bind(pid).bind(now).bind(expires).bind(lane).bind(&h.holder)
            .execute(p).await?.rows_affected());
        if stolen > 0 {
            return Ok(None);
        }
        return current(sink, lane).await;
    }
    Ok(Some(h))
}

/// The live holder of a lane, if any.
pub async fn current(sink: &Sink, lane: &str) -> Result<Option<Holder>> {
    let sql = "SELECT holder, host, pid, acquired_at_ms, expires_at_ms FROM tidemark_locks WHERE lane = $1";
    let row: Option<(String, String, i64, i64, i64)> =
        with_pool!(sink, p => sqlx::query_as(sql).bind(lane).fetch_optional(p).await?);
    Ok(row.map(|(holder, host, pid, since, exp)| Holder {
        lane: lane.to_owned(),
        holder,
        host,
        pid,
        since: from_ms(since),
        expires: from_ms(exp),
    }))
}

/// Every lease that has not expired (for `status`).
pub async fn live(sink: &Sink) -> Result<Vec<Holder>> {
    let sql = "SELECT lane, holder, host, pid, acquired_at_ms, expires_at_ms FROM tidemark_locks \
               WHERE expires_at_ms >= $1 ORDER BY lane";
    let rows: Vec<(String, String, String, i64, i64, i64)> =
        with_pool!(sink, p => sqlx::query_as(sql).bind(ms(Utc::now())).fetch_all(p).await?);
    Ok(rows
        .into_iter()
        .map(|(lane, holder, host, pid, since, exp)| Holder {
            lane,
            holder,
            host,
            pid,
            since: from_ms(since),
            expires: from_ms(exp),
        })
        .collect())
}

async fn release_lane(sink: &Sink, lane: &str, holder: &str) -> Result<()> {
    with_pool!(sink, p => sqlx::query("DELETE FROM tidemark_locks WHERE lane = $1 AND holder = $2")
        .bind(lane).bind(holder).execute(p).await?.rows_affected());
    Ok(())
}

async fn heartbeat(
    sink: Sink,
    holder: String,
    lanes: u64,
    lease: Duration,
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let mut valid_until = Utc::now() + lease;
    loop {
        tokio::time::sleep(lease / 3).await;
        let now = Utc::now();
        let expires = ms(now) + lease.as_millis() as i64;
        let renewed: Result<u64> = async {
            Ok(with_pool!(&sink, p => sqlx::query(
                "UPDATE tidemark_locks SET expires_at_ms = $1 WHERE holder = $2")
                .bind(expires).bind(&holder).execute(p).await?.rows_affected()))
        }
        .await;
        match renewed {
            Ok(n) if n == lanes => valid_until = now + lease,
            Ok(n) => {
                error!(renewed = n, lanes, "lease lost: another process took over a lane; stopping after the current batch");
                lost.store(true, Ordering::SeqCst);
                stop.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) if now > valid_until => {
                error!(error = %format!("{e:#}"), "lease expired while the target was unreachable; stopping after the current batch");
                lost.store(true, Ordering::SeqCst);
                stop.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => warn!(error = %format!("{e:#}"), "lease renewal failed; retrying"),
        }
    }
}

impl Lease {
    /// The lanes this lease covers.
    pub fn lanes(&self) -> &[String] {
        &self.lanes
    }

    /// Whether a renewal found that another process took a lane over.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Stop renewing and delete the lease rows (only ours: a taken-over lane is left alone).
    pub async fn release(self) -> Result<()> {
        self.heartbeat.abort();
        with_pool!(&self.sink, p => sqlx::query("DELETE FROM tidemark_locks WHERE holder = $1")
            .bind(&self.holder).execute(p).await?.rows_affected());
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Without `release` (a panic, an early return) the rows simply expire.
        self.heartbeat.abort();
    }
}
