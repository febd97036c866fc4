//! Dry runs read, map and resolve everything, report what would change, and leave the
//! target byte-identical (domain tables, checkpoints, ledger, dead letters, provenance).

use crate::harness::{Backend, Env};
use crate::trust_util::{day_two, dump_all, run_until, seed, MAPPING};
use bson::doc;

async fn dry_run_changes_nothing(backend: Backend) {
    // Arrange: day 0 migrated; day 1 brings 5 changed items, 10 new ones (one unmappable) and a new owner.
    let env = seed(backend, "dry").await;
    run_until(env.settings(), "2019-01-02", false)
        .await
        .expect("day 0");
    day_two(&env).await;
    env.insert(
        "items",
        vec![doc! { "_id": 99i64, "t": crate::trust_util::at(1, 99) }],
    )
    .await;
    let before = dump_all(&env.target_url).await;

    // Act
    let dry = run_until(env.settings(), "2019-01-03", true)
        .await
        .expect("dry run");

    // Assert: nothing changed, and the report says what a real run does.
    assert_eq!(
        dump_all(&env.target_url).await,
        before,
        "a dry run changed the target"
    );
    let t = dry.totals;
    assert!(dry.dry_run);
    assert_eq!(
        (t.inserted, t.updated, t.dead_lettered),
        (10, 5, 1),
        "{dry}\n{t:?}"
    );
    assert_eq!(t.pulled, 1, "owner o3 is pulled on demand: {t:?}");
    let file = dry
        .report_file
        .clone()
        .expect("a dry run writes its report file");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(json["dry_run"], true);
    assert_eq!(json["report"]["totals"]["inserted"], 10);

    let real = run_until(env.settings(), "2019-01-03", false)
        .await
        .expect("real run");
    let r = real.totals;
    assert_eq!(
        (r.inserted, r.updated, r.dead_lettered, r.pulled),
        (10, 5, 1, 1),
        "{real}"
    );
    assert_eq!(r.written, t.written, "dry run predicted the real run");
    assert_ne!(
        dump_all(&env.target_url).await,
        before,
        "the real run writes"
    );
}

#[tokio::test]
async fn dry_run_changes_nothing_sqlite() {
    dry_run_changes_nothing(Backend::Sqlite).await;
}

#[tokio::test]
async fn dry_run_changes_nothing_postgres() {
    dry_run_changes_nothing(Backend::Postgres).await;
}

/// A dry run never creates tables: on a target that was never migrated it stops with exit 5.
#[tokio::test]
async fn dry_run_needs_a_migrated_target() {
    let env = Env::new("dry_fresh", Backend::Postgres, MAPPING).await;
    let before = dump_all(&env.target_url).await;
    let err = run_until(env.settings(), "2019-01-03", true)
        .await
        .expect_err("nothing to dry-run against");
    assert_eq!(
        tidemark::exit::code(&err),
        tidemark::exit::CONFIG,
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("tidemark migrate"), "{err:#}");
    assert_eq!(dump_all(&env.target_url).await, before);
}

/// `backfill --dry-run`: every chunk read and mapped, nothing written (no backfill ledger either).
#[tokio::test]
async fn backfill_dry_run_changes_nothing() {
    let env = seed(Backend::Postgres, "dry_bf").await;
    run_until(env.settings(), "2019-01-02", false)
        .await
        .expect("day 0");
    day_two(&env).await;
    let before = dump_all(&env.target_url).await;

    let r = tidemark::commands::backfill::backfill_dry_run(
        env.settings(),
        "2019-01-01",
        "2019-01-03",
        vec!["items".into()],
        tidemark::engine::window::ChunkBy::Duration(std::time::Duration::from_secs(86_400)),
        Default::default(),
    )
    .await
    .expect("dry backfill");

    assert_eq!(dump_all(&env.target_url).await, before);
    assert_eq!(r.entities[0].windows, 2, "{r}");
    assert_eq!((r.totals.inserted, r.totals.updated), (10, 5), "{r}");
    assert_eq!(r.totals.unchanged, 15, "{r}");
}
