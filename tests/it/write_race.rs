//! A first load writes rows it found absent with a plain INSERT (no ON CONFLICT). If another
//! writer adds one of those keys between the batch's read and its insert, the batch must
//! still land: either the insert is undone to a savepoint and the upsert writes the batch's
//! version, or (optimistic inserts, no savepoint) the whole batch is written again.

use crate::harness::{scalar_i64, Backend};
use crate::trust_util::{item, run_until, seed};

#[tokio::test]
async fn insert_of_absent_rows_survives_a_concurrent_insert_of_the_same_key() {
    let out = race("race", false).await;
    // The batch saw the row as new (the savepoint's upsert keeps that count).
    assert_eq!(out.inserted, 1, "the batch read row 500 as absent: {out:?}");
}

#[tokio::test]
async fn optimistic_insert_of_absent_rows_rewrites_the_batch_on_a_concurrent_insert() {
    let out = race("race_opt", true).await;
    // The first attempt failed on the rival's key; the batch written again read the rival's
    // row and replaced it.
    assert_eq!(
        (out.inserted, out.updated),
        (0, 1),
        "the rewritten batch found row 500 stored: {out:?}"
    );
}

/// Arrange a migrated target and another session holding an uncommitted row 500; write a
/// batch with row 500 (read as absent: uncommitted), whose INSERT then waits on the rival's
/// key; the rival commits while it waits. The batch's version and child rows must be stored.
async fn race(name: &str, optimistic: bool) -> tidemark::sink::BatchOutcome {
    let env = seed(Backend::Postgres, name).await;
    let url = env.target_url.clone();
    run_until(env.settings(), "2019-01-02", false)
        .await
        .expect("first run");
    let mapping = tidemark::commands::setup::load_mapping(&env.settings()).unwrap();
    let items = mapping.entity("items").unwrap().clone();
    let other = sqlx::PgPool::connect(&url).await.unwrap();
    let mut rival = other.begin().await.unwrap();
    sqlx::query("INSERT INTO items (id, t, v) VALUES (500, now(), 'rival')")
        .execute(&mut *rival)
        .await
        .unwrap();

    let sink = tidemark::sink::Sink::connect(&tidemark::secret::SecretUri::new(url.clone()), 2)
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        let raw = vec![bson::RawDocumentBuf::from_document(&item(500, 0, "ours", "o0")).unwrap()];
        let mapped = tidemark::engine::pipeline::map_page(&items, &raw, true);
        let out = sink
            .write_batch(&tidemark::sink::BatchWrite {
                entity: Some(&items),
                rows: &mapped.rows,
                children: &mapped.children,
                run_id: "race",
                mapping_version: "trust",
                provenance: true,
                optimistic_inserts: optimistic,
                ..Default::default()
            })
            .await;
        sink.close().await;
        out
    });
    let mut waited = 0;
    while scalar_i64(&url, "SELECT COUNT(*) FROM pg_locks WHERE NOT granted").await == 0 {
        waited += 1;
        assert!(waited < 500, "the batch never waited on the rival's row");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    rival.commit().await.unwrap();
    let out = writer
        .await
        .unwrap()
        .expect("the batch lands despite the rival");

    let v: String = sqlx::query_scalar("SELECT v FROM items WHERE id = 500")
        .fetch_one(&other)
        .await
        .unwrap();
    assert_eq!(v, "ours");
    assert_eq!(
        scalar_i64(&url, "SELECT COUNT(*) FROM item_tags WHERE item_id = 500").await,
        2,
        "the batch's child rows landed too"
    );
    other.close().await;
    out
}

/// A first load presumes each next batch is all new rows and inserts it without reading;
/// when a batch holds rows already stored (written by an earlier run, changed since), the
/// insert is undone and the batch is read and upserted: every row ends up as the source has
/// it, inserts and updates are counted right, and a rollback restores the earlier state.
#[tokio::test]
async fn presumed_first_load_falls_back_when_rows_exist() {
    let env = seed(Backend::Postgres, "presume").await;
    let url = env.target_url.clone();
    run_until(env.settings(), "2019-01-02", false)
        .await
        .expect("run A: items 0..20");
    let before = crate::trust_util::dump_domain(&url).await;
    // Day 1: items 100..160 are new and come first (earlier minutes), then items 5..8 change.
    env.insert(
        "items",
        (100..160)
            .map(|i| {
                let mut d = item(i, 1, &format!("new {i}"), "o0");
                d.insert("t", crate::trust_util::at(1, i - 100));
                d
            })
            .collect(),
    )
    .await;
    let coll = env.db.collection::<bson::Document>("items");
    for i in 5..8i64 {
        coll.update_one(
            bson::doc! { "_id": i },
            bson::doc! { "$set": { "v": format!("changed {i}"), "t": crate::trust_util::at(1, 100 + i) } },
        )
        .await
        .unwrap();
    }
    let mut s = env.settings();
    s.source.batch_size = 10;
    let b = run_until(s, "2019-01-03", false).await.expect("run B");
    assert_eq!(
        (b.totals.inserted, b.totals.updated),
        (60, 3),
        "60 new rows presumed new, 3 stored rows found on fallback: {b}"
    );
    for i in 5..8i64 {
        let v: String = sqlx::query_scalar("SELECT v FROM items WHERE id = $1")
            .bind(i)
            .fetch_one(&sqlx::PgPool::connect(&url).await.unwrap())
            .await
            .unwrap();
        assert_eq!(v, format!("changed {i}"));
    }
    assert_eq!(scalar_i64(&url, "SELECT COUNT(*) FROM items").await, 80);
    tidemark::commands::rollback::rollback(env.settings(), &b.run_id, false, false)
        .await
        .expect("rollback B");
    assert_eq!(crate::trust_util::dump_domain(&url).await, before);
}
