//! Dependencies on demand, against real MongoDB + PostgreSQL (with the foreign keys
//! `migrate` creates) + SQLite: references pulled in bulk, dependents, fork chains,
//! cycles, missing-reference policies, bounded round-trips.

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use bson::{doc, Document};
use tidemark::commands::run::{run, RunOptions};

const T: i64 = 1_700_000_000; // 2023-11-14, epoch seconds

fn viz(
    id: &str,
    owner: &str,
    at: i64,
    fork: Option<&str>,
    upvoters: &[&str],
    collabs: &[&str],
) -> Document {
    let mut d = doc! {
        "id": id, "documentType": "viz", "owner": owner, "title": format!("viz {id}"),
        "createdTimestamp": at - 100, "lastUpdatedTimestamp": at, "privacy": "public",
        "upvotes": upvoters.iter().map(|u| doc! { "userId": *u, "timestamp": at }).collect::<Vec<_>>(),
        "collaborators": collabs.iter().map(|u| doc! { "userId": *u }).collect::<Vec<_>>(),
    };
    if let Some(f) = fork {
        d.insert("forkedFrom", f);
    }
    d
}

fn user(id: &str) -> Document {
    doc! { "id": id, "userName": id, "createdTimestamp": T - 86_400 * 400 }
}

async fn vizhub_env(name: &str, backend: Backend) -> Env {
    let mapping = std::fs::read_to_string("config/mappings/vizhub.toml").unwrap();
    let env = Env::new(name, backend, &mapping).await;
    for (c, f) in [
        ("documentInfo", "lastUpdatedTimestamp"),
        ("user", "createdTimestamp"),
        ("commits", "timestamp"),
        ("eventRecords", "timestamp"),
        ("documentContent", "lastUpdatedTimestamp"),
    ] {
        env.db.create_collection(c).await.ok();
        env.index(c, doc! { f: 1, "_id": 1 }).await;
        env.index(c, doc! { "id": 1 }).await;
    }
    env
}

fn opts(entities: &[&str], until: i64) -> RunOptions {
    RunOptions {
        entities: entities.iter().map(|s| s.to_string()).collect(),
        until: Some(
            chrono::DateTime::from_timestamp(until, 0)
                .unwrap()
                .to_rfc3339(),
        ),
        ..Default::default()
    }
}

async fn count(env: &Env, table: &str) -> i64 {
    scalar_i64(&env.target_url, &format!("SELECT COUNT(*) FROM {table}")).await
}

