//! Re-running writes nothing new; the overlap re-read leaves the target unchanged.

use crate::harness::{items_mapping, Backend, Env};
use bson::{doc, Document};

async fn twice(backend: Backend) {
    let env = Env::new("idem", backend, &items_mapping("epoch_millis")).await;
    let now = chrono::Utc::now().timestamp_millis();
    // Documents in the last 30 minutes: inside the 1 h overlap on the second run.
    let docs: Vec<Document> = (0..1200i64)
        .map(|i| doc! { "_id": i, "t": now - 1_800_000 + i * 1000, "v": format!("v{i}") })
        .collect();
    env.insert("items", docs).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;

    let first = env.run(env.settings()).await.expect("first run");
    let before = env.dump(&env.target_url, "items").await;
    let second = env.run(env.settings()).await.expect("second run");
    let after = env.dump(&env.target_url, "items").await;

    assert_eq!(first.entities[0].counts.written, 1200, "{first}");
    assert!(
        second.entities[0].counts.read > 0,
        "the overlap must be re-read: {second}"
    );
    assert_eq!(
        second.entities[0].counts.written, 0,
        "nothing new to write: {second}"
    );
    assert_eq!(before, after, "target changed by a re-run");
    assert_eq!(before.len(), 1200);
}

#[tokio::test]
async fn run_twice_sqlite() {
    twice(Backend::Sqlite).await;
}

#[tokio::test]
async fn run_twice_postgres() {
    twice(Backend::Postgres).await;
}

/// An updated source document is picked up by the next window and replaces the row (last version wins).
#[tokio::test]
async fn updates_replace_rows() {
    let env = Env::new("update", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    let now = chrono::Utc::now().timestamp_millis();
    env.insert(
        "items",
        vec![doc! { "_id": 1i64, "t": now - 7_200_000, "v": "old" }],
    )
    .await;
    env.run(env.settings()).await.unwrap();
    env.db
        .collection::<Document>("items")
        .update_one(
            doc! { "_id": 1i64 },
            doc! { "$set": { "v": "new", "t": now - 60_000 } },
        )
        .await
        .unwrap();
    let r = env.run(env.settings()).await.unwrap();
    assert_eq!(r.entities[0].counts.written, 1);
    let rows = env.dump(&env.target_url, "items").await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].contains("new"), "{rows:?}");
}
