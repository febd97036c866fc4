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
    let opts = |until: Option<String>| tidemark::commands::run::RunOptions {
        until,
        ..Default::default()
    };
    let first = tidemark::commands::run::run(
        s.clone(),
        opts(Some(tidemark::engine::window::fmt_ts(t))),
        Default::default(),
    )
    .await
    .expect("first run");
    let second = tidemark::commands::run::run(s, opts(None), Default::default())
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

/// A catch-up of many windows reads each next window ahead (PostgreSQL, plain entities):
/// windows full of pages, a tie on a window boundary, empty windows in between (whose
/// read-ahead is dropped for the probe's window) — every document stored exactly once, and
/// the next run finds nothing.
async fn read_ahead_across_windows(backend: Backend) {
    let env = Env::new("read_ahead", backend, &items_mapping("date")).await;
    let t = Utc.with_ymd_and_hms(2021, 3, 1, 0, 0, 0).unwrap();
    let at = |ms: i64| bson::DateTime::from_millis(t.timestamp_millis() + ms);
    let hour = 3_600_000i64;
    let mut docs: Vec<Document> = Vec::new();
    let mut id = 0i64;
    let mut add = |ms: i64, n: i64, docs: &mut Vec<Document>| {
        for _ in 0..n {
            docs.push(doc! { "_id": id, "t": at(ms), "v": "x" });
            id += 1;
        }
    };
    add(10 * 60_000, 250, &mut docs); // window 1
    add(hour, 300, &mut docs); // a tie exactly on the boundary of windows 1 and 2
    add(2 * hour - 1, 5, &mut docs); // the last millisecond of window 2
    add(5 * hour, 120, &mut docs); // after two empty windows
    add(5 * hour + 30 * 60_000, 130, &mut docs);
    add(7 * hour + 1, 40, &mut docs);
    let total = docs.len() as i64;
    env.insert("items", docs).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.source.batch_size = 100;
    s.sync.start = t;
    s.sync.max_window = std::time::Duration::from_secs(3600);
    s.sync.overlap = std::time::Duration::ZERO;
    let opts = || tidemark::commands::run::RunOptions {
        until: Some(tidemark::engine::window::fmt_ts(
            t + chrono::TimeDelta::hours(9),
        )),
        ..Default::default()
    };

    let first = tidemark::commands::run::run(s.clone(), opts(), Default::default())
        .await
        .expect("first run");
    let again = tidemark::commands::run::run(s, opts(), Default::default())
        .await
        .expect("second run");

    let c = first.entities[0].counts;
    assert_eq!((c.read, c.written), (total as u64, total as u64), "{first}");
    assert_eq!(
        first.entities[0].watermark,
        Some(t + chrono::TimeDelta::hours(9))
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(DISTINCT id) FROM items").await,
        total
    );
    assert_eq!(again.entities[0].counts.read, 0, "{again}");
}

#[tokio::test]
async fn read_ahead_across_windows_sqlite() {
    read_ahead_across_windows(Backend::Sqlite).await;
}

#[tokio::test]
async fn read_ahead_across_windows_postgres() {
    read_ahead_across_windows(Backend::Postgres).await;
}