async fn one_viz_pulls_exactly_what_it_needs(backend: Backend) {
    // Arrange: v1 in the window; v2 (another owner, other upvoters) outside it.
    let env = vizhub_env("deps_one", backend).await;
    env.insert(
        "user",
        ["u1", "u2", "u3", "u4", "u5", "u6"]
            .iter()
            .map(|u| user(u))
            .collect(),
    )
    .await;
    env.insert(
        "documentInfo",
        vec![
            viz("v1", "u1", T, None, &["u2", "u3"], &["u4"]),
            viz("v2", "u5", T - 86_400 * 10, None, &["u6"], &[]),
        ],
    )
    .await;
    env.insert(
        "commits",
        vec![
            doc! { "id": "c1", "vizId": "v1", "authorId": "u1", "timestamp": (T - 50) * 1000 },
            doc! { "id": "c2", "vizId": "v1", "parentCommitId": "c1", "authorId": "u1", "timestamp": (T - 10) * 1000 },
            doc! { "id": "c3", "vizId": "v2", "authorId": "u5", "timestamp": (T - 86_400 * 10) * 1000 },
        ],
    )
    .await;
    env.insert(
        "eventRecords",
        vec![
            doc! { "id": "e1", "vizId": "v1", "eventType": "view", "timestamp": bson::DateTime::from_millis(T * 1000) },
            doc! { "id": "e2", "vizId": "v1", "userId": "u2", "eventType": "upvote", "timestamp": bson::DateTime::from_millis(T * 1000) },
            doc! { "id": "e3", "vizId": "v2", "eventType": "view", "timestamp": bson::DateTime::from_millis(T * 1000) },
        ],
    )
    .await;
    env.insert("documentContent", vec![doc! { "id": "v1", "files": [{ "name": "index.html", "text": "<p>" }], "lastUpdatedTimestamp": T }]).await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();

    // Act: only the vizzes lane, a window holding only v1.
    let r = run(s, opts(&["vizzes"], T + 3600), Default::default())
        .await
        .expect("run");

    // Assert
    let c = r.entities[0].counts;
    assert_eq!(c.read, 1, "{r}");
    assert_eq!(count(&env, "vizzes").await, 1);
    let users = env.dump(&env.target_url, "users").await;
    assert_eq!(
        users.len(),
        4,
        "owner, 2 upvoters, 1 collaborator: {users:?}"
    );
    assert!(
        users
            .iter()
            .all(|u| ["u1", "u2", "u3", "u4"].iter().any(|id| u.contains(id))),
        "{users:?}"
    );
    assert_eq!(count(&env, "upvotes").await, 2);
    assert_eq!(count(&env, "permissions").await, 1);
    assert_eq!(count(&env, "commits").await, 2, "only v1's commits");
    assert_eq!(count(&env, "analytics_events").await, 2, "only v1's events");
    assert_eq!(count(&env, "viz_contents").await, 1);
    assert_eq!(count(&env, "files").await, 1);
    // Pulled users are normal rows; the users lane's own watermark is untouched.
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_checkpoints WHERE lane = 'nightly:users'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn one_viz_pulls_exactly_its_dependencies_sqlite() {
    one_viz_pulls_exactly_what_it_needs(Backend::Sqlite).await;
}

#[tokio::test]
async fn one_viz_pulls_exactly_its_dependencies_postgres() {
    one_viz_pulls_exactly_what_it_needs(Backend::Postgres).await;
}

async fn fork_chains_and_cycles(backend: Backend) {
    let env = vizhub_env("deps_forks", backend).await;
    env.insert(
        "user",
        ["a", "b", "c", "d"].iter().map(|u| user(u)).collect(),
    )
    .await;
    let day = 86_400;
    env.insert(
        "documentInfo",
        vec![
            // Chain f3 -> f2 -> f1, each in a different 30-day window, f3 the newest.
            viz("f1", "a", T - 90 * day, None, &[], &[]),
            viz("f2", "b", T - 60 * day, Some("f1"), &[], &[]),
            viz("f3", "c", T, Some("f2"), &[], &[]),
            // A self-referencing cycle: x <-> y, both outside the first window.
            viz("x", "d", T - 200 * day, Some("y"), &[], &[]),
            viz("y", "d", T + 5 * day, Some("x"), &[], &[]),
            // A dangling fork.
            viz("g", "a", T, Some("gone-forever"), &[], &[]),
        ],
    )
    .await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();

    // First run: only [T-1h, T+1h): f3 and g. f3 pulls f2 and f1 (and their owners) whatever their times.
    let r = run(s.clone(), opts(&["vizzes"], T + 3600), Default::default())
        .await
        .expect("run 1");
    assert_eq!(r.entities[0].counts.read, 2, "{r}");
    assert_eq!(
        r.entities[0].counts.missing_refs, 1,
        "g's dangling fork is recorded: {r}"
    );
    let v = env.dump(&env.target_url, "vizzes").await;
    assert_eq!(v.len(), 4, "f3, g + pulled f2, f1: {v:?}");
    assert_eq!(count(&env, "users").await, 3);
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM vizzes WHERE id = 'g' AND forked_from IS NULL"
        )
        .await,
        1,
        "dangling reference nulled, never re-pointed"
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_missing_refs WHERE ref_key = 'gone-forever'"
        )
        .await,
        1
    );

    // Second run reaches y, which forms a cycle with x (pulled in the same transaction).
    let r = run(
        s.clone(),
        opts(&["vizzes"], T + 10 * day),
        Default::default(),
    )
    .await
    .expect("run 2");
    assert_eq!(
        r.entities[0].counts.read, 3,
        "y, plus f3 and g again inside the 1 h overlap: {r}"
    );
    assert_eq!(count(&env, "vizzes").await, 6);
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM vizzes WHERE id = 'x' AND forked_from = 'y'"
        )
        .await,
        1
    );

    // Pulled rows are normal rows: a later window of their own (re-run over everything) changes nothing.
    let mut s2 = s.clone();
    s2.sync.start = chrono::DateTime::from_timestamp(T - 400 * day, 0).unwrap();
    let before = env.dump(&env.target_url, "vizzes").await;
    tidemark::commands::run::run(s2, opts(&["vizzes"], T + 10 * day), Default::default())
        .await
        .expect("run 3");
    assert_eq!(env.dump(&env.target_url, "vizzes").await, before);

    // The dangling fork's target appears (an old document) and g changes again: the
    // reference now resolves (pulled), and g's missing-reference record is cleared even
    // though nothing else in the batch is missing.
    env.insert(
        "documentInfo",
        vec![viz("gone-forever", "a", T - 300 * day, None, &[], &[])],
    )
    .await;
    env.db
        .collection::<Document>("documentInfo")
        .update_one(
            doc! { "id": "g" },
            doc! { "$set": { "lastUpdatedTimestamp": T + 12 * day } },
        )
        .await
        .unwrap();
    run(
        s.clone(),
        opts(&["vizzes"], T + 20 * day),
        Default::default(),
    )
    .await
    .expect("run 4");
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM vizzes WHERE id = 'g' AND forked_from = 'gone-forever'"
        )
        .await,
        1
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_missing_refs WHERE ref_key = 'gone-forever'"
        )
        .await,
        0,
        "a reference that resolved leaves no missing-reference record"
    );
}

#[tokio::test]
async fn fork_chains_and_cycles_sqlite() {
    fork_chains_and_cycles(Backend::Sqlite).await;
}

#[tokio::test]
async fn fork_chains_and_cycles_postgres() {
    fork_chains_and_cycles(Backend::Postgres).await;
}

