//! Command implementations: wire settings, mapping, source and sink together.

use crate::exit::Failure;
use crate::mapping::Mapping;
use crate::pipeline::{self, Counts, Ctx, EntityReport};
use crate::settings::Settings;
use crate::sink::{ddl, RunRecord, Sink};
use crate::source::Source;
use crate::timearg;
use crate::window::fmt_ts;
use anyhow::Result;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

/// Load and compile the mapping named in the settings (a config failure).
pub fn load_mapping(s: &Settings) -> Result<Mapping> {
    Mapping::load(&s.sync.mapping).map_err(|e| Failure::Config(e).into())
}

/// Hash of the effective settings (secrets are redacted in Debug, so never part of it).
pub fn fingerprint(s: &Settings) -> String {
    hex::encode(&Sha256::digest(format!("{s:?}").as_bytes())[..8])
}

/// Connect to the target and bring the tool's tables and the mapped tables up to date.
pub async fn open_sink(s: &Settings, mapping: &Mapping) -> Result<Sink> {
    let sink = Sink::connect(&s.target.url, s.target.max_connections)
        .await
        .map_err(Failure::Unavailable)?;
    sink.check_foreign_key_checks(s.target.foreign_key_checks)
        .await
        .map_err(Failure::Config)?;
    sink.migrate_tool_tables().await?;
    // Several processes starting at once on a fresh target (backfill workers on many hosts)
    // race on CREATE TABLE IF NOT EXISTS, which PostgreSQL can fail with a duplicate
    // pg_type key; planning again sees the tables the winner created.
    let mut attempt = 0;
    let plan = loop {
        attempt += 1;
        let plan = ddl::plan(&sink, mapping).await?;
        match ddl::apply(&sink, &plan).await {
            Ok(_) => break plan,
            Err(e) if attempt < 3 => {
                warn!(error = %format!("{e:#}"), "creating mapped tables failed; planning again (another process may have created them)");
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => return Err(e.context("creating mapped tables")),
        }
    };
    for m in &plan.manual {
        warn!("schema difference not applied: {m}");
    }
    Ok(sink)
}

/// The result of `tidemark run`.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub run_id: String,
    /// Nothing was written: the counts say what a real run would have done.
    pub dry_run: bool,
    pub entities: Vec<EntityReport>,
    pub totals: Counts,
    pub elapsed_ms: u64,
    /// Where the JSON report was written.
    #[serde(skip)]
    pub report_file: Option<String>,
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<18} {:>8} {:>8} {:>9} {:>6} {:>8} {:>7} {:>7} {:>7} {:>8} {:>7}  watermark",
            "entity",
            "read",
            "written",
            "unchanged",
            "dead",
            "filtered",
            "deleted",
            "pulled",
            "missing",
            "deferred",
            "badtime"
        )?;
        for e in &self.entities {
            let c = &e.counts;
            writeln!(
                f,
                "{:<18} {:>8} {:>8} {:>9} {:>6} {:>8} {:>7} {:>7} {:>7} {:>8} {:>7}  {}",
                e.entity,
                c.read,
                c.written,
                c.unchanged,
                c.dead_lettered,
                c.filtered,
                c.deleted,
                c.pulled,
                c.missing_refs,
                c.deferred,
                c.invalid_time,
                e.watermark.map(fmt_ts).unwrap_or_else(|| "-".into())
            )?;
        }
        let secs = self.elapsed_ms as f64 / 1000.0;
        if self.dry_run {
            let t = &self.totals;
            writeln!(
                f,
                "DRY RUN, nothing written: would insert {}, update {}, leave {} unchanged, \
                 dead-letter {}, pull {} documents on demand ({} rows)",
                t.inserted, t.updated, t.unchanged, t.dead_lettered, t.pulled, t.pulled_written
            )?;
        }
        if let Some(p) = &self.report_file {
            writeln!(f, "report: {p}")?;
        }
        write!(
            f,
            "run {}: {} documents read, {} rows written in {:.1}s ({:.0} documents/s)",
            self.run_id,
            self.totals.read,
            self.totals.written,
            secs,
            self.totals.read as f64 / secs.max(0.001)
        )
    }
}

/// Options of a catch-up run.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    pub entities: Vec<String>,
    pub until: Option<String>,
    /// Wait for lanes held by another process instead of failing with exit code 4.
    pub wait: bool,
    /// Read, map and resolve everything but roll every batch back: nothing is written.
    pub dry_run: bool,
    /// Migrate only these records (by the entity's `id_field`), regardless of windows.
    pub ids: Vec<String>,
}

