//! `tidemark run --entity NAME --id ID`: migrate single records (and what they depend on)
//! regardless of windows, for support cases. No checkpoint moves.

use crate::engine::pipeline::{self, Ctx, EntityReport};
use crate::exit::Failure;
use crate::mapping::Entity;
use anyhow::{anyhow, Result};
use bson::Bson;
use std::time::Instant;

/// The source values an id given on the command line may be stored as: the string itself,
/// an ObjectId when it looks like one, and a number when it is one.
pub fn id_values(id: &str) -> Vec<Bson> {
    let mut out = vec![Bson::String(id.to_owned())];
    if let Ok(o) = bson::oid::ObjectId::parse_str(id) {
        out.push(Bson::ObjectId(o));
    }
    if let Ok(n) = id.parse::<i64>() {
        out.push(Bson::Int64(n));
        if let Ok(n) = i32::try_from(n) {
            out.push(Bson::Int32(n));
        }
    }
    if let Ok(f) = id.parse::<f64>() {
        out.push(Bson::Double(f));
    }
    out
}

/// Fetch the documents of `e` whose `id_field` is one of `ids` and write them with
/// everything they reference, in one batch, without a checkpoint.
pub async fn migrate_records(ctx: &Ctx, e: &Entity, ids: &[String]) -> Result<EntityReport> {
    let started = Instant::now();
    let values: Vec<Bson> = ids.iter().flat_map(|i| id_values(i)).collect();
    let docs = ctx.source.fetch_in(e, &e.id_field, values).await?;
    if docs.is_empty() {
        return Err(Failure::Config(anyhow!(
            "no document of {} (collection {}) has {} = {}; check the id and the entity",
            e.name,
            e.collection,
            e.id_field,
            ids.join(", ")
        ))
        .into());
    }
    let counts = pipeline::write_docs(ctx, e, &docs, None, true).await?;
    let mut warnings = Vec::new();
    if (docs.len() as u64) < ids.len() as u64 {
        warnings.push(format!(
            "{} of {} ids were found in {}",
            docs.len(),
            ids.len(),
            e.collection
        ));
    }
    Ok(EntityReport {
        entity: e.name.clone(),
        windows: 0,
        counts,
        watermark: None,
        warnings,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}
