//! Every time encoding selects exactly its window, and documents with a missing or
//! mistyped time field are dead-lettered, not dropped and not fatal.

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use bson::{doc, Bson, Document};
use chrono::{TimeZone, Utc};

fn encode(enc: &str, ms: i64) -> Bson {
    match enc {
        "date" => Bson::DateTime(bson::DateTime::from_millis(ms)),
        "epoch_seconds" => Bson::Int64(ms / 1000),
        "epoch_millis" => Bson::Int64(ms),
        _ => Bson::String(tidemark::engine::window::fmt_ts(
            Utc.timestamp_millis_opt(ms).unwrap(),
        )),
    }
}

async fn encoding(enc: &str, backend: Backend) {
    let env = Env::new(&format!("enc_{enc}"), backend, &items_mapping(enc)).await;
    let base = Utc
        .with_ymd_and_hms(2021, 3, 1, 0, 0, 0)
        .unwrap()
        .timestamp_millis();
    // 200 good documents one minute apart, 3 without `t`, and one of every type the
    // encoding does not use (null, object, arrays, ObjectId, bool, and the
    // other scalar encodings).
    let mut docs: Vec<Document> = (0..200i64)
        .map(|i| doc! { "_id": i, "t": encode(enc, base + i * 60_000), "v": "ok" })
        .collect();
    docs.extend((200..203i64).map(|i| doc! { "_id": i, "v": "no time" }));
    let mut wrong = vec![
        Bson::Null,
        Bson::Document(doc! { "at": 1 }),
        Bson::Array(vec![Bson::Boolean(true)]),
        Bson::Array(vec![]),
        Bson::ObjectId(bson::oid::ObjectId::new()),
        Bson::Boolean(true),
    ];
    match enc {
        "date" => wrong.extend([
            Bson::String("yesterday".into()),
            Bson::Int64(5),
            Bson::Double(f64::NAN),
        ]),
        "iso8601" => wrong.extend([
            Bson::Int32(5),
            Bson::Double(f64::NAN),
            Bson::DateTime(bson::DateTime::now()),
        ]),
        _ => wrong.extend([
            Bson::String("yesterday".into()),
            Bson::DateTime(bson::DateTime::now()),
        ]),
    }
    let n_wrong = 3 + wrong.len() as i64;
    docs.extend(
        wrong
            .into_iter()
            .enumerate()
            .map(|(i, w)| doc! { "_id": 203 + i as i64, "t": w }),
    );
    // One document after `until`: must not be read.
    docs.push(doc! { "_id": 999i64, "t": encode(enc, base + 10 * 86_400_000) });
    env.insert("items", docs).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.sync.max_window = std::time::Duration::from_secs(3600);
    s.sync.start = Utc.timestamp_millis_opt(base - 86_400_000).unwrap();
    let until = Utc.timestamp_millis_opt(base + 86_400_000).unwrap();

    let report = tidemark::commands::run::run(
        s,
        tidemark::commands::run::RunOptions {
            until: Some(until.to_rfc3339()),
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .expect("run");

    let c = report.entities[0].counts;
    assert_eq!(c.read, 200, "{enc}: {report}");
    assert_eq!(
        c.invalid_time, n_wrong as u64,
        "{enc}: missing/mistyped time must be reported"
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        200
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_dead_letters WHERE entity = 'items'"
        )
        .await,
        n_wrong
    );
    let wm = report.entities[0].watermark.unwrap();
    assert_eq!(wm, until, "watermark stops at --until");
}

#[tokio::test]
async fn encodings_sqlite() {
    for enc in ["date", "epoch_seconds", "epoch_millis", "iso8601"] {
        encoding(enc, Backend::Sqlite).await;
    }
}

#[tokio::test]
async fn encodings_postgres() {
    for enc in ["date", "epoch_seconds", "epoch_millis", "iso8601"] {
        encoding(enc, Backend::Postgres).await;
    }
}

/// The window query uses the (t, _id) index: explain shows an index scan, not a collection scan.
#[tokio::test]
async fn window_query_uses_the_index() {
    let env = Env::new("explain", Backend::Sqlite, &items_mapping("epoch_seconds")).await;
    env.insert(
        "items",
        (0..100i64)
            .map(|i| doc! { "_id": i, "t": 1_600_000_000i64 + i })
            .collect(),
    )
    .await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let m = tidemark::mapping::Mapping::parse(&items_mapping("epoch_seconds"), "t").unwrap();
    let e = &m.entities[0];
    let w = tidemark::engine::window::Window::new(
        Utc.timestamp_opt(1_600_000_000, 0).unwrap(),
        Utc.timestamp_opt(1_600_000_050, 0).unwrap(),
    );
    let filter = tidemark::source::window_filter(&e.filter, "t", e.time_encoding, &w, None);
    let explain = env
        .db
        .run_command(doc! { "explain": { "find": "items", "filter": filter, "sort": { "t": 1, "_id": 1 } }, "verbosity": "queryPlanner" })
        .await
        .expect("explain");
    let text = explain.to_string();
    assert!(text.contains("IXSCAN"), "expected an index scan: {text}");
}