/// Connect for a dry run: no migrations, no DDL; a target that is not migrated is an error.
pub async fn open_sink_dry(s: &Settings, mapping: &Mapping) -> Result<Sink> {
    let url = s.target.url.expose();
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or(url.strip_prefix("sqlite:"))
    {
        let path = path.split('?').next().unwrap_or(path);
        if !std::path::Path::new(path).exists() {
            return Err(Failure::Config(anyhow::anyhow!(
                "the SQLite target {path} does not exist; a dry run creates nothing: run `tidemark migrate` first"
            ))
            .into());
        }
    }
    let sink = Sink::connect(&s.target.url, s.target.max_connections)
        .await
        .map_err(Failure::Unavailable)?;
    sink.check_foreign_key_checks(s.target.foreign_key_checks)
        .await
        .map_err(Failure::Config)?;
    if !sink.tool_tables_current().await? {
        sink.close().await;
        return Err(Failure::Config(anyhow::anyhow!(
            "tidemark's own tables in the target are missing or older than this binary; \
             a dry run changes nothing, so run `tidemark migrate` first"
        ))
        .into());
    }
    let plan = ddl::plan(&sink, mapping).await?;
    if !plan.apply.is_empty() {
        sink.close().await;
        return Err(Failure::Config(anyhow::anyhow!(
            "the mapped tables are missing or lack columns ({} statement(s) pending, see `tidemark migrate --print`); \
             a dry run changes nothing, so run `tidemark migrate` first",
            plan.apply.len()
        ))
        .into());
    }
    Ok(sink)
}

/// The settings a run's target pool is opened with. On SQLite a run writes one batch at a
/// time (`target.batches_in_flight` is 1 there), and each pooled connection keeps a page
/// cache of its own (SQLite's default, ~2 MB): the batches' transactions rotate over the
/// pool's idle connections and warm every one. Two connections hold the writer and, beside
/// it, the resolve stage or the lease; more only add caches. The flat run into SQLite
/// peaked at 55–66 MB with 4 (the default `target.max_connections`), 56–57 MB with 2
/// (BENCHMARKS.md, twelfth round). A backfill sizes its own pool (its chunks write at once).
fn run_pool(s: &Settings) -> Settings {
    let mut pool = s.clone();
    if s.target.is_sqlite() {
        pool.target.max_connections = s.target.max_connections.min(2);
    }
    pool
}