/// A batch row held back because its fork chain is deeper than `sync.max_depth` takes its
/// dependents (content, files, commits) with it: they are never written pointing at a viz
/// that is not there. (They were, and the batch failed at COMMIT on the foreign key, in every
/// run again.) The row and its dependents arrive once the chain resolves.
async fn deferred_rows_hold_back_their_dependents(backend: Backend) {
    let env = vizhub_env("deps_deferred_dependents", backend).await;
    env.insert("user", vec![user("a")]).await;
    let day = 86_400;
    env.insert(
        "documentInfo",
        vec![
            viz("d1", "a", T - 90 * day, None, &[], &[]),
            viz("d2", "a", T - 80 * day, Some("d1"), &[], &[]),
            viz("d3", "a", T - 70 * day, Some("d2"), &[], &[]),
            viz("d4", "a", T, Some("d3"), &[], &[]),
            viz("ok", "a", T, None, &[], &[]),
        ],
    )
    .await;
    let content = |id: &str| doc! { "id": id, "lastUpdatedTimestamp": T, "files": [{ "name": "index.html", "text": id }] };
    env.insert("documentContent", vec![content("d4"), content("ok")])
        .await;
    let commit = |id: &str, viz: &str| doc! { "id": id, "vizId": viz, "authorId": "a", "timestamp": T * 1000, "message": "m" };
    env.insert("commits", vec![commit("c4", "d4"), commit("cok", "ok")])
        .await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    s.sync.max_depth = 1;

    let r = run(s.clone(), opts(&["vizzes"], T + 3600), Default::default())
        .await
        .expect("a deferred row must not fail its batch");
    assert_eq!(r.entities[0].counts.deferred, 1, "d4 waits: {r}");
    let n = |sql: &'static str| scalar_i64(&env.target_url, sql);
    assert_eq!(
        count(&env, "vizzes").await,
        1,
        "d4 waits (and d3, whose own fork is too deep)"
    );
    assert_eq!(n("SELECT COUNT(*) FROM vizzes WHERE id = 'ok'").await, 1);
    assert_eq!(
        count(&env, "viz_contents").await,
        1,
        "d4's content waits with d4"
    );
    assert_eq!(
        n("SELECT COUNT(*) FROM viz_contents WHERE viz_id = 'ok'").await,
        1
    );
    assert_eq!(count(&env, "files").await, 1);
    assert_eq!(count(&env, "commits").await, 1, "d4's commit waits with d4");
    assert_eq!(n("SELECT COUNT(*) FROM commits WHERE id = 'cok'").await, 1);

    // A deeper limit resolves the chain: d4 and everything it owns arrive.
    s.sync.max_depth = 5;
    run(s.clone(), opts(&["vizzes"], T + 3600), Default::default())
        .await
        .expect("run 2");
    assert_eq!(count(&env, "vizzes").await, 5);
    assert_eq!(count(&env, "viz_contents").await, 2);
    assert_eq!(count(&env, "files").await, 2);
    assert_eq!(count(&env, "commits").await, 2);
}

#[tokio::test]
async fn deferred_rows_hold_back_their_dependents_sqlite() {
    deferred_rows_hold_back_their_dependents(Backend::Sqlite).await;
}

#[tokio::test]
async fn deferred_rows_hold_back_their_dependents_postgres() {
    deferred_rows_hold_back_their_dependents(Backend::Postgres).await;
}

/// Two entities referencing each other (teams.captain -> players, players.team -> teams).
async fn mutual(backend: Backend) {
    let mapping = r#"
version = "mutual"
[entities.teams]
collection = "teams"
id_field = "code"
time_field = "t"
time_encoding = "epoch_seconds"
table = "teams"
primary_key = ["code"]
[entities.teams.columns]
code = { path = "code", type = "text", required = true }
captain = { path = "captain", type = "text", references = "players" }

[entities.players]
collection = "players"
id_field = "name"
time_field = "t"
time_encoding = "epoch_seconds"
table = "players"
primary_key = ["name"]
[entities.players.columns]
name = { path = "name", type = "text", required = true }
team = { path = "team", type = "text", references = "teams" }
"#;
    let env = Env::new("deps_mutual", backend, mapping).await;
    env.insert(
        "teams",
        vec![
            doc! { "code": "red", "captain": "ann", "t": T },
            doc! { "code": "blue", "captain": "bob", "t": T - 999_999 },
        ],
    )
    .await;
    env.insert(
        "players",
        vec![
            doc! { "name": "ann", "team": "red", "t": T - 999_999 },
            doc! { "name": "bob", "team": "blue", "t": T - 999_999 },
        ],
    )
    .await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    let r = run(s, opts(&["teams"], T + 3600), Default::default())
        .await
        .expect("run");
    assert_eq!(r.entities[0].counts.read, 1, "{r}");
    assert_eq!(env.dump(&env.target_url, "teams").await.len(), 1);
    assert_eq!(
        env.dump(&env.target_url, "players").await.len(),
        1,
        "ann pulled; her team red is the batch row"
    );
}

#[tokio::test]
async fn mutual_references_sqlite() {
    mutual(Backend::Sqlite).await;
}

#[tokio::test]
async fn mutual_references_postgres() {
    mutual(Backend::Postgres).await;
}

