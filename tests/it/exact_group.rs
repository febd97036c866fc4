//! Group commits on SQLite (`sink::group`): what a group holds becomes visible to other
//! connections only when it commits, a write begun inside it is part of it, a group that
//! fails to commit takes back everything in it, and a group that vanished from the
//! connection is an error, never a fresh start.

use std::time::Duration;

use tidemark::secret::SecretUri;
use tidemark::sink::{Checkpoint, GroupCommit, Sink, SqliteTuning};
use tidemark::span::LaneState;

async fn target(dir: &tempfile::TempDir) -> (Sink, String) {
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let sink = Sink::connect(&SecretUri::new(url.clone()), 1)
        .await
        .expect("open the target");
    sink.migrate_tool_tables().await.expect("tool tables");
    (sink, url)
}

fn checkpoint(lane: &str, at: i64) -> Checkpoint {
    Checkpoint {
        lane: lane.into(),
        entity: "items".into(),
        state: LaneState {
            watermark: Some(tidemark::sink::from_ms(at)),
            open: None,
        },
        last: None,
        run_id: "run-group".into(),
    }
}

/// Lanes another connection (another process, `tidemark status`) sees.
async fn seen_elsewhere(url: &str) -> Vec<String> {
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
    let lanes: Vec<String> =
        sqlx::query_scalar("SELECT lane FROM tidemark_checkpoints ORDER BY lane")
            .fetch_all(&mut c)
            .await
            .unwrap();
    c.close().await.unwrap();
    lanes
}

fn pool(sink: &Sink) -> &sqlx::SqlitePool {
    match sink {
        Sink::Sqlite(p) => p,
        Sink::Postgres(_) => unreachable!("a SQLite target"),
    }
}

#[tokio::test]
async fn a_group_becomes_visible_when_it_commits_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, url) = target(&dir).await;
    let g = GroupCommit::new(Duration::from_secs(3600));

    // Two "batches" in one group: each saves a checkpoint in a transaction of its own, which
    // inside the group is a savepoint of it.
    sink.begin_group(&g).await.unwrap();
    sink.save_checkpoint(&checkpoint("a", 1_000)).await.unwrap();
    sink.end_batch_in_group(&g).await.unwrap();
    sink.begin_group(&g).await.unwrap();
    sink.save_checkpoint(&checkpoint("b", 2_000)).await.unwrap();
    sink.end_batch_in_group(&g).await.unwrap();

    // The run's own connection sees both; nobody else does before the group commits.
    let own: Vec<String> = sink
        .checkpoints()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.lane)
        .collect();
    assert_eq!(own, ["a", "b"]);
    assert!(
        seen_elsewhere(&url).await.is_empty(),
        "a group is not visible before it commits"
    );

    sink.commit_group(Some(&g)).await.unwrap();
    assert_eq!(seen_elsewhere(&url).await, ["a", "b"]);

    // A group past its interval commits after the batch that finds it so.
    let quick = GroupCommit::new(Duration::ZERO);
    sink.begin_group(&quick).await.unwrap();
    sink.save_checkpoint(&checkpoint("c", 3_000)).await.unwrap();
    sink.end_batch_in_group(&quick).await.unwrap();
    assert_eq!(seen_elsewhere(&url).await, ["a", "b", "c"]);
    sink.close().await;
}

#[tokio::test]
async fn a_group_that_fails_to_commit_takes_back_all_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, url) = target(&dir).await;
    let p = pool(&sink);
    sqlx::query(
        "CREATE TABLE parents (id TEXT PRIMARY KEY); \
         CREATE TABLE children (id TEXT PRIMARY KEY, parent TEXT \
           REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)",
    )
    .execute(p)
    .await
    .unwrap();
    let g = GroupCommit::new(Duration::from_secs(3600));

    // A good batch, then one that leaves a deferred foreign key violated.
    sink.begin_group(&g).await.unwrap();
    sink.save_checkpoint(&checkpoint("good", 1_000))
        .await
        .unwrap();
    sink.begin_group(&g).await.unwrap();
    sqlx::query("INSERT INTO children VALUES ('c1', 'nobody')")
        .execute(p)
        .await
        .unwrap();

    let err = sink
        .commit_group(Some(&g))
        .await
        .expect_err("the violation fails the commit");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("rolled back whole") && msg.contains("FOREIGN KEY"),
        "{msg}"
    );
    assert!(
        seen_elsewhere(&url).await.is_empty(),
        "nothing of the group stays"
    );
    let children: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM children")
        .fetch_one(p)
        .await
        .unwrap();
    assert_eq!(children, 0);

    // The next group starts clean.
    sink.begin_group(&g).await.unwrap();
    sink.save_checkpoint(&checkpoint("after", 2_000))
        .await
        .unwrap();
    sink.commit_group(Some(&g)).await.unwrap();
    assert_eq!(seen_elsewhere(&url).await, ["after"]);
    sink.close().await;
}

