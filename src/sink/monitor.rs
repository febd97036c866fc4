//! Read-only access to the target for `tidemark status`: open it without creating,
//! migrating or writing anything (a SELECT-only role is enough), and read the runs ledger.

use super::{from_ms, with_pool, Sink};
use crate::secret::SecretUri;
use anyhow::{bail, Result};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use std::str::FromStr;

/// The tool tables `status` reads; without any of them it cannot say anything.
pub const STATUS_TABLES: [&str; 8] = [
    "tidemark_checkpoints",
    "tidemark_runs",
    "tidemark_dead_letters",
    "tidemark_locks",
    "tidemark_missing_refs",
    "tidemark_pending",
    "tidemark_backfills",
    "tidemark_backfill_chunks",
];

/// Open the target read-only: an absent SQLite file is an error (never created), and every
/// PostgreSQL transaction is `READ ONLY`.
pub async fn open_read_only(url: &SecretUri) -> Result<Sink> {
    let raw = url.expose();
    // What happened and what to do (authentication, refused, missing database, TLS…).
    let fail = |e: sqlx::Error| anyhow::Error::new(super::reach::unreachable(url, &e));
    if raw.starts_with("sqlite:") {
        let opts = SqliteConnectOptions::from_str(raw)
            .map_err(fail)?
            .create_if_missing(false)
            .read_only(true);
        let path = opts.get_filename().to_path_buf();
        if !path.exists() {
            bail!(
                "the SQLite target {} does not exist (target.url = {url}); status never creates it. \
                 Check that the check loads the same settings as the units (/etc/tidemark/tidemark.env), \
                 or run `tidemark run` once",
                path.display()
            );
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .map_err(fail)?;
        Ok(Sink::Sqlite(pool))
    } else {
        let opts = PgConnectOptions::from_str(raw)
            .map_err(fail)?
            .application_name("tidemark status")
            .options([("default_transaction_read_only", "on")]);
        super::reach::probe_postgres(url, &opts).await?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(super::reach::CONNECT_TIMEOUT)
            .connect_with(opts)
            .await
            .map_err(fail)?;
        Ok(Sink::Postgres(pool))
    }
}

/// The tables of [`STATUS_TABLES`] that the target does not have (or this role cannot see).
pub async fn missing_tables(sink: &Sink) -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for t in STATUS_TABLES {
        let present: bool = match sink {
            Sink::Postgres(p) => {
                sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                    .bind(t)
                    .fetch_one(p)
                    .await?
            }
            Sink::Sqlite(p) => {
                sqlx::query_scalar(
                    "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = $1",
                )
                .bind(t)
                .fetch_one(p)
                .await?
            }
        };
        if !present {
            missing.push(t);
        }
    }
    Ok(missing)
}

/// One row of `tidemark_runs`, as `status` needs it.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub id: String,
    pub kind: String,
    pub status: String,
    pub host: String,
    pub pid: i64,
    pub started: DateTime<Utc>,
    pub finished: Option<DateTime<Utc>>,
    /// The run's JSON report (null while running).
    pub report: serde_json::Value,
}

type Raw = (
    String,
    String,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    Option<String>,
);

fn run_row((id, kind, status, host, pid, started, finished, report): Raw) -> RunRow {
    RunRow {
        id,
        kind,
        status,
        host,
        pid,
        started: from_ms(started),
        finished: finished.map(from_ms),
        report: report
            .and_then(|r| serde_json::from_str(&r).ok())
            .unwrap_or_default(),
    }
}

const RUN_COLUMNS: &str =
    "id, kind, status, host, pid, started_at_ms, finished_at_ms, report FROM tidemark_runs";

/// The newest `limit` catch-up runs (`kind = 'run'`, dry runs never have a row), newest first.
pub async fn recent_runs(sink: &Sink, limit: i64) -> Result<Vec<RunRow>> {
    let sql =
        format!("SELECT {RUN_COLUMNS} WHERE kind = 'run' ORDER BY started_at_ms DESC, id LIMIT $1");
    let rows: Vec<Raw> =
        with_pool!(sink, p => sqlx::query_as(&sql).bind(limit).fetch_all(p).await?);
    Ok(rows.into_iter().map(run_row).collect())
}

/// Every run of any kind still recorded as running (some may have died: see
/// [`super::lease::run_lane`]).
pub async fn running_runs(sink: &Sink) -> Result<Vec<RunRow>> {
    let sql = format!("SELECT {RUN_COLUMNS} WHERE status = 'running' ORDER BY started_at_ms");
    let rows: Vec<Raw> = with_pool!(sink, p => sqlx::query_as(&sql).fetch_all(p).await?);
    Ok(rows.into_iter().map(run_row).collect())
}
