//! Undoing one run from its provenance, in the target: the rows it inserted, changed or
//! deleted, the checkpoints it moved, the backfill chunks it finished. `tidemark rollback`
//! (src/commands/rollback.rs) checks and leases first, then calls [`undo_run`].

use crate::mapping::canon;
use crate::mapping::{Mapping, TableRef, Value};
use crate::sink::{with_pool, BeginWrite, Sink, TableOps};
use anyhow::{anyhow, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Rows undone per round (one read and one write per table), at least: a round ends only
/// where one batch's records end (below), so it may hold more.
const CHUNK: usize = 1000;

/// The most rows one round holds to keep a batch's records together; a batch larger than
/// this (a document with an array of more than ~50,000 child rows) is split.
const STEP_CAP: usize = 50_000;

/// What a rollback did (or, dry, would do).
#[derive(Debug, Default, Serialize)]
pub struct RollbackReport {
    pub run_id: String,
    pub rolled_back_run: String,
    pub dry_run: bool,
    /// Per table: rows deleted (inserted by the run) and restored (changed or deleted by it).
    pub tables: BTreeMap<String, TableTally>,
    /// Rows changed since the run by someone else (at most 100 listed). Without `--force`
    /// any conflict cancels the whole rollback.
    pub conflicts: Vec<String>,
    pub conflict_count: u64,
    /// Lanes whose checkpoint went back to where it was before the run.
    pub lanes: Vec<String>,
    pub elapsed_ms: u64,
    #[serde(skip)]
    pub report_file: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct TableTally {
    pub deleted: u64,
    pub restored: u64,
    pub conflicts: u64,
}

impl std::fmt::Display for RollbackReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.dry_run {
            writeln!(f, "DRY RUN, nothing changed:")?;
        }
        writeln!(
            f,
            "{:<24} {:>9} {:>9} {:>9}",
            "table", "deleted", "restored", "conflicts"
        )?;
        for (t, c) in &self.tables {
            writeln!(
                f,
                "{t:<24} {:>9} {:>9} {:>9}",
                c.deleted, c.restored, c.conflicts
            )?;
        }
        for c in &self.conflicts {
            writeln!(f, "conflict: {c}")?;
        }
        for l in &self.lanes {
            writeln!(f, "checkpoint rewound: {l}")?;
        }
        if let Some(p) = &self.report_file {
            writeln!(f, "report: {p}")?;
        }
        write!(
            f,
            "rollback {} of run {}: {} conflict(s)",
            self.run_id, self.rolled_back_run, self.conflict_count
        )
    }
}

/// One provenance row.
struct Prov {
    /// The time of the batch that wrote it (`written_at_ms`; every record of one batch has it).
    step: i64,
    table: String,
    pk: String,
    before: Option<String>,
    after: Option<String>,
}

fn tables(m: &Mapping) -> HashMap<String, TableRef<'_>> {
    let mut out = HashMap::new();
    for e in &m.entities {
        out.insert(e.table.clone(), e.table_ref());
        for c in &e.children {
            out.insert(c.table.clone(), c.table_ref());
        }
    }
    out
}

/// What a rollback carries from chunk to chunk.
struct Undo {
    force: bool,
    /// Rows found changed by someone else (without --force they stay as they are, so the
    /// run's older records of the same row are skipped, not reported again).
    conflicted: HashSet<(String, String)>,
}

