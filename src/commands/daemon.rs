//! `tidemark daemon`: the catch-up of `tidemark run` on a cron schedule
//! (tokio-cron-scheduler), for hosts without systemd timers.
//!
//! Flow: the scheduler only *ticks*; one runner task receives ticks and runs catch-ups,
//! so runs never overlap (a tick during a run or its retries is skipped). A failed run is
//! retried with exponential backoff, capped and jittered. SIGTERM/SIGINT set the shared
//! stop flag: the pipeline commits its current batch and checkpoint, the runner returns,
//! and if that takes longer than `daemon.shutdown_grace` the daemon exits anyway (an
//! uncommitted batch is re-read by the next run). SIGHUP re-reads the settings for the
//! next run. Metrics and `/health` are served on `daemon.metrics_listen` (off by default).

use crate::commands::run::RunOptions;
use crate::exit;
use crate::schedule::{listen_addr, upcoming, with_seconds};
use crate::settings::Settings;
use crate::telemetry::metrics;
use anyhow::{anyhow, Context, Result};
use axum::extract::State as AxState;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::{DateTime, Utc};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler};
use tracing::{error, info, warn};

/// How a run ended, as far as scheduling is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Worth retrying soon (source or target down, a transient error).
    Retry(String),
    /// Not worth retrying before the next tick (another process holds the lanes, or the data
    /// has problems that need a person).
    Skip(String),
    /// The stop flag ended the run.
    Stopped,
}

/// Retry policy of the runner.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub initial: Duration,
    pub max: Duration,
}

/// What `/health` reports; shared by the runner, the ticks and the HTTP handlers.
#[derive(Debug, Default)]
pub struct State {
    /// A run or its retries is under way: ticks are skipped. Atomic because the scheduler's
    /// job and the runner check it from different tasks without waiting on each other.
    pub busy: AtomicBool,
    /// A run (not a backoff sleep) is under way.
    pub running: AtomicBool,
    pub failures: AtomicU32,
    /// The daemon has reached its source and target once (at start or by a run): until
    /// then `/health` is not ready.
    pub connected: AtomicBool,
    /// Held only to copy in or out, never across an await.
    pub last_success: Mutex<Option<DateTime<Utc>>>,
    pub last_error: Mutex<Option<String>>,
    pub next_run: Mutex<Option<DateTime<Utc>>>,
}

/// A scheduler tick: queue a run unless one is going. Returns whether a run was queued.
pub fn tick(state: &State, tx: &mpsc::Sender<()>) -> bool {
    if state.busy.load(Ordering::SeqCst) {
        info!("scheduled time reached while the previous run is still going; skipping this tick");
        return false;
    }
    tx.try_send(()).is_ok()
}

async fn stopped(stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Receive ticks and run one catch-up per tick, never two at once, retrying failures
/// with backoff until a run succeeds, is skipped, or the stop flag is set.
pub async fn runner<F, Fut>(
    mut ticks: mpsc::Receiver<()>,
    state: Arc<State>,
    policy: Policy,
    stop: Arc<AtomicBool>,
    mut run: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Outcome>,
{
    loop {
        tokio::select! {
            t = ticks.recv() => if t.is_none() { return },
            _ = stopped(&stop) => return,
        }
        state.busy.store(true, Ordering::SeqCst);
        loop {
            state.running.store(true, Ordering::SeqCst);
            let outcome = run().await;
            state.running.store(false, Ordering::SeqCst);
            match outcome {
                Outcome::Ok => {
                    state.connected.store(true, Ordering::SeqCst);
                    state.failures.store(0, Ordering::SeqCst);
                    *state.last_success.lock().expect("state lock") = Some(Utc::now());
                    *state.last_error.lock().expect("state lock") = None;
                    break;
                }
                Outcome::Skip(msg) => {
                    // Lanes held elsewhere, or dead letters over budget: both were reached.
                    state.connected.store(true, Ordering::SeqCst);
                    warn!(error = %msg, "run did not complete; waiting for the next scheduled time");
                    *state.last_error.lock().expect("state lock") = Some(msg);
                    break;
                }
                Outcome::Stopped => return,
                Outcome::Retry(msg) => {
                    let n = state.failures.fetch_add(1, Ordering::SeqCst) + 1;
                    metrics::set_failures(n);
                    let delay = crate::retry::daemon_runs(policy.initial, policy.max)
                        .delay(n)
                        .unwrap_or(policy.max);
                    error!(error = %msg, failures = n, retry_in_s = delay.as_secs_f64(), "run failed; retrying after a backoff");
                    *state.last_error.lock().expect("state lock") = Some(msg);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {},
                        _ = stopped(&stop) => return,
                    }
                }
            }
        }
        metrics::set_failures(state.failures.load(Ordering::SeqCst));
        state.busy.store(false, Ordering::SeqCst);
    }
}

/// Turn a run's result into a scheduling outcome.
pub fn classify(result: &Result<crate::commands::run::RunReport>, stop: &AtomicBool) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(_) if stop.load(Ordering::SeqCst) => Outcome::Stopped,
        Err(e) => {
            let msg = crate::secret::redact_uri(&format!("{e:#}"));
            match exit::code(e) {
                exit::LOCK_HELD | exit::PARTIAL => Outcome::Skip(msg),
                _ => Outcome::Retry(msg),
            }
        }
    }
}

