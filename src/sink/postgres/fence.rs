//! The fence of a batch on PostgreSQL ([`crate::sink::lease::Fence`]): checked in the
//! batch's transaction just before it commits.

use crate::sink::lease::{Fence, LostLane};
use anyhow::Result;
use sqlx::{Postgres, Transaction};

/// Fail with [`LostLane`] unless the chunk's ledger row still names this holder (the row
/// stays locked until the commit) and the lane's advisory lock is still granted to this
/// process's lock session.
pub(super) async fn check(tx: &mut Transaction<'_, Postgres>, f: &Fence) -> Result<()> {
    let lost = |why| LostLane {
        lane: f.lane.clone(),
        why,
    };
    // The claim row first, locked until commit: a worker that takes the chunk over must
    // rewrite it, so it waits for this batch and then resumes from its checkpoint.
    if let (Some(c), Some((pid, class, obj))) = (&f.claim, f.pg_lock_parts()) {
        // Both in one round trip (one per batch of every chunk): the select list is
        // evaluated once the row is read and locked, so the lock is checked after it.
        let (holder, held): (Option<String>, bool) = sqlx::query_as(
            "WITH claim AS (SELECT holder FROM tidemark_backfill_chunks \
             WHERE backfill_id = $1 AND entity = $2 AND from_ms = $3 FOR UPDATE) \
             SELECT claim.holder, EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
             AND granted AND pid = $4 AND classid::text::bigint = $5 AND objid::text::bigint = $6 \
             AND objsubid = 1) FROM (SELECT 1) AS one LEFT JOIN claim ON true",
        )
        .bind(&c.backfill_id)
        .bind(&c.entity)
        .bind(c.from_ms)
        .bind(pid)
        .bind(class)
        .bind(obj)
        .fetch_one(&mut **tx)
        .await?;
        if holder.as_deref() != Some(c.holder.as_str()) {
            return Err(lost("its ledger row names another holder").into());
        }
        if !held {
            return Err(lost("its lock session ended").into());
        }
        return Ok(());
    }
    if let Some(c) = &f.claim {
        let holder: Option<Option<String>> = sqlx::query_scalar(
            "SELECT holder FROM tidemark_backfill_chunks \
             WHERE backfill_id = $1 AND entity = $2 AND from_ms = $3 FOR UPDATE",
        )
        .bind(&c.backfill_id)
        .bind(&c.entity)
        .bind(c.from_ms)
        .fetch_optional(&mut **tx)
        .await?;
        if holder.flatten().as_deref() != Some(c.holder.as_str()) {
            return Err(lost("its ledger row names another holder").into());
        }
    }
    // Then the lock itself: still granted to our lock session (pg_locks is live, not
    // a snapshot; a terminated or cut session has released it).
    if let Some((pid, class, obj)) = f.pg_lock_parts() {
        let held: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND pid = $1 AND classid::text::bigint = $2 AND objid::text::bigint = $3 AND objsubid = 1)",
        )
        .bind(pid)
        .bind(class)
        .bind(obj)
        .fetch_one(&mut **tx)
        .await?;
        if !held {
            return Err(lost("its lock session ended").into());
        }
    }
    Ok(())
}
