//! Late writes: documents written with a time behind the watermark. Inside the overlap the
//! next run re-reads them; outside it no window ever will, and `verify` reports them as
//! missing (by key) until a backfill of that range brings them in. Also: documents updated
//! while their window is being read end in their latest version.

use crate::fault_util::Mongod;
use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use bson::doc;
use std::time::Duration;
use tidemark::commands::verify::{verify, VerifyOptions};

#[tokio::test]
async fn late_writes_inside_the_overlap_are_caught_outside_reported_by_verify() {
    // Arrange: one run brings the watermark to the source clock.
    let mongo = Mongod::start();
    let env = Env::new_at(
        &mongo.uri(),
        "late",
        Backend::Sqlite,
        &items_mapping("epoch_millis"),
    )
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let h = 3_600_000;
    env.insert(
        "items",
        (0..100i64)
            .map(|i| doc! { "_id": i, "t": now - 2 * h + i * 1000, "v": "on time" })
            .collect(),
    )
    .await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.sync.overlap = Duration::from_secs(3600);
    s.sync.start = chrono::DateTime::from_timestamp_millis(now - 3 * h).unwrap();
    env.run(s.clone()).await.expect("first run");

    // Act: two late writes behind the new watermark, 10 minutes and 3 hours back.
    env.insert(
        "items",
        vec![
            doc! { "_id": 1000i64, "t": now - 600_000, "v": "late, inside the overlap" },
            doc! { "_id": 2000i64, "t": now - 3 * h + 60_000, "v": "late, outside the overlap" },
        ],
    )
    .await;
    env.run(s.clone()).await.expect("second run");
    let rep = verify(
        &s,
        &VerifyOptions {
            from: tidemark::engine::window::fmt_ts(
                chrono::DateTime::from_timestamp_millis(now - 4 * h).unwrap(),
            ),
            to: tidemark::engine::window::fmt_ts(
                chrono::DateTime::from_timestamp_millis(now + 60_000).unwrap(),
            ),
            entities: vec![],
            bucket: Duration::from_secs(3600),
            limit: 50,
        },
    )
    .await
    .expect("verify");

    // Assert
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM items WHERE id = 1000"
        )
        .await,
        1,
        "inside the overlap: caught"
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM items WHERE id = 2000"
        )
        .await,
        0,
        "outside: no window reads it"
    );
    let e = &rep.entities[0];
    assert_eq!(
        (e.missing_count, e.different_count, e.extra_count),
        (1, 0, 0),
        "{rep}"
    );
    assert!(
        e.missing.iter().any(|k| k.contains("2000")),
        "verify names the late document: {:?}",
        e.missing
    );
    assert!(rep.differences > 0);
}

/// Documents updated while the run reads their window: after the next run every row holds
/// the latest version (an update moves `t` forward, into a later window or the next run).
#[tokio::test]
async fn documents_updated_during_the_read_end_in_their_latest_version() {
    // Arrange
    let mongo = Mongod::start();
    let env = Env::new_at(
        &mongo.uri(),
        "updmid",
        Backend::Sqlite,
        &items_mapping("epoch_millis"),
    )
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    env.insert("items", crate::ops_util::items(20_000, now - 3_600_000, 10))
        .await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.source.rate_limit = 10_000;
    let coll = env.db.collection::<bson::Document>("items");

    // Act: while the run reads (about 2 s), update documents all over the window.
    let run = tidemark::commands::run::run(s.clone(), Default::default(), Default::default());
    let writer = async {
        for round in 0..10i64 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            for id in (round..20_000).step_by(997) {
                let t = chrono::Utc::now().timestamp_millis() - 5_000;
                coll.update_one(
                    doc! { "_id": id },
                    doc! { "$set": { "t": t, "v": format!("updated {round}") } },
                )
                .await
                .unwrap();
            }
        }
    };
    let (first, ()) = tokio::join!(run, writer);
    first.expect("run during updates");
    s.source.rate_limit = 0;
    tokio::time::sleep(Duration::from_millis(50)).await;
    env.run(s).await.expect("next run");

    // Assert: every source document, at its latest version.
    use futures::TryStreamExt;
    let docs: Vec<bson::Document> = coll
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut want: Vec<String> = docs
        .iter()
        .map(|d| format!("{}|{}", d.get_i64("_id").unwrap(), d.get_str("v").unwrap()))
        .collect();
    want.sort();
    let mut got = crate::fault_kill::texts(
        &env.target_url,
        "SELECT CAST(id AS TEXT) || '|' || v FROM items",
    )
    .await;
    got.sort();
    assert_eq!(got.len(), 20_000);
    assert!(
        got == want,
        "target rows differ from the latest source versions"
    );
}