/// `tidemark daemon`: runs until SIGTERM/SIGINT.
pub async fn daemon(
    config: Option<PathBuf>,
    settings: Settings,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    metrics::install();
    let d = settings.daemon.clone();
    let state = Arc::new(State::default());
    if !d.metrics_listen.is_empty() {
        serve_metrics(listen_addr(&d.metrics_listen)?, state.clone(), stop.clone()).await?;
    }
    metrics::set_failures(0);
    metrics::set_in_progress(false);
    // In the background: a source that is down must not hold up the schedule.
    let (probe_settings, probe_state) = (settings.clone(), state.clone());
    tokio::spawn(async move {
        if probe(&probe_settings).await {
            probe_state.connected.store(true, Ordering::SeqCst);
        }
    });
    let shared = Arc::new(RwLock::new(settings));
    watch_sighup(config, shared.clone());

    let (tx, rx) = mpsc::channel::<()>(1);
    let mut sched = JobScheduler::new()
        .await
        .context("starting the scheduler")?;
    let (job_tx, job_state, expr) = (tx.clone(), state.clone(), d.schedule.clone());
    let job = Job::new_async(with_seconds(&d.schedule).as_str(), move |_id, _l| {
        let (tx, state, expr) = (job_tx.clone(), job_state.clone(), expr.clone());
        Box::pin(async move {
            tick(&state, &tx);
            note_next_run(&state, &expr);
        })
    })
    .map_err(|e| anyhow!("daemon.schedule = {:?}: {e}", d.schedule))?;
    sched.add(job).await.context("scheduling the catch-up")?;
    sched.start().await.context("starting the scheduler")?;
    note_next_run(&state, &d.schedule);
    let next = state
        .next_run
        .lock()
        .expect("state lock")
        .map(crate::engine::window::fmt_ts);
    info!(schedule = %d.schedule, next = next.as_deref().unwrap_or("never"), "daemon started");
    if d.run_on_start {
        tick(&state, &tx);
    }

    let policy = Policy {
        initial: d.backoff_initial,
        max: d.backoff_max,
    };
    let run_stop = stop.clone();
    let run = move || {
        let s = shared.read().expect("settings lock").clone();
        let stop = run_stop.clone();
        async move {
            let retention = s.retention.older_than().ok().flatten();
            let r = crate::commands::run::run(s.clone(), RunOptions::default(), stop.clone()).await;
            if let Ok(report) = &r {
                info!(run_id = %report.run_id, read = report.totals.read, written = report.totals.written, ms = report.elapsed_ms, "scheduled run done");
                if retention.is_some() {
                    prune_after_run(&s, retention).await;
                }
            }
            classify(&r, &stop)
        }
    };
    let grace = d.shutdown_grace;
    let outcome = tokio::select! {
        _ = runner(rx, state, policy, stop.clone(), run) => Ok(()),
        _ = async { stopped(&stop).await; tokio::time::sleep(grace).await } => Err(anyhow!(
            "the current batch did not commit within daemon.shutdown_grace = {grace:?}; exiting anyway. \
             Nothing is lost: the next run re-reads the uncommitted batch from its checkpoint"
        )),
    };
    let _ = sched.shutdown().await;
    if outcome.is_ok() {
        info!("daemon stopped");
    }
    outcome
}

/// `[retention] older_than` after a successful scheduled run. A failed prune is logged and
/// changes nothing about the run's outcome (the next run tries again).
async fn prune_after_run(s: &Settings, older_than: Option<Duration>) {
    match crate::commands::prune::prune(s, older_than, false).await {
        Ok(rep) => info!(
            runs = rep.runs,
            ledger_rows = rep.removed.ledger_rows,
            provenance_records = rep.removed.provenance_records,
            report_files = rep.report_files,
            report_bytes = rep.report_bytes,
            "retention: pruned what finished before the cutoff"
        ),
        Err(e) => {
            warn!(error = %crate::secret::redact_uri(&format!("{e:#}")), "retention: prune failed; the next scheduled run tries again")
        }
    }
}