#[tokio::test]
async fn a_group_gone_from_the_connection_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, url) = target(&dir).await;
    let g = GroupCommit::new(Duration::from_secs(3600));
    sink.begin_group(&g).await.unwrap();
    sink.save_checkpoint(&checkpoint("lost", 1_000))
        .await
        .unwrap();

    // SQLite ends the transaction behind the group's back (as it may on an I/O error).
    sqlx::query("ROLLBACK").execute(pool(&sink)).await.unwrap();

    let err = sink
        .begin_group(&g)
        .await
        .expect_err("the next batch must not start afresh");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("not as the run left it") && msg.contains("next run reads them again"),
        "{msg}"
    );
    assert!(seen_elsewhere(&url).await.is_empty());
    sink.close().await;
}

/// The run's snapshot reader (`sink::group`, "Snapshot reads"): it answers key lookups from
/// the last group commit, never from the open group; and from the resolution of a batch that
/// deletes rows until its group commits, the writing connection answers instead.
#[tokio::test]
async fn the_snapshot_reader_sees_commits_and_yields_to_deletions() {
    use tidemark::mapping::{Mapping, Value};
    let dir = tempfile::tempdir().unwrap();
    let (sink, _url) = target(&dir).await;
    let p = pool(&sink);
    exec(
        p,
        "CREATE TABLE items (id INTEGER PRIMARY KEY, t TEXT, v TEXT)",
    )
    .await;
    exec(p, "INSERT INTO items (id) VALUES (1)").await;
    let m = Mapping::parse(&crate::harness::items_mapping("date"), "t").unwrap();
    let items = m.entity("items").unwrap();
    let kc = items.key_column.unwrap();
    let keys = [Value::BigInt(1), Value::BigInt(2)];
    let g = &GroupCommit::new(Duration::from_secs(3600))
        .with_reader(
            &sink,
            SqliteTuning {
                cache_mib: 4,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(g.reader_has_seen(), Some(0), "the reader is open");
    // Batch 1 writes key 2 in the open group: the reader does not see it yet.
    sink.begin_group(g).await.unwrap();
    exec(p, "INSERT INTO items (id) VALUES (2)").await;
    g.written(1);
    sink.end_batch_in_group(g).await.unwrap();
    assert_eq!(
        lookup(&sink, g, items.table_ref(), kc, &keys).await,
        ["1"],
        "the open group is not the reader's"
    );
    assert_eq!(
        sink.existing_keys(items.table_ref(), kc, &keys)
            .await
            .unwrap()
            .len(),
        2,
        "the writing connection sees its open group"
    );
    sink.commit_group(Some(g)).await.unwrap();
    assert_eq!(g.reader_has_seen(), Some(1));
    assert_eq!(
        lookup(&sink, g, items.table_ref(), kc, &keys).await,
        ["1", "2"],
        "a commit is the reader's"
    );

    // Batch 2 deletes key 1 and was resolved: lookups go to the writer, which sees the
    // deletion, until a commit after batch 2 was written.
    g.deletes_in(2);
    sink.begin_group(g).await.unwrap();
    exec(p, "DELETE FROM items WHERE id = 1").await;
    assert_eq!(
        lookup(&sink, g, items.table_ref(), kc, &keys).await,
        ["2"],
        "a deletion not committed is seen"
    );
    sink.commit_group(Some(g)).await.unwrap();
    // Committed, but batch 2 is not reported written yet: still the writer.
    assert_eq!(g.reader_has_seen(), Some(1));
    assert_eq!(lookup(&sink, g, items.table_ref(), kc, &keys).await, ["2"]);
    g.written(2);
    sink.begin_group(g).await.unwrap();
    exec(p, "INSERT INTO items (id) VALUES (1)").await;
    sink.commit_group(Some(g)).await.unwrap();
    assert_eq!(g.reader_has_seen(), Some(2));
    assert_eq!(
        lookup(&sink, g, items.table_ref(), kc, &keys).await,
        ["1", "2"],
        "the reader answers again"
    );
    sink.begin_group(g).await.unwrap();
    exec(p, "DELETE FROM items WHERE id = 2").await;
    assert_eq!(
        lookup(&sink, g, items.table_ref(), kc, &keys).await,
        ["1", "2"],
        "a deletion no resolution announced is not seen (the memo covers the run's own)"
    );
    sink.commit_group(Some(g)).await.unwrap();
    g.close_reader().await;
    sink.close().await;
}

/// Sorted key texts of `keys` that exist, as a run's resolution asks for them.
async fn lookup(
    sink: &Sink,
    g: &GroupCommit,
    t: tidemark::mapping::TableRef<'_>,
    kc: usize,
    keys: &[tidemark::mapping::Value],
) -> Vec<String> {
    let mut found: Vec<String> = sink
        .existing_keys_in_run(Some(g), t, kc, keys)
        .await
        .unwrap()
        .into_iter()
        .collect();
    found.sort();
    found
}

/// Run one statement on the writing connection (inside the open group, if one is).
async fn exec(p: &sqlx::SqlitePool, sql: &str) {
    sqlx::query(sql).execute(p).await.unwrap();
}
