//! `migrate` creates the mapped tables, applies additive changes without touching data, and
//! reports (never applies) destructive differences — on both backends.

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use bson::doc;

async fn additive_and_destructive(backend: Backend) {
    let v1 = items_mapping("epoch_millis");
    let env = Env::new("schema", backend, &v1).await;
    let now = chrono::Utc::now().timestamp_millis();
    env.insert(
        "items",
        (0..10i64)
            .map(|i| doc! { "_id": i, "t": now - 600_000, "v": "x", "w": i })
            .collect(),
    )
    .await;
    env.run(env.settings()).await.expect("run with v1");

    // v2: a new column (additive) and `v` changed from text to bigint (destructive).
    let v2 = v1.replace(
        "v = { path = \"v\", type = \"text\" }",
        "v = { path = \"w\", type = \"bigint\" }\nw2 = { path = \"w\", type = \"integer\" }",
    );
    std::fs::write(&env.mapping_path, &v2).unwrap();
    let s = env.settings();
    let printed = tidemark::app::migrate(&s, true)
        .await
        .expect("migrate --print");
    assert!(printed.contains("ADD COLUMN \"w2\""), "{printed}");
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        10,
        "--print changes nothing"
    );

    let out = tidemark::app::migrate(&s, false).await.expect("migrate");
    assert!(
        out.contains("NOT APPLIED") && out.contains("items.v"),
        "destructive change reported: {out}"
    );
    if backend == Backend::Postgres {
        assert!(
            out.contains("ALTER TABLE \"items\" ALTER COLUMN \"v\" TYPE BIGINT"),
            "{out}"
        );
    }
    // Data untouched, new column present and NULL.
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM items WHERE w2 IS NULL"
        )
        .await,
        10
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items WHERE v = 'x'").await,
        10
    );
}

#[tokio::test]
async fn migrate_sqlite() {
    additive_and_destructive(Backend::Sqlite).await;
}

#[tokio::test]
async fn migrate_postgres() {
    additive_and_destructive(Backend::Postgres).await;
}