fn note_next_run(state: &State, expr: &str) {
    let next = upcoming(expr, Utc::now(), 1)
        .ok()
        .and_then(|v| v.into_iter().next());
    *state.next_run.lock().expect("state lock") = next;
    metrics::set_next_run(next);
}

/// Reach the source and the target at start and publish what they hold (watermarks,
/// backlog, outstanding dead letters, every entity's counters at 0), so lag is visible at
/// once. Changes nothing. Returns whether both were reached.
async fn probe(s: &Settings) -> bool {
    let result: Result<()> = async {
        let mapping = crate::commands::setup::load_mapping(s)?;
        let names: Vec<String> = mapping.entities.iter().map(|e| e.name.clone()).collect();
        metrics::entities(&names);
        let sink = crate::sink::Sink::connect(&s.target.url, 1).await?;
        // Read only: the first run (started beside this probe) migrates.
        let migrated = sink.tool_tables_current().await?;
        for cp in if migrated {
            sink.checkpoints().await?
        } else {
            Vec::new()
        } {
            if let (Some(entity), Some(wm)) = (cp.lane.strip_prefix("nightly:"), cp.state.watermark)
            {
                metrics::record_watermark(entity, wm);
            }
        }
        let source = crate::source::Source::connect(&s.source).await;
        let source = match source {
            Ok(src) => src,
            Err(e) => {
                sink.close().await;
                return Err(e);
            }
        };
        if migrated {
            crate::commands::run::observe_outstanding(&sink, &source, &mapping, &names).await;
        }
        sink.close().await;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %crate::secret::redact_uri(&format!("{e:#}")), "could not reach the source and target at start; /health is not ready and metrics fill in after the first successful run");
            false
        }
    }
}

/// SIGHUP: re-read the settings; they apply from the next run. The schedule and the
/// metrics address are fixed at start (a restart applies them).
fn watch_sighup(config: Option<PathBuf>, shared: Arc<RwLock<Settings>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP; restart the daemon to apply new settings");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match Settings::load(config.as_deref()) {
                Ok(new) => {
                    let old = shared.read().expect("settings lock").daemon.clone();
                    if old.schedule != new.daemon.schedule
                        || old.metrics_listen != new.daemon.metrics_listen
                    {
                        warn!("SIGHUP: daemon.schedule and daemon.metrics_listen changes apply only after a restart");
                    }
                    *shared.write().expect("settings lock") = new;
                    info!("SIGHUP: settings reloaded; they apply from the next run");
                }
                Err(e) => {
                    error!(error = %format!("{e:#}"), "SIGHUP: new settings are invalid; keeping the current ones")
                }
            }
        }
    });
}

async fn serve_metrics(addr: SocketAddr, state: Arc<State>, stop: Arc<AtomicBool>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (daemon.metrics_listen); is the port in use?")
    })?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        warn!(addr = %local, "metrics endpoint is reachable from other hosts; it shows entity names and times only");
    }
    info!(addr = %local, "serving /metrics and /health");
    let app = axum::Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health", get(health_handler))
        .with_state(state);
    tokio::spawn(async move {
        let serve =
            axum::serve(listener, app).with_graceful_shutdown(async move { stopped(&stop).await });
        if let Err(e) = serve.await {
            error!(error = %e, "metrics endpoint failed");
        }
    });
    Ok(())
}

async fn metrics_handler() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(Utc::now()),
    )
}

/// 200 `ok` once the source and target were reached and while the last run succeeded;
/// 503 `starting` before the first connection, 503 `failing` after a failed run.
async fn health_handler(AxState(state): AxState<Arc<State>>) -> impl IntoResponse {
    let failures = state.failures.load(Ordering::SeqCst);
    let connected = state.connected.load(Ordering::SeqCst);
    let last_error = state.last_error.lock().expect("state lock").clone();
    let status = if failures > 0 {
        "failing"
    } else if !connected {
        "starting"
    } else {
        "ok"
    };
    let body = serde_json::json!({
        "status": status,
        "connected": connected,
        "run_in_progress": state.running.load(Ordering::SeqCst),
        "consecutive_failures": failures,
        "last_success": state.last_success.lock().expect("state lock").map(crate::engine::window::fmt_ts),
        "last_error": last_error,
        "next_run": state.next_run.lock().expect("state lock").map(crate::engine::window::fmt_ts),
    });
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}