/// Dangling references under each policy; `defer` resolves once the parent appears.
async fn policies(backend: Backend) {
    for policy in ["null", "skip", "defer"] {
        let mapping = format!(
            r#"
version = "p"
[entities.posts]
collection = "posts"
id_field = "pid"
time_field = "t"
time_encoding = "epoch_seconds"
table = "posts"
primary_key = ["pid"]
[entities.posts.columns]
pid = {{ path = "pid", type = "text", required = true }}
author = {{ path = "author", type = "text", references = "authors", on_missing = "{policy}" }}

[entities.authors]
collection = "authors"
id_field = "aid"
time_field = "t"
time_encoding = "epoch_seconds"
table = "authors"
primary_key = ["aid"]
windowed = false
[entities.authors.columns]
aid = {{ path = "aid", type = "text", required = true }}
"#
        );
        let env = Env::new(&format!("deps_{policy}"), backend, &mapping).await;
        env.insert(
            "posts",
            vec![
                doc! { "pid": "p1", "author": "ghost", "t": T },
                doc! { "pid": "p2", "author": "real", "t": T },
            ],
        )
        .await;
        env.insert("authors", vec![doc! { "aid": "real", "t": T }])
            .await;
        let mut s = env.settings();
        s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
        let r = run(s.clone(), opts(&["posts"], T + 3600), Default::default())
            .await
            .expect("run");
        let c = r.entities[0].counts;
        assert_eq!(c.missing_refs, 1, "{policy}: {r}");
        let posts = count(&env, "posts").await;
        let dead = scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_dead_letters",
        )
        .await;
        let pending = scalar_i64(&env.target_url, "SELECT COUNT(*) FROM tidemark_pending").await;
        match policy {
            "null" => {
                assert_eq!((posts, dead, pending), (2, 0, 0));
                assert_eq!(
                    scalar_i64(
                        &env.target_url,
                        "SELECT COUNT(*) FROM posts WHERE pid = 'p1' AND author IS NULL"
                    )
                    .await,
                    1
                );
            }
            "skip" => assert_eq!((posts, dead, pending), (1, 1, 0)),
            _ => {}
        }
        if policy != "defer" {
            // The provenance of the batch names the rows as written (p1 dropped or nulled
            // after its key and hash were computed ahead): the rollback undoes them exactly.
            tidemark::commands::rollback::rollback(s.clone(), &r.run_id, false, false)
                .await
                .unwrap_or_else(|e| panic!("{policy}: rollback: {e:#}"));
            assert_eq!(count(&env, "posts").await, 0, "{policy}");
            continue;
        }
        assert_eq!((posts, dead, pending), (1, 0, 1));
        // The author appears in the source: the next run writes the held-back post.
        env.insert("authors", vec![doc! { "aid": "ghost", "t": T }])
            .await;
        let r = run(s, opts(&["posts"], T + 3600), Default::default())
            .await
            .expect("rerun");
        assert_eq!(count(&env, "posts").await, 2, "{r}");
        assert_eq!(
            scalar_i64(&env.target_url, "SELECT COUNT(*) FROM tidemark_pending").await,
            0
        );
        assert_eq!(
            scalar_i64(
                &env.target_url,
                "SELECT COUNT(*) FROM tidemark_missing_refs"
            )
            .await,
            0
        );
    }
}

#[tokio::test]
async fn missing_reference_policies_sqlite() {
    policies(Backend::Sqlite).await;
}

#[tokio::test]
async fn missing_reference_policies_postgres() {
    policies(Backend::Postgres).await;
}

/// Lookups are batched: source round-trips per batch do not grow with the batch size.
#[tokio::test]
async fn round_trips_are_bounded_per_batch() {
    let env = vizhub_env("deps_trips", Backend::Sqlite).await;
    let n = 400;
    env.insert("user", (0..n).map(|i| user(&format!("u{i}"))).collect())
        .await;
    let vizzes: Vec<Document> = (0..n)
        .map(|i| {
            let u = format!("u{i}");
            let fork = (i > 0).then(|| format!("v{}", i - 1));
            viz(&format!("v{i}"), &u, T, fork.as_deref(), &[&u], &[&u])
        })
        .collect();
    env.insert("documentInfo", vizzes).await;
    env.insert(
        "commits",
        (0..n).map(|i| doc! { "id": format!("c{i}"), "vizId": format!("v{i}"), "authorId": format!("u{i}"), "timestamp": T * 1000 }).collect(),
    )
    .await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    let r = run(s, opts(&["vizzes"], T + 3600), Default::default())
        .await
        .expect("run");
    let c = r.entities[0].counts;
    assert_eq!(c.read, n as u64);
    assert_eq!(count(&env, "commits").await, n);
    assert!(
        c.source_queries <= 20,
        "{} source round-trips for one batch of {n}: lookups are not batched",
        c.source_queries
    );
}

/// The same documents for two source databases: a viz with its content, commits and event;
/// one commit whose author does not exist (written with the reference nulled), and two
/// source documents each for commits `c3` and `c4` (an old and a new version of one key).
async fn pulled_then_reread_data(env: &Env) {
    // Fixed `_id`s: `users.legacy_object_id` keeps them, and both databases must match.
    let mut n = 0u8;
    let mut ids = |docs: Vec<Document>| -> Vec<Document> {
        docs.into_iter()
            .map(|mut d| {
                n += 1;
                let mut b = [0u8; 12];
                b[11] = n;
                d.insert("_id", bson::oid::ObjectId::from_bytes(b));
                d
            })
            .collect()
    };
    env.insert("user", ids(vec![user("u1")])).await;
    // v1 is a fork of v0, which changed later: v1's batch pulls v0 as a reference (without
    // its dependents), and the vizzes lane must still read v0 to pull its content.
    env.insert(
        "documentInfo",
        ids(vec![
            viz("v1", "u1", T, Some("v0"), &["u1"], &[]),
            viz("v0", "u1", T + 10, None, &[], &[]),
            // Before the window: only pulled, as the viz commit c5's later version moved to.
            viz("v9", "u1", T - 86_400 * 10, None, &[], &[]),
        ]),
    )
    .await;
    env.insert(
        "documentContent",
        ids(vec![
            doc! { "id": "v1", "files": [{ "name": "a.js", "text": "1" }, { "name": "b.js", "text": "2" }], "lastUpdatedTimestamp": T },
            doc! { "id": "v0", "files": [{ "name": "a.js", "text": "0" }], "lastUpdatedTimestamp": T + 10 },
        ]),
    )
    .await;
    let commit = |id: &str, author: &str, at: i64, msg: &str| doc! { "id": id, "vizId": "v1", "authorId": author, "timestamp": at * 1000, "message": msg };
    env.insert(
        "commits",
        ids(vec![
            commit("c1", "u1", T - 50, "first"),
            commit("c2", "ghost", T - 40, "by a deleted user"),
            commit("c3", "u1", T - 30, "old"),
            commit("c3", "u1", T - 20, "new"),
            // The same two versions in the other insertion order: pulls see them in natural
            // order, so one of c3 and c4 is pulled at its old version and one at its new.
            commit("c4", "u1", T - 20, "new"),
            commit("c4", "u1", T - 30, "old"),
            // v1 pulls c5's old version only (the new one names another viz): the commits
            // lane must write the new one, not skip it as "already written".
            commit("c5", "u1", T - 30, "on v1"),
            doc! { "id": "c5", "vizId": "v9", "authorId": "u1", "timestamp": (T - 20) * 1000, "message": "moved" },
        ]),
    )
    .await;
    env.insert("eventRecords", ids(vec![doc! { "id": "e1", "vizId": "v1", "eventType": "view", "timestamp": bson::DateTime::from_millis(T * 1000) }])).await;
}

