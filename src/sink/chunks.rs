//! The backfill ledger (`tidemark_backfills`, `tidemark_backfill_chunks`): a backfill's plan,
//! its chunks, and who works on each (holder, host, pid, since), shared by every worker of
//! every host. `tidemark backfill` (src/commands/backfill.rs) drives it.
//!
//! A chunk is claimed by taking its lane's lock ([`super::lease::LaneLocks`]: a PostgreSQL
//! session advisory lock, or a lock file beside a SQLite database), then writing the claim
//! into its row. The lock decides; the row only shows who works on it. A chunk whose holder
//! died (its process or lock session ended) is free at once: nothing is read from /proc and
//! no clock is compared.

use super::lease::{lane_is_held, ChunkClaim, Fence, LaneLocks};
use crate::sink::{from_ms, ms, with_pool, BeginWrite, Sink};
use crate::span::{fmt_ts, ChunkBy, Window};
use anyhow::Result;
use chrono::Utc;
use serde::Serialize;
use sha2::{Digest, Sha256};

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

impl Chunk {
    /// What this chunk's batches check before they commit: the lane's lock is still ours
    /// and the row still names `holder`.
    pub fn fence(&self, locks: &LaneLocks, backfill_id: &str, holder: &str) -> Fence {
        locks.fence(
            &self.lane,
            Some(ChunkClaim {
                backfill_id: backfill_id.to_owned(),
                entity: self.entity.clone(),
                from_ms: ms(self.window.from),
                holder: holder.to_owned(),
            }),
        )
    }
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
}

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

    /// Failed chunks get another try whenever a worker starts.
    pub async fn prepare(&self) -> Result<()> {
        with_pool!(&self.sink, p => sqlx::query(
            "UPDATE tidemark_backfill_chunks SET status = 'pending' WHERE backfill_id = $1 AND status = 'failed'")
            .bind(&self.id).execute(p).await?.rows_affected());
        Ok(())
    }

    /// Claim the next chunk nobody holds: take its lane's lock, then write the claim into its
    /// row (if the chunk is not done meanwhile). Chunks marked running are candidates too:
    /// if their lock is free, their holder is gone. None when every unfinished chunk is held
    /// by a live worker (which will finish it) or nothing is left.
    pub async fn claim(&self, locks: &LaneLocks) -> Result<Option<Chunk>> {
        let sql = "SELECT entity, from_ms, to_ms, lane FROM tidemark_backfill_chunks \
                   WHERE backfill_id = $1 AND status IN ('pending', 'running') \
                   ORDER BY CASE WHEN status = 'pending' THEN 0 ELSE 1 END, from_ms, entity";
        let candidates: Vec<(String, i64, i64, String)> =
            with_pool!(&self.sink, p => sqlx::query_as(sql).bind(&self.id).fetch_all(p).await?);
        for (entity, f, t, lane) in candidates {
            if !locks.try_lock(&lane).await? {
                continue;
            }
            let claimed = with_pool!(&self.sink, p => sqlx::query(
                "UPDATE tidemark_backfill_chunks SET status = 'running', holder = $4, host = $5, pid = $6, \
                 claimed_at_ms = $7, lease_expires_ms = NULL, attempts = attempts + 1, error = NULL \
                 WHERE backfill_id = $1 AND entity = $2 AND from_ms = $3 AND status IN ('pending', 'running')")
                .bind(&self.id).bind(&entity).bind(f).bind(&self.holder).bind(&self.host)
                .bind(self.pid).bind(ms(Utc::now()))
                .execute(p).await?.rows_affected());
            if claimed == 1 {
                return Ok(Some(Chunk {
                    entity,
                    window: Window::new(from_ms(f), from_ms(t)),
                    lane,
                }));
            }
            // Finished by its holder between our read and our lock.
            locks.unlock(&lane).await?;
        }
        Ok(None)
    }

    /// The chunk [`Ledger::claim`] would most likely give this worker after `current`: the
    /// first pending chunk nobody ever claimed (so it has no checkpoint), other than
    /// `current`. Only a guess for reading ahead: nothing is locked or written, and the
    /// worker uses what it read only if it then claims this very chunk, at its start.
    pub async fn peek_next(&self, current: &Chunk) -> Result<Option<Chunk>> {
        let sql = "SELECT entity, from_ms, to_ms, lane FROM tidemark_backfill_chunks \
                   WHERE backfill_id = $1 AND status = 'pending' AND attempts = 0 AND lane <> $2 \
                   ORDER BY from_ms, entity LIMIT 1";
        let row: Option<(String, i64, i64, String)> = with_pool!(&self.sink, p => sqlx::query_as(sql)
            .bind(&self.id).bind(&current.lane).fetch_optional(p).await?);
        Ok(row.map(|(entity, f, t, lane)| Chunk {
            entity,
            window: Window::new(from_ms(f), from_ms(t)),
            lane,
        }))
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
    /// `host:pid` of every worker holding a chunk's lock.
    pub workers: Vec<String>,
    pub started_at: String,
}

/// Every backfill that is not finished, with its progress and live workers (whose chunk
/// locks are held). Call it from a process that holds no locks of this target (`status`),
/// as [`lane_is_held`] says.
pub async fn unfinished(sink: &Sink) -> Result<Vec<BackfillStatus>> {
    let sql = "SELECT id, created_at_ms FROM tidemark_backfills WHERE status <> 'done' ORDER BY created_at_ms";
    let rows: Vec<(String, i64)> = with_pool!(sink, p => sqlx::query_as(sql).fetch_all(p).await?);
    let mut out = Vec::new();
    for (id, created) in rows {
        let Some(plan) = Ledger::load(sink, &id).await? else {
            continue;
        };
        let sql = "SELECT host, pid, lane FROM tidemark_backfill_chunks \
                   WHERE backfill_id = $1 AND status = 'running' ORDER BY host, pid";
        let claims: Vec<(String, i64, String)> =
            with_pool!(sink, p => sqlx::query_as(sql).bind(&id).fetch_all(p).await?);
        let mut workers: Vec<(String, i64)> = Vec::new();
        for (host, pid, lane) in claims {
            // A row marked running whose lock is free belongs to a worker that died.
            if !workers.contains(&(host.clone(), pid)) && lane_is_held(sink, &lane).await? {
                workers.push((host, pid));
            }
        }
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
    use std::time::Duration;

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
