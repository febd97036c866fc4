//! `tidemark backfill --dry-run`: the range's chunks read, mapped and resolved in this
//! process with every batch rolled back (see [`backfill_dry_run`]).

use super::{entity_names, plan_chunks};
use crate::commands::lifecycle::{outcome, RunLog};
use crate::commands::run::RunReport;
use crate::commands::setup::{load_mapping, open_sink_dry};
use crate::engine::pipeline::{self, Counts, Ctx, EntityReport};
use crate::engine::window::{fmt_ts, ChunkBy, Window};
use crate::exit::Failure;
use crate::settings::Settings;
use crate::source::Source;
use crate::timearg;
use anyhow::Result;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// `tidemark backfill --dry-run`: every chunk of the range read, mapped and resolved in
/// this process, one after another, with every batch rolled back. No backfill ledger, no
/// checkpoints, no runs-ledger row: only the report file.
pub async fn backfill_dry_run(
    s: Settings,
    from: &str,
    to: &str,
    entities: Vec<String>,
    chunk: ChunkBy,
    stop: Arc<AtomicBool>,
) -> Result<RunReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let mapping = load_mapping(&s)?;
    let (f, t) = timearg::parse_range(from, to, chrono::Utc::now()).map_err(Failure::Config)?;
    let (f, t) = (
        crate::engine::window::to_millis(f),
        crate::engine::window::to_millis(t),
    );
    let names = entity_names(&entities, &s, &mapping)?;
    let source = Source::connect(&s.source)
        .await
        .map_err(Failure::Unavailable)?;
    let settled = source.server_time().await? - chrono::TimeDelta::from_std(s.sync.settle)?;
    let t = t.min(crate::engine::window::to_millis(settled));
    let sink = open_sink_dry(&s, &mapping).await?;
    let log = RunLog::new(&s, "backfill", true, &mapping.version, started_at);
    let run_id = log.id().to_owned();
    let mut ctx = Ctx::new(s, mapping, source, sink, run_id.clone(), stop);
    ctx.dry_run = true;
    let ctx = Arc::new(ctx);
    let mut reports = Vec::new();
    let mut totals = Counts::default();
    let mut result = Ok(());
    'entities: for n in &names {
        let e = ctx.mapping.entity(n)?.clone();
        let e_started = Instant::now();
        let mut counts = Counts::default();
        let windows = if f < t {
            plan_chunks(&ctx.source, &e, Window::new(f, t), chunk)
                .await?
                .0
        } else {
            Vec::new()
        };
        for w in &windows {
            let lane = format!("dry-run:{run_id}:{n}");
            match pipeline::run_window(&ctx, &e, &lane, None, *w, None, true).await {
                Ok(r) => counts.add(&r.counts),
                Err(err) => {
                    result = Err(err);
                    break 'entities;
                }
            }
        }
        totals.add(&counts);
        reports.push(EntityReport {
            entity: n.clone(),
            windows: windows.len(),
            counts,
            watermark: None,
            warnings: Vec::new(),
            elapsed_ms: e_started.elapsed().as_millis() as u64,
        });
    }
    let mut report = RunReport {
        run_id,
        dry_run: true,
        entities: reports,
        rows_written: totals.rows_written(),
        totals,
        elapsed_ms: started.elapsed().as_millis() as u64,
        report_file: None,
    };
    let mut json = serde_json::to_value(&report)?;
    json["range"] = serde_json::json!({ "from": fmt_ts(f), "to": fmt_ts(t), "chunk": match chunk {
        ChunkBy::Duration(d) => humantime::format_duration(d).to_string(),
        ChunkBy::Docs(n) => format!("{n} documents"),
    } });
    let status = outcome(&result, &mut json, false);
    if let Ok(p) = log.finish(&ctx.sink, status, &json).await {
        report.report_file = Some(p.display().to_string());
    }
    ctx.sink.close().await;
    result.map(|_| report)
}
