//! One fate per document: a row with several unresolved references is dead-lettered, held
//! back or written, never two of them at once; the strictest policy among its unresolved
//! references wins (skip, then defer, then null; docs/DEPENDENCIES.md). Before the fix a
//! row with a `skip` and a `defer` reference both missing landed in `tidemark_dead_letters`
//! and in `tidemark_pending` (seen on the demo: 15 commits).

use crate::harness::{scalar_i64, Backend, Env};
use bson::doc;
use chrono::{TimeZone, Utc};

const MAPPING: &str = r#"
version = "fates-1"
[entities.accounts]
collection = "accounts"
id_field = "accountId"
time_field = "t"
time_encoding = "epoch_millis"
table = "accounts"
primary_key = ["account_id"]
[entities.accounts.columns]
account_id = { path = "accountId", type = "text", required = true }

[entities.items]
collection = "items"
time_field = "t"
time_encoding = "epoch_millis"
table = "items"
primary_key = ["id"]
[entities.items.columns]
id = { path = "_id", type = "bigint", required = true }
owner = { path = "owner", type = "text", references = "accounts", on_missing = "skip" }
reviewer = { path = "reviewer", type = "text", references = "accounts", on_missing = "defer" }
editor = { path = "editor", type = "text", references = "accounts", on_missing = "null" }
approver = { path = "approver", type = "text", references = "accounts", on_missing = "skip" }
"#;

async fn fates(backend: Backend) {
    let env = Env::new("fates", backend, MAPPING).await;
    let t = Utc
        .with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
        .unwrap()
        .timestamp_millis();
    env.insert("accounts", vec![doc! { "accountId": "a", "t": t }])
        .await;
    env.insert(
        "items",
        vec![
            // skip + defer missing: a dead letter only.
            doc! { "_id": 1i64, "t": t, "owner": "ghost1", "reviewer": "ghost2", "editor": "a" },
            // defer + null missing: held back only.
            doc! { "_id": 2i64, "t": t, "owner": "a", "reviewer": "ghost3", "editor": "ghost4" },
            // two skips missing: one dead letter.
            doc! { "_id": 3i64, "t": t, "owner": "ghost5", "approver": "ghost6" },
            // null missing only: written with the column nulled.
            doc! { "_id": 4i64, "t": t, "owner": "a", "editor": "ghost7" },
            // all resolved.
            doc! { "_id": 5i64, "t": t, "owner": "a", "reviewer": "a", "editor": "a", "approver": "a" },
        ],
    )
    .await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.sync.start = Utc.with_ymd_and_hms(2023, 12, 1, 0, 0, 0).unwrap();
    let r = env.run(s.clone()).await.expect("run");
    let items = r.entities.iter().find(|e| e.entity == "items").unwrap();
    let url = &env.target_url;
    let ids = |sql: &str| {
        let sql = sql.to_owned();
        async move {
            crate::oracle::strings(url, &sql)
                .await
                .into_iter()
                .collect::<Vec<_>>()
        }
    };
    let dead =
        ids("SELECT source_id FROM tidemark_dead_letters WHERE entity = 'items' ORDER BY 1").await;
    let pending =
        ids("SELECT source_id FROM tidemark_pending WHERE entity = 'items' ORDER BY 1").await;
    let rows =
        ids("SELECT CAST(id AS TEXT) || '|' || COALESCE(editor, '~') FROM items ORDER BY 1").await;
    assert_eq!(dead, ["1", "3"], "dead letters ({backend:?})");
    assert_eq!(pending, ["2"], "pending ({backend:?})");
    assert_eq!(rows, ["4|~", "5|a"], "rows ({backend:?})");
    assert_eq!(
        items.counts.dead_lettered, 2,
        "dead letters counted once per document"
    );
    assert_eq!(
        items.counts.deferred, 1,
        "held back counted once per document"
    );
    // Every unresolved reference is recorded, whatever the row's fate: 2 + 2 + 2 + 1.
    let missing = scalar_i64(
        url,
        "SELECT COUNT(*) FROM tidemark_missing_refs WHERE entity = 'items'",
    )
    .await;
    assert_eq!(missing, 7, "missing references recorded ({backend:?})");

    // Verify agrees: nothing differs, the dead letters and the held-back row counted apart.
    let v = tidemark::commands::verify::verify(
        &s,
        &tidemark::commands::verify::VerifyOptions {
            from: "2023-12-01T00:00:00Z".into(),
            to: "2024-02-01T00:00:00Z".into(),
            entities: vec!["items".into()],
            bucket: std::time::Duration::from_secs(86_400),
            limit: 100,
        },
    )
    .await
    .expect("verify");
    assert_eq!(v.differences, 0, "verify ({backend:?}): {v}");
    let e = &v.entities[0];
    assert_eq!(
        (e.dead_lettered, e.deferred),
        (2, 1),
        "verify's counts ({backend:?})"
    );
}

#[tokio::test]
async fn one_fate_per_document_sqlite() {
    fates(Backend::Sqlite).await;
}

#[tokio::test]
async fn one_fate_per_document_postgres() {
    fates(Backend::Postgres).await;
}
