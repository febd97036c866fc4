//! Shared fixtures of the trust-tool tests: a mapping with a reference, a JSON column and a
//! child table, documents for it, and a dump of every table of a target.

use crate::harness::{Backend, Env};
use bson::{doc, Document};
use chrono::{TimeZone, Utc};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tidemark::commands::run::{RunOptions, RunReport};
use tidemark::settings::Settings;

pub const MAPPING: &str = r#"
version = "trust"
[entities.owners]
collection = "owners"
time_field = "t"
time_encoding = "date"
table = "owners"
primary_key = ["id"]
windowed = false
[entities.owners.columns]
id = { path = "_id", type = "text", required = true }
name = { path = "name", type = "text" }

[entities.items]
collection = "items"
time_field = "t"
time_encoding = "date"
table = "items"
primary_key = ["id"]
[entities.items.columns]
id = { path = "_id", type = "bigint", required = true }
t = { path = "t", type = "timestamptz", required = true }
v = { path = "v", type = "text", required = true }
owner = { path = "owner", type = "text", references = "owners", on_missing = "null" }
meta = { path = "meta", type = "json" }
[entities.items.children.tags]
path = "tags"
table = "item_tags"
primary_key = ["item_id", "pos"]
[entities.items.children.tags.columns]
item_id = { parent = "id", type = "bigint" }
pos = { ordinal = true, type = "integer" }
tag = { path = "$", type = "text" }
"#;

/// `2019-01-01T00:00:00Z` plus `days` days and `mins` minutes, as a BSON date.
pub fn at(days: i64, mins: i64) -> bson::DateTime {
    let base = Utc.with_ymd_and_hms(2019, 1, 1, 0, 0, 0).unwrap();
    bson::DateTime::from_chrono(
        base + chrono::TimeDelta::days(days) + chrono::TimeDelta::minutes(mins),
    )
}

pub fn item(id: i64, day: i64, v: &str, owner: &str) -> Document {
    doc! { "_id": id, "t": at(day, id), "v": v, "owner": owner,
    "meta": { "a": id, "b": [1, 2], "z": { "y": 1, "x": 2 } }, "tags": ["x", format!("t{id}")] }
}

pub fn owner(id: &str) -> Document {
    doc! { "_id": id, "t": at(0, 0), "name": format!("name of {id}") }
}

/// Day 0: 20 items owned by o0..o2.
pub async fn seed(backend: Backend, name: &str) -> Env {
    let env = Env::new(name, backend, MAPPING).await;
    env.insert("owners", (0..3).map(|i| owner(&format!("o{i}"))).collect())
        .await;
    env.insert(
        "items",
        (0..20)
            .map(|i| item(i, 0, &format!("v{i}"), &format!("o{}", i % 3)))
            .collect(),
    )
    .await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    env
}

/// Day 1: items 0..5 changed (new value, fewer tags), items 20..30 new (owner o3, pulled on demand).
pub async fn day_two(env: &Env) {
    let items = env.db.collection::<Document>("items");
    for i in 0..5i64 {
        items
            .update_one(
                doc! { "_id": i },
                doc! { "$set": { "v": format!("changed {i}"), "t": at(1, i), "tags": ["only"] } },
            )
            .await
            .unwrap();
    }
    env.insert("owners", vec![owner("o3")]).await;
    env.insert(
        "items",
        (20..30)
            .map(|i| item(i, 1, &format!("v{i}"), "o3"))
            .collect(),
    )
    .await;
}

pub async fn run_until(s: Settings, until: &str, dry_run: bool) -> anyhow::Result<RunReport> {
    tidemark::commands::run::run(
        s,
        RunOptions {
            until: Some(until.into()),
            dry_run,
            ..Default::default()
        },
        Arc::new(AtomicBool::new(false)),
    )
    .await
}

/// Every table of the target and its rows (sorted): equal dumps mean identical databases.
pub async fn dump_all(url: &str) -> Vec<(String, Vec<String>)> {
    use sqlx::Connection;
    let tables: Vec<String> = if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
            .fetch_all(&mut c)
            .await
            .unwrap()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
        )
        .fetch_all(&mut c)
        .await
        .unwrap()
    };
    let mut out = Vec::new();
    for t in tables {
        let rows = crate::harness::dump(url, &t).await;
        out.push((t, rows));
    }
    out
}

/// The domain tables only.
pub async fn dump_domain(url: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for t in ["items", "item_tags", "owners"] {
        out.push((t.to_owned(), crate::harness::dump(url, t).await));
    }
    out
}

pub async fn exec(url: &str, sql: &str) {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    }
}
