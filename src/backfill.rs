//! `tidemark backfill`: a range cut into chunks, one checkpoint lane per (entity, chunk),
//! each chunk run by [`pipeline::run_window`]. Never touches the nightly lanes.
//!
//! The plan lives in the target (`tidemark_backfills`, `tidemark_backfill_chunks`), so
//! it survives crashes and can be shared: any number of processes on any hosts claim
//! chunks from the ledger (PostgreSQL: `FOR UPDATE SKIP LOCKED`; SQLite: one
//! `UPDATE … RETURNING`, which its single writer makes atomic). A claimed chunk row is
//! that chunk's lease: holder, host, pid and an expiry the worker's heartbeat renews; an
//! expired claim (or one whose pid is gone on this host) is taken over, and the new
//! holder resumes from the chunk's checkpoint.
//!
//! The backfill id is derived from the range, chunk size and entities, so running the
//! same command again (or on another host) resumes or joins the same backfill.

use crate::app::{self, fingerprint};
use crate::exit::Failure;
use crate::lock::{holder_is_dead, this_host, with_pool};
use crate::pipeline::{self, Counts, Ctx};
use crate::settings::Settings;
use crate::sink::BeginWrite;
use crate::sink::{from_ms, ms, RunRecord, Sink};
use crate::source::Source;
use crate::timearg;
use crate::window::{self, fmt_ts, to_millis, Window};
use anyhow::{anyhow, Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    pub from: Option<String>,
    pub to: Option<String>,
    pub entities: Vec<String>,
    pub chunk: Duration,
    pub parallel: usize,
    /// Resume or join this backfill; the range and entities come from the ledger.
    pub resume: Option<String>,
}

/// A backfill as stored in the ledger.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub id: String,
    pub range: Window,
    pub chunk_ms: i64,
    pub entities: Vec<String>,
}

/// Deterministic id of a backfill: same range, chunk and entities, same id.
pub fn plan_id(range: Window, chunk: Duration, entities: &[String]) -> String {
    let mut names = entities.to_vec();
    names.sort();
    let key = format!(
        "{}|{}|{}|{}",
        ms(range.from),
        ms(range.to),
        chunk.as_millis(),
        names.join(",")
    );
    format!("bf-{}", &hex::encode(Sha256::digest(key.as_bytes()))[..10])
}

/// One claimed chunk.
#[derive(Debug, Clone)]
struct Chunk {
    entity: String,
    window: Window,
    lane: String,
}

/// Counts of chunks by state, and documents read by finished chunks.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Progress {
    pub total: u64,
    pub done: u64,
    pub running: u64,
    pub failed: u64,
    pub docs_read: u64,
}

/// The outcome of this worker's part of a backfill.
#[derive(Debug, Serialize)]
pub struct BackfillReport {
    pub id: String,
    pub plan: Plan,
    /// Chunks this process finished.
    pub chunks_here: u64,
    /// Documents this process read and wrote.
    pub counts: Counts,
    /// The whole backfill, all workers.
    pub progress: Progress,
    pub elapsed_ms: u64,
}

impl std::fmt::Display for BackfillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed_ms as f64 / 1000.0;
        writeln!(
            f,
            "backfill {} {} of {}: {}/{} chunks done",
            self.id,
            self.plan.range,
            self.plan.entities.join(", "),
            self.progress.done,
            self.progress.total
        )?;
        if self.progress.running > 0 {
            writeln!(
                f,
                "{} chunk(s) still running on other workers",
                self.progress.running
            )?;
        }
        write!(
            f,
            "this worker: {} chunks, {} documents read, {} rows written, {} dead-lettered in {:.1}s ({:.0} documents/s)",
            self.chunks_here,
            self.counts.read,
            self.counts.written,
            self.counts.dead_lettered,
            secs,
            self.counts.read as f64 / secs.max(0.001)
        )
    }
}

/// The ledger, seen by one worker process.
struct Ledger {
    sink: Sink,
    id: String,
    /// This process's claim token.
    holder: String,
    host: String,
    pid: i64,
    lease: Duration,
}

const CLAIMABLE: &str =
    "backfill_id = $1 AND (status = 'pending' OR (status = 'running' AND lease_expires_ms < $2))";

