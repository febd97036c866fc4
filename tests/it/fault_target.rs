//! Target faults: PostgreSQL connections cut mid-run (through a loopback proxy: the test
//! never restarts the machine's PostgreSQL), a read-only SQLite file, and a SQLite file that
//! fills up (`PRAGMA max_page_count`). Each: a clear error, no partial batch (rows and
//! checkpoint commit together), and a rerun completes with the uninterrupted run's target.

use crate::fault_util::{Mongod, Proxy};
use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use crate::ops_util::items;
use bson::doc;
use std::sync::atomic::{AtomicBool, Ordering};

use tidemark::commands::run::RunOptions;
use tidemark::secret::SecretUri;

const DOCS: i64 = 20_000;

/// A private source server (kept alive by the caller), its data, and a reference target.
async fn arrange(name: &str, backend: Backend) -> (Env, String, Mongod) {
    let mongo = Mongod::start();
    let env = Env::new_at(&mongo.uri(), name, backend, &items_mapping("epoch_millis")).await;
    let base = chrono::Utc::now().timestamp_millis() - 20 * 86_400_000;
    env.insert("items", items(DOCS, base, 10)).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let reference = env.second_target().await;
    let mut s = env.settings();
    s.target.url = SecretUri::new(reference.clone());
    env.run(s).await.expect("uninterrupted run");
    (env, reference, mongo)
}

/// Rows and checkpoint commit together: the rows present are exactly a prefix of the
/// `(t, _id)` order up to the checkpoint, and a multiple of the batch size while a window
/// is open (no partial batch).
async fn assert_no_partial_batch(url: &str, batch: i64) {
    let rows = scalar_i64(url, "SELECT COUNT(*) FROM items").await;
    let open = scalar_i64(
        url,
        "SELECT COUNT(*) FROM tidemark_checkpoints WHERE open_from_ms IS NOT NULL",
    )
    .await;
    if open > 0 {
        assert_eq!(
            rows % batch,
            0,
            "{rows} rows is not a whole number of batches of {batch}"
        );
    }
}

#[tokio::test]
async fn postgres_connections_cut_mid_run() {
    // Arrange: the target reached through a proxy that cuts its connections while runs go on.
    let (env, reference, _mongo) = arrange("pgcut", Backend::Postgres).await;
    let url: url_parts::Url = url_parts::parse(&env.target_url);
    let proxy = Proxy::start(url.addr).await;
    let mut s = env.settings();
    s.target.url = SecretUri::new(url.with_port(proxy.port()));
    s.source.rate_limit = 8_000;
    s.source.batch_size = 500;
    // A run whose connections are cut cannot release its lane's lease either (the target is
    // unreachable); the runs after the cuts wait for it to expire, as `--wait` does.
    s.lock.lease = std::time::Duration::from_secs(3);

    // Act: the first three runs lose their target connections over and over, mid-run; then
    // runs go on (each resuming from its checkpoint) until one completes.
    let mut failures = Vec::new();
    for attempt in 0..10 {
        let done = AtomicBool::new(false);
        let opts = RunOptions {
            wait: attempt >= 3,
            ..Default::default()
        };
        let run = async {
            let r = tidemark::commands::run::run(s.clone(), opts, Default::default()).await;
            done.store(true, Ordering::SeqCst);
            r
        };
        // A single cut can fall between two transactions, where the pool silently
        // replaces the dead connection; cutting every 40 ms until the run ends makes sure
        // one lands on a transaction in flight.
        let cutter = async {
            if attempt < 3 {
                crate::harness::wait_rows(&env.target_url, "items").await;
                while !done.load(Ordering::SeqCst) {
                    proxy.cut();
                    tokio::time::sleep(std::time::Duration::from_millis(40)).await;
                }
            }
        };
        let (r, ()) = tokio::join!(run, cutter);
        match r {
            Ok(_) => break,
            Err(e) => {
                failures.push(format!("{e:#}"));
                assert_no_partial_batch(&env.target_url, 500).await;
            }
        }
    }

    // Assert
    assert!(
        !failures.is_empty(),
        "no cut hit the run; the test proved nothing"
    );
    for f in &failures {
        assert!(!f.contains("panicked"), "{f}");
    }
    eprintln!(
        "{} runs failed on a cut target connection, e.g.: {}",
        failures.len(),
        failures[0]
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        DOCS
    );
    assert_eq!(
        env.dump(&env.target_url, "items").await,
        env.dump(&reference, "items").await
    );
}

