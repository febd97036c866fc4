//! One batch in one transaction: its records (dead letters, missing references, pending
//! documents), the rows it pulled, its own rows and dependents, provenance and the
//! checkpoint; retried as a whole after a deadlock or a wrong presumption.

use super::checkpoint::{capture_lane_query, checkpoint_query, lane_captured, mark_lane_captured};
use super::provenance::Tracker;
use super::rows::{last_per_key, write_rows, Rows};
use super::{
    ddl, ms, order, with_pool, BatchOutcome, BatchWrite, BeginWrite, PresumedNewConflict,
    ProvenanceRow, Sink, TableOps,
};
use crate::mapping::{ColumnType, Entity, TableRef, Value};
use anyhow::{Context, Result};
use chrono::Utc;
use indexmap::IndexMap;
use std::borrow::Cow;
use tracing::warn;

impl Sink {
    /// Write one batch: dead letters, deletions, rows, child rows and checkpoint in one
    /// transaction. An error names the target and says that nothing of the batch was kept.
    pub async fn write_batch(&self, b: &BatchWrite<'_>) -> Result<BatchOutcome> {
        let entity = b.entity.map_or("tool records", |e| e.name.as_str());
        let mut b = b.clone();
        let mut deadlocks = 0;
        let written = loop {
            let out = self.write_batch_tx(&b).await;
            let Err(e) = out else { break out };
            if let Some(o) = b.order {
                // This attempt's transaction is over: the batch after it waits for the next
                // one, and gives way to it after a deadlock.
                let deadlock = order::is_deadlock(&e);
                o.next_attempt(deadlock);
                if (deadlock || e.chain().any(|c| c.is::<order::Yielded>())) && deadlocks < 5 {
                    deadlocks += 1;
                    // Wait for the batch before (if any), outside any transaction.
                    if !o.before_done().await {
                        break Err(e.context(order::PredecessorFailed));
                    }
                    continue;
                }
            }
            if e.chain().any(|c| c.is::<PresumedNewConflict>())
                && (b.optimistic_inserts || b.presume_new || b.presume_dependents_new)
            {
                b = BatchWrite {
                    presume_new: false,
                    presume_dependents_new: false,
                    optimistic_inserts: false,
                    ..b
                };
                continue;
            }
            break Err(e);
        };
        written.with_context(|| {
            format!(
                "target database: writing a batch of {entity} failed and was rolled back \
                 (the next run resumes from the last committed checkpoint)"
            )
        })
    }

