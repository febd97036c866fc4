//! Verify compares the mapped source with the target for a range and names the exact ids
//! that are missing, extra or different, and the columns; exit code 7 on any difference.
//! Right after a clean run it finds nothing, whatever the missing-reference policies and
//! soft deletes did; each kind of damage done to the target afterwards is found, exactly.

use crate::harness::{Backend, Env};
use crate::trust_util::{at, day_two, exec, run_until, seed};
use bson::{doc, Document};
use tidemark::cli::VerifyArgs;
use tidemark::commands::verify::{verify, RowDiff, VerifyOptions, VerifyReport};

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

/// Applies `sql` to the target on one connection, with the foreign-key checks off when
/// `unchecked` (how a dangling reference gets in: another writer, or tidemark's own
/// `foreign_key_checks = "tidemark"`).
async fn damage(url: &str, unchecked: bool, sql: &[&str]) {
    use sqlx::{Connection, Executor};
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        if unchecked {
            c.execute("PRAGMA foreign_keys = OFF").await.unwrap();
        }
        for s in sql {
            c.execute(*s).await.unwrap();
        }
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        if unchecked {
            c.execute("SET session_replication_role = replica")
                .await
                .unwrap();
        }
        for s in sql {
            c.execute(*s).await.unwrap();
        }
    }
}

/// The trust domain migrated over two days, then `sql` applied to the target: the report
/// of `verify` over both days.
async fn damaged(backend: Backend, unchecked: bool, sql: &[&str]) -> VerifyReport {
    let env = seed(backend, "vfy_dmg").await;
    day_two(&env).await;
    run_until(env.settings(), "2019-01-03", false)
        .await
        .expect("run");
    let clean = verify(&env.settings(), &opts()).await.expect("verify");
    assert_eq!(clean.differences, 0, "{clean}");
    damage(&env.target_url, unchecked, sql).await;
    verify(&env.settings(), &opts()).await.expect("verify")
}

/// `(column, source, target)` of a listed row's differing columns.
fn columns(d: &RowDiff) -> Vec<(String, String, String)> {
    d.columns
        .iter()
        .map(|c| (c.column.clone(), c.source.to_string(), c.target.to_string()))
        .collect()
}

fn the_one(r: &VerifyReport) -> &RowDiff {
    let e = &r.entities[0];
    assert_eq!(e.details.len(), 1, "{r}");
    &e.details[0]
}

async fn changed_column(backend: Backend) {
    let r = damaged(
        backend,
        false,
        &["UPDATE items SET v = 'tampered' WHERE id = 7"],
    )
    .await;
    assert_eq!(r.entities[0].different, vec!["[7]"], "{r}");
    assert_eq!(r.differences, 1, "{r}");
    let d = the_one(&r);
    assert_eq!(
        columns(d),
        vec![("v".into(), "\"v7\"".into(), "\"tampered\"".into())],
        "{r}"
    );
}

async fn deleted_row(backend: Backend) {
    let r = damaged(backend, false, &["DELETE FROM items WHERE id = 8"]).await;
    assert_eq!(r.entities[0].missing, vec!["[8]"], "{r}");
    assert_eq!(r.differences, 1, "{r}");
}

async fn extra_row(backend: Backend) {
    let r = damaged(
        backend,
        false,
        &["INSERT INTO items (id, t, v) VALUES (99, '2019-01-01T05:00:00.000Z', 'stray')"],
    )
    .await;
    assert_eq!(r.entities[0].extra, vec!["[99]"], "{r}");
    assert_eq!(r.differences, 1, "{r}");
}

async fn changed_child_row(backend: Backend) {
    let r = damaged(
        backend,
        false,
        &["UPDATE item_tags SET tag = 'tampered' WHERE item_id = 9 AND pos = 1"],
    )
    .await;
    assert_eq!(r.entities[0].different, vec!["[9]"], "{r}");
    assert_eq!(r.differences, 1, "{r}");
    let d = the_one(&r);
    assert!(d.columns.is_empty(), "{r}");
    assert_eq!(d.children.len(), 1, "{r}");
    let c = &d.children[0];
    assert_eq!(
        (c.table.as_str(), c.key.as_str(), c.state),
        ("item_tags", "[9,1]", "different")
    );
    assert_eq!(c.columns.len(), 1, "{r}");
    assert_eq!(
        (
            c.columns[0].column.as_str(),
            c.columns[0].source.to_string(),
            c.columns[0].target.to_string()
        ),
        ("tag", "\"t9\"".to_owned(), "\"tampered\"".to_owned())
    );
}

async fn deleted_child_row(backend: Backend) {
    let r = damaged(
        backend,
        false,
        &["DELETE FROM item_tags WHERE item_id = 12 AND pos = 0"],
    )
    .await;
    assert_eq!(r.entities[0].different, vec!["[12]"], "{r}");
    assert_eq!(r.differences, 1, "{r}");
    let c = &the_one(&r).children;
    assert_eq!(c.len(), 1, "{r}");
    assert_eq!((c[0].key.as_str(), c[0].state), ("[12,0]", "missing"));
}