/// A lane reading documents the same run already pulled (a viz's content, commits and events,
/// pulled with the viz) skips them instead of resolving and writing them again, and the
/// result is the same as runs that cannot skip (one lane per run): a row written with a
/// reference nulled is written again, and of two documents for one key the later still wins.
/// With one document per page (the two versions of c3 land in different batches), and with
/// pages of many (the document hashes computed with the mapping must stay with their
/// documents).
async fn lanes_skip_rows_this_run_pulled(backend: Backend, page: usize) {
    let one = vizhub_env(&format!("deps_skip_one_run_{page}"), backend).await;
    let apart = vizhub_env(&format!("deps_skip_apart_{page}"), backend).await;
    pulled_then_reread_data(&one).await;
    pulled_then_reread_data(&apart).await;
    let settings = |env: &Env| {
        let mut s = env.settings();
        s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
        s.source.batch_size = page;
        s
    };

    let r = run(settings(&one), opts(&[], T + 3600), Default::default())
        .await
        .expect("one run, every lane");
    for lane in [
        "users",
        "vizzes",
        "viz_contents",
        "commits",
        "analytics_events",
    ] {
        run(
            settings(&apart),
            opts(&[lane], T + 3600),
            Default::default(),
        )
        .await
        .expect(lane);
    }

    let counts = |name: &str| {
        r.entities
            .iter()
            .find(|e| e.entity == name)
            .unwrap_or_else(|| panic!("{name} in {r}"))
            .counts
    };
    let contents = counts("viz_contents");
    assert_eq!(
        (contents.read, contents.written, contents.already_written),
        (2, 0, 2),
        "v0's content came with v0 in the vizzes lane: {r}"
    );
    assert_eq!(
        counts("vizzes").already_written,
        0,
        "v0 was read again for its dependents: {r}"
    );
    assert_eq!(counts("analytics_events").already_written, 1, "{r}");
    let commits = counts("commits");
    assert_eq!(commits.read, 8, "{r}");
    // c1 is skipped; c2 (author nulled) is not; of c3, c4 and c5 at most the version pulled.
    assert!(
        (1..=4).contains(&commits.already_written),
        "c1 (and the pulled versions of c3, c4, c5) already written: {r}"
    );
    assert_eq!(
        commits.missing_refs, 1,
        "c2 went through resolution again: {r}"
    );
    assert_eq!(
        commits.read,
        commits.written + commits.unchanged + commits.duplicates,
        "{r}"
    );
    for table in [
        "users",
        "vizzes",
        "upvotes",
        "viz_contents",
        "files",
        "commits",
        "analytics_events",
    ] {
        assert_eq!(
            one.dump(&one.target_url, table).await,
            apart.dump(&apart.target_url, table).await,
            "{table}: one run with skips differs from one run per lane"
        );
    }
    assert_eq!(
        scalar_i64(
            &one.target_url,
            "SELECT COUNT(*) FROM commits WHERE id IN ('c3', 'c4') AND message = 'new'"
        )
        .await,
        2,
        "the later versions of c3 and c4 win"
    );
    assert_eq!(
        scalar_i64(
            &one.target_url,
            "SELECT COUNT(*) FROM commits WHERE id = 'c5' AND viz_id = 'v9'"
        )
        .await,
        1,
        "c5's later version, never pulled, is written"
    );
    assert_eq!(
        scalar_i64(&one.target_url, "SELECT COUNT(*) FROM files").await,
        3
    );
}

#[tokio::test]
async fn lanes_skip_rows_this_run_pulled_sqlite() {
    lanes_skip_rows_this_run_pulled(Backend::Sqlite, 1).await;
}

#[tokio::test]
async fn lanes_skip_rows_this_run_pulled_postgres() {
    lanes_skip_rows_this_run_pulled(Backend::Postgres, 1).await;
}

#[tokio::test]
async fn lanes_skip_rows_this_run_pulled_in_full_pages_postgres() {
    lanes_skip_rows_this_run_pulled(Backend::Postgres, 100).await;
}