/// Check each row still holds what the newer records left; undo the ones that do. The chunk
/// is undone in its order (newest first), one run of consecutive rows of one table at a
/// time: a child row goes before the parent it came with, so no cascade reaches it first.
async fn undo_chunk<T: TableOps>(
    tx: &mut T,
    tables: &HashMap<String, TableRef<'_>>,
    chunk: &[Prov],
    undo: &mut Undo,
    rep: &mut RollbackReport,
) -> Result<()> {
    let mut runs: Vec<(&str, Vec<&Prov>)> = Vec::new();
    for p in chunk {
        if !undo.force
            && !undo.conflicted.is_empty()
            && undo.conflicted.contains(&(p.table.clone(), p.pk.clone()))
        {
            continue;
        }
        match runs.last_mut() {
            Some((t, list)) if *t == p.table => list.push(p),
            _ => runs.push((p.table.as_str(), vec![p])),
        }
    }
    // Check every row of the chunk before changing any, then restore before-images, then
    // delete what the run inserted: deleting an inserted parent first would let its foreign
    // keys' ON DELETE SET NULL / CASCADE change rows still to be checked or restored (a commit
    // the run moved to a viz it inserted; a child row moved to a new parent).
    let mut plan = Vec::new();
    for (name, provs) in runs {
        let t = *tables.get(name).ok_or_else(|| {
            anyhow!("run wrote table {name}, which the current mapping no longer declares; restore the mapping that wrote it, then roll back")
        })?;
        let keys: Vec<Vec<Value>> = provs
            .iter()
            .map(|p| canon::key_from_json(t, &p.pk))
            .collect::<Result<_>>()?;
        let current = crate::sink::provenance::index_rows(t, tx.select_rows(t, t.pk, &keys).await?);
        let (mut restore, mut delete) = (Vec::new(), Vec::new());
        let tally = rep.tables.entry(name.to_owned()).or_default();
        for (p, key) in provs.iter().zip(keys) {
            let cur = current.get(&p.pk);
            let untouched = match (&p.after, cur) {
                (None, None) => true,
                (Some(h), Some(r)) => &canon::row_hash(t, r) == h,
                _ => false,
            };
            if !untouched {
                undo.conflicted.insert((p.table.clone(), p.pk.clone()));
                tally.conflicts += 1;
                rep.conflict_count += 1;
                if rep.conflicts.len() < 100 {
                    let what = if cur.is_some() { "changed" } else { "deleted" };
                    rep.conflicts
                        .push(format!("{name} {}: {what} since the run", p.pk));
                }
                if !undo.force {
                    continue;
                }
            }
            match &p.before {
                Some(b) => restore.push(canon::row_from_json(t, &serde_json::from_str(b)?)?),
                None => delete.push(key),
            }
        }
        plan.push((name, t, restore, delete));
    }
    for (name, t, restore, _) in &plan {
        if !restore.is_empty() {
            tx.upsert_rows(*t, restore).await?;
            rep.tables.entry(name.to_string()).or_default().restored += restore.len() as u64;
        }
    }
    for (name, t, _, delete) in &plan {
        if !delete.is_empty() {
            let n = tx.delete_keys(*t, t.pk, delete).await?;
            rep.tables.entry(name.to_string()).or_default().deleted += n;
        }
    }
    Ok(())
}

/// The `(table_name, pk)` pairs one run's provenance touched ({run} is a parameter or a
/// column), with the keys of grouped insert records expanded. `{expand}` is the dialect's
/// table function over a JSON array, `{first}` takes element 0 of one of its items.
fn touched(run: &str, pg: bool) -> String {
    let (expand, first) = if pg {
        ("jsonb_array_elements(p.inserted::jsonb) e", "e ->> 0")
    } else {
        ("json_each(p.inserted) e", "json_extract(e.value, '$[0]')")
    };
    format!(
        "SELECT table_name, pk FROM tidemark_provenance WHERE run_id = {run} AND inserted IS NULL \
         UNION ALL SELECT p.table_name, {first} FROM tidemark_provenance p, {expand} \
         WHERE p.run_id = {run} AND p.inserted IS NOT NULL"
    )
}

/// Runs started after `run` that touched one of its rows or lanes and are not rolled back.
fn later_runs_sql(pg: bool) -> String {
    format!(
        "SELECT DISTINCT r.id, r.started_at_ms FROM tidemark_runs r WHERE r.started_at_ms > $2 \
         AND r.status <> 'rolled_back' AND r.id <> $1 AND (EXISTS (SELECT 1 FROM ({}) a \
         JOIN ({}) b ON b.table_name = a.table_name AND b.pk = a.pk) \
         OR EXISTS (SELECT 1 FROM tidemark_run_lanes a JOIN tidemark_run_lanes b ON b.lane = a.lane \
         WHERE a.run_id = $1 AND b.run_id = r.id)) ORDER BY r.started_at_ms DESC",
        touched("$1", pg),
        touched("r.id", pg)
    )
}

