//! `tidemark dead-letters list|show|retry|discard`: the documents that could not be mapped.
//! `retry` maps them again with the current mapping (after a fix) through
//! [`pipeline::write_docs`], so references are pulled and provenance kept like in a run;
//! what now maps is written and its dead letter removed, what still fails is kept with the
//! new error.

use crate::cli::{DeadLetterCommand, DeadLetterFilter};
use crate::commands::lifecycle::{outcome, RunLog};
use crate::engine::pipeline::{self, Counts, Ctx};
use crate::engine::window::fmt_ts;
use crate::exit::{self, Failure};
use crate::settings::Settings;
use crate::sink::dead_letters::{discard, list, DeadLetterRow};
use crate::sink::from_ms;
use crate::source::Source;
use anyhow::{anyhow, Result};
use bson::{Bson, RawDocumentBuf};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

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
    let mapping = crate::commands::setup::load_mapping(&s)?;
    let source = Source::connect(&s.source)
        .await
        .map_err(Failure::Unavailable)?;
    let sink = if dry_run {
        crate::commands::setup::open_sink_dry(&s, &mapping).await?
    } else {
        crate::commands::setup::open_sink(&s, &mapping).await?
    };
    let letters = list(&sink, &f, i64::MAX).await?;
    let log = RunLog::start(&s, &sink, "retry", dry_run, &mapping.version, started_at).await?;
    let id = log.id().to_owned();
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
    let status = outcome(&result, &mut json, false);
    let file = log.finish(&sink, status, &json).await;
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

/// `tidemark dead-letters …`.
pub async fn execute(s: Settings, cmd: DeadLetterCommand) -> Result<i32> {
    match cmd {
        DeadLetterCommand::List {
            filter,
            limit,
            json,
        } => {
            let sink = super::setup::connect_dry(&s).await?;
            let rows = list(&sink, &filter, limit).await?;
            sink.close().await;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", format_list(&rows));
            }
        }
        DeadLetterCommand::Show { filter } => {
            let sink = super::setup::connect_dry(&s).await?;
            let rows = list(&sink, &filter, 1000).await?;
            sink.close().await;
            print!("{}", format_full(&rows));
        }
        DeadLetterCommand::Retry { filter, dry_run } => {
            let rep = retry(s, filter, dry_run).await?;
            println!("{rep}");
        }
        DeadLetterCommand::Discard { filter, all } => {
            if !all && filter.entity.is_none() && filter.run.is_none() && filter.ids.is_empty() {
                return Err(Failure::Config(anyhow!(
                    "discard needs a filter (--entity, --run, --id) or --all"
                ))
                .into());
            }
            let sink = super::setup::connect_dry(&s).await?;
            let n = discard(&sink, &filter).await?;
            sink.close().await;
            println!("discarded {n} dead letter(s)");
        }
    }
    Ok(exit::OK)
}
