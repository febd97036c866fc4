//! What one run shares across its entities and windows ([`Ctx`]), and what it counts and
//! reports ([`Counts`], [`WindowReport`], [`EntityReport`]).

use crate::engine::window::Window;
use crate::mapping::{Entity, Mapping};
use crate::settings::Settings;
use crate::sink::Sink;
use crate::source::Source;
use anyhow::Result;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

/// Everything a run needs, shared by all entities of the run.
pub struct Ctx {
    pub settings: Settings,
    pub mapping: Mapping,
    /// The mapping's entities by name, shared with work sent off the async runtime.
    pub shared: HashMap<String, Arc<Entity>>,
    pub source: Source,
    pub sink: Sink,
    pub run_id: String,
    /// Dead letters written by this run so far (checked against the error budget; shared
    /// by the lanes of one run, see [`Ctx::for_lane`]).
    pub dead_total: Arc<AtomicU64>,
    /// Set by a shutdown signal; checked between batches so the current batch commits first.
    pub stop: Arc<AtomicBool>,
    /// What reference resolution learned in this lane. Its "present" includes keys pulled
    /// by batches not committed yet, which is only true for batches committed after them:
    /// the batches of one lane (committed in order), never another lane's. Lanes running at
    /// once (backfill chunks) each have their own ([`Ctx::for_lane`]).
    pub memo: tokio::sync::Mutex<crate::engine::memo::Memo>,
    /// Rows this run wrote on demand, so a lane reading them again skips them.
    /// Shared with the window's mapper, which looks ahead in it (`pre_skip`).
    pub pulled: Arc<std::sync::Mutex<crate::engine::pulled::Pulled>>,
    /// Which documents have dead letters, missing references or pending records.
    pub records: Arc<crate::sink::records::Known>,
    /// Every batch is rolled back instead of committed and no checkpoint is saved.
    pub dry_run: bool,
    /// Record before-images of changed rows (`sync.provenance`) for `tidemark rollback`.
    pub provenance: bool,
    /// Checked by every batch's transaction before it commits (a backfill worker's current
    /// chunk: [`crate::sink::lease::Fence`]). A lock because the worker sets it per chunk
    /// while the lane's context is shared with its tasks; held only to copy the Arc.
    pub fence: std::sync::RwLock<Option<Arc<crate::sink::lease::Fence>>>,
    /// The batches of this run share SQLite transactions ([`crate::sink::GroupCommit`]): set
    /// by `tidemark run` on its one SQLite connection; None elsewhere (each batch commits).
    pub group: Option<crate::sink::GroupCommit>,
}

impl Ctx {
    /// The context of one more lane of this run, run at the same time as others (a backfill
    /// worker): everything shared but the reference memo. With a shared memo, a chunk took a
    /// reference another chunk had pulled but not committed as present, and committed first
    /// (a foreign-key violation, or with `foreign_key_checks = "tidemark"` a row pointing at
    /// nothing): `exact_parallel`.
    pub fn for_lane(&self) -> Ctx {
        Ctx {
            settings: self.settings.clone(),
            mapping: self.mapping.clone(),
            shared: self.shared.clone(),
            source: self.source.clone(),
            sink: self.sink.clone(),
            run_id: self.run_id.clone(),
            dead_total: self.dead_total.clone(),
            stop: self.stop.clone(),
            memo: Default::default(),
            pulled: self.pulled.clone(),
            records: self.records.clone(),
            dry_run: self.dry_run,
            provenance: self.provenance,
            fence: std::sync::RwLock::new(self.fence()),
            // Lanes at once (a backfill's chunks) write on connections of their own.
            group: None,
        }
    }

    /// Commit this run's open group of batches, if any ([`crate::sink::GroupCommit`]).
    pub async fn commit_group(&self) -> anyhow::Result<()> {
        self.sink.commit_group(self.group.as_ref()).await
    }

    /// The fence the batches of this lane check now (see [`Ctx::fence`]).
    pub fn fence(&self) -> Option<Arc<crate::sink::lease::Fence>> {
        self.fence.read().map(|f| f.clone()).unwrap_or_default()
    }

    /// Set the fence for the batches written from now on.
    pub fn set_fence(&self, f: Option<crate::sink::lease::Fence>) {
        if let Ok(mut g) = self.fence.write() {
            *g = f.map(Arc::new);
        }
    }

    /// Entity `name` of the mapping, shareable with other tasks.
    pub fn entity_arc(&self, name: &str) -> Result<Arc<Entity>> {
        match self.shared.get(name) {
            Some(e) => Ok(e.clone()),
            None => Ok(Arc::new(self.mapping.entity(name)?.clone())),
        }
    }

    pub fn new(
        settings: Settings,
        mapping: Mapping,
        source: Source,
        sink: Sink,
        run_id: String,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let shared = mapping
            .entities
            .iter()
            .map(|e| (e.name.clone(), Arc::new(e.clone())))
            .collect();
        Ctx {
            shared,
            mapping,
            source,
            sink,
            run_id,
            dead_total: Default::default(),
            stop,
            memo: Default::default(),
            pulled: Arc::new(std::sync::Mutex::new(crate::engine::pulled::Pulled::new(
                settings.state_dir.clone(),
            ))),
            records: Default::default(),
            dry_run: false,
            provenance: settings.sync.provenance,
            fence: Default::default(),
            group: None,
            settings,
        }
    }
}