async fn extra_child_row(backend: Backend) {
    let r = damaged(
        backend,
        false,
        &["INSERT INTO item_tags (item_id, pos, tag) VALUES (13, 5, 'stray')"],
    )
    .await;
    assert_eq!(r.entities[0].different, vec!["[13]"], "{r}");
    assert_eq!(r.differences, 1, "{r}");
    let c = &the_one(&r).children;
    assert_eq!(c.len(), 1, "{r}");
    assert_eq!((c[0].key.as_str(), c[0].state), ("[13,5]", "extra"));
}

/// A reference pointing at nothing: the row differs from the source, and the foreign-key
/// check names it too.
async fn dangling_reference(backend: Backend) {
    let r = damaged(
        backend,
        true,
        &["UPDATE items SET owner = 'ghost' WHERE id = 3"],
    )
    .await;
    assert_eq!(r.entities[0].different, vec!["[3]"], "{r}");
    assert_eq!(
        columns(the_one(&r)),
        vec![("owner".into(), "\"o0\"".into(), "\"ghost\"".into())],
        "{r}"
    );
    assert_eq!(r.dangling.len(), 1, "{r}");
    assert_eq!(r.dangling[0].table, "items", "{r}");
    assert_eq!(r.dangling[0].keys, vec!["[3]"], "{r}");
    assert_eq!(r.differences, 2, "the row and its dangling reference: {r}");
}

/// Long values are cut in the report; a column that may hold a credential never shows its
/// value (its name says so).
#[test]
fn shown_values_are_cut_and_secrets_hidden() {
    use tidemark::commands::verify::shown;
    let long = serde_json::json!("x".repeat(500));
    let cut = shown("notes", long).to_string();
    assert!(cut.len() < 200 && cut.contains("500 characters"), "{cut}");
    let hidden = shown("api_token", serde_json::json!("hunter2")).to_string();
    assert!(!hidden.contains("hunter2"), "{hidden}");
    assert_eq!(shown("v", serde_json::json!("v7")), serde_json::json!("v7"));
}

macro_rules! both_backends {
    ($($name:ident => $f:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test]
            async fn sqlite() {
                $f(Backend::Sqlite).await;
            }
            #[tokio::test]
            async fn postgres() {
                $f(Backend::Postgres).await;
            }
        }
    )*};
}

both_backends! {
    damage_changed_column => changed_column,
    damage_deleted_row => deleted_row,
    damage_extra_row => extra_row,
    damage_changed_child_row => changed_child_row,
    damage_deleted_child_row => deleted_child_row,
    damage_extra_child_row => extra_child_row,
    damage_dangling_reference => dangling_reference,
    demo_verifies_clean => demo_verifies_clean,
    policies_are_not_differences => policies_are_not_differences,
}

/// The VizHub example mapping on the demo data: right after a clean run, verify finds
/// nothing (the documents dead-lettered by `skip` references are counted as such).
async fn demo_verifies_clean(backend: Backend) {
    let env =
        crate::fault_kill::demo_env(&crate::harness::mongo_uri(), "vfy_demo", backend, 1000, 42)
            .await;
    let mut s = env.settings();
    s.sync.start = "2015-01-01T00:00:00Z".parse().unwrap();
    s.sync.error_budget = 100_000;
    s.source.batch_size = 200;
    env.run(s.clone()).await.expect("run");
    let all = VerifyOptions {
        from: "2010-01-01".into(),
        to: "now".into(),
        entities: vec![],
        bucket: std::time::Duration::from_secs(86_400 * 30),
        limit: 20,
    };
    let r = verify(&s, &all).await.expect("verify");
    assert_eq!(r.differences, 0, "{r}");
    let vizzes = &r.entities[1];
    assert_eq!(vizzes.entity, "vizzes");
    assert!(vizzes.source_rows > 900, "{r}");
    assert_eq!(vizzes.target_rows, vizzes.source_rows, "{r}");
    let dead: u64 = r.entities.iter().map(|e| e.dead_lettered).sum();
    assert!(
        dead > 0,
        "the demo's malformed viz takes its content, commits and events along: {r}"
    );
}

/// A domain with every policy verify must understand: a `skip` reference (the document is
/// dead-lettered), `null` and `skip` references in a child table (the column is NULL, the
/// child row dropped), and a soft delete (the row stays, marked).
const POLICIES: &str = r#"
version = "verify-policies"
[entities.owners]
collection = "owners"
time_field = "t"
time_encoding = "date"
table = "owners"
primary_key = ["id"]
windowed = false
[entities.owners.columns]
id = { path = "_id", type = "text", required = true }

[entities.items]
collection = "items"
time_field = "t"
time_encoding = "date"
table = "items"
primary_key = ["id"]
[entities.items.deleted]
when = 'has(doc.deleted) && doc.deleted == true'
action = "soft_delete"
column = "deleted_at"
[entities.items.columns]
id = { path = "_id", type = "bigint", required = true }
v = { path = "v", type = "text" }
owner = { path = "owner", type = "text", references = "owners", on_missing = "skip" }
deleted_at = { path = "deletedAt", type = "timestamptz" }
[entities.items.children.likes]
path = "likes"
table = "item_likes"
primary_key = ["item_id", "pos"]
[entities.items.children.likes.columns]
item_id = { parent = "id", type = "bigint" }
pos = { ordinal = true, type = "integer" }
by = { path = "by", type = "text", references = "owners", on_missing = "null" }
fan = { path = "fan", type = "text", references = "owners", on_missing = "skip" }
"#;

