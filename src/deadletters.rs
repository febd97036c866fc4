//! `tidemark dead-letters list|show|retry|discard`: the documents that could not be mapped.
//! `retry` maps them again with the current mapping (after a fix) through
//! [`pipeline::write_docs`], so references are pulled and provenance kept like in a run;
//! what now maps is written and its dead letter removed, what still fails is kept with the
//! new error.

use crate::app::{self, fingerprint};
use crate::cli::DeadLetterFilter;
use crate::exit::Failure;
use crate::lock::with_pool;
use crate::pipeline::{self, Counts, Ctx};
use crate::settings::Settings;
use crate::sink::{from_ms, RunRecord, Sink};
use crate::source::Source;
use crate::window::fmt_ts;
use anyhow::{anyhow, Result};
use bson::{Bson, RawDocumentBuf};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// One dead letter.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadLetterRow {
    pub entity: String,
    pub source_id: String,
    pub run_id: String,
    pub error: String,
    pub document: String,
    pub mapping_version: String,
    pub created_at_ms: i64,
}

fn push_filter<'a, DB: sqlx::Database>(q: &mut sqlx::QueryBuilder<'a, DB>, f: &'a DeadLetterFilter)
where
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    q.push(" WHERE 1 = 1");
    if let Some(e) = &f.entity {
        q.push(" AND entity = ").push_bind(e.clone());
    }
    if let Some(r) = &f.run {
        q.push(" AND run_id = ").push_bind(r.clone());
    }
    if !f.ids.is_empty() {
        q.push(" AND source_id IN (");
        let mut sep = q.separated(", ");
        for id in &f.ids {
            sep.push_bind(id.clone());
        }
        q.push(")");
    }
}

/// Dead letters matching `f`, ordered by entity and source id.
pub async fn list(sink: &Sink, f: &DeadLetterFilter, limit: i64) -> Result<Vec<DeadLetterRow>> {
    Ok(with_pool!(sink, p => {
        let mut q = sqlx::QueryBuilder::new(
            "SELECT entity, source_id, run_id, error, document, mapping_version, created_at_ms FROM tidemark_dead_letters");
        push_filter(&mut q, f);
        q.push(" ORDER BY entity, source_id LIMIT ").push_bind(limit);
        q.build_query_as::<DeadLetterRow>().fetch_all(p).await?
    }))
}

/// Delete the dead letters matching `f`; returns how many.
pub async fn discard(sink: &Sink, f: &DeadLetterFilter) -> Result<u64> {
    Ok(with_pool!(sink, p => {
        let mut q = sqlx::QueryBuilder::new("DELETE FROM tidemark_dead_letters");
        push_filter(&mut q, f);
        q.build().execute(p).await?.rows_affected()
    }))
}

/// `dead-letters list`.
pub fn format_list(rows: &[DeadLetterRow]) -> String {
    let mut out = format!("{:<16} {:<40} {:<36} error\n", "entity", "source_id", "run");
    for r in rows {
        let err: String = r.error.chars().take(100).collect();
        out.push_str(&format!(
            "{:<16} {:<40} {:<36} {err}\n",
            r.entity, r.source_id, r.run_id
        ));
    }
    out.push_str(&format!("{} dead letter(s)\n", rows.len()));
    out
}

/// `dead-letters show`.
pub fn format_full(rows: &[DeadLetterRow]) -> String {
    let mut out = String::new();
    for r in rows {
        let doc = serde_json::from_str::<serde_json::Value>(&r.document)
            .and_then(|d| serde_json::to_string_pretty(&d))
            .unwrap_or_else(|_| r.document.clone());
        out.push_str(&format!(
            "entity:          {}\nsource_id:       {}\nrun:             {}\nmapping version: {}\ncreated:         {}\nerror:           {}\ndocument:\n{doc}\n\n",
            r.entity,
            r.source_id,
            r.run_id,
            r.mapping_version,
            fmt_ts(from_ms(r.created_at_ms)),
            r.error
        ));
    }
    out
}