/// Document counts: `read = written + unchanged + dead_lettered + duplicates + deleted + filtered`.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub read: u64,
    pub written: u64,
    /// Of `written`: new rows, and rows that existed with other content (counted when
    /// provenance is on or in a dry run; otherwise 0).
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Of `unchanged`: rows this run had already written from the same document (pulled on
    /// demand by another batch), skipped without reading the target ([`crate::engine::pulled`]).
    pub already_written: u64,
    pub dead_lettered: u64,
    /// Earlier versions of a key superseded inside the same batch.
    pub duplicates: u64,
    /// Documents whose time field is missing or mistyped (dead-lettered by the scan).
    pub invalid_time: u64,
    /// Documents matching the deleted rule.
    pub deleted: u64,
    /// Documents matching `skip_when`.
    pub filtered: u64,
    /// Child rows inserted or changed, and removed (element gone from the source array).
    pub child_written: u64,
    pub child_removed: u64,
    /// Documents pulled on demand (references and dependents), and their rows written.
    pub pulled: u64,
    pub pulled_written: u64,
    /// References that could not be resolved (recorded in tidemark_missing_refs).
    pub missing_refs: u64,
    /// Documents held back for a later run (on_missing = defer, or over a limit).
    pub deferred: u64,
    /// Batches where max_depth or max_pulled_per_batch stopped resolution.
    pub limit_hits: u64,
    /// Round-trips to the source.
    pub source_queries: u64,
    /// Batches written while the batch before them was still being written (on their own
    /// connection, committed after it: `target.batches_in_flight`).
    pub overlapped_batches: u64,
    /// Of one batch: none of its rows was stored before (the window's next batch then
    /// presumes a first load, [`crate::sink::BatchWrite::presume_new`]). Not summed.
    #[serde(skip)]
    pub all_new: bool,
    /// Of one batch: it had dependents and none was stored before (the next batch presumes
    /// the same, [`crate::sink::BatchWrite::presume_dependents_new`]). Not summed.
    #[serde(skip)]
    pub dependents_new: bool,
}

/// Every row a run wrote (inserted or changed), in each kind of table. Writes are counted:
/// a row written twice in one run (pulled, then changed in its own window) counts twice.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct RowsWritten {
    /// `main + child + pulled`.
    pub total: u64,
    /// Rows of the entities' own tables ([`Counts::written`]).
    pub main: u64,
    /// Rows of their child tables (exploded arrays).
    pub child: u64,
    /// Rows of entities pulled on demand (references and dependents), child rows included.
    pub pulled: u64,
}

impl Counts {
    /// Every row written: the entity's own, its child rows, and what it pulled.
    pub fn rows_written(&self) -> RowsWritten {
        RowsWritten {
            total: self.written + self.child_written + self.pulled_written,
            main: self.written,
            child: self.child_written,
            pulled: self.pulled_written,
        }
    }

    pub fn add(&mut self, o: &Counts) {
        self.read += o.read;
        self.written += o.written;
        self.inserted += o.inserted;
        self.updated += o.updated;
        self.unchanged += o.unchanged;
        self.already_written += o.already_written;
        self.dead_lettered += o.dead_lettered;
        self.duplicates += o.duplicates;
        self.invalid_time += o.invalid_time;
        self.deleted += o.deleted;
        self.filtered += o.filtered;
        self.child_written += o.child_written;
        self.child_removed += o.child_removed;
        self.pulled += o.pulled;
        self.pulled_written += o.pulled_written;
        self.missing_refs += o.missing_refs;
        self.deferred += o.deferred;
        self.limit_hits += o.limit_hits;
        self.source_queries += o.source_queries;
        self.overlapped_batches += o.overlapped_batches;
    }
}

/// The outcome of one window.
#[derive(Debug, Clone, Serialize)]
pub struct WindowReport {
    pub entity: String,
    pub window: Window,
    pub resumed: bool,
    pub batches: u64,
    pub counts: Counts,
    pub elapsed_ms: u64,
    /// The window's last batch stored only new rows (the next window's first batch then
    /// presumes a first load too).
    #[serde(skip)]
    pub ended_new: bool,
}

/// The outcome of catching one entity up.
#[derive(Debug, Clone, Serialize)]
pub struct EntityReport {
    pub entity: String,
    pub windows: usize,
    pub counts: Counts,
    pub watermark: Option<DateTime<Utc>>,
    pub warnings: Vec<String>,
    pub elapsed_ms: u64,
}

impl EntityReport {
    /// What the metrics record of this catch-up.
    pub fn totals(&self) -> crate::telemetry::metrics::EntityTotals<'_> {
        crate::telemetry::metrics::EntityTotals {
            entity: &self.entity,
            watermark: self.watermark,
            read: self.counts.read,
            written: self.counts.written,
            unchanged: self.counts.unchanged,
            dead: self.counts.dead_lettered + self.counts.invalid_time,
            pulled: self.counts.pulled,
            elapsed_ms: self.elapsed_ms,
        }
    }
}

/// The nightly lane of an entity.
pub fn nightly_lane(entity: &str) -> String {
    format!("nightly:{entity}")
}
