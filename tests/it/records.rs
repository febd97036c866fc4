//! A batch clears the dead letters, missing references and pending records of the documents
//! it writes cleanly; the run sends only the ids that can have one (`tidemark::sink::records`).
//! These tests check that no record that should go stays, and none that should stay goes.

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use bson::{doc, Document};

const T: i64 = 1_600_000_000;

/// The harness's items mapping, with `v` required (a document without it is a dead letter).
fn mapping() -> String {
    let m = items_mapping("epoch_seconds");
    let required = m.replace(
        r#"v = { path = "v", type = "text" }"#,
        r#"v = { path = "v", type = "text", required = true }"#,
    );
    assert_ne!(required, m);
    required
}

async fn dead_ids(env: &Env) -> Vec<i64> {
    let mut out = Vec::new();
    for id in 1..=60i64 {
        let n = scalar_i64(
            &env.target_url,
            &format!(
                "SELECT COUNT(*) FROM tidemark_dead_letters WHERE entity = 'items' AND source_id = '{id}'"
            ),
        )
        .await;
        if n > 0 {
            out.push(id);
        }
    }
    out
}

async fn run_until(
    s: &tidemark::settings::Settings,
    until: i64,
) -> tidemark::commands::run::RunReport {
    let until = chrono::DateTime::from_timestamp(T + until, 0).unwrap();
    crate::trust_util::run_until(s.clone(), &until.to_rfc3339(), false)
        .await
        .expect("run")
}

async fn cleared_when_fixed(backend: Backend) {
    // Arrange: 40 items, three without the required `v` (dead letters), in batches of 7.
    let env = Env::new("records", backend, &mapping()).await;
    let bad = [5i64, 17, 33];
    let docs: Vec<Document> = (1..=40i64)
        .map(|i| {
            if bad.contains(&i) {
                doc! { "_id": i, "t": T + i }
            } else {
                doc! { "_id": i, "t": T + i, "v": format!("v{i}") }
            }
        })
        .collect();
    env.insert("items", docs).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.source.batch_size = 7;
    s.sync.start = chrono::DateTime::from_timestamp(T - 10, 0).unwrap();
    let first = run_until(&s, 50).await;
    assert_eq!(first.totals.dead_lettered, 3, "{first}");
    assert_eq!(dead_ids(&env).await, bad.to_vec());

    // Act: 17 and 33 are fixed (a later time); 41 arrives broken and 42 fine, and 2 changes.
    let items = env.db.collection::<Document>("items");
    for (id, at) in [(17i64, 100i64), (33, 101), (2, 102)] {
        items
            .update_one(
                doc! { "_id": id },
                doc! { "$set": { "v": "fixed", "t": T + at } },
            )
            .await
            .unwrap();
    }
    env.insert(
        "items",
        vec![
            doc! { "_id": 41i64, "t": T + 103 },
            doc! { "_id": 42i64, "t": T + 104, "v": "v42" },
        ],
    )
    .await;
    let second = run_until(&s, 150).await;

    // Assert: the fixed ones lost their dead letters, the new broken one has one, 5 keeps its.
    assert_eq!(dead_ids(&env).await, vec![5, 41], "{second}");
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM items WHERE v = 'fixed'"
        )
        .await,
        3
    );

    // And a record written by run 2 is cleared by run 3 once its document is fixed.
    items
        .update_one(
            doc! { "_id": 41i64 },
            doc! { "$set": { "v": "fixed", "t": T + 200 } },
        )
        .await
        .unwrap();
    let third = run_until(&s, 250).await;
    assert_eq!(dead_ids(&env).await, vec![5], "{third}");
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        41
    );
}

#[tokio::test]
async fn dead_letters_cleared_when_fixed_sqlite() {
    cleared_when_fixed(Backend::Sqlite).await;
}

#[tokio::test]
async fn dead_letters_cleared_when_fixed_postgres() {
    cleared_when_fixed(Backend::Postgres).await;
}
