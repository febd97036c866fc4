//! `tidemark demo seed` refuses a database holding collections it did not create, unless
//! --force, and then leaves those collections alone; `demo touch` makes a night's changes.

use crate::harness::{items_mapping, Backend, Env};
use crate::ops_util::tidemark;
use bson::doc;

async fn count(env: &Env, coll: &str, filter: bson::Document) -> u64 {
    env.db
        .collection::<bson::Document>(coll)
        .count_documents(filter)
        .await
        .unwrap()
}

#[tokio::test]
async fn ops_demo_seed_refuses_a_database_it_did_not_fill() {
    // Arrange: a "production" database with its own collections, one named like a demo one.
    let prod = Env::new("demoprod", Backend::Sqlite, &items_mapping("epoch_millis")).await;
    prod.insert("orders", vec![doc! { "_id": 1, "total": 10 }])
        .await;
    prod.insert("user", vec![doc! { "_id": "keep-me" }]).await;
    let scratch = Env::new(
        "demoscratch",
        Backend::Sqlite,
        &items_mapping("epoch_millis"),
    )
    .await;
    let seed = |env: &Env, force: bool| {
        let mut args = vec!["demo", "seed", "--vizzes", "20"];
        if force {
            args.push("--force");
        }
        tidemark(env, &env.target_url, &args).output().unwrap()
    };

    // Act
    let refused = seed(&prod, false);
    let user_after_refusal = count(&prod, "user", doc! { "_id": "keep-me" }).await;
    let demo_after_refusal = count(&prod, "documentInfo", doc! {}).await;
    let forced = seed(&prod, true);
    let first = seed(&scratch, false);
    let again = seed(&scratch, false);

    // Assert
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("orders") && stderr.contains("user") && stderr.contains("--force"),
        "the refusal names what it found and the way out: {stderr}"
    );
    assert_eq!(user_after_refusal, 1, "nothing is dropped when refusing");
    assert_eq!(demo_after_refusal, 0, "nothing is written when refusing");
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert_eq!(
        count(&prod, "orders", doc! {}).await,
        1,
        "other collections are left alone"
    );
    assert!(count(&prod, "documentInfo", doc! {}).await >= 20);
    for out in [&first, &again] {
        assert!(
            out.status.success(),
            "a database demo seed filled itself is seeded again: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `demo touch` changes the share of vizzes asked for (title, first file, time stamps), and
/// the next run carries exactly those changes.
#[tokio::test]
async fn ops_demo_touch_changes_a_share_of_the_vizzes_for_the_next_run() {
    let vizhub = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mappings/vizhub.toml"),
    )
    .unwrap();
    let env = Env::new("demotouch", Backend::Sqlite, &vizhub).await;
    let (url, dir) = (env.target_url.clone(), env.dir.path().to_path_buf());
    let ok = |out: std::process::Output| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        String::from_utf8(out.stdout).unwrap()
    };
    ok(tidemark(&env, &url, &["demo", "seed", "--vizzes", "200"])
        .output()
        .unwrap());
    let cmd = |args: &[&str]| {
        let mut c = tidemark(&env, &url, args);
        c.env("TIDEMARK__SYNC__START", "2010-01-01T00:00:00Z");
        c.env("TIDEMARK__STATE_DIR", dir.display().to_string());
        c
    };
    ok(cmd(&["run"]).output().unwrap());

    let out = ok(cmd(&["demo", "touch", "--percent", "5", "--seed", "3"])
        .output()
        .unwrap());
    let edited = count(
        &env,
        "documentInfo",
        doc! { "title": { "$regex": "^Edited viz " } },
    )
    .await;
    let night = ok(cmd(&["run"]).output().unwrap());
    let bad = cmd(&["demo", "touch", "--percent", "0"]).output().unwrap();

    assert!(out.starts_with(&format!("touched {edited} of ")), "{out}");
    assert!((9..=11).contains(&edited), "5 % of ~200 vizzes: {edited}");
    let in_target = crate::harness::scalar_i64(
        &url,
        "SELECT COUNT(*) FROM vizzes WHERE title LIKE 'Edited viz %'",
    )
    .await;
    assert_eq!(in_target as u64, edited, "{night}");
    assert_eq!(
        bad.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--percent 0 is out of range"));
}