/// `tidemark run`: catch every selected entity up (or, with `ids`, migrate single records).
pub async fn run(s: Settings, opts: RunOptions, stop: Arc<AtomicBool>) -> Result<RunReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let mapping = load_mapping(&s)?;
    let mut names = if opts.entities.is_empty() {
        s.sync.entities.clone()
    } else {
        opts.entities.clone()
    };
    if names.is_empty() {
        names = mapping.entities.iter().map(|e| e.name.clone()).collect();
    }
    for n in &names {
        mapping.entity(n).map_err(Failure::Config)?;
    }
    if !opts.ids.is_empty() && opts.entities.len() != 1 {
        return Err(Failure::Config(anyhow::anyhow!(
            "--id needs exactly one --entity, e.g. tidemark run --entity vizzes --id 1a2b…"
        ))
        .into());
    }
    let until = opts
        .until
        .as_deref()
        .map(|u| timearg::parse_instant(u, chrono::Utc::now()))
        .transpose()
        .map_err(Failure::Config)?
        .map(crate::window::to_millis);
    let source = Source::connect(&s.source)
        .await
        .map_err(Failure::Unavailable)?;
    let pool = run_pool(&s);
    let sink = if opts.dry_run {
        open_sink_dry(&pool, &mapping).await?
    } else {
        open_sink(&pool, &mapping).await?
    };
    // Single records move no checkpoint and a dry run writes nothing: neither takes the lanes.
    let lease = if opts.dry_run || !opts.ids.is_empty() {
        None
    } else {
        let lanes: Vec<String> = names.iter().map(|n| pipeline::nightly_lane(n)).collect();
        let lock_opts = crate::lock::LockOptions {
            lease: s.lock.lease,
            wait: opts.wait,
        };
        match crate::lock::acquire(&sink, &lanes, lock_opts, stop.clone()).await {
            Ok(l) => Some(l),
            Err(e) => {
                if crate::exit::code(&e) == crate::exit::LOCK_HELD {
                    crate::prom::record_run("lock_held", 0, chrono::Utc::now());
                }
                sink.close().await;
                return Err(e);
            }
        }
    };
    if !opts.dry_run {
        crate::prom::set_in_progress(true);
    }
    let run_id = uuid::Uuid::new_v4().to_string();
    let record = RunRecord {
        id: run_id.clone(),
        kind: if opts.ids.is_empty() { "run" } else { "record" }.into(),
        dry_run: opts.dry_run,
        settings_fingerprint: fingerprint(&s),
        mapping_version: mapping.version.clone(),
    };
    if !opts.dry_run {
        sink.start_run(&record).await?;
    }
    info!(run_id = %run_id, dry_run = opts.dry_run, target = %s.target.url, source = %s.source.uri, "run started");
    let reports_dir = s.reports_path();
    let mut ctx = Ctx::new(s, mapping, source, sink, run_id.clone(), stop);
    ctx.dry_run = opts.dry_run;
    let ctx = Arc::new(ctx);
    let mut reports = Vec::new();
    let mut result = Ok(());
    let mut failed_entity = None;
    for n in &names {
        let e = ctx.mapping.entity(n)?.clone();
        let r = if opts.ids.is_empty() {
            pipeline::catch_up(&ctx, &e, until).await
        } else {
            crate::record::migrate_records(&ctx, &e, &opts.ids).await
        };
        match r {
            Ok(r) => {
                if !opts.dry_run {
                    crate::prom::record_entity(&r, chrono::Utc::now());
                }
                reports.push(r);
            }
            Err(err) => {
                failed_entity = Some(n.clone());
                result = Err(err);
                break;
            }
        }
    }
    if lease.as_ref().is_some_and(|l| l.is_lost()) && result.is_ok() {
        result = Err(anyhow::anyhow!(
            "the lease on {:?} was lost during the run (another process took a lane over after it expired); \
             check lock.lease against how long the target stalls",
            lease.as_ref().map(|l| l.lanes()).unwrap_or_default()
        ));
    }
    let mut totals = Counts::default();
    for r in &reports {
        totals.add(&r.counts);
    }
    let mut report = RunReport {
        run_id: run_id.clone(),
        dry_run: opts.dry_run,
        entities: reports,
        totals,
        elapsed_ms: started.elapsed().as_millis() as u64,
        report_file: None,
    };
    let (status, json) = match &result {
        Ok(()) => ("ok", serde_json::to_value(&report)?),
        Err(e) => {
            let status = if crate::exit::code(e) == crate::exit::PARTIAL {
                "partial"
            } else {
                "failed"
            };
            let mut v = serde_json::to_value(&report)?;
            v["error"] = serde_json::Value::String(crate::secret::redact_uri(&format!("{e:#}")));
            if let Some(n) = &failed_entity {
                v["failed_entity"] = serde_json::Value::String(n.clone());
            }
            (status, v)
        }
    };
    let written = if opts.dry_run {
        crate::reports::finish_dry(&reports_dir, &record, started_at, status, &json)
    } else {
        crate::reports::finish(&ctx.sink, &reports_dir, &run_id, status, &json).await
    };
    match written {
        Ok(p) => report.report_file = Some(p.display().to_string()),
        Err(e) => warn!(error = %format!("{e:#}"), "run report file not written"),
    }
    if !opts.dry_run {
        crate::prom::record_run(status, report.elapsed_ms, chrono::Utc::now());
        crate::prom::set_in_progress(false);
    }
    if let Some(lease) = lease {
        if let Err(e) = lease.release().await {
            warn!(error = %format!("{e:#}"), "could not release the lane leases; they expire after lock.lease");
        }
    }
    ctx.sink.close().await;
    result.map(|_| report)
}

/// `tidemark migrate [--print]`.
pub async fn migrate(s: &Settings, print_only: bool) -> Result<String> {
    let mapping = load_mapping(s)?;
    let sink = Sink::connect(&s.target.url, 1)
        .await
        .map_err(Failure::Unavailable)?;
    if !print_only {
        sink.migrate_tool_tables().await?;
    }
    let plan = ddl::plan(&sink, &mapping).await?;
    let mut out = String::new();
    for st in &plan.apply {
        out.push_str(st);
        out.push_str(";\n");
    }
    if !print_only {
        ddl::apply(&sink, &plan).await?;
        out.push_str(&format!(
            "applied {} statement(s) on {}\n",
            plan.apply.len(),
            sink.backend()
        ));
    }
    for m in &plan.manual {
        out.push_str(&format!(
            "NOT APPLIED (destructive or ambiguous), run by hand if intended:\n{m}\n"
        ));
    }
    sink.close().await;
    Ok(out)
}

