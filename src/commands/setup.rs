//! What every command that touches the target does first: load the mapping, open the
//! sink (migrated, or checked for a dry run), fingerprint the settings.

use crate::exit::Failure;
use crate::mapping::Mapping;
use crate::settings::{ForeignKeyChecks, Settings};
use crate::sink::{ddl, Sink, SqliteTuning};
use anyhow::Result;
use backon::Retryable;
use sha2::{Digest, Sha256};
use tracing::warn;

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
    let tuning = SqliteTuning {
        tidemark_checks_references: s.target.foreign_key_checks == ForeignKeyChecks::Tidemark,
        ..SqliteTuning::of(&s.target)
    };
    let sink = Sink::connect_tuned(&s.target.url, s.target.max_connections, tuning)
        .await
        .map_err(Failure::Unavailable)?;
    sink.check_foreign_key_checks(s.target.foreign_key_checks)
        .await
        .map_err(Failure::Config)?;
    sink.migrate_tool_tables().await?;
    // Several processes starting at once on a fresh target (backfill workers on many hosts)
    // race on CREATE TABLE IF NOT EXISTS, which PostgreSQL can fail with a duplicate
    // pg_type key; planning again sees the tables the winner created.
    let target = &sink;
    let checks = s.target.foreign_key_checks;
    let plan = (|| async move {
        let plan = ddl::plan(target, mapping, checks).await?;
        ddl::apply(target, &plan).await?;
        Ok::<_, anyhow::Error>(plan)
    })
    .retry(crate::retry::concurrent_ddl())
    .when(crate::sink::is_retriable_error)
    .notify(|e, delay| {
        warn!(error = %format!("{e:#}"), delay_ms = delay.as_millis() as u64,
              "creating mapped tables failed; planning again (another process may have created them)");
    })
    .await
    .map_err(|e| e.context("creating mapped tables"))?;
    for m in &plan.manual {
        warn!("schema difference not applied: {m}");
    }
    Ok(sink)
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
    let sink = Sink::connect_tuned(
        &s.target.url,
        s.target.max_connections,
        SqliteTuning::of(&s.target),
    )
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
    let plan = ddl::plan(&sink, mapping, s.target.foreign_key_checks).await?;
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

/// Load the mapping and open the target for reading only (see [`open_sink_dry`]).
pub async fn connect_dry(s: &Settings) -> Result<Sink> {
    let mapping = load_mapping(s)?;
    open_sink_dry(s, &mapping).await
}