/// One batch mixing a stored viz that changed with a new one: the new viz and its child rows
/// are inserted without reading (COPY on PostgreSQL), the stored one is upserted and its
/// child rows replaced (an upvote gone from the array is deleted), and a rollback of the run
/// restores exactly the state before it.
async fn mixed_new_and_stored_parents(backend: Backend) {
    let env = vizhub_env("deps_mixed_batch", backend).await;
    env.insert("user", ["u1", "u2", "u3"].iter().map(|u| user(u)).collect())
        .await;
    env.insert(
        "documentInfo",
        vec![viz("v1", "u1", T - 100, None, &["u1", "u2"], &["u2"])],
    )
    .await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    run(s.clone(), opts(&["vizzes"], T), Default::default())
        .await
        .expect("run 1");
    let tables = ["vizzes", "upvotes", "permissions"];
    let mut before = Vec::new();
    for t in tables {
        before.push(env.dump(&env.target_url, t).await);
    }

    let coll = env.db.collection::<Document>("documentInfo");
    coll.delete_many(doc! {}).await.unwrap();
    let mut changed = viz("v1", "u1", T + 10, None, &["u2", "u3"], &[]);
    changed.insert("title", "renamed");
    env.insert(
        "documentInfo",
        vec![changed, viz("v2", "u3", T + 20, None, &["u1"], &["u1"])],
    )
    .await;
    let r = run(s.clone(), opts(&["vizzes"], T + 3600), Default::default())
        .await
        .expect("run 2");
    let c = r.entities[0].counts;
    assert_eq!((c.read, c.inserted, c.updated), (2, 1, 1), "{r}");
    let n = |sql: &'static str| scalar_i64(&env.target_url, sql);
    assert_eq!(
        n("SELECT COUNT(*) FROM vizzes WHERE id = 'v1' AND title = 'renamed'").await,
        1
    );
    assert_eq!(
        env.dump(&env.target_url, "upvotes").await.len(),
        3,
        "v1: u2, u3 (u1 removed); v2: u1"
    );
    assert_eq!(
        n("SELECT COUNT(*) FROM upvotes WHERE viz_id = 'v1' AND user_id = 'u1'").await,
        0
    );
    assert_eq!(
        n("SELECT COUNT(*) FROM permissions").await,
        1,
        "v1's collaborator gone, v2's new"
    );
    assert_eq!(
        n("SELECT COUNT(*) FROM permissions WHERE viz_id = 'v2' AND user_id = 'u1'").await,
        1
    );

    tidemark::commands::rollback::rollback(s.clone(), &r.run_id, false, false)
        .await
        .unwrap_or_else(|e| panic!("rollback: {e:#}"));
    for (t, was) in tables.iter().zip(before) {
        assert_eq!(
            env.dump(&env.target_url, t).await,
            was,
            "{t} after rollback"
        );
    }
}

#[tokio::test]
async fn mixed_new_and_stored_parents_sqlite() {
    mixed_new_and_stored_parents(Backend::Sqlite).await;
}

#[tokio::test]
async fn mixed_new_and_stored_parents_postgres() {
    mixed_new_and_stored_parents(Backend::Postgres).await;
}

