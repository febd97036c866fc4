//! Unit tests of dependency resolution: the missing-reference policies on a mapped page.
use super::*;
use crate::engine::page::row_meta;
use crate::mapping::Mapping;

const MAPPING: &str = r#"
version = "t1"
[entities.users]
collection = "users"
time_field = "t"
time_encoding = "epoch_seconds"
table = "users"
id_field = "id"
primary_key = ["id"]
[entities.users.columns]
id = { path = "id", type = "text", required = true }

[entities.posts]
collection = "posts"
time_field = "t"
time_encoding = "epoch_seconds"
table = "posts"
primary_key = ["id"]
[entities.posts.columns]
id = { path = "id", type = "text", required = true }
owner = { path = "owner", type = "text", references = "users", on_missing = "skip" }
editor = { path = "editor", type = "text", references = "users", on_missing = "null" }
extra = { remainder = true, type = "json" }
[entities.posts.children.likes]
path = "likes"
table = "likes"
primary_key = ["post_id", "position"]
[entities.posts.children.likes.columns]
post_id = { parent = "id", type = "text" }
position = { ordinal = true, type = "integer" }
user_id = { path = "u", type = "text", references = "users", on_missing = "skip" }
by = { path = "by", type = "text", references = "users", on_missing = "null" }
"#;

/// Keys and hashes computed ahead survive the missing-reference policies: rows a policy
/// nulled get theirs computed again, rows it dropped (and a dropped row's children) take
/// theirs with them, and every one left matches its row (a stale one would record a
/// wrong hash in the undo log; a cleared one sends the hashing to the writer's task).
#[test]
fn precomputed_keys_and_hashes_follow_the_policies() {
    let m = Mapping::parse(MAPPING, "test").unwrap();
    let e = m.entity("posts").unwrap();
    let like = |u: &str, by: &str| bson::rawdoc! { "u": u, "by": by };
    let docs = vec![
        bson::rawdoc! { "_id": 1, "id": "p1", "t": 1, "owner": "alice", "editor": "ghost", "x": {"b": 1, "a": 2},
        "likes": [like("alice", "bob"), like("ghost", "bob"), like("bob", "ghost")] },
        bson::rawdoc! { "_id": 2, "id": "p2", "t": 1, "owner": "ghost", "editor": "bob",
        "likes": [like("alice", "alice")] },
        bson::rawdoc! { "_id": 3, "id": "p3", "t": 1, "owner": "bob", "editor": "alice", "x": {"z": 1, "a": [1, {"d": 2, "c": 3}]},
        "likes": [like("bob", "alice"), like("alice", "ghost")] },
    ];
    let mut page = map_page(e, &docs, true);
    crate::engine::page::prepare(e, &mut page, true);
    let mut memo = Memo::default();
    for (k, present) in [("alice", true), ("bob", true), ("ghost", false)] {
        memo.set("users", k.into(), present);
    }
    let mut res = Resolution::default();
    let removed = apply_policies(e, &mut page, &docs, &mut memo, &mut res, false);

    assert_eq!(removed.len(), 1, "p2's owner is missing: skipped");
    let ids: Vec<&Value> = page.rows.iter().map(|r| &r[0]).collect();
    assert_eq!(ids, [&Value::Text("p1".into()), &Value::Text("p3".into())]);
    assert_eq!(
        page.rows[0][2],
        Value::Null,
        "p1's editor is missing: nulled"
    );
    let likes = &page.children[0];
    assert_eq!(
        likes.len(),
        4,
        "one like of p1 dropped, p2's like gone with p2"
    );
    assert_eq!(likes.iter().filter(|r| r[3] == Value::Null).count(), 2);

    let t = e.table_ref();
    assert_eq!(
        page.row_meta.len(),
        page.rows.len(),
        "row keys and hashes kept"
    );
    for (row, meta) in page.rows.iter().zip(&page.row_meta) {
        assert_eq!(meta, &row_meta(t, row));
    }
    let ct = e.children[0].table_ref();
    assert_eq!(
        page.child_meta[0].len(),
        likes.len(),
        "child keys and hashes kept"
    );
    for (row, meta) in likes.iter().zip(&page.child_meta[0]) {
        assert_eq!(meta, &row_meta(ct, row));
    }
}

/// A row gets one fate, the strictest among its unresolved references: skip (a dead
/// letter) over defer (held back) over null; every unresolved reference is recorded.
#[test]
fn a_row_with_several_missing_references_gets_one_fate() {
    let m = Mapping::parse(
        &MAPPING.replace(
            "editor = { path = \"editor\", type = \"text\", references = \"users\", on_missing = \"null\" }",
            "editor = { path = \"editor\", type = \"text\", references = \"users\", on_missing = \"null\" }\n\
             reviewer = { path = \"reviewer\", type = \"text\", references = \"users\", on_missing = \"defer\" }",
        ),
        "test",
    )
    .unwrap();
    let e = m.entity("posts").unwrap();
    let docs = vec![
        bson::rawdoc! { "_id": 1, "id": "p1", "t": 1, "owner": "ghost", "reviewer": "ghost" },
        bson::rawdoc! { "_id": 2, "id": "p2", "t": 1, "owner": "alice", "reviewer": "ghost", "editor": "ghost" },
        bson::rawdoc! { "_id": 3, "id": "p3", "t": 1, "owner": "alice", "reviewer": "limbo" },
        bson::rawdoc! { "_id": 4, "id": "p4", "t": 1, "owner": "alice", "editor": "ghost" },
    ];
    let mut page = map_page(e, &docs, true);
    let mut memo = Memo::default();
    memo.set("users", "alice".into(), true);
    memo.set("users", "ghost".into(), false);
    let mut res = Resolution::default();
    let removed = apply_policies(e, &mut page, &docs, &mut memo, &mut res, false);

    assert_eq!(removed.len(), 3);
    let dead: Vec<&str> = res.dead.iter().map(|d| d.source_id.as_str()).collect();
    assert_eq!(
        dead,
        ["1"],
        "skip beats defer: a dead letter, not also held back"
    );
    let held: Vec<&str> = res.deferred.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        held,
        ["2", "3"],
        "defer beats null; unresolved within limits is held"
    );
    assert!(res.deferred[1].1.contains("not resolved within limits"));
    assert_eq!(page.rows.len(), 1, "p4 written with its editor nulled");
    assert_eq!(res.missing.len(), 6, "every unresolved reference recorded");
}