    /// The ids whose records a batch clears: its documents' dead letters (`resolved`), their
    /// missing references and pending entries (`clear_refs`), and the pulled documents'
    /// missing references by entity. With [`BatchWrite::known`], only ids that can have a
    /// record, and the records the batch writes are noted first (see [`crate::sink::records`]).
    #[allow(clippy::type_complexity)]
    async fn records_to_clear<'b>(
        &self,
        b: &'b BatchWrite<'_>,
    ) -> Result<(
        Cow<'b, [String]>,
        Cow<'b, [String]>,
        IndexMap<&'b str, Vec<String>>,
    )> {
        let entity_name = b.entity.map(|e| e.name.as_str()).unwrap_or_default();
        let mut pulled: IndexMap<&str, Vec<String>> = IndexMap::new();
        for (entity, id) in b.clear_pulled {
            pulled.entry(entity.as_str()).or_default().push(id.clone());
        }
        let Some(known) = b.known else {
            return Ok((
                Cow::Borrowed(b.resolved),
                Cow::Borrowed(b.clear_refs),
                pulled,
            ));
        };
        for entity in std::iter::once(entity_name).chain(pulled.keys().copied()) {
            if !known.is_loaded(entity) {
                known.load(
                    entity,
                    self.record_ids(entity, crate::sink::records::CAP).await?,
                );
            }
        }
        for (entity, ids) in pulled.iter_mut() {
            *ids = known.may_have(entity, ids);
        }
        let written = b
            .dead
            .iter()
            .map(|d| (entity_name, d.source_id.as_str()))
            .chain(
                b.other_dead
                    .iter()
                    .map(|(e, d)| (e.as_str(), d.source_id.as_str())),
            )
            .chain(
                b.missing
                    .iter()
                    .map(|m| (m.entity.as_str(), m.source_id.as_str())),
            )
            .chain(b.deferred.iter().map(|(id, _)| (entity_name, id.as_str())));
        for (entity, id) in written {
            known.add(entity, id);
        }
        Ok((
            Cow::Owned(known.may_have(entity_name, b.resolved)),
            Cow::Owned(known.may_have(entity_name, b.clear_refs)),
            pulled,
        ))
    }

    async fn write_batch_tx(&self, b: &BatchWrite<'_>) -> Result<BatchOutcome> {
        let now = ms(Utc::now());
        let entity_name = b.entity.map(|e| e.name.as_str()).unwrap_or_default();
        let (resolved, clear_refs, pulled) = self.records_to_clear(b).await?;
        let out = with_pool!(self, p => {
            let mut tx = p.begin_write().await?;
            if let Some(o) = b.order {
                tx.take_turn_lock(o.lock_key()).await?;
                o.locked();
            }
            if b.skip_fk_checks {
                tx.fk_checks(false).await?;
            }
            // Documents that map now clear their old dead letters first.
            tx.delete_source_ids("tidemark_dead_letters", entity_name, &resolved).await?;
            // One multi-row statement per 1,000 dead letters; a key appearing twice keeps its
            // last version (one statement may not upsert the same row twice).
            let dead = last_per_key(b.dead.iter().map(|d| (entity_name, d))
                .chain(b.other_dead.iter().map(|(e, d)| (e.as_str(), d)))
                .map(|(entity, d)| ((entity, d.source_id.as_str()), (entity, d))));
            for chunk in dead.chunks(1000) {
                let mut q = sqlx::QueryBuilder::new(DEAD_LETTER_INSERT);
                q.push_values(chunk, |mut row, (entity, d)| {
                    row.push_bind(*entity).push_bind(d.source_id.as_str()).push_bind(b.run_id)
                        .push_bind(d.error.as_str()).push_bind(d.document.as_str())
                        .push_bind(b.mapping_version).push_bind(now);
                });
                q.push(DEAD_LETTER_CONFLICT);
                q.build().persistent(false).execute(&mut *tx).await.context("recording dead letters")?;
            }
            for table in ["tidemark_missing_refs", "tidemark_pending"] {
                tx.delete_source_ids(table, entity_name, &clear_refs).await?;
            }
            for (entity, ids) in &pulled {
                tx.delete_source_ids("tidemark_missing_refs", entity, ids).await?;
            }
            // As the dead letters: one statement per 1,000, the last record per key kept.
            let missing = last_per_key(b.missing.iter()
                .map(|m| ((m.entity.as_str(), m.source_id.as_str(), m.column.as_str()), m)));
            for chunk in missing.chunks(1000) {
                let mut q = sqlx::QueryBuilder::new(MISSING_REF_INSERT);
                q.push_values(chunk, |mut row, m| {
                    row.push_bind(m.entity.as_str()).push_bind(m.source_id.as_str()).push_bind(m.column.as_str())
                        .push_bind(m.ref_entity.as_str()).push_bind(m.ref_key.as_str())
                        .push_bind(format!("{:?}", m.policy).to_lowercase()).push_bind(b.run_id).push_bind(now);
                });
                q.push(MISSING_REF_CONFLICT);
                q.build().persistent(false).execute(&mut *tx).await.context("recording missing references")?;
            }
            for (id, reason) in b.deferred {
                sqlx::query(PENDING_UPSERT)
                    .bind(entity_name).bind(id).bind(reason).bind(now).bind(b.run_id)
                    .execute(&mut *tx).await?;
            }
            let mut trk = Tracker {
                on: b.provenance || b.dry_run,
                store: (b.provenance && !b.dry_run).then(|| (b.run_id.to_owned(), now)),
                ..Default::default()
            };
            let out = write_entities(&mut tx, b, &mut trk).await?;
            if b.provenance && !b.dry_run && !trk.changes.is_empty() {
                record_provenance(&mut tx, b.run_id, &trk, now).await?;
            }
            // Everything but the checkpoint is sent: commit after the batch before, or not at all.
            if let Some(after) = b.order.and_then(|o| o.after.as_ref()) {
                tx.wait_turn(after).await?;
            }
            // Last, so that nothing between the check and the commit waits on anything.
            if let Some(f) = b.fence {
                if !b.dry_run {
                    tx.check_fence(f).await?;
                }
            }
            let capture = b.checkpoint.filter(|cp| !b.dry_run && !lane_captured(cp));
            if let Some(cp) = b.checkpoint {
                if let Some(cp) = capture {
                    capture_lane_query!(cp).execute(&mut *tx).await?;
                }
                checkpoint_query!(cp).execute(&mut *tx).await?;
            }
            // The connection's buffers keep the size of the largest message they carried (a
            // batch with a megabyte-sized file sends and holds a bind message that large), on
            // every pooled connection, for the life of the process: bounded by the largest
            // document ever written, not by the batch settings. Back to 8 KiB each (sqlx's
            // default) before the connection returns to the pool; regrowing them costs a few
            // reallocations per batch. Full mapping, 20 ms RSS samples, one run each: median
            // 45.7 → 44.6 MB, peak within the spread (BENCHMARKS.md, fifteenth round).
            sqlx::Connection::shrink_buffers(&mut *tx);
            if b.dry_run {
                tx.rollback().await?;
            } else {
                tx.commit().await?;
                if let Some(cp) = capture {
                    mark_lane_captured(cp);
                }
            }
            out
        });
        if !b.dry_run {
            self.analyze_grown(b).await;
        }
        Ok(out)
    }

    /// PostgreSQL plans a batch's key lookups (`… IN (SELECT * FROM UNNEST($1))`) from table
    /// statistics. A table tidemark is filling has none until autovacuum gets to it (a minute
    /// or more), and without them the planner hash-joins the keys against a full scan
    /// instead of probing the index: every batch then costs a scan of a growing child table.
    /// So a table is analyzed when the rows this process has written to it pass 1,000, then
    /// 10,000, 100,000 and so on (ANALYZE samples a bounded number of rows, and does not
    /// block writers). A failed ANALYZE only costs speed: it is logged, never an error.
    /// JSON columns outside the primary key are left out: no lookup reads them, and their
    /// statistics were the costly part (a whole document per sampled row; BENCHMARKS.md,
    /// "Session 23").
    async fn analyze_grown(&self, b: &BatchWrite<'_>) {
        let Sink::Postgres(pool) = self else { return };
        let mut sizes: Vec<(TableRef<'_>, u64)> = Vec::new();
        fn add<'e>(
            sizes: &mut Vec<(TableRef<'e>, u64)>,
            e: &'e Entity,
            rows: usize,
            children: &[Vec<Vec<Value>>],
        ) {
            sizes.push((e.table_ref(), rows as u64));
            for (c, rows) in e.children.iter().zip(children) {
                sizes.push((c.table_ref(), rows.len() as u64));
            }
        }
        if let Some(e) = b.entity {
            add(&mut sizes, e, b.rows.len(), b.children);
        }
        for r in b.before.iter().chain(b.after) {
            add(&mut sizes, &r.entity, r.rows.len(), &r.children);
        }
        let o = pool.connect_options();
        let target = format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or_default()
        );
        let due: Vec<TableRef<'_>> = {
            let mut grown = GROWN.lock().unwrap_or_else(|p| p.into_inner());
            sizes
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .filter_map(|(t, n)| {
                    let total = grown.entry(format!("{target} {}", t.name)).or_default();
                    let before = *total;
                    *total += n;
                    let magnitude = |x: u64| if x < 1000 { 0 } else { x.ilog10() };
                    (magnitude(*total) > magnitude(before)).then_some(t)
                })
                .collect()
        };
        for t in due {
            let looked_up: Vec<String> = (t.columns.iter().enumerate())
                .filter(|(i, c)| c.ty != ColumnType::Json || t.pk.contains(i))
                .map(|(_, c)| ddl::quote(&c.name))
                .collect();
            let sql = if looked_up.is_empty() {
                format!("ANALYZE {}", ddl::quote(t.name))
            } else {
                format!("ANALYZE {} ({})", ddl::quote(t.name), looked_up.join(", "))
            };
            if let Err(e) = sqlx::query(&sql).execute(pool).await {
                warn!(table = %t.name, "ANALYZE failed (key lookups may be slower until autovacuum runs): {e}");
            }
        }
    }
}