impl Ledger {
    async fn create(&self, plan: &Plan) -> Result<()> {
        let now = ms(Utc::now());
        let by = format!("{}:{}", self.host, self.pid);
        let chunks: Vec<(String, Window)> = plan
            .entities
            .iter()
            .flat_map(|e| {
                window::chunks(
                    plan.range.from,
                    plan.range.to,
                    Duration::from_millis(plan.chunk_ms as u64),
                )
                .into_iter()
                .map(move |w| (e.clone(), w))
            })
            .collect();
        with_pool!(&self.sink, p => {
            let mut tx = p.begin_write().await?;
            let created = sqlx::query(
                "INSERT INTO tidemark_backfills (id, from_ms, to_ms, chunk_ms, entities, status, created_by, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, 'running', $6, $7) ON CONFLICT (id) DO NOTHING")
                .bind(&plan.id).bind(ms(plan.range.from)).bind(ms(plan.range.to)).bind(plan.chunk_ms)
                .bind(plan.entities.join(",")).bind(&by).bind(now)
                .execute(&mut *tx).await?.rows_affected();
            if created > 0 {
                for (e, w) in &chunks {
                    sqlx::query(
                        "INSERT INTO tidemark_backfill_chunks (backfill_id, entity, from_ms, to_ms, lane) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING")
                        .bind(&plan.id).bind(e).bind(ms(w.from)).bind(ms(w.to)).bind(lane(&plan.id, e, w))
                        .execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
        });
        Ok(())
    }

    async fn load(sink: &Sink, id: &str) -> Result<Option<Plan>> {
        let sql = "SELECT from_ms, to_ms, chunk_ms, entities FROM tidemark_backfills WHERE id = $1";
        let row: Option<(i64, i64, i64, String)> =
            with_pool!(sink, p => sqlx::query_as(sql).bind(id).fetch_optional(p).await?);
        Ok(row.map(|(f, t, c, e)| Plan {
            id: id.to_owned(),
            range: Window::new(from_ms(f), from_ms(t)),
            chunk_ms: c,
            entities: e.split(',').map(str::to_owned).collect(),
        }))
    }

    /// Failed chunks get another try whenever a worker starts; chunks claimed by a process
    /// of this host that no longer exists are freed at once instead of after their lease.
    async fn prepare(&self) -> Result<()> {
        with_pool!(&self.sink, p => sqlx::query(
            "UPDATE tidemark_backfill_chunks SET status = 'pending' WHERE backfill_id = $1 AND status = 'failed'")
            .bind(&self.id).execute(p).await?.rows_affected());
        let sql = "SELECT DISTINCT holder, pid FROM tidemark_backfill_chunks \
                   WHERE backfill_id = $1 AND status = 'running' AND host = $2";
        let claims: Vec<(String, i64)> = with_pool!(&self.sink, p => sqlx::query_as(sql).bind(&self.id).bind(&self.host).fetch_all(p).await?);
        for (holder, pid) in claims {
            if holder_is_dead(&self.host, pid) {
                warn!(backfill = %self.id, pid, "freeing chunks claimed by a worker of this host that has exited");
                with_pool!(&self.sink, p => sqlx::query(
                    "UPDATE tidemark_backfill_chunks SET status = 'pending', holder = NULL \
                     WHERE backfill_id = $1 AND holder = $2 AND status = 'running'")
                    .bind(&self.id).bind(&holder).execute(p).await?.rows_affected());
            }
        }
        Ok(())
    }

    async fn claim_once(&self) -> Result<Option<Chunk>> {
        let now = ms(Utc::now());
        let lock = match self.sink {
            Sink::Postgres(_) => " FOR UPDATE SKIP LOCKED",
            Sink::Sqlite(_) => "",
        };
        let sql = format!(
            "UPDATE tidemark_backfill_chunks SET status = 'running', holder = $3, host = $4, pid = $5, \
             claimed_at_ms = $2, lease_expires_ms = $6, attempts = attempts + 1, error = NULL \
             WHERE (backfill_id, entity, from_ms) IN (SELECT backfill_id, entity, from_ms \
               FROM tidemark_backfill_chunks WHERE {CLAIMABLE} ORDER BY from_ms, entity LIMIT 1{lock}) \
             RETURNING entity, from_ms, to_ms, lane"
        );
        let row: Option<(String, i64, i64, String)> = with_pool!(&self.sink, p => sqlx::query_as(&sql)
            .bind(&self.id).bind(now).bind(&self.holder).bind(&self.host).bind(self.pid)
            .bind(now + self.lease.as_millis() as i64)
            .fetch_optional(p).await?);
        Ok(row.map(|(entity, f, t, lane)| Chunk {
            entity,
            window: Window::new(from_ms(f), from_ms(t)),
            lane,
        }))
    }

    /// Claim the next chunk; None when nothing is left to claim. `SKIP LOCKED` can come back
    /// empty while another worker's claim commits, so an empty answer is double-checked.
    async fn claim(&self) -> Result<Option<Chunk>> {
        for attempt in 0..20u64 {
            if let Some(c) = self.claim_once().await? {
                return Ok(Some(c));
            }
            let sql = format!("SELECT COUNT(*) FROM tidemark_backfill_chunks WHERE {CLAIMABLE}");
            let left: i64 = with_pool!(&self.sink, p => sqlx::query_scalar(&sql)
                .bind(&self.id).bind(ms(Utc::now())).fetch_one(p).await?);
            if left == 0 {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20 * (attempt + 1))).await;
        }
        Ok(None)
    }

    async fn set_state(
        &self,
        c: &Chunk,
        status: &str,
        counts: &Counts,
        error: Option<&str>,
    ) -> Result<bool> {
        let sql =
            "UPDATE tidemark_backfill_chunks SET status = $1, docs_read = $2, docs_written = $3, \
                   dead_lettered = $4, finished_at_ms = $5, error = $6, lease_expires_ms = NULL, \
                   holder = CASE WHEN $1 = 'pending' THEN NULL ELSE holder END \
                   WHERE backfill_id = $7 AND entity = $8 AND from_ms = $9 AND holder = $10";
        let n = with_pool!(&self.sink, p => sqlx::query(sql)
            .bind(status).bind(counts.read as i64).bind(counts.written as i64).bind(counts.dead_lettered as i64)
            .bind((status == "done").then(|| ms(Utc::now()))).bind(error)
            .bind(&self.id).bind(&c.entity).bind(ms(c.window.from)).bind(&self.holder)
            .execute(p).await?.rows_affected());
        Ok(n > 0)
    }

    async fn heartbeat(&self) -> Result<()> {
        let expires = ms(Utc::now()) + self.lease.as_millis() as i64;
        with_pool!(&self.sink, p => sqlx::query(
            "UPDATE tidemark_backfill_chunks SET lease_expires_ms = $1 \
             WHERE backfill_id = $2 AND holder = $3 AND status = 'running'")
            .bind(expires).bind(&self.id).bind(&self.holder).execute(p).await?.rows_affected());
        Ok(())
    }

    async fn progress(sink: &Sink, id: &str) -> Result<Progress> {
        let sql = "SELECT status, COUNT(*), CAST(COALESCE(SUM(docs_read), 0) AS BIGINT) FROM tidemark_backfill_chunks \
                   WHERE backfill_id = $1 GROUP BY status";
        let rows: Vec<(String, i64, i64)> =
            with_pool!(sink, p => sqlx::query_as(sql).bind(id).fetch_all(p).await?);
        let mut pr = Progress::default();
        for (status, n, docs) in rows {
            pr.total += n as u64;
            match status.as_str() {
                "done" => {
                    pr.done = n as u64;
                    pr.docs_read = docs as u64;
                }
                "running" => pr.running = n as u64,
                "failed" => pr.failed = n as u64,
                _ => {}
            }
        }
        Ok(pr)
    }

    /// Mark the backfill finished once every chunk is done, and drop its chunk checkpoints.
    async fn close_if_complete(&self) -> Result<bool> {
        let pr = Self::progress(&self.sink, &self.id).await?;
        if pr.done < pr.total {
            return Ok(false);
        }
        let pattern = format!("backfill:{}:%", self.id);
        with_pool!(&self.sink, p => {
            let mut tx = p.begin_write().await?;
            sqlx::query("UPDATE tidemark_backfills SET status = 'done', finished_at_ms = $1 WHERE id = $2 AND status <> 'done'")
                .bind(ms(Utc::now())).bind(&self.id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM tidemark_checkpoints WHERE lane LIKE $1")
                .bind(&pattern).execute(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(true)
    }
}

/// An unfinished backfill, for `tidemark status`.
#[derive(Debug, Clone, Serialize)]
pub struct BackfillStatus {
    pub id: String,
    pub range: String,
    pub entities: Vec<String>,
    pub progress: Progress,
    /// `host:pid` of every worker holding a live claim.
    pub workers: Vec<String>,
    pub started_at: String,
}

/// Every backfill that is not finished, with its progress and live workers.
pub async fn unfinished(sink: &Sink) -> Result<Vec<BackfillStatus>> {
    let sql = "SELECT id, created_at_ms FROM tidemark_backfills WHERE status <> 'done' ORDER BY created_at_ms";
    let rows: Vec<(String, i64)> = with_pool!(sink, p => sqlx::query_as(sql).fetch_all(p).await?);
    let mut out = Vec::new();
    for (id, created) in rows {
        let Some(plan) = Ledger::load(sink, &id).await? else {
            continue;
        };
        let sql = "SELECT DISTINCT host, pid FROM tidemark_backfill_chunks \
                   WHERE backfill_id = $1 AND status = 'running' AND lease_expires_ms >= $2 ORDER BY host, pid";
        let workers: Vec<(String, i64)> = with_pool!(sink, p => sqlx::query_as(sql)
            .bind(&id).bind(ms(Utc::now())).fetch_all(p).await?);
        out.push(BackfillStatus {
            progress: Ledger::progress(sink, &id).await?,
            id,
            range: plan.range.to_string(),
            entities: plan.entities,
            workers: workers
                .into_iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect(),
            started_at: fmt_ts(from_ms(created)),
        });
    }
    Ok(out)
}

/// The checkpoint lane of one chunk.
pub fn lane(id: &str, entity: &str, w: &Window) -> String {
    format!("backfill:{id}:{entity}:{}", ms(w.from))
}

/// `tidemark backfill`.
pub async fn backfill(
    mut s: Settings,
    opts: BackfillOptions,
    stop: Arc<AtomicBool>,
) -> Result<BackfillReport> {
    let started = Instant::now();
    if opts.parallel == 0 {
        return Err(Failure::Config(anyhow!("--parallel must be at least 1")).into());
    }
    let mapping = app::load_mapping(&s)?;
    let source = Source::connect(&s.source)
        .await
        .map_err(Failure::Unavailable)?;
    // Each chunk's window holds a connection per batch in flight and one to resolve.
    s.target.max_connections = s
        .target
        .max_connections
        .max(opts.parallel as u32 * (s.target.batches_in_flight + 1) + 2);
    let sink = app::open_sink(&s, &mapping).await?;
    let mut ledger = Ledger {
        sink: sink.clone(),
        id: String::new(),
        holder: uuid::Uuid::new_v4().to_string(),
        host: this_host(),
        pid: std::process::id() as i64,
        lease: s.lock.lease,
    };
    let plan = match &opts.resume {
        Some(id) => Ledger::load(&sink, id).await?.ok_or_else(|| {
            Failure::Config(anyhow!(
                "there is no backfill {id} in the target; `tidemark status` lists backfills"
            ))
        })?,
        None => {
            let plan = new_plan(&s, &opts, &mapping, &source).await?;
            ledger.id = plan.id.clone();
            ledger.create(&plan).await?;
            plan
        }
    };
    ledger.id = plan.id.clone();
    for n in &plan.entities {
        mapping.entity(n).map_err(Failure::Config)?;
    }
    ledger.prepare().await?;
    let run_id = uuid::Uuid::new_v4().to_string();
    sink.start_run(&RunRecord {
        id: run_id.clone(),
        kind: "backfill".into(),
        dry_run: false,
        settings_fingerprint: fingerprint(&s),
        mapping_version: mapping.version.clone(),
    })
    .await?;
    let before = Ledger::progress(&sink, &plan.id).await?;
    info!(backfill = %plan.id, range = %plan.range, entities = %plan.entities.join(","),
          chunks = before.total, done = before.done, parallel = opts.parallel, "backfill started");
    let total_docs = count_docs(&source, &mapping, &plan).await.unwrap_or(0);
    let ctx = Arc::new(Ctx::new(
        s,
        mapping,
        source,
        sink.clone(),
        run_id.clone(),
        stop.clone(),
    ));
    let ledger = Arc::new(ledger);
    let done = Arc::new(AtomicBool::new(false));
    let beat = tokio::spawn(heartbeat(ledger.clone(), done.clone()));
    let shown = tokio::spawn(show_progress(
        sink.clone(),
        plan.id.clone(),
        total_docs,
        before,
        done.clone(),
    ));

    let tally = Arc::new(Mutex::new((0u64, Counts::default())));
    let abort = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..opts.parallel {
        set.spawn(worker(
            ctx.clone(),
            ledger.clone(),
            abort.clone(),
            tally.clone(),
        ));
    }
    let mut result: Result<()> = Ok(());
    while let Some(r) = set.join_next().await {
        let r = r
            .map_err(|e| anyhow!("backfill worker task failed: {e}"))
            .and_then(|r| r);
        if let (Err(e), true) = (r, result.is_ok()) {
            result = Err(e);
        }
    }
    done.store(true, Ordering::SeqCst);
    beat.abort();
    let _ = shown.await;
    let complete = ledger.close_if_complete().await?;
    let progress = Ledger::progress(&sink, &plan.id).await?;
    let (chunks_here, counts) = *tally.lock().expect("tally lock");
    let report = BackfillReport {
        id: plan.id.clone(),
        plan,
        chunks_here,
        counts,
        progress,
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    let (status, mut json) = match &result {
        Ok(()) => ("ok", serde_json::to_value(&report)?),
        Err(e) => (
            if crate::exit::code(e) == crate::exit::PARTIAL {
                "partial"
            } else {
                "failed"
            },
            serde_json::to_value(&report)?,
        ),
    };
    if let Err(e) = &result {
        json["error"] = serde_json::Value::String(crate::secret::redact_uri(&format!("{e:#}")));
    }
    crate::reports::finish(&sink, &ctx.settings.reports_path(), &run_id, status, &json).await?;
    sink.close().await;
    if complete {
        info!(backfill = %report.id, "backfill complete");
    }
    result
        .with_context(|| {
            format!(
                "backfill {} stopped; resume it with: tidemark backfill --resume {}",
                report.id, report.id
            )
        })
        .map(|_| report)
}

async fn new_plan(
    s: &Settings,
    opts: &BackfillOptions,
    mapping: &crate::mapping::Mapping,
    source: &Source,
) -> Result<Plan> {
    let config = |m: String| -> anyhow::Error { Failure::Config(anyhow!(m)).into() };
    let (Some(from), Some(to)) = (&opts.from, &opts.to) else {
        return Err(config(
            "give the range with --from and --to, or --resume ID to continue a backfill".into(),
        ));
    };
    let (f, t) = timearg::parse_range(from, to, Utc::now()).map_err(Failure::Config)?;
    let (f, t) = (to_millis(f), to_millis(t));
    if opts.chunk.as_millis() == 0 {
        return Err(config("--chunk must be longer than 0s, e.g. 1d".into()));
    }
    let mut entities = if !opts.entities.is_empty() {
        opts.entities.clone()
    } else if !s.sync.entities.is_empty() {
        s.sync.entities.clone()
    } else {
        mapping
            .entities
            .iter()
            .filter(|e| e.windowed)
            .map(|e| e.name.clone())
            .collect()
    };
    entities.sort();
    entities.dedup();
    for n in &entities {
        mapping.entity(n).map_err(Failure::Config)?;
    }
    let settled =
        to_millis(source.server_time().await? - chrono::TimeDelta::from_std(s.sync.settle)?);
    if f >= settled {
        return Err(config(format!(
            "--from {from} is after the source clock minus sync.settle ({}); nothing can be backfilled yet",
            fmt_ts(settled)
        )));
    }
    let id = plan_id(Window::new(f, t), opts.chunk, &entities);
    let t_eff: DateTime<Utc> = t.min(settled);
    if t_eff < t {
        warn!(to = %fmt_ts(t), until = %fmt_ts(t_eff), "--to is past the source clock minus sync.settle; the backfill stops there and the nightly run covers the rest");
    }
    Ok(Plan {
        id,
        range: Window::new(f, t_eff),
        chunk_ms: opts.chunk.as_millis() as i64,
        entities,
    })
}

/// Documents in the range, counted with the `(time, _id)` index: the progress bar's length.
async fn count_docs(
    source: &Source,
    mapping: &crate::mapping::Mapping,
    plan: &Plan,
) -> Result<u64> {
    let mut total = 0;
    for n in &plan.entities {
        let e = mapping.entity(n)?;
        let filter = crate::source::window_filter(
            &e.filter,
            &e.time_field,
            e.time_encoding,
            &plan.range,
            None,
        );
        total += source
            .db
            .collection::<bson::Document>(&e.collection)
            .count_documents(filter)
            .await?;
    }
    Ok(total)
}

async fn worker(
    ctx: Arc<Ctx>,
    ledger: Arc<Ledger>,
    abort: Arc<AtomicBool>,
    tally: Arc<Mutex<(u64, Counts)>>,
) -> Result<()> {
    loop {
        if ctx.stop.load(Ordering::SeqCst) || abort.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(chunk) = ledger.claim().await? else {
            return Ok(());
        };
        match run_chunk(&ctx, &chunk).await {
            Ok(c) => {
                if !ledger.set_state(&chunk, "done", &c, None).await? {
                    warn!(lane = %chunk.lane, "chunk was taken over by another worker after this one's lease expired; both wrote the same rows");
                }
                let mut t = tally.lock().expect("tally lock");
                t.0 += 1;
                t.1.add(&c);
            }
            Err(e) if ctx.stop.load(Ordering::SeqCst) => {
                ledger
                    .set_state(&chunk, "pending", &Counts::default(), None)
                    .await?;
                return Err(e);
            }
            Err(e) => {
                abort.store(true, Ordering::SeqCst);
                let msg = crate::secret::redact_uri(&format!("{e:#}"));
                ledger
                    .set_state(&chunk, "failed", &Counts::default(), Some(&msg))
                    .await?;
                return Err(e.context(format!("chunk {} of {}", chunk.window, chunk.entity)));
            }
        }
    }
}

/// Run one chunk from its checkpoint (a chunk whose checkpoint is already complete was
/// finished by a worker that died before updating the ledger).
async fn run_chunk(ctx: &Arc<Ctx>, c: &Chunk) -> Result<Counts> {
    let e = ctx.mapping.entity(&c.entity)?.clone();
    let cp = ctx.sink.load_checkpoint(&c.lane).await?;
    if let Some(cp) = &cp {
        if cp.state.open.is_none() && cp.state.watermark.is_some_and(|w| w >= c.window.to) {
            return Ok(Counts::default());
        }
    }
    let after = cp
        .filter(|cp| cp.state.open == Some(c.window))
        .and_then(|cp| cp.last);
    let outstanding = ctx.sink.has_outstanding(&e.name).await?;
    let r = pipeline::run_window(ctx, &e, &c.lane, None, c.window, after, outstanding).await?;
    Ok(r.counts)
}

async fn heartbeat(ledger: Arc<Ledger>, done: Arc<AtomicBool>) {
    while !done.load(Ordering::SeqCst) {
        tokio::time::sleep(ledger.lease / 3).await;
        if let Err(e) = ledger.heartbeat().await {
            warn!(error = %format!("{e:#}"), "backfill lease renewal failed; retrying");
        }
    }
}

/// A progress bar on a terminal, a log line every 10 s otherwise. Progress is read from
/// the ledger, so every worker shows the whole backfill.
async fn show_progress(
    sink: Sink,
    id: String,
    total_docs: u64,
    start: Progress,
    done: Arc<AtomicBool>,
) {
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let b = indicatif::ProgressBar::new(total_docs.max(start.docs_read));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{wide_bar}] {human_pos}/{human_len} docs  {per_sec}  ETA {eta}  {msg}",
            )
            .expect("valid template"),
        );
        b.set_position(start.docs_read);
        b.reset_eta();
        crate::progress::set_active(Some(b.clone()));
        b
    });
    let started = Instant::now();
    let every = if terminal {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(10)
    };
    let mut last = Instant::now();
    loop {
        let finished = done.load(Ordering::SeqCst);
        if finished || last.elapsed() >= every {
            last = Instant::now();
            if let Ok(p) = Ledger::progress(&sink, &id).await {
                let docs = p.docs_read;
                match &bar {
                    Some(b) => {
                        b.set_length(total_docs.max(docs));
                        b.set_position(docs);
                        b.set_message(format!("chunks {}/{}", p.done, p.total));
                    }
                    None => {
                        let secs = started.elapsed().as_secs_f64().max(0.001);
                        let rate = docs.saturating_sub(start.docs_read) as f64 / secs;
                        let left = total_docs.saturating_sub(docs);
                        let eta = (rate > 0.0).then(|| (left as f64 / rate).round() as u64);
                        info!(backfill = %id, chunks_done = p.done, chunks_total = p.total, chunks_running = p.running,
                              docs, docs_total = total_docs, docs_per_s = rate.round() as u64, eta_s = eta.map_or(-1, |e| e as i64), "backfill progress");
                    }
                }
            }
        }
        if finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(b) = bar {
        b.finish();
        crate::progress::set_active(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn same_request_same_id() {
        let w = Window::new(
            Utc.with_ymd_and_hms(2019, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(2019, 7, 1, 0, 0, 0).unwrap(),
        );
        let day = Duration::from_secs(86_400);
        let a = plan_id(w, day, &["users".into(), "vizzes".into()]);
        assert_eq!(a, plan_id(w, day, &["vizzes".into(), "users".into()]));
        assert_ne!(a, plan_id(w, day * 2, &["users".into(), "vizzes".into()]));
        assert!(a.starts_with("bf-") && a.len() == 13, "{a}");
    }
}
