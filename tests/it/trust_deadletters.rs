//! Dead letters: after a mapping fix, `retry` re-maps them (fetching the documents again,
//! or using the stored copy when the source lost one) and writes what now succeeds.

use crate::harness::{scalar_i64, Backend};
use crate::trust_util::{at, run_until, seed, MAPPING};
use bson::{doc, Document};
use tidemark::cli::DeadLetterFilter;
use tidemark::commands::dead_letters::retry;
use tidemark::sink::dead_letters::{discard, list};

async fn sink(url: &str) -> tidemark::sink::Sink {
    tidemark::sink::Sink::connect(&tidemark::secret::SecretUri::new(url.to_owned()), 1)
        .await
        .unwrap()
}

async fn retry_after_fix(backend: Backend) {
    // Arrange: five items without `v` (required) become dead letters; one is then deleted
    // from the source, and one also has an owner that no mapping fix makes text.
    let env = seed(backend, "dl").await;
    let bad: Vec<Document> = (100..105i64)
        .map(|i| doc! { "_id": i, "t": at(0, i) })
        .collect();
    env.insert("items", bad).await;
    env.db
        .collection::<Document>("items")
        .update_one(
            doc! { "_id": 104i64 },
            doc! { "$set": { "owner": { "not": "text" } } },
        )
        .await
        .unwrap();
    let first = run_until(env.settings(), "2019-01-02", false)
        .await
        .expect("run");
    assert_eq!(first.totals.dead_lettered, 5, "{first}");
    env.db
        .collection::<Document>("items")
        .delete_one(doc! { "_id": 103i64 })
        .await
        .unwrap();
    let all = DeadLetterFilter::default();
    let s = sink(&env.target_url).await;
    assert_eq!(list(&s, &all, 100).await.unwrap().len(), 5);

    // Act: fix the mapping (v gets a default), dry-run the retry, then retry.
    let fixed = MAPPING.replace(
        r#"v = { path = "v", type = "text", required = true }"#,
        r#"v = { path = "v", type = "text", default = "(none)" }"#,
    );
    assert_ne!(fixed, MAPPING);
    std::fs::write(&env.mapping_path, fixed).unwrap();
    tidemark::commands::migrate::migrate(&env.settings(), false)
        .await
        .unwrap();
    let dry = retry(env.settings(), all.clone(), true)
        .await
        .expect("dry retry");
    assert_eq!(
        list(&s, &all, 100).await.unwrap().len(),
        5,
        "a dry retry changed dead letters"
    );
    let rep = retry(env.settings(), all.clone(), false)
        .await
        .expect("retry");

    // Assert
    let t = rep.entities["items"];
    assert_eq!((t.retried, t.fixed, t.still_failing), (5, 4, 1), "{rep}");
    assert_eq!(rep.from_stored_copy, 1, "{rep}");
    assert_eq!(dry.entities["items"].fixed, 4, "{dry}");
    let left = list(&s, &all, 100).await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].source_id, "104");
    assert_eq!(
        left[0].run_id, rep.run_id,
        "the dead letter carries the retry's error and run"
    );
    let n = scalar_i64(
        &env.target_url,
        "SELECT COUNT(*) FROM items WHERE id BETWEEN 100 AND 103 AND v = '(none)'",
    )
    .await;
    assert_eq!(n, 4);

    let only = DeadLetterFilter {
        entity: Some("items".into()),
        ..Default::default()
    };
    assert_eq!(discard(&s, &only).await.unwrap(), 1);
    assert!(list(&s, &all, 100).await.unwrap().is_empty());
}

#[tokio::test]
async fn retry_after_fix_sqlite() {
    retry_after_fix(Backend::Sqlite).await;
}

#[tokio::test]
async fn retry_after_fix_postgres() {
    retry_after_fix(Backend::Postgres).await;
}
