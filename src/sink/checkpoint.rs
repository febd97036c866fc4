//! Checkpoints: a lane's saved position, read and written on its own or with a batch
//! (`checkpoint_query!`), and the lane's checkpoint as it was before a run first moved it
//! (kept for rollback).

use super::{from_ms, with_pool, BeginWrite, Checkpoint, Sink};
use crate::source::Position;
use crate::span::{LaneState, Window};
use anyhow::Result;
use sqlx::Row;

impl Sink {
    /// Read a lane's checkpoint (a lane that never ran has the default state).
    pub async fn load_checkpoint(&self, lane: &str) -> Result<Option<Checkpoint>> {
        let sql =
            "SELECT entity, watermark_ms, open_from_ms, open_to_ms, last_ts, last_id, run_id \
                   FROM tidemark_checkpoints WHERE lane = $1";
        let row = with_pool!(self, p => sqlx::query(sql).bind(lane).fetch_optional(p).await?.map(|r| {
            (r.get::<String, _>(0), r.get::<Option<i64>, _>(1), r.get::<Option<i64>, _>(2),
             r.get::<Option<i64>, _>(3), r.get::<Option<String>, _>(4), r.get::<Option<String>, _>(5),
             r.get::<Option<String>, _>(6))
        }));
        let Some((entity, wm, of, ot, lts, lid, run_id)) = row else {
            return Ok(None);
        };
        let open = match (of, ot) {
            (Some(f), Some(t)) if f < t => Some(Window::new(from_ms(f), from_ms(t))),
            _ => None,
        };
        let last = match (lts, lid) {
            (Some(ts), Some(id)) => Some(Position::from_json(&ts, &id)?),
            _ => None,
        };
        Ok(Some(Checkpoint {
            lane: lane.to_owned(),
            entity,
            state: LaneState {
                watermark: wm.map(from_ms),
                open,
            },
            last,
            run_id: run_id.unwrap_or_default(),
        }))
    }

    /// All checkpoints (for status).
    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let lanes: Vec<String> = with_pool!(self, p => sqlx::query_scalar("SELECT lane FROM tidemark_checkpoints ORDER BY lane")
            .fetch_all(p).await?);
        let mut out = Vec::new();
        for l in lanes {
            out.extend(self.load_checkpoint(&l).await?);
        }
        Ok(out)
    }

    /// Save a checkpoint on its own (end of a window, empty windows).
    pub async fn save_checkpoint(&self, cp: &Checkpoint) -> Result<()> {
        with_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            capture_lane_query!(cp).execute(&mut *tx).await?;
            checkpoint_query!(cp).execute(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(())
    }
}

pub(super) const CHECKPOINT_UPSERT: &str = "INSERT INTO tidemark_checkpoints \
    (lane, entity, watermark_ms, open_from_ms, open_to_ms, last_ts, last_id, run_id, updated_at_ms) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
    ON CONFLICT (lane) DO UPDATE SET entity = excluded.entity, watermark_ms = excluded.watermark_ms, \
    open_from_ms = excluded.open_from_ms, open_to_ms = excluded.open_to_ms, last_ts = excluded.last_ts, \
    last_id = excluded.last_id, run_id = excluded.run_id, updated_at_ms = excluded.updated_at_ms";

/// Keep a lane's checkpoint as it was before the run first moves it (for rollback).
pub(super) const LANE_CAPTURE: &str = "INSERT INTO tidemark_run_lanes \
    (run_id, lane, entity, existed, watermark_ms, open_from_ms, open_to_ms, last_ts, last_id, prev_run_id) \
    SELECT CAST($1 AS TEXT), CAST($2 AS TEXT), CAST($3 AS TEXT), c.lane IS NOT NULL, c.watermark_ms, c.open_from_ms, \
    c.open_to_ms, c.last_ts, c.last_id, c.run_id \
    FROM (SELECT 1 AS one) AS o LEFT JOIN tidemark_checkpoints c ON c.lane = $2 WHERE TRUE \
    ON CONFLICT (run_id, lane) DO NOTHING";

macro_rules! capture_lane_query {
    ($cp:expr) => {{
        let cp: &$crate::sink::Checkpoint = $cp;
        sqlx::query($crate::sink::checkpoint::LANE_CAPTURE)
            .bind(cp.run_id.clone())
            .bind(cp.lane.clone())
            .bind(cp.entity.clone())
    }};
}
pub(super) use capture_lane_query;

macro_rules! checkpoint_query {
    ($cp:expr) => {{
        let cp: &$crate::sink::Checkpoint = $cp;
        let (lts, lid) = match &cp.last {
            Some(p) => {
                let (a, b) = p.to_json();
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        sqlx::query($crate::sink::checkpoint::CHECKPOINT_UPSERT)
            .bind(cp.lane.clone())
            .bind(cp.entity.clone())
            .bind(cp.state.watermark.map($crate::sink::ms))
            .bind(cp.state.open.map(|w| $crate::sink::ms(w.from)))
            .bind(cp.state.open.map(|w| $crate::sink::ms(w.to)))
            .bind(lts)
            .bind(lid)
            .bind(cp.run_id.clone())
            .bind($crate::sink::ms(chrono::Utc::now()))
    }};
}
pub(super) use checkpoint_query;

/// `(run, lane)` pairs whose lane capture ([`LANE_CAPTURE`]) this process has committed: the
/// capture keeps a lane's checkpoint as it was before the run first moved it, so once
/// committed, later batches of the run skip the statement (one round-trip per batch).
static CAPTURED: std::sync::Mutex<std::collections::BTreeSet<(String, String)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

pub(super) fn lane_captured(cp: &Checkpoint) -> bool {
    let set = CAPTURED.lock().unwrap_or_else(|p| p.into_inner());
    set.contains(&(cp.run_id.clone(), cp.lane.clone()))
}

pub(super) fn mark_lane_captured(cp: &Checkpoint) {
    let mut set = CAPTURED.lock().unwrap_or_else(|p| p.into_inner());
    if set.len() > 10_000 {
        // A daemon's old runs; forgetting one only costs its lane a repeated capture.
        set.clear();
    }
    set.insert((cp.run_id.clone(), cp.lane.clone()));
}
