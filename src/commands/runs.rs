//! `tidemark runs [show ID]`: the runs ledger (`tidemark_runs`) and the report files.

use crate::cli::{RunsArgs, RunsCommand};
use crate::exit::{self, Failure};
use crate::settings::Settings;
use crate::sink::runs::RunRow;
use anyhow::{anyhow, Result};

/// `tidemark runs [show ID]`.
pub async fn runs(s: &Settings, args: RunsArgs) -> Result<i32> {
    let sink = super::setup::connect_dry(s).await?;
    let out = match args.command {
        Some(RunsCommand::Show { id }) => {
            let found = crate::sink::runs::find(&sink, &s.reports_path(), &id).await?;
            if found.is_none() {
                if let Some(p) = crate::sink::retention::pruned(&sink, &id).await? {
                    sink.close().await;
                    return Err(crate::commands::prune::pruned_error(&p));
                }
            }
            let row = found.ok_or_else(|| {
                Failure::Config(anyhow!(
                    "no run {id} in tidemark_runs or {}; `tidemark runs` lists them",
                    s.reports_path().display()
                ))
            })?;
            let mut v = serde_json::to_value(&row)?;
            v["lanes"] = serde_json::Value::Array(crate::sink::runs::lanes(&sink, &id).await?);
            serde_json::to_string_pretty(&v)?
        }
        None => {
            let rows = crate::sink::runs::list(&sink, args.kind.as_deref(), args.limit).await?;
            if args.json {
                serde_json::to_string_pretty(&rows)?
            } else {
                let mut t = format_list(&rows);
                t.push_str("(* = dry run)");
                t
            }
        }
    };
    sink.close().await;
    println!("{out}");
    Ok(exit::OK)
}

/// `tidemark runs`: one line per run.
pub fn format_list(rows: &[RunRow]) -> String {
    let mut out = format!(
        "{:<36} {:<11} {:<8} {:<24} {:>9} {:>9} {:>9}\n",
        "id", "kind", "status", "started", "read", "written", "dead"
    );
    for r in rows {
        let t = r
            .report
            .as_ref()
            .map(|j| {
                let c = if j["totals"].is_object() {
                    &j["totals"]
                } else {
                    &j["counts"]
                };
                (
                    c["read"].as_u64().unwrap_or(0),
                    c["written"].as_u64().unwrap_or(0),
                    // The invalid-time scan's dead letters are dead letters too.
                    c["dead_lettered"].as_u64().unwrap_or(0)
                        + c["invalid_time"].as_u64().unwrap_or(0),
                )
            })
            .unwrap_or_default();
        let status = if r.dry_run {
            format!("{}*", r.status)
        } else {
            r.status.clone()
        };
        out.push_str(&format!(
            "{:<36} {:<11} {:<8} {:<24} {:>9} {:>9} {:>9}\n",
            r.id, r.kind, status, r.started_at, t.0, t.1, t.2
        ));
    }
    out
}
