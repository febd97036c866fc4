//! `tidemark sweep [--entity NAME] [--dry-run]`: find target rows whose source document was
//! hard-deleted (a hard delete leaves nothing for a time window to read) and apply the
//! entity's deleted rule to them: `delete` removes the row and its child rows,
//! `soft_delete` sets the rule's column; without a rule the rows are only reported.
//!
//! Bounded work per step: target keys are paged with a keyset on the key column
//! (`--chunk` at a time) and each page is looked up in the source with one `$in` query on
//! the id field (projection: the id only, no entity filter, so a document that still
//! exists is never taken for deleted). Changes go through the normal batch writer, so they
//! have provenance and can be rolled back like a run.

use crate::cli::SweepArgs;
use crate::commands::lifecycle::{outcome, RunLog};
use crate::engine::select::{Fallback, Selection};
use crate::exit::{self, Failure};
use crate::mapping::spec::DeleteAction;
use crate::mapping::{Entity, Value};
use crate::settings::Settings;
use crate::sink::{BatchWrite, Sink};
use crate::source::Source;
use anyhow::{anyhow, Result};
use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use serde::Serialize;
use std::collections::HashSet;
use std::time::Instant;

/// What one entity's sweep found and did.
#[derive(Debug, Default, Serialize)]
pub struct EntitySweep {
    pub entity: String,
    pub rule: String,
    /// Target rows compared with the source.
    pub checked: u64,
    /// Rows whose source document is gone.
    pub vanished: u64,
    /// Rows removed or soft-deleted (0 without a rule, and in a dry run what would be).
    pub applied: u64,
    /// Keys of vanished rows (at most 100).
    pub ids: Vec<String>,
    pub source_queries: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct SweepReport {
    pub run_id: String,
    pub dry_run: bool,
    pub entities: Vec<EntitySweep>,
    pub elapsed_ms: u64,
    #[serde(skip)]
    pub report_file: Option<String>,
}

impl std::fmt::Display for SweepReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.dry_run {
            writeln!(f, "DRY RUN, nothing changed:")?;
        }
        writeln!(
            f,
            "{:<18} {:<12} {:>9} {:>9} {:>9}",
            "entity", "rule", "checked", "vanished", "applied"
        )?;
        for e in &self.entities {
            writeln!(
                f,
                "{:<18} {:<12} {:>9} {:>9} {:>9}",
                e.entity, e.rule, e.checked, e.vanished, e.applied
            )?;
            for id in &e.ids {
                writeln!(f, "  gone from the source: {} {id}", e.entity)?;
            }
        }
        if let Some(p) = &self.report_file {
            writeln!(f, "report: {p}")?;
        }
        write!(f, "sweep {}", self.run_id)
    }
}