fn policy_item(id: i64, day: i64, owner: &str, likes: &[(&str, &str)]) -> Document {
    doc! { "_id": id, "t": at(day, id), "v": format!("v{id}"), "owner": owner,
    "likes": likes.iter().map(|(by, fan)| doc! { "by": *by, "fan": *fan }).collect::<Vec<_>>() }
}

async fn policies_are_not_differences(backend: Backend) {
    // Arrange: owner `ghost` does not exist. Item 1 is owned by it (dead-lettered by
    // `skip`); item 2's likes name it (one nulled, one dropped); item 3 is soft-deleted
    // after the first run.
    let env = Env::new("vfy_pol", backend, POLICIES).await;
    env.insert("owners", vec![doc! { "_id": "o1", "t": at(0, 0) }])
        .await;
    env.insert(
        "items",
        vec![
            policy_item(1, 0, "ghost", &[]),
            policy_item(
                2,
                0,
                "o1",
                &[("ghost", "o1"), ("o1", "ghost"), ("o1", "o1")],
            ),
            policy_item(3, 0, "o1", &[("o1", "o1")]),
            policy_item(4, 0, "o1", &[]),
        ],
    )
    .await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    run_until(env.settings(), "2019-01-02", false)
        .await
        .expect("first run");
    env.db
        .collection::<Document>("items")
        .update_one(
            doc! { "_id": 3i64 },
            doc! { "$set": { "deleted": true, "t": at(1, 5) } },
        )
        .await
        .unwrap();
    run_until(env.settings(), "2019-01-03", false)
        .await
        .expect("second run");

    // Act
    let r = verify(&env.settings(), &opts()).await.expect("verify");

    // Assert: no difference; the dead letter and the soft-deleted row are counted.
    assert_eq!(r.differences, 0, "{r}");
    let e = &r.entities[0];
    assert_eq!((e.dead_lettered, e.soft_deleted), (1, 1), "{r}");
    assert_eq!(e.source_rows, 3, "{r}");

    // And both ways: the soft-delete marker removed, a nulled child reference filled in,
    // the dead letter discarded (the document is then lost without a trace).
    damage(
        &env.target_url,
        true,
        &[
            "UPDATE items SET deleted_at = NULL WHERE id = 3",
            "UPDATE item_likes SET by = 'o1' WHERE item_id = 2 AND pos = 0",
            "DELETE FROM tidemark_dead_letters WHERE entity = 'items'",
        ],
    )
    .await;
    let r = verify(&env.settings(), &opts()).await.expect("verify");
    let e = &r.entities[0];
    assert_eq!(sorted(&e.different), vec!["[2]", "[3]"], "{r}");
    assert_eq!(e.missing, vec!["[1]"], "{r}");
    assert_eq!(r.differences, 3, "{r}");
    let marker = e.details.iter().find(|d| d.key == "[3]").unwrap();
    assert_eq!(columns(marker)[0].0, "deleted_at", "{r}");
    assert_eq!(columns(marker)[0].2, "null", "{r}");
    let nulled = e.details.iter().find(|d| d.key == "[2]").unwrap();
    assert_eq!(nulled.children.len(), 1, "{r}");
    assert_eq!(nulled.children[0].key, "[2,0]", "{r}");
    assert_eq!(nulled.children[0].columns[0].column, "by", "{r}");
}

/// Two source documents for one key (a legacy data bug the demo data has too), read in
/// different pages: the later one is what the target must hold, as a run writes it.
const TWINS: &str = r#"
version = "verify-twins"
[entities.items]
collection = "items"
id_field = "id"
time_field = "t"
time_encoding = "date"
table = "items"
primary_key = ["id"]
[entities.items.columns]
id = { path = "id", type = "text", required = true }
t = { path = "t", type = "timestamptz", required = true }
v = { path = "v", type = "text" }
"#;

async fn twins_in_two_pages(backend: Backend) {
    let env = Env::new("vfy_twins", backend, TWINS).await;
    env.insert(
        "items",
        vec![
            doc! { "id": "a", "t": at(0, 1), "v": "first copy" },
            doc! { "id": "b", "t": at(0, 2), "v": "b" },
            doc! { "id": "a", "t": at(0, 3), "v": "later copy" },
        ],
    )
    .await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.source.batch_size = 1;
    run_until(s.clone(), "2019-01-02", false)
        .await
        .expect("run");

    let r = verify(&s, &opts()).await.expect("verify");

    assert_eq!(r.differences, 0, "{r}");
    assert_eq!(r.entities[0].source_rows, 2, "{r}");
}

both_backends! {
    twins_verify_clean => twins_in_two_pages,
}
