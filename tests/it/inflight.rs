//! `target.batches_in_flight` against real MongoDB + PostgreSQL: batches written at once on
//! their own connections land exactly what one batch after the other lands; a batch that
//! fails takes the batches written beside it down with it (none commits past it); and a
//! deadlock between two batches in flight, which only PostgreSQL can see, is survived.

use crate::fault_kill::{demo_env, dump_all};
use crate::harness::{items_mapping, mongo_uri, scalar_i64, Backend, Env};
use crate::ops_util::items;
use bson::doc;
use tidemark::commands::run::{run, RunOptions};
use tidemark::secret::SecretUri;
use tidemark::settings::Settings;

async fn exec(url: &str, sql: &str) {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
}

fn in_flight(s: &Settings, url: &str, n: u32) -> Settings {
    let mut s = s.clone();
    s.target.url = SecretUri::new(url.to_owned());
    s.target.batches_in_flight = n;
    s.target.max_connections = n + 2;
    s
}

/// The demo data set, every entity, into two databases: one batch at a time, and four at
/// once. Same tables, same rows, same records; and batches did overlap.
#[tokio::test]
async fn demo_data_lands_the_same_with_batches_in_flight() {
    let env = demo_env(&mongo_uri(), "infl_demo", Backend::Postgres, 400, 17).await;
    let second = env.second_target().await;
    let mut s = env.settings();
    s.sync.start = "2015-01-01T00:00:00Z".parse().unwrap();
    s.sync.error_budget = 100_000;
    s.source.batch_size = 50;
    let one = run(
        in_flight(&s, &env.target_url, 1),
        RunOptions::default(),
        Default::default(),
    )
    .await
    .expect("run one batch at a time");
    let four = run(
        in_flight(&s, &second, 4),
        RunOptions::default(),
        Default::default(),
    )
    .await
    .expect("run four batches at once");
    let overlapped = |r: &tidemark::commands::run::RunReport| -> u64 {
        r.entities.iter().map(|e| e.counts.overlapped_batches).sum()
    };
    assert_eq!(overlapped(&one), 0, "{one}");
    assert!(
        overlapped(&four) > 5,
        "batches were written beside each other: {four}"
    );
    for (a, b) in one.entities.iter().zip(&four.entities) {
        assert_eq!(a.counts.read, b.counts.read, "{one}\n{four}");
        assert_eq!(a.counts.written, b.counts.written, "{one}\n{four}");
        assert_eq!(
            a.counts.dead_lettered, b.counts.dead_lettered,
            "{one}\n{four}"
        );
    }
    assert_eq!(
        dump_all(&env, &env.target_url).await,
        dump_all(&env, &second).await
    );
}

const DOCS: i64 = 1000;

/// Items 0..DOCS, ten per second (batches of 100 are ids 0–99, 100–199, …), a migrated
/// PostgreSQL target and settings writing two batches at once.
async fn items_env(name: &str) -> (Env, Settings) {
    let env = Env::new(name, Backend::Postgres, &items_mapping("epoch_millis")).await;
    let base = chrono::Utc::now().timestamp_millis() - 86_400_000;
    env.insert("items", items(DOCS, base, 10)).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = in_flight(&env.settings(), &env.target_url, 2);
    s.source.batch_size = 100;
    tidemark::commands::migrate::migrate(&s, false)
        .await
        .expect("migrate");
    (env, s)
}

/// The batch of ids 400–499 fails after a second, while the batch after it (500–599) has
/// been written beside it and waits for its turn: neither commits, nothing past 399 does,
/// and the next run completes the table.
#[tokio::test]
async fn a_failed_batch_takes_the_batch_written_beside_it_down() {
    let (env, s) = items_env("infl_fail").await;
    exec(
        &env.target_url,
        "CREATE FUNCTION fail_450() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN IF NEW.id = 450 THEN PERFORM pg_sleep(1); RAISE EXCEPTION 'item 450 refused'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER fail_450 BEFORE INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION fail_450();",
    )
    .await;
    let err = env
        .run(s.clone())
        .await
        .expect_err("the batch of 450 fails");
    assert!(format!("{err:#}").contains("item 450 refused"), "{err:#}");
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        400,
        "exactly the batches before the failed one"
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT MAX(id) FROM items").await,
        399
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_checkpoints WHERE last_id LIKE '%399%'"
        )
        .await,
        1,
        "the checkpoint stays at the last committed batch"
    );
    exec(&env.target_url, "DROP TRIGGER fail_450 ON items").await;
    let r = env.run(s).await.expect("the next run completes");
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        DOCS,
        "{r}"
    );
}

/// Batch 400–499 sleeps on item 450 while batch 500–599 inserts and takes the lock of a
/// shared counter row (a trigger of the user's own), then waits for its turn; batch
/// 400–499 then waits for that lock. Only PostgreSQL sees both waits: it aborts one, the
/// pair is written again in order, and every item is counted exactly once.
#[tokio::test]
async fn a_deadlock_between_batches_in_flight_is_survived() {
    let (env, s) = items_env("infl_deadlock").await;
    exec(
        &env.target_url,
        "CREATE TABLE hits (id int PRIMARY KEY, n bigint NOT NULL); INSERT INTO hits VALUES (1, 0); \
         CREATE FUNCTION slow_450() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN IF NEW.id = 450 THEN PERFORM pg_sleep(1.5); END IF; RETURN NEW; END $$; \
         CREATE TRIGGER slow_450 BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION slow_450(); \
         CREATE FUNCTION count_hit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN UPDATE hits SET n = n + 1 WHERE id = 1; RETURN NULL; END $$; \
         CREATE TRIGGER count_hit AFTER INSERT ON items FOR EACH ROW EXECUTE FUNCTION count_hit();",
    )
    .await;
    let r = tokio::time::timeout(std::time::Duration::from_secs(120), env.run(s))
        .await
        .expect("no batch waits forever")
        .expect("the run completes");
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        DOCS,
        "{r}"
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT n FROM hits").await,
        DOCS,
        "each item inserted once by a committed transaction"
    );
    let overlapped: u64 = r.entities.iter().map(|e| e.counts.overlapped_batches).sum();
    assert!(overlapped > 0, "{r}");
}
