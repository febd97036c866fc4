//! `tidemark verify`: the report as text (the comparison itself is
//! [`crate::engine::verify`]); exit code [`DIFFERENCES`] when source and target differ.

pub use crate::engine::verify::*;

use crate::commands::setup;
use crate::exit::Failure;
use crate::settings::Settings;
use crate::source::Source;
use anyhow::Result;

/// `tidemark verify`: load the mapping, connect both sides (read only) and compare.
pub async fn verify(s: &Settings, opts: &VerifyOptions) -> Result<VerifyReport> {
    let mapping = setup::load_mapping(s)?;
    let plan = plan(&mapping, opts)?;
    let source = Source::connect(&s.source)
        .await
        .map_err(Failure::Unavailable)?;
    let sink = setup::open_sink_dry(s, &mapping).await?;
    let report = compare(&source, &sink, &mapping, &plan, opts).await;
    sink.close().await;
    report
}

/// Exit code of `verify` when source and target differ.
pub const DIFFERENCES: i32 = 7;

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<18} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>6} {:>8} {:>10}",
            "entity",
            "source",
            "target",
            "missing",
            "extra",
            "different",
            "unmap",
            "dead",
            "deferred",
            "buckets≠"
        )?;
        for e in &self.entities {
            writeln!(
                f,
                "{:<18} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>6} {:>8} {:>10}",
                e.entity,
                e.source_rows,
                e.target_rows,
                e.missing_count,
                e.extra_count,
                e.different_count,
                e.unmappable,
                e.dead_lettered,
                e.deferred,
                e.differing_buckets.len()
            )?;
            for d in &e.details {
                write!(f, "  {:<9} {} {}", d.state, e.entity, d.key)?;
                if let Some(r) = &d.reason {
                    write!(f, ": {r}")?;
                }
                writeln!(f)?;
                for c in &d.columns {
                    writeln!(
                        f,
                        "      {}: source {} target {}",
                        c.column, c.source, c.target
                    )?;
                }
                for c in &d.children {
                    writeln!(f, "      {} {} {}", c.table, c.key, c.state)?;
                    for col in &c.columns {
                        writeln!(
                            f,
                            "        {}: source {} target {}",
                            col.column, col.source, col.target
                        )?;
                    }
                }
            }
            if let Some(n) = &e.note {
                writeln!(f, "  note: {n}")?;
            }
        }
        for d in &self.dangling {
            writeln!(
                f,
                "  dangling  {} {}: {} row(s) point at nothing {}",
                d.table,
                d.constraint,
                d.rows,
                d.keys.join(" ")
            )?;
        }
        write!(
            f,
            "verify {}: {}",
            self.range,
            if self.differences == 0 {
                "source and target agree".to_owned()
            } else {
                format!("{} difference(s)", self.differences)
            }
        )
    }
}
