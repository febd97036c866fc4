//! Soak helper for `scripts/soak.sh` (not part of tidemark).
//!
//!   soak_writer write URI DB SECONDS   insert and update `items` until SECONDS have passed
//!   soak_writer check URI DB TARGET    compare every source document with the target row
//!
//! Documents use `tests`' items mapping: `_id` (int64), `t` (epoch ms), `v` (text).
//! Updates set `t` to now, as a legacy application touching a record would.

use bson::doc;
use futures::TryStreamExt;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (mode, uri, db) = (args[1].as_str(), &args[2], &args[3]);
    let client = mongodb::Client::with_uri_str(uri).await?;
    let coll = client.database(db).collection::<bson::Document>("items");
    match mode {
        "write" => {
            let secs: u64 = args[4].parse()?;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
            let start = Instant::now();
            let mut next: i64 = coll.count_documents(doc! {}).await? as i64;
            let (mut inserted, mut updated) = (0u64, 0u64);
            while start.elapsed() < Duration::from_secs(secs) {
                let now = chrono::Utc::now().timestamp_millis();
                let docs: Vec<_> = (0..50)
                    .map(|i| doc! { "_id": next + i, "t": now, "v": format!("v{} r0", next + i) })
                    .collect();
                coll.insert_many(docs).await?;
                next += 50;
                inserted += 50;
                for _ in 0..20 {
                    let id = rng.gen_range(0..next);
                    let now = chrono::Utc::now().timestamp_millis();
                    coll.update_one(
                        doc! { "_id": id },
                        doc! { "$set": { "t": now, "v": format!("v{id} r{now}") } },
                    )
                    .await?;
                    updated += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!("writer: inserted {inserted}, updated {updated}, documents {next}");
        }
        "check" => {
            let target = &args[4];
            use sqlx::Connection;
            let mut c = sqlx::SqliteConnection::connect(target).await?;
            let rows: Vec<(i64, Option<String>)> = sqlx::query_as("SELECT id, v FROM items")
                .fetch_all(&mut c)
                .await?;
            let rows: HashMap<i64, Option<String>> = rows.into_iter().collect();
            let docs: Vec<bson::Document> = coll.find(doc! {}).await?.try_collect().await?;
            let mut missing = 0;
            let mut stale = 0;
            for d in &docs {
                let id = d
                    .get_i64("_id")
                    .or_else(|_| d.get_i32("_id").map(i64::from))?;
                match rows.get(&id) {
                    None => missing += 1,
                    Some(v) if v.as_deref() != d.get_str("v").ok() => stale += 1,
                    _ => {}
                }
            }
            let extra = rows.len() as i64 - (docs.len() as i64 - missing);
            println!(
                "check: source {} documents, target {} rows, missing {missing}, stale {stale}, extra {extra}",
                docs.len(),
                rows.len()
            );
            if missing != 0 || stale != 0 || extra != 0 {
                std::process::exit(1);
            }
        }
        other => anyhow::bail!("unknown mode {other}"),
    }
    Ok(())
}
