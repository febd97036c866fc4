//! Distinct documents stay distinct (DESIGN "Distinct documents stay distinct"): ids that
//! differ only in BSON type (`42` and `"42"`, an ObjectId and its hex string) map to the
//! same key text. The string keeps the key; the other document is dead-lettered with an
//! error naming both — in one page, across pages and across runs. Keys of ids that do not
//! collide are unchanged.

use crate::harness::{scalar_i64, Backend, Env};
use bson::{doc, oid::ObjectId, Bson, Document};
use chrono::{TimeZone, Utc};

const MAPPING: &str = r#"
version = "ids-1"
[entities.items]
collection = "items"
time_field = "t"
time_encoding = "date"
table = "items"
primary_key = ["id"]
[entities.items.columns]
id = { path = "_id", type = "text", required = true }
v = { path = "v", type = "text" }
t = { path = "t", type = "timestamptz", required = true }
"#;

fn at(minute: u32) -> bson::DateTime {
    bson::DateTime::from_chrono(Utc.with_ymd_and_hms(2024, 1, 1, 0, minute, 0).unwrap())
}

async fn colliding_ids(backend: Backend, batch: usize, second_run: bool) {
    let env = Env::new("ids", backend, MAPPING).await;
    let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
    let docs: Vec<(Bson, &str, u32)> = vec![
        (Bson::Int32(42), "int", 1),
        (Bson::Int64(7), "long", 2),
        (Bson::ObjectId(oid), "oid", 3),
        (Bson::String("plain".into()), "plain", 4),
        (Bson::String("42".into()), "string42", 5),
        (Bson::String(oid.to_hex()), "hexstring", 6),
    ];
    let all = docs.len() as i64;
    let first: Vec<Document> = docs
        .iter()
        .filter(|(_, v, _)| !second_run || !v.starts_with("string") && *v != "hexstring")
        .map(|(id, v, m)| doc! { "_id": id.clone(), "v": *v, "t": at(*m) })
        .collect();
    env.insert("items", first).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.sync.start = "2023-12-31T00:00:00Z".parse().unwrap();
    s.source.batch_size = batch;
    let first_until = tidemark::commands::run::RunOptions {
        until: Some("2024-01-01T00:08:00Z".into()),
        ..Default::default()
    };
    let report = tidemark::commands::run::run(s.clone(), first_until, Default::default())
        .await
        .expect("run");
    if second_run {
        // The string twins arrive later; their older typed twins are already rows.
        let later: Vec<Document> = docs
            .iter()
            .filter(|(_, v, _)| v.starts_with("string") || *v == "hexstring")
            .map(|(id, v, m)| doc! { "_id": id.clone(), "v": *v, "t": at(*m + 10) })
            .collect();
        env.insert("items", later).await;
        let second = env.run(s).await.expect("second run");
        assert!(second.entities[0].counts.read >= 2, "{second}");
    }

    let url = &env.target_url;
    let rows = scalar_i64(url, "SELECT COUNT(*) FROM items").await;
    let dead = scalar_i64(
        url,
        "SELECT COUNT(*) FROM tidemark_dead_letters WHERE error LIKE '%collides%'",
    )
    .await;
    assert_eq!(
        rows + dead,
        all,
        "every document is a row or a dead letter: {rows} rows, {dead} dead\n{report}"
    );
    assert_eq!(dead, 2, "the int 42 and the ObjectId are dead letters");
    let has = |key: String, v: &'static str| async move {
        scalar_i64(
            url,
            &format!("SELECT COUNT(*) FROM items WHERE id = '{key}' AND v = '{v}'"),
        )
        .await
    };
    assert_eq!(
        has("42".into(), "string42").await,
        1,
        "the string keeps the key"
    );
    assert_eq!(has(oid.to_hex(), "hexstring").await, 1);
    // Ids that collide with nothing keep their usual keys.
    assert_eq!(has("7".into(), "long").await, 1);
    assert_eq!(has("plain".into(), "plain").await, 1);
}

#[tokio::test]
async fn ids_of_different_types_never_merge_one_page_sqlite() {
    colliding_ids(Backend::Sqlite, 500, false).await;
}

#[tokio::test]
async fn ids_of_different_types_never_merge_across_pages_postgres() {
    colliding_ids(Backend::Postgres, 1, false).await;
}

#[tokio::test]
async fn ids_of_different_types_never_merge_across_runs_sqlite() {
    colliding_ids(Backend::Sqlite, 2, true).await;
}
