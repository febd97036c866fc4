//! Edges where a run looked healthier than it was: the rate limit and the first page,
//! `windowed = false`, the invalid-time scan's dead letters in `tidemark runs`, time values
//! no window can hold, a misspelt `time_field`, and missing references in child tables.

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use bson::{doc, Document};
use chrono::{TimeZone, Utc};
use tidemark::commands::run::RunOptions;

fn ms(y: i32, mo: u32, d: u32) -> i64 {
    Utc.with_ymd_and_hms(y, mo, d, 0, 0, 0)
        .unwrap()
        .timestamp_millis()
}

fn items(n: i64, from_ms: i64) -> Vec<Document> {
    (0..n)
        .map(|i| doc! { "_id": i, "t": from_ms + i * 1000, "v": format!("v{i}") })
        .collect()
}

/// 150 documents, fewer than one page, at 100 documents/s: the run takes 1.5 s, not 0.
#[tokio::test]
async fn rate_limit_slows_the_first_page() {
    let env = Env::new("ratelimit", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    env.insert("items", items(150, ms(2024, 1, 1))).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.source.rate_limit = 100;
    s.source.batch_size = 500;
    let t0 = std::time::Instant::now();
    let r = env.run(s).await.expect("run");
    let took = t0.elapsed();
    assert_eq!(r.entities[0].counts.written, 150);
    assert!(
        took >= std::time::Duration::from_millis(1400),
        "150 documents at 100/s took {took:?}"
    );
}

const TWO: &str = r#"
version = "w-1"
[entities.accounts]
collection = "accounts"
id_field = "accountId"
time_field = "t"
time_encoding = "epoch_millis"
table = "accounts"
primary_key = ["account_id"]
windowed = false
[entities.accounts.columns]
account_id = { path = "accountId", type = "text", required = true }
[entities.items]
collection = "items"
time_field = "t"
time_encoding = "epoch_millis"
table = "items"
primary_key = ["id"]
[entities.items.columns]
id = { path = "_id", type = "bigint", required = true }
owner = { path = "owner", type = "text", references = "accounts" }
"#;

/// An entity with `windowed = false` gets no windows, no lane and no watermark from `run`;
/// naming it alone is refused with the fix.
#[tokio::test]
async fn unwindowed_entities_are_only_pulled() {
    let env = Env::new("unwindowed", Backend::Sqlite, TWO).await;
    let t = ms(2024, 1, 1);
    env.insert(
        "accounts",
        vec![
            doc! { "accountId": "a1", "t": t },
            doc! { "accountId": "a2", "t": t },
        ],
    )
    .await;
    env.insert("items", vec![doc! { "_id": 1i64, "owner": "a1", "t": t }])
        .await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let r = env.run(env.settings()).await.expect("run");
    let names: Vec<&str> = r.entities.iter().map(|e| e.entity.as_str()).collect();
    assert_eq!(names, ["items"], "{r}");
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM accounts").await,
        1,
        "only the referenced account, pulled on demand"
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_checkpoints WHERE lane LIKE '%accounts%'"
        )
        .await,
        0,
        "no lane or watermark for accounts"
    );
    let err = tidemark::commands::run::run(
        env.settings(),
        RunOptions {
            entities: vec!["accounts".into()],
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("windowed = false"), "{err:#}");
}

/// Time values of the right type that no window can hold (±2^62 ms, year 20000) are found
/// by the scan and dead-lettered, and `tidemark runs` counts them as dead.
#[tokio::test]
async fn unreadable_times_are_dead_letters_and_runs_counts_them() {
    let env = Env::new("badtime", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    let mut docs = items(5, ms(2024, 1, 1));
    docs.push(doc! { "_id": 100i64, "t": 1i64 << 62 });
    docs.push(doc! { "_id": 101i64, "t": -(1i64 << 62) });
    docs.push(doc! { "_id": 102i64, "t": 20_000i64 * 365 * 86_400_000 });
    docs.push(doc! { "_id": 103i64, "t": "yesterday" });
    env.insert("items", docs).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let r = env.run(env.settings()).await.expect("run");
    let c = r.entities[0].counts;
    assert_eq!((c.written, c.invalid_time), (5, 4), "{r}");
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_dead_letters"
        )
        .await,
        4
    );
    let s = env.settings();
    let mapping = tidemark::commands::setup::load_mapping(&s).unwrap();
    let sink = tidemark::commands::setup::open_sink(&s, &mapping)
        .await
        .unwrap();
    let rows = tidemark::sink::runs::list(&sink, None, 10).await.unwrap();
    let text = tidemark::commands::runs::format_list(&rows);
    let line = text.lines().nth(1).expect("one run");
    assert!(
        line.split_whitespace().last() == Some("4"),
        "dead column: {text}"
    );

    // The next runs find the same four: they still wait in the dead letters, but they are
    // not dead-lettered (nor counted, nor warned about) again; a new one is.
    let r = env.run(env.settings()).await.expect("second run");
    assert_eq!(r.entities[0].counts.invalid_time, 0, "{r}");
    env.insert("items", vec![doc! { "_id": 104i64, "t": "tomorrow" }])
        .await;
    let r = env.run(env.settings()).await.expect("third run");
    assert_eq!(r.entities[0].counts.invalid_time, 1, "{r}");
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_dead_letters"
        )
        .await,
        5
    );
}