/// `tidemark check-config`: resolved settings (redacted) and the compiled mapping.
pub fn check_config(s: &Settings) -> Result<String> {
    let mapping = load_mapping(s)?;
    let mut out = format!(
        "settings OK (fingerprint {})\n{s:#?}\n\nmapping {} OK (version {})\n",
        fingerprint(s),
        s.sync.mapping.display(),
        mapping.version
    );
    for e in &mapping.entities {
        out.push_str(&format!(
            "  {:<18} {} -> {} ({} columns, time {} as {:?})\n",
            e.name,
            e.collection,
            e.table,
            e.columns.len(),
            e.time_field,
            e.time_encoding
        ));
    }
    Ok(out)
}

/// `tidemark backfill --dry-run`: every chunk of the range read, mapped and resolved in
/// this process, one after another, with every batch rolled back. No backfill ledger, no
/// checkpoints, no runs-ledger row: only the report file.
pub async fn backfill_dry_run(
    s: Settings,
    from: &str,
    to: &str,
    entities: Vec<String>,
    chunk: std::time::Duration,
    stop: Arc<AtomicBool>,
) -> Result<RunReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let mapping = load_mapping(&s)?;
    let (f, t) = timearg::parse_range(from, to, chrono::Utc::now()).map_err(Failure::Config)?;
    let (f, t) = (crate::window::to_millis(f), crate::window::to_millis(t));
    if chunk.is_zero() {
        return Err(
            Failure::Config(anyhow::anyhow!("--chunk must be longer than 0s, e.g. 1d")).into(),
        );
    }
    let names: Vec<String> = if !entities.is_empty() {
        entities
    } else if !s.sync.entities.is_empty() {
        s.sync.entities.clone()
    } else {
        mapping
            .entities
            .iter()
            .filter(|e| e.windowed)
            .map(|e| e.name.clone())
            .collect()
    };
    for n in &names {
        mapping.entity(n).map_err(Failure::Config)?;
    }
    let source = Source::connect(&s.source)
        .await
        .map_err(Failure::Unavailable)?;
    let settled = source.server_time().await? - chrono::TimeDelta::from_std(s.sync.settle)?;
    let t = t.min(crate::window::to_millis(settled));
    let sink = open_sink_dry(&s, &mapping).await?;
    let run_id = uuid::Uuid::new_v4().to_string();
    let record = RunRecord {
        id: run_id.clone(),
        kind: "backfill".into(),
        dry_run: true,
        settings_fingerprint: fingerprint(&s),
        mapping_version: mapping.version.clone(),
    };
    let reports_dir = s.reports_path();
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
            crate::window::chunks(f, t, chunk)
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
        totals,
        elapsed_ms: started.elapsed().as_millis() as u64,
        report_file: None,
    };
    let mut json = serde_json::to_value(&report)?;
    json["range"] = serde_json::json!({ "from": fmt_ts(f), "to": fmt_ts(t), "chunk": humantime::format_duration(chunk).to_string() });
    let status = match &result {
        Ok(()) => "ok",
        Err(e) => {
            json["error"] = serde_json::Value::String(crate::secret::redact_uri(&format!("{e:#}")));
            "failed"
        }
    };
    if let Ok(p) = crate::reports::finish_dry(&reports_dir, &record, started_at, status, &json) {
        report.report_file = Some(p.display().to_string());
    }
    ctx.sink.close().await;
    result.map(|_| report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_on_sqlite_pools_two_connections_at_most() {
        let mut s = Settings::load(None).expect("defaults are valid");
        s.target.url = crate::secret::SecretUri::new("sqlite://state/x.db");
        s.target.max_connections = 4;
        assert_eq!(run_pool(&s).target.max_connections, 2);
        s.target.max_connections = 1;
        assert_eq!(run_pool(&s).target.max_connections, 1);
        s.target.max_connections = 6;
        s.target.url = crate::secret::SecretUri::new("postgres://u@h/db");
        assert_eq!(
            run_pool(&s).target.max_connections,
            6,
            "PostgreSQL keeps its pool"
        );
    }
}