/// The outcome of a retry.
#[derive(Debug, Default, Serialize)]
pub struct RetryReport {
    pub run_id: String,
    pub dry_run: bool,
    /// Per entity: dead letters retried, fixed (written, filtered or deleted now), still failing.
    pub entities: BTreeMap<String, RetryTally>,
    pub counts: Counts,
    /// Documents no longer in the source, retried from the stored copy.
    pub from_stored_copy: u64,
    pub elapsed_ms: u64,
    #[serde(skip)]
    pub report_file: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct RetryTally {
    pub retried: u64,
    pub fixed: u64,
    pub still_failing: u64,
}

impl std::fmt::Display for RetryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.dry_run {
            writeln!(f, "DRY RUN, nothing written:")?;
        }
        writeln!(
            f,
            "{:<20} {:>8} {:>8} {:>14}",
            "entity", "retried", "fixed", "still failing"
        )?;
        for (e, t) in &self.entities {
            writeln!(
                f,
                "{e:<20} {:>8} {:>8} {:>14}",
                t.retried, t.fixed, t.still_failing
            )?;
        }
        if let Some(p) = &self.report_file {
            writeln!(f, "report: {p}")?;
        }
        write!(
            f,
            "retry {}: {} rows written, {} from the stored copy (gone from the source)",
            self.run_id, self.counts.written, self.from_stored_copy
        )
    }
}

fn stored_doc(d: &DeadLetterRow) -> Option<RawDocumentBuf> {
    let v: serde_json::Value = serde_json::from_str(&d.document).ok()?;
    match Bson::try_from(v).ok()? {
        Bson::Document(doc) => RawDocumentBuf::from_document(&doc).ok(),
        _ => None,
    }
}

/// `dead-letters retry`.
pub async fn retry(s: Settings, f: DeadLetterFilter, dry_run: bool) -> Result<RetryReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let mapping = app::load_mapping(&s)?;
    let source = Source::connect(&s.source)
        .await
        .map_err(Failure::Unavailable)?;
    let sink = if dry_run {
        app::open_sink_dry(&s, &mapping).await?
    } else {
        app::open_sink(&s, &mapping).await?
    };
    let letters = list(&sink, &f, i64::MAX).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let record = RunRecord {
        id: id.clone(),
        kind: "retry".into(),
        dry_run,
        settings_fingerprint: fingerprint(&s),
        mapping_version: mapping.version.clone(),
    };
    if !dry_run {
        sink.start_run(&record).await?;
    }
    let dir = s.reports_path();
    let mut ctx = Ctx::new(
        s,
        mapping,
        source,
        sink.clone(),
        id.clone(),
        Arc::new(AtomicBool::new(false)),
    );
    ctx.dry_run = dry_run;
    let mut rep = RetryReport {
        run_id: id.clone(),
        dry_run,
        ..Default::default()
    };
    let mut by_entity: BTreeMap<String, Vec<DeadLetterRow>> = BTreeMap::new();
    for d in letters {
        by_entity.entry(d.entity.clone()).or_default().push(d);
    }
    let result = retry_all(&ctx, by_entity, &mut rep).await;
    rep.elapsed_ms = started.elapsed().as_millis() as u64;
    let mut json = serde_json::to_value(&rep)?;
    let status = match &result {
        Ok(()) => "ok",
        Err(e) => {
            json["error"] = serde_json::Value::String(crate::secret::redact_uri(&format!("{e:#}")));
            "failed"
        }
    };
    let file = if dry_run {
        crate::reports::finish_dry(&dir, &record, started_at, status, &json)
    } else {
        crate::reports::finish(&sink, &dir, &id, status, &json).await
    };
    rep.report_file = file.ok().map(|p| p.display().to_string());
    sink.close().await;
    result.map(|_| rep)
}

async fn retry_all(
    ctx: &Ctx,
    by_entity: BTreeMap<String, Vec<DeadLetterRow>>,
    rep: &mut RetryReport,
) -> Result<()> {
    for (name, letters) in by_entity {
        let e = ctx.mapping.entity(&name).map_err(|_| {
            anyhow!("dead letters of `{name}`, which the mapping no longer defines: discard them with `tidemark dead-letters discard --entity {name}`")
        })?;
        let tally = rep.entities.entry(name.clone()).or_default();
        for chunk in letters.chunks(ctx.settings.source.batch_size) {
            let ids: Vec<Bson> = chunk
                .iter()
                .filter_map(|d| serde_json::from_str::<serde_json::Value>(&d.source_id).ok())
                .filter_map(|v| Bson::try_from(v).ok())
                .collect();
            let mut docs = ctx.source.fetch_in(e, "_id", ids).await?;
            let found: std::collections::HashSet<String> =
                docs.iter().map(|d| pipeline::source_id(d)).collect();
            for d in chunk.iter().filter(|d| !found.contains(&d.source_id)) {
                if let Some(doc) = stored_doc(d) {
                    docs.push(doc);
                    rep.from_stored_copy += 1;
                }
            }
            let c = pipeline::write_docs(ctx, e, &docs, None, true).await?;
            rep.counts.add(&c);
            tally.retried += chunk.len() as u64;
            tally.still_failing += c.dead_lettered + c.deferred;
        }
        tally.fixed = tally.retried.saturating_sub(tally.still_failing);
    }
    Ok(())
}
