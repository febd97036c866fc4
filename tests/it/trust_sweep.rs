//! Sweep finds rows whose source document was hard-deleted and applies the delete rule;
//! single-record runs migrate one document and what it references, without a checkpoint.

use crate::harness::{scalar_i64, Backend};
use crate::trust_util::{dump_domain, run_until, seed, MAPPING};
use bson::{doc, Document};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tidemark::commands::sweep::sweep;

async fn sweep_applies_delete_rule(backend: Backend) {
    // Arrange: 20 items migrated, then 3 hard-deleted from the source.
    let env = seed(backend, "sweep").await;
    run_until(env.settings(), "2019-01-02", false)
        .await
        .expect("run");
    env.db
        .collection::<Document>("items")
        .delete_many(doc! { "_id": { "$in": [3i64, 7i64, 11i64] } })
        .await
        .unwrap();
    let before = dump_domain(&env.target_url).await;

    // Act + Assert: without a rule, only a report.
    let items = || vec!["items".to_string()];
    let r = sweep(env.settings(), items(), false, 4)
        .await
        .expect("sweep");
    assert_eq!(
        (
            r.entities[0].checked,
            r.entities[0].vanished,
            r.entities[0].applied
        ),
        (20, 3, 0),
        "{r}"
    );
    assert_eq!(dump_domain(&env.target_url).await, before);

    // With `delete`: a dry run changes nothing, the real sweep removes rows and child rows.
    let with_rule = format!(
        "{MAPPING}\n[entities.items.deleted]\nwhen = 'has(doc.gone)'\naction = \"delete\"\n"
    );
    std::fs::write(&env.mapping_path, with_rule).unwrap();
    let dry = sweep(env.settings(), items(), true, 4)
        .await
        .expect("dry sweep");
    assert_eq!(dry.entities[0].applied, 3, "{dry}");
    assert_eq!(
        dump_domain(&env.target_url).await,
        before,
        "a dry sweep changed the target"
    );
    let real = sweep(env.settings(), items(), false, 4)
        .await
        .expect("sweep");
    assert_eq!(real.entities[0].applied, 3, "{real}");
    assert_eq!(real.entities[0].ids, vec!["[3]", "[7]", "[11]"], "{real}");
    let url = &env.target_url;
    assert_eq!(scalar_i64(url, "SELECT COUNT(*) FROM items").await, 17);
    assert_eq!(
        scalar_i64(
            url,
            "SELECT COUNT(*) FROM item_tags WHERE item_id IN (3, 7, 11)"
        )
        .await,
        0
    );

    // The sweep is a run like any other: it can be rolled back.
    tidemark::commands::rollback::rollback(env.settings(), &real.run_id, false, false)
        .await
        .expect("rollback the sweep");
    assert_eq!(dump_domain(&env.target_url).await, before);
}

#[tokio::test]
async fn sweep_applies_delete_rule_sqlite() {
    sweep_applies_delete_rule(Backend::Sqlite).await;
}

#[tokio::test]
async fn sweep_applies_delete_rule_postgres() {
    sweep_applies_delete_rule(Backend::Postgres).await;
}

/// `run --entity items --id 5`: that item, its tags and its owner; no checkpoint; a report.
#[tokio::test]
async fn single_record_run() {
    let env = seed(Backend::Sqlite, "record").await;
    let r = tidemark::commands::run::run(
        env.settings(),
        tidemark::commands::run::RunOptions {
            entities: vec!["items".into()],
            ids: vec!["5".into()],
            ..Default::default()
        },
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .expect("single record");
    let url = &env.target_url;
    assert_eq!(crate::harness::dump(url, "items").await.len(), 1, "{r}");
    assert!(crate::harness::dump(url, "items").await[0].starts_with("5|"));
    assert_eq!(
        crate::harness::dump(url, "owners").await.len(),
        1,
        "owner o2 pulled"
    );
    assert_eq!(crate::harness::dump(url, "item_tags").await.len(), 2);
    assert_eq!(
        scalar_i64(url, "SELECT COUNT(*) FROM tidemark_checkpoints").await,
        0
    );

    let sink = tidemark::sink::Sink::connect(&tidemark::secret::SecretUri::new(url.clone()), 1)
        .await
        .unwrap();
    let runs = tidemark::sink::runs::list(&sink, None, 10).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (runs[0].kind.as_str(), runs[0].status.as_str()),
        ("record", "ok")
    );
    let file = r.report_file.expect("report file");
    assert!(
        file.starts_with(env.settings().reports_path().to_str().unwrap()),
        "{file}"
    );
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains("\"kind\": \"record\""), "{text}");

    let err = tidemark::commands::run::run(
        env.settings(),
        tidemark::commands::run::RunOptions {
            entities: vec!["items".into()],
            ids: vec!["424242".into()],
            ..Default::default()
        },
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .expect_err("unknown id");
    assert!(format!("{err:#}").contains("424242"), "{err:#}");
}