/// The batch's rows: what it pulled (`before`), the entity's own, then its dependents
/// (`after`). Pulled references were read absent from the target (`resolve::pull`): with
/// optimistic inserts they are inserted without reading them again (a row that appeared
/// since fails the batch with `PresumedNewConflict`, and it is written again with a read
/// first).
async fn write_entities<T: TableOps>(
    tx: &mut T,
    b: &BatchWrite<'_>,
    trk: &mut Tracker,
) -> Result<BatchOutcome> {
    let mut out = BatchOutcome::default();
    let optimistic = b.optimistic_inserts;
    for r in b.before {
        let rows = Rows {
            rows: &r.rows,
            meta: &r.meta,
            children: &r.children,
            child_meta: &r.child_meta,
            presume_new: optimistic,
            optimistic,
            ..Default::default()
        };
        let o = write_rows(tx, &r.entity, rows, trk).await?;
        out.pulled_written += o.written + o.child_written;
    }
    if let Some(e) = b.entity {
        let rows = Rows {
            rows: b.rows,
            meta: b.row_meta,
            children: b.children,
            child_meta: b.child_meta,
            big: b.big,
            deletes: b.deletes,
            soft_deletes: b.soft_deletes,
            presume_new: b.presume_new,
            optimistic,
            skip_fk_checks: b.skip_fk_checks,
        };
        let o = write_rows(tx, e, rows, trk).await?;
        out = BatchOutcome {
            pulled_written: out.pulled_written,
            ..o
        };
    }
    out.dependents_new = b.after.iter().any(|r| !r.rows.is_empty());
    for r in b.after {
        let rows = Rows {
            rows: &r.rows,
            meta: &r.meta,
            children: &r.children,
            child_meta: &r.child_meta,
            presume_new: b.presume_dependents_new,
            optimistic,
            ..Default::default()
        };
        let o = write_rows(tx, &r.entity, rows, trk).await?;
        out.pulled_written += o.written + o.child_written;
        out.dependents_new &= o.all_new || r.rows.is_empty();
    }
    Ok(out)
}