/// Of two source documents for one key pulled together (two versions of commit `c9`, the
/// newer inserted first), the newer one is written, as a window read in time order would.
async fn pulled_duplicates_keep_the_latest_version(backend: Backend) {
    let env = vizhub_env("deps_pulled_dups", backend).await;
    env.insert("user", vec![user("u1")]).await;
    env.insert("documentInfo", vec![viz("v1", "u1", T, None, &[], &[])])
        .await;
    let commit = |at: i64, msg: &str| doc! { "id": "c9", "vizId": "v1", "authorId": "u1", "timestamp": at * 1000, "message": msg };
    env.insert(
        "commits",
        vec![commit(T - 20, "new"), commit(T - 30, "old")],
    )
    .await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    run(s, opts(&["vizzes"], T + 3600), Default::default())
        .await
        .expect("run");
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM commits WHERE id = 'c9' AND message = 'new'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn pulled_duplicates_keep_the_latest_version_sqlite() {
    pulled_duplicates_keep_the_latest_version(Backend::Sqlite).await;
}

#[tokio::test]
async fn pulled_duplicates_keep_the_latest_version_postgres() {
    pulled_duplicates_keep_the_latest_version(Backend::Postgres).await;
}

/// While a batch's dependents were all new, the next batch inserts its own without reading
/// them first; a dependent that exists after all (commit `c3`, written by an earlier run
/// under another viz, then moved to `v3`) rolls the batch back and it is written the usual way.
/// The result, the counts and a rollback are the same as without the presumption.
async fn dependents_presumed_new(backend: Backend) {
    let env = vizhub_env("deps_presumed", backend).await;
    // One viz per batch, so each batch follows one whose dependents were new.
    let mapping = std::fs::read_to_string(&env.mapping_path).unwrap();
    let one = mapping.replace("batch_size = 250", "batch_size = 1");
    assert_ne!(one, mapping);
    std::fs::write(&env.mapping_path, one).unwrap();
    env.insert("user", vec![user("u1")]).await;
    let vizzes: Vec<Document> = (1..=4)
        .map(|i| viz(&format!("v{i}"), "u1", T + i, None, &["u1"], &[]))
        .collect();
    env.insert("documentInfo", vizzes).await;
    env.insert(
        "documentContent",
        (1..=4)
            .map(|i| doc! { "id": format!("v{i}"), "files": [{ "name": "a.js", "text": format!("{i}") }], "lastUpdatedTimestamp": T + i })
            .collect(),
    )
    .await;
    // Run 1 writes c3 under v9 (pulled with it); then c3 moves to v3.
    env.insert(
        "documentInfo",
        vec![viz("v9", "u1", T - 86_400 * 10, None, &[], &[])],
    )
    .await;
    let commit = |i: i64, viz: &str, at: i64| doc! { "id": format!("c{i}"), "vizId": viz, "authorId": "u1", "timestamp": at * 1000, "message": format!("m{i}") };
    env.insert(
        "commits",
        vec![
            commit(1, "v1", T + 1),
            commit(2, "v2", T + 2),
            commit(3, "v9", T - 500),
            commit(4, "v4", T + 4),
        ],
    )
    .await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    run(s.clone(), opts(&["commits"], T - 400), Default::default())
        .await
        .expect("run 1: commits up to c3, which pulls v9");
    assert_eq!(count(&env, "commits").await, 1);
    assert_eq!(count(&env, "vizzes").await, 1);
    env.db
        .collection::<Document>("commits")
        .update_one(
            doc! { "id": "c3" },
            doc! { "$set": { "vizId": "v3", "timestamp": (T + 3) * 1000 } },
        )
        .await
        .unwrap();
    let tables = ["vizzes", "viz_contents", "files", "commits", "upvotes"];
    let mut before = Vec::new();
    for t in tables {
        before.push(env.dump(&env.target_url, t).await);
    }

    let r = run(s.clone(), opts(&["vizzes"], T + 3600), Default::default())
        .await
        .expect("run 2");

    let c = r.entities[0].counts;
    assert_eq!((c.read, c.written), (4, 4), "{r}");
    // Four contents with a file each, three new commits and c3 moved.
    assert_eq!(c.pulled_written, 4 + 4 + 4, "{r}");
    assert_eq!(count(&env, "commits").await, 4);
    assert_eq!(count(&env, "viz_contents").await, 4);
    assert_eq!(count(&env, "files").await, 4);
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM commits WHERE id = 'c3' AND viz_id = 'v3' AND message = 'm3'"
        )
        .await,
        1
    );
    // The rollback restores c3 (under v9) before it deletes v3, whose ON DELETE SET NULL
    // would otherwise change c3 first; every row inserted without reading is undone.
    tidemark::commands::rollback::rollback(s.clone(), &r.run_id, false, false)
        .await
        .unwrap_or_else(|e| panic!("rollback: {e:#}"));
    for (t, was) in tables.iter().zip(before) {
        assert_eq!(
            env.dump(&env.target_url, t).await,
            was,
            "{t} after rollback"
        );
    }
}

#[tokio::test]
async fn dependents_presumed_new_sqlite() {
    dependents_presumed_new(Backend::Sqlite).await;
}

#[tokio::test]
async fn dependents_presumed_new_postgres() {
    dependents_presumed_new(Backend::Postgres).await;
}

/// The harness's items, with a child table of parts keyed by their own sku (not by the
/// item), plus `extra` column lines for the parts.
fn parts_mapping(extra: &str) -> String {
    items_mapping("epoch_seconds")
        + r#"
[entities.items.children.parts]
path = "parts"
table = "parts"
primary_key = ["sku"]
[entities.items.children.parts.columns]
sku = { path = "sku", type = "text", required = true }
item_id = { parent = "id", type = "bigint" }
"# + extra
        + "\n"
}

/// Child rows of a parent that was not stored are inserted without reading; when one exists
/// after all under another parent (part `b` moves from item 1 to the new item 2), the batch
/// is written again the careful way and the part moves. A rollback puts it back.
async fn new_parent_takes_a_child_from_another(backend: Backend) {
    let items = parts_mapping("");
    let env = Env::new("deps_child_moves", backend, &items).await;
    let part = |s: &str| doc! { "sku": s };
    env.insert(
        "items",
        vec![doc! { "_id": 1i64, "t": T, "parts": [part("a"), part("b")] }],
    )
    .await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    // Run 2 reads item 2 alone.
    s.sync.overlap = std::time::Duration::ZERO;
    run(s.clone(), opts(&[], T + 10), Default::default())
        .await
        .expect("run 1");
    let before = env.dump(&env.target_url, "parts").await;
    assert_eq!(before.len(), 2);

    env.insert(
        "items",
        vec![doc! { "_id": 2i64, "t": T + 20, "parts": [part("b"), part("c")] }],
    )
    .await;
    let r = run(s.clone(), opts(&[], T + 30), Default::default())
        .await
        .expect("run 2");

    assert_eq!(r.entities[0].counts.read, 1, "{r}");
    let owner = |sku: &'static str| {
        scalar_i64(
            &env.target_url,
            Box::leak(format!("SELECT item_id FROM parts WHERE sku = '{sku}'").into_boxed_str()),
        )
    };
    assert_eq!(
        (owner("a").await, owner("b").await, owner("c").await),
        (1, 2, 2)
    );
    // The move is recorded as an update of `b` (before: under item 1), so a rollback puts it
    // back, before it deletes item 2 (whose ON DELETE CASCADE would take `b` with it).
    tidemark::commands::rollback::rollback(s.clone(), &r.run_id, false, false)
        .await
        .unwrap_or_else(|e| panic!("rollback: {e:#}"));
    assert_eq!(env.dump(&env.target_url, "parts").await, before);
}