/// A value as the text both sides agree on (ObjectId as hex, numbers as digits).
fn bson_text(b: &Bson) -> String {
    match b {
        Bson::String(s) => s.clone(),
        Bson::ObjectId(o) => o.to_hex(),
        Bson::Int32(i) => i.to_string(),
        Bson::Int64(i) => i.to_string(),
        Bson::Double(d) if d.fract() == 0.0 && d.abs() < 1e15 => (*d as i64).to_string(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

fn lookup_values(v: &Value) -> Vec<Bson> {
    match v {
        Value::Text(s) => crate::commands::record::id_values(s),
        Value::Int(i) => vec![
            Bson::Int32(*i),
            Bson::Int64(*i as i64),
            Bson::Double(*i as f64),
        ],
        Value::BigInt(i) => {
            let mut out = vec![Bson::Int64(*i), Bson::Double(*i as f64)];
            if let Ok(n) = i32::try_from(*i) {
                out.push(Bson::Int32(n));
            }
            out
        }
        other => vec![Bson::String(other.key_text())],
    }
}

struct Job<'a> {
    source: &'a Source,
    sink: &'a Sink,
    run_id: &'a str,
    mapping_version: &'a str,
    dry_run: bool,
    provenance: bool,
    chunk: usize,
}

async fn sweep_entity(j: &Job<'_>, e: &Entity) -> Result<EntitySweep> {
    let kc = e.key_column.ok_or_else(|| {
        anyhow!(
            "{} has no column holding its id_field `{}`; sweep cannot match rows to documents",
            e.name,
            e.id_field
        )
    })?;
    let rule = e.deleted.as_ref().map(|d| d.action);
    let mut out = EntitySweep {
        entity: e.name.clone(),
        rule: match rule {
            Some(DeleteAction::Delete) => "delete",
            Some(DeleteAction::SoftDelete) => "soft_delete",
            None => "report only",
        }
        .into(),
        ..Default::default()
    };
    let soft_col = e.deleted.as_ref().and_then(|d| d.column);
    let coll = j.source.db.collection::<Document>(&e.collection);
    let mut after: Option<Value> = None;
    loop {
        let rows = j
            .sink
            .scan_rows(e.table_ref(), kc, after.as_ref(), None, j.chunk)
            .await?;
        let Some(last) = rows.last() else { break };
        after = Some(last[kc].clone());
        out.checked += rows.len() as u64;
        let values: Vec<Bson> = rows.iter().flat_map(|r| lookup_values(&r[kc])).collect();
        let found: HashSet<String> = coll
            .find(doc! { &e.id_field: { "$in": values } })
            .projection(doc! { &e.id_field: 1 })
            .await?
            .try_collect::<Vec<Document>>()
            .await?
            .iter()
            .filter_map(|d| d.get(&e.id_field).map(bson_text))
            .collect();
        out.source_queries += 1;
        let gone: Vec<&Vec<Value>> = rows
            .iter()
            .filter(|r| r[kc] != Value::Null && !found.contains(&r[kc].key_text()))
            .collect();
        out.vanished += gone.len() as u64;
        for r in &gone {
            if out.ids.len() < 100 {
                out.ids
                    .push(crate::mapping::canon::key_of_row(e.table_ref(), r));
            }
        }
        let keys: Vec<Vec<Value>> = gone
            .iter()
            .map(|r| e.pk.iter().map(|&i| r[i].clone()).collect())
            .collect();
        let now = Value::Timestamp(crate::engine::window::to_millis(chrono::Utc::now()));
        let soft: Vec<(Vec<Value>, Value)> = match soft_col {
            Some(c) => gone
                .iter()
                .zip(&keys)
                .filter(|(r, _)| r[c] == Value::Null)
                .map(|(_, k)| (k.clone(), now.clone()))
                .collect(),
            None => Vec::new(),
        };
        let (deletes, soft) = match rule {
            Some(DeleteAction::Delete) => (keys, Vec::new()),
            Some(DeleteAction::SoftDelete) => (Vec::new(), soft),
            None => (Vec::new(), Vec::new()),
        };
        if deletes.is_empty() && soft.is_empty() {
            continue;
        }
        let o = j
            .sink
            .write_batch(&BatchWrite {
                entity: Some(e),
                deletes: &deletes,
                soft_deletes: &soft,
                run_id: j.run_id,
                mapping_version: j.mapping_version,
                dry_run: j.dry_run,
                provenance: j.provenance,
                ..Default::default()
            })
            .await?;
        out.applied += o.deleted;
    }
    Ok(out)
}

/// `tidemark sweep`.
pub async fn sweep(
    s: Settings,
    entities: Vec<String>,
    dry_run: bool,
    chunk: usize,
) -> Result<SweepReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let mapping = crate::commands::setup::load_mapping(&s)?;
    let names = Selection::new(&mapping, &entities)
        .or(Fallback::Keyed)
        .names()?;
    let source = Source::connect(&s.source)
        .await
        .map_err(Failure::Unavailable)?;
    let sink = if dry_run {
        crate::commands::setup::open_sink_dry(&s, &mapping).await?
    } else {
        crate::commands::setup::open_sink(&s, &mapping).await?
    };
    let log = RunLog::start(&s, &sink, "sweep", dry_run, &mapping.version, started_at).await?;
    let id = log.id().to_owned();
    let job = Job {
        source: &source,
        sink: &sink,
        run_id: &id,
        mapping_version: &mapping.version,
        dry_run,
        provenance: s.sync.provenance,
        chunk: chunk.max(1),
    };
    let mut rep = SweepReport {
        run_id: id.clone(),
        dry_run,
        ..Default::default()
    };
    let mut result = Ok(());
    for n in &names {
        match sweep_entity(&job, mapping.entity(n)?).await {
            Ok(r) => rep.entities.push(r),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    rep.elapsed_ms = started.elapsed().as_millis() as u64;
    let mut json = serde_json::to_value(&rep)?;
    let status = outcome(&result, &mut json, false);
    let file = log.finish(&sink, status, &json).await;
    rep.report_file = file.ok().map(|p| p.display().to_string());
    sink.close().await;
    result.map(|_| rep)
}

/// `tidemark sweep`.
pub async fn execute(s: Settings, args: SweepArgs) -> Result<i32> {
    let rep = sweep(s, args.entities, args.dry_run, args.chunk).await?;
    println!("{rep}");
    Ok(exit::OK)
}