/// What the batch changed, for `tidemark rollback`: a before-image and after-hash per
/// changed row, and per table the list of rows it inserted.
pub(super) async fn record_provenance<T: TableOps>(
    tx: &mut T,
    run_id: &str,
    trk: &Tracker,
    now: i64,
) -> Result<()> {
    let inserted = trk.inserted_by_table();
    let rows: Vec<ProvenanceRow> = trk
        .changes
        .iter()
        .filter(|(_, c)| !c.is_insert())
        .map(|((table, pk), c)| {
            (
                table.as_str(),
                pk.as_str(),
                c.before.as_deref(),
                c.after_hash.as_deref(),
                None,
            )
        })
        .chain(
            inserted
                .iter()
                .map(|(table, list)| (*table, "", None, None, Some(list.as_str()))),
        )
        .collect();
    tx.insert_provenance(run_id, &rows, now)
        .await
        .context("recording provenance")
}

const DEAD_LETTER_INSERT: &str = "INSERT INTO tidemark_dead_letters \
    (entity, source_id, run_id, error, document, mapping_version, created_at_ms) ";
const DEAD_LETTER_CONFLICT: &str = " ON CONFLICT (entity, source_id) DO UPDATE SET run_id = excluded.run_id, \
    error = excluded.error, document = excluded.document, mapping_version = excluded.mapping_version, \
    created_at_ms = excluded.created_at_ms";

const MISSING_REF_INSERT: &str = "INSERT INTO tidemark_missing_refs \
    (entity, source_id, column_name, ref_entity, ref_key, policy, run_id, seen_at_ms) ";
const MISSING_REF_CONFLICT: &str = " ON CONFLICT (entity, source_id, column_name) DO UPDATE SET ref_entity = excluded.ref_entity, ref_key = excluded.ref_key, \
    policy = excluded.policy, run_id = excluded.run_id, seen_at_ms = excluded.seen_at_ms";

const PENDING_UPSERT: &str = "INSERT INTO tidemark_pending \
    (entity, source_id, reason, attempts, first_seen_ms, last_seen_ms, run_id) VALUES ($1, $2, $3, 1, $4, $4, $5) \
    ON CONFLICT (entity, source_id) DO UPDATE SET reason = excluded.reason, \
    attempts = tidemark_pending.attempts + 1, last_seen_ms = excluded.last_seen_ms, run_id = excluded.run_id";

/// Rows written by this process per target database and table, for [`Sink::analyze_grown`].
static GROWN: std::sync::Mutex<std::collections::BTreeMap<String, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());