#[tokio::test]
async fn new_parent_takes_a_child_from_another_sqlite() {
    new_parent_takes_a_child_from_another(Backend::Sqlite).await;
}

#[tokio::test]
async fn new_parent_takes_a_child_from_another_postgres() {
    new_parent_takes_a_child_from_another(Backend::Postgres).await;
}

/// Keys and hashes of child rows are computed ahead (in the mapper, and where pulled pages
/// are mapped); a missing-reference policy that then nulls a child column must not leave
/// the old hash in the provenance. Parts of item 2 (read in the window) and of item 1
/// (pulled by an order) name a maker that does not exist: the column is nulled, and a
/// rollback, which checks every row it undoes against the hash recorded for it, undoes the
/// run exactly.
async fn nulled_child_references_keep_provenance_exact(backend: Backend) {
    let mapping = parts_mapping(
        r#"maker = { path = "maker", type = "text", references = "makers", on_missing = "null" }"#,
    ) + r#"
[entities.makers]
collection = "makers"
id_field = "mid"
time_field = "t"
time_encoding = "epoch_seconds"
table = "makers"
primary_key = ["mid"]
windowed = false
[entities.makers.columns]
mid = { path = "mid", type = "text", required = true }

[entities.orders]
collection = "orders"
id_field = "oid"
time_field = "t"
time_encoding = "epoch_seconds"
table = "orders"
primary_key = ["oid"]
[entities.orders.columns]
oid = { path = "oid", type = "text", required = true }
item = { path = "item", type = "bigint", required = true, references = "items", on_missing = "skip" }
"#;
    let env = Env::new("deps_nulled_child", backend, &mapping).await;
    let part = |s: &str, m: &str| doc! { "sku": s, "maker": m };
    env.insert("makers", vec![doc! { "mid": "m1", "t": T }])
        .await;
    env.insert(
        "items",
        vec![
            doc! { "_id": 1i64, "t": T - 86_400 * 10, "parts": [part("a", "ghost"), part("b", "m1")] },
            doc! { "_id": 2i64, "t": T, "parts": [part("c", "ghost"), part("d", "m1")] },
        ],
    )
    .await;
    env.insert("orders", vec![doc! { "oid": "o1", "item": 1i64, "t": T }])
        .await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    let r = run(
        s.clone(),
        opts(&["items", "orders"], T + 10),
        Default::default(),
    )
    .await
    .expect("run");
    assert_eq!(count(&env, "items").await, 2, "item 1 pulled by o1: {r}");
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM parts WHERE maker IS NULL"
        )
        .await,
        2,
        "parts a and c lost their maker"
    );
    tidemark::commands::rollback::rollback(s.clone(), &r.run_id, false, false)
        .await
        .unwrap_or_else(|e| panic!("rollback: {e:#}"));
    for t in ["items", "parts", "orders"] {
        assert_eq!(count(&env, t).await, 0, "{t} after rollback");
    }
}

#[tokio::test]
async fn nulled_child_references_keep_provenance_exact_sqlite() {
    nulled_child_references_keep_provenance_exact(Backend::Sqlite).await;
}

#[tokio::test]
async fn nulled_child_references_keep_provenance_exact_postgres() {
    nulled_child_references_keep_provenance_exact(Backend::Postgres).await;
}

/// A batch that deletes a viz (the legacy store's leftover) and re-reads its fork (the
/// overlap), whose document still names the deleted viz: the fork takes its policy (NULL, a
/// missing-reference record) instead of pointing at the row the batch deleted. The batch used
/// to fail at commit on the fork's foreign key, in every run again.
async fn deleted_parent_and_its_fork_in_one_batch(backend: Backend) {
    let env = vizhub_env("deps_del_fork", backend).await;
    env.insert("user", vec![user("a"), user("b")]).await;
    env.insert(
        "documentInfo",
        vec![
            viz("p", "a", T, None, &["b"], &["b"]),
            viz("f", "b", T + 10, Some("p"), &[], &[]),
        ],
    )
    .await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    run(s.clone(), opts(&["vizzes"], T + 3600), Default::default())
        .await
        .expect("run 1");
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM vizzes WHERE forked_from = 'p'"
        )
        .await,
        1
    );
    env.db
        .collection::<Document>("documentInfo")
        .insert_one(doc! { "_type": bson::Bson::Null, "id": "p", "lastUpdatedTimestamp": T + 100 })
        .await
        .unwrap();
    let r = run(s, opts(&["vizzes"], T + 3600), Default::default())
        .await
        .expect("run 2 deletes p and writes f in one batch");
    assert_eq!(r.entities[0].counts.deleted, 1, "{r}");
    assert_eq!(
        env.dump(&env.target_url, "vizzes")
            .await
            .iter()
            .filter(|r| r.contains("viz p") || r.contains("viz f"))
            .count(),
        1,
        "only f is left"
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM vizzes WHERE id = 'f' AND forked_from IS NULL"
        )
        .await,
        1
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_missing_refs WHERE ref_key = 'p'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&env, "upvotes").await + count(&env, "permissions").await,
        0
    );
}

#[tokio::test]
async fn deleted_parent_and_its_fork_in_one_batch_sqlite() {
    deleted_parent_and_its_fork_in_one_batch(Backend::Sqlite).await;
}

#[tokio::test]
async fn deleted_parent_and_its_fork_in_one_batch_postgres() {
    deleted_parent_and_its_fork_in_one_batch(Backend::Postgres).await;
}