/// The run's provenance records, newest first, a few at a time: a record of inserted rows
/// holds a whole batch's keys of one table.
const PROV_NEWEST_FIRST: &str =
    "SELECT id, table_name, pk, before_image, after_hash, inserted, written_at_ms FROM tidemark_provenance \
    WHERE run_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3";

/// The same in commit order (PostgreSQL: `commit_seq`, numbered at COMMIT by a deferred
/// trigger, migration 0008): batches of different lanes commit concurrently there, and a
/// batch may insert its records before, yet commit after, a batch that wrote a row it
/// references. Undone by id, that row was deleted first and its `ON DELETE SET NULL` made
/// the referencing row look changed by someone else. Used when every record of the run has
/// its number (runs written before the migration are undone by id); SQLite has one writer,
/// so its ids are the commit order.
const PROV_NEWEST_COMMITTED_FIRST: &str =
    "SELECT commit_seq, table_name, pk, before_image, after_hash, inserted, written_at_ms FROM tidemark_provenance \
    WHERE run_id = $1 AND commit_seq < $2 ORDER BY commit_seq DESC LIMIT $3";

/// Provenance records read per round (each may hold a batch's inserted keys).
const RECORDS: i64 = 50;

type ProvRow = (
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
);
pub type LaneRow = (
    String,
    String,
    bool,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// `backfill:{id}:{entity}:{from_ms}` → (id, entity, from_ms).
fn backfill_lane(lane: &str) -> Option<(&str, &str, i64)> {
    let rest = lane.strip_prefix("backfill:")?;
    let (id, rest) = rest.split_once(':')?;
    let (entity, from) = rest.rsplit_once(':')?;
    Some((id, entity, from.parse().ok()?))
}

/// Indexes for the rollback's own transaction on the reference columns that have none,
/// dropped again before it ends: `(table, column)` of every reference column that does not
/// lead its table's primary key. Deleting an inserted row runs its foreign
/// keys' `ON DELETE SET NULL`, which looks the row up in every referencing table; without an
/// index each deleted row scanned those tables. PostgreSQL targets get no reference indexes
/// (`migrate`: docs/DEPENDENCIES.md) and neither do SQLite targets written with
/// `foreign_key_checks = "tidemark"`: a dry rollback of the 20,000-viz first load took 214 s
/// on PostgreSQL and 397 s on such a SQLite file (the load 8–9 s), and one batch of 186
/// vizzes 24 s at 200,000 (BENCHMARKS.md, "Session 25"). Building them makes writers of those
/// tables wait until the rollback ends.
fn undo_indexes(m: &Mapping) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut add = |table: &str, t: TableRef<'_>| {
        for (i, c) in t.columns.iter().enumerate() {
            if c.references.is_some() && t.pk.first() != Some(&i) {
                out.push((table.to_owned(), c.name.clone()));
            }
        }
    };
    for e in &m.entities {
        add(&e.table, e.table_ref());
        for c in &e.children {
            add(&c.table, c.table_ref());
        }
    }
    out
}

/// 1 when table `$1` has a column `$2` (the mapping may name one not migrated yet) and no
/// index begins with it, else 0.
const NEEDS_INDEX_PG: &str = "SELECT (CASE WHEN EXISTS (SELECT 1 FROM pg_attribute \
    WHERE attrelid = to_regclass(quote_ident($1)) AND attname = $2 AND NOT attisdropped) \
    AND NOT EXISTS (SELECT 1 FROM pg_index x JOIN pg_attribute a \
    ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0] \
    WHERE x.indrelid = to_regclass(quote_ident($1)) AND a.attname = $2) THEN 1 ELSE 0 END)::int8";
