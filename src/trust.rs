//! Dispatch of the trust commands (`runs`, `dead-letters`, `verify`, `sweep`): turn parsed
//! arguments into calls and results into output and exit codes, so `main.rs` stays thin.

use crate::app;
use crate::cli::{DeadLetterCommand, RunsArgs, RunsCommand, SweepArgs, VerifyArgs};
use crate::exit::{self, Failure};
use crate::settings::Settings;
use crate::sink::Sink;
use anyhow::{anyhow, Result};

async fn connect(s: &Settings) -> Result<Sink> {
    let mapping = app::load_mapping(s)?;
    app::open_sink_dry(s, &mapping).await
}

/// `tidemark runs [show ID]`.
pub async fn runs(s: &Settings, args: RunsArgs) -> Result<i32> {
    let sink = connect(s).await?;
    let out = match args.command {
        Some(RunsCommand::Show { id }) => {
            let row = crate::reports::find(&sink, &s.reports_path(), &id)
                .await?
                .ok_or_else(|| {
                    Failure::Config(anyhow!(
                        "no run {id} in tidemark_runs or {}; `tidemark runs` lists them",
                        s.reports_path().display()
                    ))
                })?;
            let mut v = serde_json::to_value(&row)?;
            v["lanes"] = serde_json::Value::Array(crate::reports::lanes(&sink, &id).await?);
            serde_json::to_string_pretty(&v)?
        }
        None => {
            let rows = crate::reports::list(&sink, args.kind.as_deref(), args.limit).await?;
            if args.json {
                serde_json::to_string_pretty(&rows)?
            } else {
                let mut t = crate::reports::format_list(&rows);
                t.push_str("(* = dry run)");
                t
            }
        }
    };
    sink.close().await;
    println!("{out}");
    Ok(exit::OK)
}

/// `tidemark dead-letters …`.
pub async fn dead_letters(s: Settings, cmd: DeadLetterCommand) -> Result<i32> {
    match cmd {
        DeadLetterCommand::List {
            filter,
            limit,
            json,
        } => {
            let sink = connect(&s).await?;
            let rows = crate::deadletters::list(&sink, &filter, limit).await?;
            sink.close().await;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", crate::deadletters::format_list(&rows));
            }
        }
        DeadLetterCommand::Show { filter } => {
            let sink = connect(&s).await?;
            let rows = crate::deadletters::list(&sink, &filter, 1000).await?;
            sink.close().await;
            print!("{}", crate::deadletters::format_full(&rows));
        }
        DeadLetterCommand::Retry { filter, dry_run } => {
            let rep = crate::deadletters::retry(s, filter, dry_run).await?;
            println!("{rep}");
        }
        DeadLetterCommand::Discard { filter, all } => {
            if !all && filter.entity.is_none() && filter.run.is_none() && filter.ids.is_empty() {
                return Err(Failure::Config(anyhow!(
                    "discard needs a filter (--entity, --run, --id) or --all"
                ))
                .into());
            }
            let sink = connect(&s).await?;
            let n = crate::deadletters::discard(&sink, &filter).await?;
            sink.close().await;
            println!("discarded {n} dead letter(s)");
        }
    }
    Ok(exit::OK)
}

/// `tidemark verify`: exit 0 when source and target agree, 7 otherwise.
pub async fn verify(s: Settings, args: VerifyArgs) -> Result<i32> {
    let opts = crate::verify::VerifyOptions {
        from: args.from,
        to: args.to,
        entities: args.entities,
        bucket: args.bucket,
        limit: args.limit,
    };
    let rep = crate::verify::verify(&s, &opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!("{rep}");
    }
    Ok(if rep.differences == 0 {
        exit::OK
    } else {
        crate::verify::DIFFERENCES
    })
}

/// `tidemark sweep`.
pub async fn sweep(s: Settings, args: SweepArgs) -> Result<i32> {
    let rep = crate::sweep::sweep(s, args.entities, args.dry_run, args.chunk).await?;
    println!("{rep}");
    Ok(exit::OK)
}
