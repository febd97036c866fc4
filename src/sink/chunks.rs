//! The backfill ledger (`tidemark_backfills`, `tidemark_backfill_chunks`): a backfill's plan,
//! its chunks, and each chunk's claim (holder, host, pid, lease), shared by every worker of
//! every host. `tidemark backfill` (src/commands/backfill.rs) drives it.

use crate::sink::{from_ms, ms, with_pool, BeginWrite, Sink};
use crate::span::{fmt_ts, ChunkBy, Window};
use anyhow::Result;
use chrono::Utc;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tracing::warn;

/// A backfill as stored in the ledger.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub id: String,
    pub range: Window,
    /// Chunk length; 0 when the chunks were cut by document count.
    pub chunk_ms: i64,
    pub entities: Vec<String>,
    /// Every chunk of a new plan, per entity (empty for a plan read back from the ledger,
    /// whose chunks are rows there).
    #[serde(skip)]
    pub chunks: Vec<(String, Window)>,
    /// Documents counted while planning a new plan by document count.
    #[serde(skip)]
    pub docs: Option<u64>,
}

/// Deterministic id of a backfill: same range, chunk setting and entities, same id.
pub fn plan_id(range: Window, chunk: ChunkBy, entities: &[String]) -> String {
    let mut names = entities.to_vec();
    names.sort();
    let key = format!(
        "{}|{}|{}|{}",
        ms(range.from),
        ms(range.to),
        chunk.id_key(),
        names.join(",")
    );
    format!("bf-{}", &hex::encode(Sha256::digest(key.as_bytes()))[..10])
}

/// One claimed chunk.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub entity: String,
    pub window: Window,
    pub lane: String,
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

/// What a chunk read and wrote, as the ledger records it.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChunkCounts {
    pub read: u64,
    pub written: u64,
    pub dead_lettered: u64,
}

/// The ledger, seen by one worker process.
pub struct Ledger {
    pub sink: Sink,
    pub id: String,
    /// This process's claim token.
    pub holder: String,
    pub host: String,
    pub pid: i64,
    pub lease: Duration,
}

const CLAIMABLE: &str =
    "backfill_id = $1 AND (status = 'pending' OR (status = 'running' AND lease_expires_ms < $2))";

impl Ledger {
    pub async fn create(&self, plan: &Plan) -> Result<()> {
        let now = ms(Utc::now());
        let by = format!("{}:{}", self.host, self.pid);
        let chunks = &plan.chunks;
        with_pool!(&self.sink, p => {
            let mut tx = p.begin_write().await?;
            let created = sqlx::query(
                "INSERT INTO tidemark_backfills (id, from_ms, to_ms, chunk_ms, entities, status, created_by, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, 'running', $6, $7) ON CONFLICT (id) DO NOTHING")
                .bind(&plan.id).bind(ms(plan.range.from)).bind(ms(plan.range.to)).bind(plan.chunk_ms)
                .bind(plan.entities.join(",")).bind(&by).bind(now)
                .execute(&mut *tx).await?.rows_affected();
            if created > 0 {
                for (e, w) in chunks {
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

    pub async fn load(sink: &Sink, id: &str) -> Result<Option<Plan>> {
        let sql = "SELECT from_ms, to_ms, chunk_ms, entities FROM tidemark_backfills WHERE id = $1";
        let row: Option<(i64, i64, i64, String)> =
            with_pool!(sink, p => sqlx::query_as(sql).bind(id).fetch_optional(p).await?);
        Ok(row.map(|(f, t, c, e)| Plan {
            id: id.to_owned(),
            range: Window::new(from_ms(f), from_ms(t)),
            chunk_ms: c,
            entities: e.split(',').map(str::to_owned).collect(),
            chunks: Vec::new(),
            docs: None,
        }))
    }

    /// Failed chunks get another try whenever a worker starts; chunks claimed by a process
    /// of this host that no longer exists are freed at once instead of after their lease.
    pub async fn prepare(&self, holder_is_dead: impl Fn(&str, i64) -> bool) -> Result<()> {
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

    pub async fn claim_once(&self) -> Result<Option<Chunk>> {
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
    pub async fn claim(&self) -> Result<Option<Chunk>> {
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

    pub async fn set_state(
        &self,
        c: &Chunk,
        status: &str,
        counts: ChunkCounts,
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

    pub async fn heartbeat(&self) -> Result<()> {
        let expires = ms(Utc::now()) + self.lease.as_millis() as i64;
        with_pool!(&self.sink, p => sqlx::query(
            "UPDATE tidemark_backfill_chunks SET lease_expires_ms = $1 \
             WHERE backfill_id = $2 AND holder = $3 AND status = 'running'")
            .bind(expires).bind(&self.id).bind(&self.holder).execute(p).await?.rows_affected());
        Ok(())
    }

    pub async fn progress(sink: &Sink, id: &str) -> Result<Progress> {
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
    pub async fn close_if_complete(&self) -> Result<bool> {
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
        let by = ChunkBy::Duration;
        let a = plan_id(w, by(day), &["users".into(), "vizzes".into()]);
        assert_eq!(a, plan_id(w, by(day), &["vizzes".into(), "users".into()]));
        assert_ne!(
            a,
            plan_id(w, by(day * 2), &["users".into(), "vizzes".into()])
        );
        let docs = plan_id(w, ChunkBy::Docs(50_000), &["users".into()]);
        assert_ne!(docs, plan_id(w, ChunkBy::Docs(10_000), &["users".into()]));
        assert_ne!(docs, plan_id(w, by(day), &["users".into()]));
        assert!(a.starts_with("bf-") && a.len() == 13, "{a}");
    }
}
