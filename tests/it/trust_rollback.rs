//! Rollback undoes exactly one run from its provenance: inserted rows go, changed rows get
//! their previous content back, rows the tool never wrote stay, the checkpoint goes back so
//! a re-run repeats the window, and rows edited by someone else since block it (or --force).

use crate::harness::{scalar_i64, Backend};
use crate::trust_util::{day_two, dump_domain, exec, run_until, seed};
use tidemark::rollback::rollback;

async fn rollback_restores_prior_state(backend: Backend) {
    // Arrange: run A (day 0), a row written by hand, then run B (day 1: updates, inserts, a pulled owner).
    let env = seed(backend, "rb").await;
    let url = env.target_url.clone();
    run_until(env.settings(), "2019-01-02", false)
        .await
        .expect("run A");
    exec(
        &url,
        "INSERT INTO items (id, t, v) VALUES (1000, '2019-01-01T12:00:00.000Z', 'by hand')",
    )
    .await;
    let watermark_a = scalar_i64(
        &url,
        "SELECT watermark_ms FROM tidemark_checkpoints WHERE lane = 'nightly:items'",
    )
    .await;
    let after_a = dump_domain(&url).await;
    day_two(&env).await;
    let b = run_until(env.settings(), "2019-01-03", false)
        .await
        .expect("run B");
    assert_eq!((b.totals.inserted, b.totals.updated), (10, 5), "{b}");
    let after_b = dump_domain(&url).await;
    assert_ne!(after_a, after_b);
    let run_a = tidemark::reports::list(
        &tidemark::sink::Sink::connect(&tidemark::secret::SecretUri::new(url.clone()), 1)
            .await
            .unwrap(),
        Some("run"),
        10,
    )
    .await
    .unwrap()
    .last()
    .unwrap()
    .id
    .clone();

    // Act + Assert: A cannot be undone while B, which touched the same lane, stands.
    let err = rollback(env.settings(), &run_a, false, false)
        .await
        .expect_err("later run B");
    assert!(format!("{err:#}").contains(&b.run_id), "{err:#}");

    // Someone else edits a row B wrote: the rollback refuses and changes nothing.
    exec(
        &url,
        "UPDATE items SET v = 'edited by the app' WHERE id = 3",
    )
    .await;
    let edited = dump_domain(&url).await;
    let err = rollback(env.settings(), &b.run_id, false, false)
        .await
        .expect_err("conflict");
    assert_eq!(
        tidemark::exit::code(&err),
        tidemark::exit::PARTIAL,
        "{err:#}"
    );
    assert_eq!(
        dump_domain(&url).await,
        edited,
        "a refused rollback changed rows"
    );

    // A dry rollback reports and changes nothing.
    let dry = rollback(env.settings(), &b.run_id, true, true)
        .await
        .expect("dry rollback");
    assert_eq!(dry.tables["items"].deleted, 10, "{dry}");
    assert_eq!(dry.tables["items"].restored, 5, "{dry}");
    assert_eq!(dump_domain(&url).await, edited);

    let done = rollback(env.settings(), &b.run_id, false, true)
        .await
        .expect("rollback B");
    assert_eq!(
        dump_domain(&url).await,
        after_a,
        "prior state restored exactly\n{done}"
    );
    assert_eq!(
        done.tables["owners"].deleted, 1,
        "pulled owner o3 removed: {done}"
    );
    let wm = scalar_i64(
        &url,
        "SELECT watermark_ms FROM tidemark_checkpoints WHERE lane = 'nightly:items'",
    )
    .await;
    assert_eq!(wm, watermark_a, "checkpoint moved back");
    let status = tidemark::reports::list(
        &tidemark::sink::Sink::connect(&tidemark::secret::SecretUri::new(url.clone()), 1)
            .await
            .unwrap(),
        Some("run"),
        10,
    )
    .await
    .unwrap()
    .into_iter()
    .find(|r| r.id == b.run_id)
    .unwrap()
    .status;
    assert_eq!(status, "rolled_back");
    rollback(env.settings(), &b.run_id, false, false)
        .await
        .expect_err("only once");

    // A re-run repeats the window and arrives where B did.
    let c = run_until(env.settings(), "2019-01-03", false)
        .await
        .expect("run C");
    assert_eq!(dump_domain(&url).await, after_b, "{c}");
}

#[tokio::test]
async fn rollback_restores_prior_state_sqlite() {
    rollback_restores_prior_state(Backend::Sqlite).await;
}

#[tokio::test]
async fn rollback_restores_prior_state_postgres() {
    rollback_restores_prior_state(Backend::Postgres).await;
}