const NEEDS_INDEX_SQLITE: &str = "SELECT CASE WHEN EXISTS (SELECT 1 FROM pragma_table_info($1) \
    WHERE name = $2) AND NOT EXISTS (SELECT 1 FROM pragma_index_list($1) l, \
    pragma_index_info(l.name) i WHERE i.seqno = 0 AND i.name = $2) THEN 1 ELSE 0 END";

/// Undo run `run` in one transaction: its rows newest first (see [`undo_chunk`]), then its
/// lanes' checkpoints (`lanes_of_run`, from [`lanes_of_run`]) and backfill chunks, then mark
/// it rolled back. Rolled back instead of committed when `dry_run`, or when rows conflict
/// and not `force`. What was (or would be) done goes into `rep`.
pub async fn undo_run(
    sink: &Sink,
    mapping: &Mapping,
    run: &str,
    lanes_of_run: &[LaneRow],
    force: bool,
    dry_run: bool,
    rep: &mut RollbackReport,
) -> Result<()> {
    let tables = tables(mapping);
    with_pool!(sink, p => {
        let mut tx = p.begin_write().await?;
        let pg = matches!(sink, Sink::Postgres(_));
        let needs = if pg { NEEDS_INDEX_PG } else { NEEDS_INDEX_SQLITE };
        let mut indexes = Vec::new();
        for (table, column) in undo_indexes(mapping) {
            let n: i64 = sqlx::query_scalar(needs).bind(&table).bind(&column).fetch_one(&mut *tx).await?;
            if n == 1 {
                let name = format!("tidemark_undo_{}", indexes.len());
                sqlx::query(&format!("CREATE INDEX {name} ON {} ({})",
                    crate::sink::ddl::quote(&table), crate::sink::ddl::quote(&column)))
                    .execute(&mut *tx).await?;
                indexes.push(name);
            }
        }
        let newest_first = if pg {
            let unnumbered: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM tidemark_provenance WHERE run_id = $1 AND commit_seq IS NULL",
            )
            .bind(run).fetch_one(&mut *tx).await?;
            if unnumbered == 0 { PROV_NEWEST_COMMITTED_FIRST } else { PROV_NEWEST_FIRST }
        } else {
            PROV_NEWEST_FIRST
        };
        // Undo newest first, each record against the state the newer ones left. A chunk
        // holds each row at most once (undo_chunk reads and writes a chunk per table), so
        // a row the run touched in two batches closes the chunk. Otherwise a chunk ends
        // only where a batch's records end: undo_chunk checks every row before it deletes
        // any, and a row deleted in an earlier chunk than a row of the same batch that
        // references it would have its `ON DELETE SET NULL` change that row first, which
        // the check then reports as changed by someone else (a pulled viz and the viz
        // forked from it, listed in that order in one record and split by the chunk's
        // end: 2 false conflicts in a 20,000-viz run, 4 at 200,000; BENCHMARKS.md,
        // "Session 25").
        let mut before = i64::MAX;
        let mut chunk: Vec<Prov> = Vec::new();
        let mut in_chunk: HashSet<(String, String)> = HashSet::new();
        let mut undo = Undo { force, conflicted: HashSet::new() };
        loop {
            let rows: Vec<ProvRow> = sqlx::query_as(newest_first).bind(run).bind(before).bind(RECORDS).fetch_all(&mut *tx).await?;
            let Some(last) = rows.last() else { break };
            before = last.0;
            for p in expand(rows)? {
                let key = (p.table.clone(), p.pk.clone());
                let step_ends = chunk.last().is_some_and(|l| l.step != p.step);
                if (chunk.len() >= CHUNK && step_ends) || chunk.len() >= STEP_CAP || in_chunk.contains(&key) {
                    undo_chunk(&mut tx, &tables, &chunk, &mut undo, rep).await?;
                    chunk.clear();
                    in_chunk.clear();
                }
                in_chunk.insert(key);
                chunk.push(p);
            }
        }
        undo_chunk(&mut tx, &tables, &chunk, &mut undo, rep).await?;
        for (lane, entity, existed, wm, of, ot, lts, lid, prev) in lanes_of_run {
            if *existed {
                sqlx::query("INSERT INTO tidemark_checkpoints (lane, entity, watermark_ms, open_from_ms, open_to_ms, \
                             last_ts, last_id, run_id, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                             ON CONFLICT (lane) DO UPDATE SET entity = excluded.entity, watermark_ms = excluded.watermark_ms, \
                             open_from_ms = excluded.open_from_ms, open_to_ms = excluded.open_to_ms, last_ts = excluded.last_ts, \
                             last_id = excluded.last_id, run_id = excluded.run_id, updated_at_ms = excluded.updated_at_ms")
                    .bind(lane).bind(entity).bind(wm).bind(of).bind(ot).bind(lts).bind(lid).bind(prev)
                    .bind(crate::sink::runs::now_ms()).execute(&mut *tx).await?;
            } else {
                sqlx::query("DELETE FROM tidemark_checkpoints WHERE lane = $1").bind(lane).execute(&mut *tx).await?;
            }
            if let Some((bf, ent, from)) = backfill_lane(lane) {
                sqlx::query("UPDATE tidemark_backfill_chunks SET status = 'pending', holder = NULL, finished_at_ms = NULL, \
                             lease_expires_ms = NULL WHERE backfill_id = $1 AND entity = $2 AND from_ms = $3")
                    .bind(bf).bind(ent).bind(from).execute(&mut *tx).await?;
                sqlx::query("UPDATE tidemark_backfills SET status = 'running', finished_at_ms = NULL WHERE id = $1")
                    .bind(bf).execute(&mut *tx).await?;
            }
            rep.lanes.push(lane.clone());
        }
        for name in &indexes {
            sqlx::query(&format!("DROP INDEX {name}")).execute(&mut *tx).await?;
        }
        sqlx::query("UPDATE tidemark_runs SET status = 'rolled_back' WHERE id = $1").bind(run).execute(&mut *tx).await?;
        // All or nothing: with conflicts (and no --force) nothing is changed.
        if dry_run || (rep.conflict_count > 0 && !force) {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
    });
    Ok(())
}

