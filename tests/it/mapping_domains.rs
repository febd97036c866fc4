//! A second domain (annotation studies) mapped only through a mapping file: computed
//! classification, numeric/date/uuid types, exploded arrays with replace-the-whole-set,
//! soft deletes — on both backends.

use crate::harness::{Backend, Env};
use bson::{doc, Document};

fn study(id: &str, annotators: &[&str], labels: &[(&str, &str)], at: &str) -> Document {
    doc! {
        "studyId": id, "title": format!("  Study {id} "), "annotators": annotators,
        "annotations": labels.iter().map(|(b, l)| doc! { "by": *b, "label": *l }).collect::<Vec<_>>(),
        "budget": bson::Bson::Decimal128("1234.50".parse().unwrap()),
        "startedOn": "2024-02-29", "externalId": "6F9619FF-8B86-D011-B42D-00C04FC964FF",
        "updatedAt": at, "site": "lab-3",
    }
}

async fn studies(backend: Backend) {
    let mapping = std::fs::read_to_string("tests/fixtures/studies.toml").unwrap();
    let env = Env::new("studies", backend, &mapping).await;
    env.insert(
        "studies",
        vec![
            study(
                "s1",
                &["ann"],
                &[("ann", " Cat ")],
                "2024-03-01T10:00:00.000Z",
            ),
            study(
                "s2",
                &["ann", "bob"],
                &[("ann", "cat"), ("bob", "dog")],
                "2024-03-01T11:00:00.000Z",
            ),
            study(
                "s3",
                &["ann", "bob", "cy"],
                &[("cy", "cow")],
                "2024-03-01T12:00:00.000Z",
            ),
        ],
    )
    .await;
    env.index("studies", doc! { "updatedAt": 1, "_id": 1 })
        .await;
    let mut s = env.settings();
    s.sync.start = "2024-01-01T00:00:00Z".parse().unwrap();

    let until = |t: &str| tidemark::commands::run::RunOptions {
        until: Some(t.into()),
        ..Default::default()
    };
    let first = tidemark::commands::run::run(s.clone(), until("2024-03-02"), Default::default())
        .await
        .expect("first run");
    assert_eq!(first.entities[0].counts.written, 3, "{first}");
    let rows = env.dump(&env.target_url, "studies").await;
    assert!(
        rows[0].contains("gold") && rows[1].contains("pool") && rows[2].contains("pool"),
        "{rows:?}"
    );
    assert!(
        rows[0].contains("Study s1") && !rows[0].contains("  Study"),
        "trimmed title: {rows:?}"
    );
    assert!(rows[0].contains("1234.5"), "numeric: {rows:?}");
    assert!(rows[0].contains("2024-02-29"), "date: {rows:?}");
    assert!(
        rows[0].contains("6f9619ff-8b86-d011-b42d-00c04fc964ff"),
        "uuid: {rows:?}"
    );
    assert!(
        rows[0].contains("lab-3"),
        "remainder keeps unmapped fields: {rows:?}"
    );
    let ann = env.dump(&env.target_url, "annotations").await;
    assert_eq!(ann.len(), 4, "{ann:?}");
    assert!(ann[0].contains("cat") && !ann[0].contains("Cat"), "{ann:?}");

    // s2 loses bob (and his annotation); s3 is removed at the source.
    let coll = env.db.collection::<Document>("studies");
    coll.update_one(
        doc! { "studyId": "s2" },
        doc! { "$set": { "annotators": ["ann"], "annotations": [{ "by": "ann", "label": "cat" }], "updatedAt": "2024-03-02T09:00:00.000Z" } },
    )
    .await
    .unwrap();
    coll.update_one(
        doc! { "studyId": "s3" },
        doc! { "$set": { "removed": true, "updatedAt": "2024-03-02T10:00:00.000Z" } },
    )
    .await
    .unwrap();
    let second = tidemark::commands::run::run(s, until("2024-03-03"), Default::default())
        .await
        .expect("second run");

    let c = second.entities[0].counts;
    assert_eq!((c.written, c.deleted), (1, 1), "{second}");
    assert_eq!(
        c.child_removed, 1,
        "bob's annotation must disappear: {second}"
    );
    let rows = env.dump(&env.target_url, "studies").await;
    assert!(rows[1].contains("gold"), "s2 re-classified: {rows:?}");
    assert!(
        rows[2].contains("2024-03-02"),
        "s3 soft-deleted with its time: {rows:?}"
    );
    assert_eq!(env.dump(&env.target_url, "annotations").await.len(), 3);
}

#[tokio::test]
async fn studies_sqlite() {
    studies(Backend::Sqlite).await;
}

#[tokio::test]
async fn studies_postgres() {
    studies(Backend::Postgres).await;
}
