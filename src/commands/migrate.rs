//! `tidemark migrate [--print]`: the tool's tables and the mapped tables' DDL.

use crate::commands::setup::load_mapping;
use crate::exit::Failure;
use crate::settings::Settings;
use crate::sink::{ddl, Sink};
use anyhow::Result;

/// `tidemark migrate [--print]`.
pub async fn migrate(s: &Settings, print_only: bool) -> Result<String> {
    let mapping = load_mapping(s)?;
    let sink = Sink::connect(&s.target.url, 1)
        .await
        .map_err(Failure::Unavailable)?;
    if !print_only {
        sink.migrate_tool_tables().await?;
    }
    let plan = ddl::plan(&sink, &mapping, s.target.foreign_key_checks).await?;
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