/// Runs started after `run` (which started at `started_ms`) that touched one of its rows or
/// lanes and are not rolled back, newest first.
pub async fn later_runs(sink: &Sink, run: &str, started_ms: i64) -> Result<Vec<(String, i64)>> {
    let sql = later_runs_sql(matches!(sink, Sink::Postgres(_)));
    Ok(with_pool!(sink, p => sqlx::query_as(&sql)
        .bind(run).bind(started_ms).fetch_all(p).await?))
}

/// The lanes run `run` moved, with the checkpoint each had before it.
pub async fn lanes_of_run(sink: &Sink, run: &str) -> Result<Vec<LaneRow>> {
    Ok(with_pool!(sink, p => sqlx::query_as(
        "SELECT lane, entity, existed, watermark_ms, open_from_ms, open_to_ms, last_ts, last_id, prev_run_id \
         FROM tidemark_run_lanes WHERE run_id = $1 ORDER BY lane")
        .bind(run).fetch_all(p).await?))
}

/// Records (newest first) to single-row undo steps, newest first: a grouped insert record
/// gives its keys in reverse.
fn expand(rows: Vec<ProvRow>) -> Result<Vec<Prov>> {
    let mut out = Vec::new();
    for (id, table, pk, before, after, inserted, step) in rows {
        match inserted {
            None => out.push(Prov {
                step,
                table,
                pk,
                before,
                after,
            }),
            Some(list) => {
                let list: Vec<(String, String)> = serde_json::from_str(&list).map_err(|e| {
                    anyhow!("provenance record {id} ({table}): its list of inserted rows is not readable: {e}")
                })?;
                out.extend(list.into_iter().rev().map(|(pk, h)| Prov {
                    step,
                    table: table.clone(),
                    pk,
                    before: None,
                    after: Some(h),
                }));
            }
        }
    }
    Ok(out)
}