/// Minimal URL surgery for the proxy: host:port of a postgres:// URL.
mod url_parts {
    pub struct Url {
        pub addr: std::net::SocketAddr,
        raw: String,
        hostport: String,
    }
    pub fn parse(raw: &str) -> Url {
        let after = raw
            .split_once('@')
            .map(|x| x.1)
            .unwrap_or(raw.trim_start_matches("postgres://"));
        let hostport = after.split('/').next().unwrap().to_owned();
        let addr = hostport.parse().unwrap_or_else(|_| {
            let (h, p) = hostport.split_once(':').unwrap_or((&hostport, "5432"));
            let h = if h == "localhost" { "127.0.0.1" } else { h };
            format!("{h}:{p}")
                .parse()
                .expect("a numeric PostgreSQL address")
        });
        Url {
            addr,
            raw: raw.to_owned(),
            hostport,
        }
    }
    impl Url {
        pub fn with_port(&self, port: u16) -> String {
            self.raw
                .replacen(&self.hostport, &format!("127.0.0.1:{port}"), 1)
        }
    }
}

fn sqlite_path(url: &str) -> std::path::PathBuf {
    url.trim_start_matches("sqlite://").into()
}

#[tokio::test]
async fn read_only_sqlite_target_is_a_clear_error() {
    // Arrange: a first run creates the file; then it becomes read-only, then new documents.
    let (env, _, _mongo) = arrange("rosqlite", Backend::Sqlite).await;
    let s = env.settings();
    env.run(s.clone()).await.expect("first run");
    let before = env.dump(&env.target_url, "items").await;
    let base = chrono::Utc::now().timestamp_millis() - 600_000; // inside the overlap
    env.insert(
        "items",
        items(500, base, 10)
            .into_iter()
            .map(|mut d| {
                let id = d.get_i64("_id").unwrap();
                d.insert("_id", id + 1_000_000);
                d
            })
            .collect(),
    )
    .await;
    let path = sqlite_path(&env.target_url);
    let dir = path.parent().unwrap().to_path_buf();
    let set_ro = |ro: bool| {
        for p in [path.clone(), dir.clone()] {
            let mut perm = std::fs::metadata(&p).unwrap().permissions();
            perm.set_readonly(ro);
            std::fs::set_permissions(&p, perm).unwrap();
        }
    };
    // Root ignores file permissions, so the run also opens the file with `mode=ro`.
    set_ro(true);

    // Act
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .arg("run")
        .envs(env.env_vars(&env.target_url))
        .env(
            "TIDEMARK__TARGET__URL",
            format!("{}?mode=ro", env.target_url),
        )
        .output()
        .unwrap();
    set_ro(false);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();

    // Assert: refused with a message naming the target; nothing changed; a rerun completes.
    assert!(
        !out.status.success(),
        "a read-only target cannot take the run: {err}"
    );
    assert!(err.contains("error:") && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("target") || err.contains("read-only") || err.contains("readonly"),
        "the error should say the target cannot be written: {err}"
    );
    assert_eq!(env.dump(&env.target_url, "items").await, before);
    env.run(s).await.expect("rerun on a writable target");
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        DOCS + 500
    );
}

#[tokio::test]
async fn full_sqlite_target_fails_cleanly_and_rerun_completes() {
    full_sqlite_target("fullsqlite", None).await;
}

/// The same with the batches grouped into one transaction (`target.sqlite_group_commit_ms`,
/// as `tidemark run` does on SQLite): the full disk fails the group, SQLite may roll all of
/// it back, and still no partial batch stays, the checkpoint goes back with the rows, and a
/// rerun completes with the uninterrupted run's target.
#[tokio::test]
async fn full_sqlite_target_with_grouped_batches_fails_cleanly_and_rerun_completes() {
    full_sqlite_target(
        "fullgroup",
        Some(tidemark::sink::GroupCommit::new(
            std::time::Duration::from_secs(60),
        )),
    )
    .await;
}

