//! Mixed `_id` types in one collection: keyset paging must not lose documents when a page
//! boundary falls between two `_id` types that share one timestamp (`$gt` only compares
//! values of the same BSON type class).

use crate::harness::{scalar_i64, Backend, Env};
use bson::{doc, oid::ObjectId, Bson, Document};
use chrono::{TimeZone, Utc};

const MAPPING: &str = r#"
version = "test"
[entities.items]
collection = "items"
time_field = "t"
time_encoding = "date"
table = "items"
primary_key = ["id"]
[entities.items.columns]
id = { path = "_id", type = "text", required = true }
t = { path = "t", type = "timestamptz", required = true }
"#;

/// Ids of every type class a `_id` may hold, in an order that interleaves them.
fn mixed_ids() -> Vec<Bson> {
    let mut ids = Vec::new();
    for i in 0..12i64 {
        ids.push(Bson::Int64(1000 + i));
        ids.push(Bson::Int32(2000 + i as i32));
        ids.push(Bson::Double(3000.5 + i as f64));
        ids.push(Bson::String(format!("s{i:03}")));
        ids.push(Bson::ObjectId(ObjectId::from_bytes([i as u8; 12])));
        ids.push(Bson::Boolean(i % 2 == 0)); // only two distinct values; dedup below
        ids.push(Bson::DateTime(bson::DateTime::from_millis(
            1_500_000_000_000 + i,
        )));
    }
    ids.push(Bson::Null);
    let mut seen = std::collections::HashSet::new();
    ids.retain(|b| seen.insert(format!("{b:?}")));
    ids
}

async fn mixed_id_types(backend: Backend, batch: usize) {
    // Arrange: every document shares one timestamp, so ordering within the window is by _id
    // alone, and small pages put page boundaries between every pair of types.
    let mongo = crate::fault_util::Mongod::start();
    let env = Env::new_at(&mongo.uri(), "mixedid", backend, MAPPING).await;
    let t = Utc.with_ymd_and_hms(2021, 3, 1, 0, 0, 0).unwrap();
    let at = bson::DateTime::from_millis(t.timestamp_millis());
    let ids = mixed_ids();
    let docs: Vec<Document> = ids
        .iter()
        .map(|id| doc! { "_id": id.clone(), "t": at })
        .collect();
    env.insert("items", docs).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.source.batch_size = batch;
    s.sync.scan_invalid_time = false;

    // Act
    let report = env.run(s).await.expect("run");

    // Assert: every document was read once; the ones whose _id cannot become text
    // (null, booleans) are dead letters, never dropped.
    let c = report.entities[0].counts;
    assert_eq!(
        c.read,
        ids.len() as u64,
        "read {} of {} documents: {report}",
        c.read,
        ids.len()
    );
    let rows = scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await;
    let dead = scalar_i64(
        &env.target_url,
        "SELECT COUNT(*) FROM tidemark_dead_letters",
    )
    .await;
    assert_eq!(rows + dead, ids.len() as i64, "rows {rows} + dead {dead}");
    assert_eq!(c.written + c.dead_lettered, ids.len() as u64);
}

#[tokio::test]
async fn mixed_id_types_are_all_read_sqlite_batch_1() {
    mixed_id_types(Backend::Sqlite, 1).await;
}

#[tokio::test]
async fn mixed_id_types_are_all_read_sqlite_batch_5() {
    mixed_id_types(Backend::Sqlite, 5).await;
}

#[tokio::test]
async fn mixed_id_types_are_all_read_postgres() {
    mixed_id_types(Backend::Postgres, 3).await;
}

/// Resuming (after a crash, or a cursor reopened after a source error) from any position
/// continues with exactly the documents after it, whatever the `_id` types on either side.
#[tokio::test]
async fn keyset_resume_crosses_id_type_boundaries() {
    // Arrange
    let mongo = crate::fault_util::Mongod::start();
    let env = Env::new_at(&mongo.uri(), "mixedresume", Backend::Sqlite, MAPPING).await;
    let t = Utc.with_ymd_and_hms(2021, 3, 1, 0, 0, 0).unwrap();
    let at = bson::DateTime::from_millis(t.timestamp_millis());
    let ids = mixed_ids();
    let docs: Vec<Document> = ids
        .iter()
        .map(|id| doc! { "_id": id.clone(), "t": at })
        .collect();
    env.insert("items", docs).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let s = env.settings();
    let source = tidemark::source::Source::connect(&s.source).await.unwrap();
    let mapping = tidemark::mapping::Mapping::parse(MAPPING, "test").unwrap();
    let e = mapping.entity("items").unwrap();
    let w = tidemark::engine::window::Window::new(t, t + chrono::TimeDelta::seconds(1));
    let read_all = |after: Option<tidemark::source::Position>| {
        let mut rx = source.stream_window(e, w, after);
        async move {
            let mut out = Vec::new();
            while let Some(p) = rx.recv().await {
                for d in p.expect("page").docs {
                    out.push(Bson::try_from(d.get("_id").unwrap().unwrap()).unwrap());
                }
            }
            out
        }
    };
    let order = read_all(None).await;
    assert_eq!(order.len(), ids.len(), "a full read returns every document");

    // Act + Assert: resume after every single position.
    for (i, id) in order.iter().enumerate() {
        let after = tidemark::source::Position {
            ts: Bson::DateTime(at),
            id: id.clone(),
        };
        let rest = read_all(Some(after)).await;
        assert_eq!(
            rest,
            order[i + 1..].to_vec(),
            "resuming after _id {id:?} (position {i}) lost or repeated documents"
        );
    }
}
