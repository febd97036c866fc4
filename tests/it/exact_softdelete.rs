//! Soft delete keeps everything (DESIGN "Deleted means marked, not forgotten"): a document
//! marked deleted — before tidemark first saw it, or later — is upserted with all its
//! columns and child rows plus the marker, and re-running writes nothing.

use crate::harness::{scalar_i64, Backend, Env};
use bson::{doc, Document};
use tidemark::commands::run::RunOptions;

const MAPPING: &str = r#"
version = "soft-1"
[entities.studies]
collection = "studies"
id_field = "studyId"
time_field = "updatedAt"
time_encoding = "iso8601"
table = "studies"
primary_key = ["study_id"]
[entities.studies.deleted]
when = 'has(doc.removed) && doc.removed == true'
action = "soft_delete"
column = "removed_at"
[entities.studies.columns]
study_id = { path = "studyId", type = "text", required = true }
title = { path = "title", type = "text" }
updated_at = { path = "updatedAt", type = "timestamptz", from = "iso8601", required = true }
removed_at = { path = "removedAt", type = "timestamptz" }
[entities.studies.children.annotations]
path = "annotations"
table = "annotations"
primary_key = ["study_id", "position"]
[entities.studies.children.annotations.columns]
study_id = { parent = "study_id", type = "text" }
position = { ordinal = true, type = "integer" }
label = { path = "label", type = "text" }
"#;

fn study(id: &str, title: &str, labels: &[&str], at: &str, removed: bool) -> Document {
    let mut d = doc! {
        "studyId": id, "title": title, "updatedAt": at,
        "annotations": labels.iter().map(|l| doc! { "label": *l }).collect::<Vec<_>>(),
    };
    if removed {
        d.insert("removed", true);
    }
    d
}

fn until(t: &str) -> RunOptions {
    RunOptions {
        until: Some(t.into()),
        ..Default::default()
    }
}

async fn soft_delete(backend: Backend) {
    let env = Env::new("softdel", backend, MAPPING).await;
    env.insert(
        "studies",
        vec![
            // Already deleted when tidemark first sees it.
            study("s1", "born dead", &["a", "b"], "2024-03-01T10:00:00Z", true),
            study("s2", "alive", &["c"], "2024-03-01T11:00:00Z", false),
        ],
    )
    .await;
    let mut s = env.settings();
    s.sync.start = "2024-01-01T00:00:00Z".parse().unwrap();
    let first = tidemark::commands::run::run(s.clone(), until("2024-03-02"), Default::default())
        .await
        .expect("first run");
    let rows = env.dump(&env.target_url, "studies").await;
    assert_eq!(rows.len(), 2, "s1 must have a row: {rows:?}\n{first}");
    assert!(
        rows[0].contains("born dead") && rows[0].contains("2024-03-01"),
        "s1 with its columns and its marker: {rows:?}"
    );
    let ann = env.dump(&env.target_url, "annotations").await;
    assert_eq!(ann.len(), 3, "s1's child rows are kept: {ann:?}");

    // s2 is marked deleted later, and its title and annotations change in the same write.
    env.db
        .collection::<Document>("studies")
        .update_one(
            doc! { "studyId": "s2" },
            doc! { "$set": { "removed": true, "title": "renamed", "annotations": [{ "label": "d" }, { "label": "e" }], "updatedAt": "2024-03-02T09:00:00Z" } },
        )
        .await
        .unwrap();
    let second = tidemark::commands::run::run(s.clone(), until("2024-03-03"), Default::default())
        .await
        .expect("second run");
    let rows = env.dump(&env.target_url, "studies").await;
    assert!(
        rows[1].contains("renamed") && rows[1].contains("2024-03-02"),
        "s2 refreshed and marked: {rows:?}\n{second}"
    );
    assert!(!rows[1].contains("alive"), "{rows:?}");
    let ann = env.dump(&env.target_url, "annotations").await;
    assert_eq!(ann.len(), 4, "s2's new child rows: {ann:?}");
    let marked = scalar_i64(
        &env.target_url,
        "SELECT COUNT(*) FROM studies WHERE removed_at IS NOT NULL",
    )
    .await;
    assert_eq!(marked, 2);

    // Re-running both documents writes nothing: the marked rows are not stamped again.
    let before = env.dump(&env.target_url, "studies").await;
    let xmin = |url: String| async move {
        scalar_i64(
            &url,
            "SELECT COALESCE(SUM(xmin::text::bigint), 0)::bigint FROM studies",
        )
        .await
    };
    let xmin_before = if backend == Backend::Postgres {
        xmin(env.target_url.clone()).await
    } else {
        0
    };
    let again = tidemark::commands::run::run(
        s,
        RunOptions {
            entities: vec!["studies".into()],
            ids: vec!["s1".into(), "s2".into()],
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .expect("rerun");
    let c = again.entities[0].counts;
    assert_eq!(c.written, 0, "a rerun writes nothing: {again}");
    assert_eq!(c.unchanged, 2, "{again}");
    assert_eq!(env.dump(&env.target_url, "studies").await, before);
    if backend == Backend::Postgres {
        assert_eq!(
            xmin(env.target_url.clone()).await,
            xmin_before,
            "PostgreSQL rows were written again"
        );
    }
}

#[tokio::test]
async fn soft_delete_keeps_rows_sqlite() {
    soft_delete(Backend::Sqlite).await;
}

#[tokio::test]
async fn soft_delete_keeps_rows_postgres() {
    soft_delete(Backend::Postgres).await;
}

/// The marker column needs no declaration; declared with another type, it is an error
/// naming the fix.
#[test]
fn soft_delete_marker_is_declared_for_you() {
    let undeclared = MAPPING.replace(
        "removed_at = { path = \"removedAt\", type = \"timestamptz\" }\n",
        "",
    );
    assert_ne!(undeclared, MAPPING);
    let m = tidemark::mapping::Mapping::parse(&undeclared, "soft").unwrap();
    assert!(m.entities[0].columns.iter().any(|c| c.name == "removed_at"));
    let mistyped = MAPPING.replace(
        "removed_at = { path = \"removedAt\", type = \"timestamptz\" }",
        "removed_at = { path = \"removedAt\", type = \"text\" }",
    );
    let err = tidemark::mapping::Mapping::parse(&mistyped, "soft")
        .unwrap_err()
        .to_string();
    assert!(err.contains("type = \"timestamptz\""), "{err}");
}
