//! The dead letters in the target (`tidemark_dead_letters`): listed and discarded by
//! `tidemark dead-letters` (src/commands/dead_letters.rs); written by the batch commit.

use crate::cli::DeadLetterFilter;
use crate::sink::{with_pool, Sink};
use anyhow::Result;
use serde::Serialize;

/// One dead letter.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadLetterRow {
    pub entity: String,
    pub source_id: String,
    pub run_id: String,
    pub error: String,
    pub document: String,
    pub mapping_version: String,
    pub created_at_ms: i64,
}

fn push_filter<'a, DB: sqlx::Database>(q: &mut sqlx::QueryBuilder<'a, DB>, f: &'a DeadLetterFilter)
where
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    q.push(" WHERE 1 = 1");
    if let Some(e) = &f.entity {
        q.push(" AND entity = ").push_bind(e.clone());
    }
    if let Some(r) = &f.run {
        q.push(" AND run_id = ").push_bind(r.clone());
    }
    if !f.ids.is_empty() {
        q.push(" AND source_id IN (");
        let mut sep = q.separated(", ");
        for id in &f.ids {
            sep.push_bind(id.clone());
        }
        q.push(")");
    }
}

/// Dead letters matching `f`, ordered by entity and source id.
pub async fn list(sink: &Sink, f: &DeadLetterFilter, limit: i64) -> Result<Vec<DeadLetterRow>> {
    Ok(with_pool!(sink, p => {
        let mut q = sqlx::QueryBuilder::new(
            "SELECT entity, source_id, run_id, error, document, mapping_version, created_at_ms FROM tidemark_dead_letters");
        push_filter(&mut q, f);
        q.push(" ORDER BY entity, source_id LIMIT ").push_bind(limit);
        q.build_query_as::<DeadLetterRow>().fetch_all(p).await?
    }))
}

/// Delete the dead letters matching `f`; returns how many.
pub async fn discard(sink: &Sink, f: &DeadLetterFilter) -> Result<u64> {
    Ok(with_pool!(sink, p => {
        let mut q = sqlx::QueryBuilder::new("DELETE FROM tidemark_dead_letters");
        push_filter(&mut q, f);
        q.build().execute(p).await?.rows_affected()
    }))
}

/// Which of `ids` already wait in the dead letters of `entity`: a scan that finds the same
/// unselectable documents every night records (and counts) only the new ones.
pub async fn outstanding_among(
    sink: &Sink,
    entity: &str,
    ids: &[String],
) -> Result<std::collections::HashSet<String>> {
    let mut found = std::collections::HashSet::new();
    for chunk in ids.chunks(5_000) {
        let f = DeadLetterFilter {
            entity: Some(entity.to_string()),
            ids: chunk.to_vec(),
            ..Default::default()
        };
        let rows: Vec<(String,)> = with_pool!(sink, p => {
            let mut q = sqlx::QueryBuilder::new("SELECT source_id FROM tidemark_dead_letters");
            push_filter(&mut q, &f);
            q.build_query_as::<(String,)>().fetch_all(p).await?
        });
        found.extend(rows.into_iter().map(|(id,)| id));
    }
    Ok(found)
}
