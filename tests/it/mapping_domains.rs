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

    // A soft-deleted document is written (with its marker), not deleted.
    let c = second.entities[0].counts;
    assert_eq!((c.written, c.deleted), (2, 0), "{second}");
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

/// docs/MAPPING.md's content-hash example: `blobs` keyed by `sha256(doc.text)` keeps each
/// distinct text once, within a batch and across runs, while `uploads` keeps every document.
async fn content_keyed(backend: Backend) {
    let md = std::fs::read_to_string("docs/MAPPING.md").unwrap();
    let start = md.find("# One row per distinct attachment text").unwrap();
    let example = &md[start..start + md[start..].find("```").unwrap()];
    let mapping = format!("version = \"content\"\n{example}");
    let env = Env::new("content", backend, &mapping).await;
    let at = |s: &str| bson::DateTime::parse_rfc3339_str(s).unwrap();
    let upload = |id: &str, text: &str, t: &str| {
        doc! { "_id": id, "name": format!("{id}.txt"), "text": text, "uploadedAt": at(t) }
    };
    env.insert(
        "attachments",
        vec![
            upload("a", "shared text", "2024-03-01T10:00:00Z"),
            upload("b", "other text", "2024-03-01T11:00:00Z"),
            upload("c", "shared text", "2024-03-01T12:00:00Z"),
        ],
    )
    .await;
    env.index("attachments", doc! { "uploadedAt": 1, "_id": 1 })
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
    let blobs = env.dump(&env.target_url, "blobs").await;
    assert_eq!(blobs.len(), 2, "two distinct texts: {blobs:?} {first}");
    // `printf 'shared text' | sha256sum`, `printf 'other text' | sha256sum`
    for hash in [
        "5592f0774967b08aaf2b2d6c04f7700779bd3e661f9c77c55b76197f013d7790",
        "ed886d735b3ed7db324ddfcfa30187c3fac4182f623a79e2b8c54ebf92a38a3a",
    ] {
        assert!(blobs.iter().any(|r| r.contains(hash)), "{hash}: {blobs:?}");
    }
    let uploads = env.dump(&env.target_url, "uploads").await;
    assert_eq!(uploads.len(), 3, "{uploads:?}");

    env.insert(
        "attachments",
        vec![upload("d", "other text", "2024-03-02T10:00:00Z")],
    )
    .await;
    let second = tidemark::commands::run::run(s, until("2024-03-03"), Default::default())
        .await
        .expect("second run");
    assert_eq!(
        env.dump(&env.target_url, "blobs").await,
        blobs,
        "the same content again is the same row: {second}"
    );
    assert_eq!(env.dump(&env.target_url, "uploads").await.len(), 4);
}

#[tokio::test]
async fn content_keyed_sqlite() {
    content_keyed(Backend::Sqlite).await;
}

#[tokio::test]
async fn content_keyed_postgres() {
    content_keyed(Backend::Postgres).await;
}
