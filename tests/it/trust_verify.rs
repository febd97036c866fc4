//! Verify compares the mapped source with the target for a range and names the exact ids
//! that are missing, extra or different; exit code 7 on any difference.

use crate::harness::Backend;
use crate::trust_util::{at, day_two, exec, run_until, seed};
use bson::{doc, Document};
use tidemark::cli::VerifyArgs;
use tidemark::commands::verify::{verify, VerifyOptions};

fn opts() -> VerifyOptions {
    VerifyOptions {
        from: "2019-01-01".into(),
        to: "2019-01-03".into(),
        entities: vec!["items".into()],
        bucket: std::time::Duration::from_secs(3600),
        limit: 50,
    }
}

async fn verify_finds_differences(backend: Backend) {
    // Arrange: two days migrated; source and target agree.
    let env = seed(backend, "verify").await;
    day_two(&env).await;
    run_until(env.settings(), "2019-01-03", false)
        .await
        .expect("run");
    let clean = verify(&env.settings(), &opts()).await.expect("verify");
    assert_eq!(clean.differences, 0, "{clean}");
    assert_eq!(clean.entities[0].source_rows, 30, "{clean}");

    // Act: the target drifts (row altered, child row altered, row deleted) and the source
    // changes after the window ran (one update inside the range, one moving out of it).
    let url = &env.target_url;
    exec(url, "UPDATE items SET v = 'tampered' WHERE id = 7").await;
    exec(
        url,
        "UPDATE item_tags SET tag = 'tampered' WHERE item_id = 9 AND pos = 1",
    )
    .await;
    exec(url, "DELETE FROM item_tags WHERE item_id = 8").await;
    exec(url, "DELETE FROM items WHERE id = 8").await;
    let items = env.db.collection::<Document>("items");
    items
        .update_one(
            doc! { "_id": 10i64 },
            doc! { "$set": { "v": "late edit", "t": at(1, 600) } },
        )
        .await
        .unwrap();
    items
        .update_one(doc! { "_id": 11i64 }, doc! { "$set": { "t": at(9, 0) } })
        .await
        .unwrap();
    let r = verify(&env.settings(), &opts()).await.expect("verify");

    // Assert
    let e = &r.entities[0];
    assert_eq!(e.missing, vec!["[8]"], "{r}");
    assert_eq!(sorted(&e.different), vec!["[10]", "[7]", "[9]"], "{r}");
    assert_eq!(e.extra, vec!["[11]"], "{r}");
    assert_eq!(r.differences, 5, "{r}");
    assert!(!e.differing_buckets.is_empty(), "{r}");
    let code = tidemark::commands::verify_command(
        env.settings(),
        VerifyArgs {
            from: "2019-01-01".into(),
            to: "2019-01-03".into(),
            entities: vec![],
            bucket: std::time::Duration::from_secs(3600),
            limit: 10,
            json: false,
        },
    )
    .await
    .expect("verify command");
    assert_eq!(code, tidemark::commands::verify::DIFFERENCES);
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

#[tokio::test]
async fn verify_finds_differences_sqlite() {
    verify_finds_differences(Backend::Sqlite).await;
}

#[tokio::test]
async fn verify_finds_differences_postgres() {
    verify_finds_differences(Backend::Postgres).await;
}