/// A misspelt time_field makes every document unreadable: the run fails naming the field,
/// and leaves no watermark.
#[tokio::test]
async fn misspelt_time_field_fails_the_run() {
    let mapping =
        items_mapping("epoch_millis").replace("time_field = \"t\"", "time_field = \"ts\"");
    let env = Env::new("misspelt", Backend::Sqlite, &mapping).await;
    env.insert("items", items(20, ms(2024, 1, 1))).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let err = env.run(env.settings()).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("`ts`") && msg.contains("misspelt"), "{msg}");
    assert_ne!(
        tidemark::exit::code(&err),
        0,
        "a run that read nothing usable must not exit 0"
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_checkpoints WHERE watermark_ms IS NOT NULL"
        )
        .await,
        0,
        "the watermark must not advance"
    );
}

/// Some documents have no usable time. A first load confirms the time field from the
/// windows it is about to read (data years after `sync.start`) and copies everything else;
/// once the lane has a watermark, a mapping that misspells the field is still refused by
/// the check of the whole range, and the watermark stays where it was.
#[tokio::test]
async fn time_field_check_with_bad_times_postgres() {
    let env = Env::new("tfcheck", Backend::Postgres, &items_mapping("epoch_millis")).await;
    let mut docs = items(20, ms(2024, 1, 1));
    docs.push(doc! { "_id": 100i64, "t": "yesterday" });
    env.insert("items", docs).await;
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let r = env.run(env.settings()).await.expect("run");
    let c = r.entities[0].counts;
    assert_eq!((c.written, c.invalid_time), (20, 1), "{r}");
    let wm = "SELECT COALESCE(MAX(watermark_ms), -1) FROM tidemark_checkpoints";
    let before = scalar_i64(&env.target_url, wm).await;
    assert!(before > ms(2024, 1, 1), "watermark {before}");
    let misspelt =
        items_mapping("epoch_millis").replace("time_field = \"t\"", "time_field = \"ts\"");
    std::fs::write(&env.mapping_path, misspelt).unwrap();
    let err = env.run(env.settings()).await.unwrap_err();
    assert!(format!("{err:#}").contains("misspelt"), "{err:#}");
    assert_eq!(scalar_i64(&env.target_url, wm).await, before);
}

const CHILD_REFS: &str = r#"
version = "cr-1"
[entities.accounts]
collection = "accounts"
id_field = "accountId"
time_field = "t"
time_encoding = "epoch_millis"
table = "accounts"
primary_key = ["account_id"]
windowed = false
[entities.accounts.columns]
account_id = { path = "accountId", type = "text", required = true }
[entities.studies]
collection = "studies"
time_field = "t"
time_encoding = "epoch_millis"
table = "studies"
primary_key = ["id"]
[entities.studies.columns]
id = { path = "_id", type = "bigint", required = true }
[entities.studies.children.members]
path = "members"
table = "members"
primary_key = ["study_id", "position"]
[entities.studies.children.members.columns]
study_id = { parent = "id", type = "bigint" }
position = { ordinal = true, type = "integer" }
account_id = { path = "account", type = "text", references = "accounts", on_missing = "null" }
"#;

/// A reference missing from a child-table column is recorded in tidemark_missing_refs and
/// counted, like one in a main column (DEPENDENCIES.md: every occurrence is recorded).
#[tokio::test]
async fn missing_references_in_child_tables_are_recorded() {
    let env = Env::new("childrefs", Backend::Sqlite, CHILD_REFS).await;
    let t = ms(2024, 1, 1);
    env.insert("accounts", vec![doc! { "accountId": "a1", "t": t }])
        .await;
    env.insert(
        "studies",
        vec![
            doc! { "_id": 1i64, "t": t, "members": [{ "account": "a1" }, { "account": "ghost" }] },
            doc! { "_id": 2i64, "t": t + 1, "members": [{ "account": "a1" }] },
        ],
    )
    .await;
    env.index("studies", doc! { "t": 1, "_id": 1 }).await;
    let r = env.run(env.settings()).await.expect("run");
    assert_eq!(r.entities[0].counts.missing_refs, 1, "{r}");
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_missing_refs WHERE entity = 'studies' \
             AND source_id = '1' AND column_name = 'members.account_id' AND ref_key = 'ghost'"
        )
        .await,
        1
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM members WHERE account_id IS NULL"
        )
        .await,
        1,
        "nulled, kept"
    );
}
