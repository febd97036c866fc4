//! Many documents sharing one timestamp, straddling a page and a window boundary,
//! are each stored exactly once.

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use bson::{doc, Document};
use chrono::{TimeZone, Utc};

async fn ties(backend: Backend) {
    // Arrange: 1,500 documents at exactly T (the boundary between two windows, batch 500),
    // plus neighbours 1 ms either side.
    let env = Env::new("ties", backend, &items_mapping("date")).await;
    let t = Utc.with_ymd_and_hms(2020, 6, 1, 0, 0, 0).unwrap();
    let at = |ms: i64| bson::DateTime::from_millis(t.timestamp_millis() + ms);
    let mut docs: Vec<Document> = (0..1500i64)
        .map(|i| doc! { "_id": i, "t": at(0), "v": "tie" })
        .collect();
    docs.extend((1500..1510i64).map(|i| doc! { "_id": i, "t": at(-1) }));
    docs.extend((1510..1520i64).map(|i| doc! { "_id": i, "t": at(1) }));
    env.insert("items", docs).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.sync.start = t - chrono::TimeDelta::hours(1);
    s.sync.max_window = std::time::Duration::from_secs(3600);
    s.sync.overlap = std::time::Duration::ZERO;

    // Act: the first run's last window ends exactly at T (exclusive); the next one starts at T.
    let opts = |until: Option<String>| tidemark::app::RunOptions {
        until,
        ..Default::default()
    };
    let first = tidemark::app::run(
        s.clone(),
        opts(Some(tidemark::window::fmt_ts(t))),
        Default::default(),
    )
    .await
    .expect("first run");
    let second = tidemark::app::run(s, opts(None), Default::default())
        .await
        .expect("second run");

    // Assert: every document read exactly once, stored exactly once.
    assert_eq!(first.entities[0].watermark, Some(t));
    assert_eq!(first.entities[0].counts.read, 10, "{first}");
    let c = second.entities[0].counts;
    assert_eq!(c.read, 1510, "{second}");
    assert_eq!(c.written, 1510);
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        1520
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(DISTINCT id) FROM items").await,
        1520
    );
}

#[tokio::test]
async fn ties_sqlite() {
    ties(Backend::Sqlite).await;
}

#[tokio::test]
async fn ties_postgres() {
    ties(Backend::Postgres).await;
}