async fn full_sqlite_target(name: &str, group: Option<tidemark::sink::GroupCommit>) {
    // Arrange: a pre-created target whose file may not grow past a few pages beyond what
    // the tool's tables and a first batches need.
    let (env, reference, _mongo) = arrange(name, Backend::Sqlite).await;
    let mut s = env.settings();
    s.target.max_connections = 1; // max_page_count is per connection
    env.run({
        let mut s0 = s.clone();
        s0.sync.start = "2100-01-01T00:00:00Z".parse().unwrap(); // create the tables only
        s0
    })
    .await
    .expect("create tables");
    let pages = {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&env.target_url)
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut c)
            .await
            .unwrap();
        n
    };
    let limited = format!("PRAGMA max_page_count = {}", pages + 40);

    // Act: SQLite applies max_page_count per connection, so the window is run in-process
    // on a one-connection pool that carries the limit.
    let sink = tidemark::sink::Sink::connect(&s.target.url, 1)
        .await
        .unwrap();
    if let tidemark::sink::Sink::Sqlite(pool) = &sink {
        sqlx::query(&limited).execute(pool).await.unwrap();
    }
    let mapping = tidemark::mapping::Mapping::load(&s.sync.mapping).unwrap();
    let source = tidemark::source::Source::connect(&s.source).await.unwrap();
    let mut ctx = tidemark::engine::pipeline::Ctx::new(
        s.clone(),
        mapping.clone(),
        source,
        sink,
        "run-full".into(),
        Default::default(),
    );
    ctx.group = group;
    let ctx = std::sync::Arc::new(ctx);
    let e = mapping.entity("items").unwrap();
    let err = tidemark::engine::pipeline::catch_up(&ctx, e, None)
        .await
        .expect_err("the file fills up");
    // As `tidemark run` does after an entity: what of the group is still open commits.
    let _ = ctx.commit_group().await;
    ctx.sink.close().await;

    // Assert: a clear error, whole batches only, and a rerun without the limit completes.
    let msg = format!("{err:#}");
    assert!(
        msg.contains("full"),
        "the error says the database is full: {msg}"
    );
    let rows = scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await;
    assert!(rows < DOCS, "the limit did not bite ({rows} rows)");
    assert_no_partial_batch(&env.target_url, 500).await;
    env.run(s).await.expect("rerun with room");
    assert_eq!(
        env.dump(&env.target_url, "items").await,
        env.dump(&reference, "items").await
    );
}

/// A transaction failing on a constraint the application added to a mapped table (here a
/// CHECK that one document's value breaks): the run stops with an error naming the batch and
/// the constraint, the batches before it stay committed with their checkpoint, the failing
/// batch leaves nothing, and once the rule is lifted a rerun completes with the
/// uninterrupted run's target.
#[tokio::test]
async fn constraint_violation_fails_the_batch_cleanly_and_rerun_completes() {
    let (env, reference, _mongo) = arrange("constraint", Backend::Postgres).await;
    let s = env.settings();
    env.run({
        let mut s0 = s.clone();
        s0.sync.start = "2100-01-01T00:00:00Z".parse().unwrap(); // create the tables only
        s0
    })
    .await
    .expect("create tables");
    let exec = |sql: &'static str| {
        let url = env.target_url.clone();
        async move {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query(sql).execute(&mut c).await.unwrap();
        }
    };
    exec("ALTER TABLE items ADD CONSTRAINT app_rule CHECK (v <> 'value 12345')").await;

    let err = env
        .run(s.clone())
        .await
        .expect_err("document 12345 breaks app_rule");

    let msg = format!("{err:#}");
    assert!(
        msg.contains("writing a batch of items failed and was rolled back")
            && msg.contains("app_rule"),
        "the error names the batch and the constraint: {msg}"
    );
    let rows = scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await;
    assert!(
        rows > 0 && rows < DOCS,
        "batches before the bad one stay ({rows} rows)"
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM items WHERE id = 12345"
        )
        .await,
        0
    );
    assert_no_partial_batch(&env.target_url, 500).await;
    exec("ALTER TABLE items DROP CONSTRAINT app_rule").await;
    env.run(s).await.expect("rerun once the rule is lifted");
    assert_eq!(
        env.dump(&env.target_url, "items").await,
        env.dump(&reference, "items").await
    );
}
