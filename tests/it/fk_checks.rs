//! `target.foreign_key_checks = "tidemark"` against real MongoDB + PostgreSQL: the same rows
//! as with the database's per-row checks, no reference left dangling, deletions still take
//! their `ON DELETE` actions, and a role that may not turn the checks off fails before
//! anything is written.

use crate::fault_kill::{demo_env, dump_all};
use crate::harness::{mongo_uri, pg_admin_url, scalar_i64, Backend, Env};
use bson::{doc, Document};
use tidemark::commands::run::{run, RunOptions};
use tidemark::secret::SecretUri;
use tidemark::settings::{ForeignKeyChecks, Settings};

const T: i64 = 1_700_000_000; // 2023-11-14, epoch seconds

async fn exec(url: &str, sql: &str) {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
}

/// Rows whose foreign key points at nothing, over every foreign key of the database.
async fn dangling(url: &str) -> Vec<String> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    #[allow(clippy::type_complexity)]
    let fks: Vec<(String, String, String, Vec<String>, Vec<String>)> = sqlx::query_as(
        "SELECT con.conname, src.relname, dst.relname, \
                array_agg(quote_ident(sa.attname) ORDER BY k.ord), \
                array_agg(quote_ident(da.attname) ORDER BY k.ord) \
         FROM pg_constraint con \
         JOIN pg_class src ON src.oid = con.conrelid \
         JOIN pg_class dst ON dst.oid = con.confrelid \
         CROSS JOIN LATERAL unnest(con.conkey, con.confkey) WITH ORDINALITY AS k(s, d, ord) \
         JOIN pg_attribute sa ON sa.attrelid = con.conrelid AND sa.attnum = k.s \
         JOIN pg_attribute da ON da.attrelid = con.confrelid AND da.attnum = k.d \
         WHERE con.contype = 'f' GROUP BY 1, 2, 3",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert!(fks.len() >= 10, "the VizHub schema's foreign keys: {fks:?}");
    let mut out = Vec::new();
    for (name, src, dst, mine, theirs) in fks {
        let not_null: Vec<String> = mine.iter().map(|a| format!("s.{a} IS NOT NULL")).collect();
        let same: Vec<String> = mine
            .iter()
            .zip(&theirs)
            .map(|(a, b)| format!("d.{b} = s.{a}"))
            .collect();
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM {src} s WHERE {} \
             AND NOT EXISTS (SELECT 1 FROM {dst} d WHERE {})",
            not_null.join(" AND "),
            same.join(" AND ")
        ))
        .fetch_one(&mut c)
        .await
        .unwrap();
        if n > 0 {
            out.push(format!("{name}: {n} rows"));
        }
    }
    out
}

fn with(s: &Settings, url: &str, mode: ForeignKeyChecks) -> Settings {
    let mut s = s.clone();
    s.target.url = SecretUri::new(url.to_owned());
    s.target.foreign_key_checks = mode;
    s
}

/// Rows whose foreign key points at nothing: PostgreSQL's constraints queried one by one, or
/// SQLite's own `PRAGMA foreign_key_check` over every table.
async fn dangling_on(url: &str) -> Vec<String> {
    if !url.starts_with("sqlite:") {
        return dangling(url).await;
    }
    use sqlx::{Connection, Row};
    let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
    sqlx::query("PRAGMA foreign_key_check")
        .fetch_all(&mut c)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} row {:?} -> {}",
                r.get::<String, _>(0),
                r.get::<Option<i64>, _>(1),
                r.get::<String, _>(2)
            )
        })
        .collect()
}

/// The demo data set, every entity, into two targets: the database checking each row, and
/// tidemark. Same tables, same records, nothing dangling.
async fn demo_data_lands_the_same(backend: Backend) {
    let env = demo_env(&mongo_uri(), "fkc_demo", backend, 400, 11).await;
    let second = env.second_target().await;
    let mut s = env.settings();
    s.sync.start = "2015-01-01T00:00:00Z".parse().unwrap();
    s.sync.error_budget = 100_000;
    s.source.batch_size = 100;
    let by_db = run(
        with(&s, &env.target_url, ForeignKeyChecks::Database),
        RunOptions::default(),
        Default::default(),
    )
    .await
    .expect("run with the database's checks");
    let by_tm = run(
        with(&s, &second, ForeignKeyChecks::Tidemark),
        RunOptions::default(),
        Default::default(),
    )
    .await
    .expect("run with tidemark's checks");
    for (a, b) in by_db.entities.iter().zip(&by_tm.entities) {
        assert_eq!(a.counts.written, b.counts.written, "{by_db}\n{by_tm}");
        assert_eq!(a.counts.pulled, b.counts.pulled, "{by_db}\n{by_tm}");
        assert_eq!(a.counts.deleted, b.counts.deleted, "{by_db}\n{by_tm}");
    }
    assert!(
        scalar_i64(&second, "SELECT COUNT(*) FROM commits").await > 100,
        "the demo data reached the dependents"
    );
    assert_eq!(
        dump_all(&env, &env.target_url).await,
        dump_all(&env, &second).await
    );
    assert_eq!(dangling_on(&second).await, Vec::<String>::new());
}

#[tokio::test]
async fn demo_data_lands_the_same_when_tidemark_checks_references() {
    demo_data_lands_the_same(Backend::Postgres).await;
}

#[tokio::test]
async fn demo_data_lands_the_same_when_tidemark_checks_references_sqlite() {
    demo_data_lands_the_same(Backend::Sqlite).await;
}

/// A viz's content document: one file.
fn content(id: &str) -> Document {
    doc! { "id": id, "files": [{ "name": "index.js", "text": "x" }], "lastUpdatedTimestamp": T + 1 }
}

fn viz(id: &str, at: i64, fork: Option<&str>, upvoters: &[&str]) -> Document {
    let mut d = doc! {
        "id": id, "documentType": "viz", "owner": "a", "title": format!("viz {id}"),
        "createdTimestamp": at - 100, "lastUpdatedTimestamp": at, "privacy": "public",
        "upvotes": upvoters.iter().map(|u| doc! { "userId": *u, "timestamp": at }).collect::<Vec<_>>(),
        "collaborators": upvoters.iter().map(|u| doc! { "userId": *u }).collect::<Vec<_>>(),
    };
    if let Some(f) = fork {
        d.insert("forkedFrom", f);
    }
    d
}

async fn vizzes_env(name: &str) -> Env {
    vizzes_env_on(name, Backend::Postgres).await
}

async fn vizzes_env_on(name: &str, backend: Backend) -> Env {
    let mapping = std::fs::read_to_string("config/mappings/vizhub.toml").unwrap();
    let env = Env::new(name, backend, &mapping).await;
    env.insert(
        "user",
        ["a", "b"]
            .iter()
            .map(|u| doc! { "id": *u, "userName": *u, "createdTimestamp": T - 86_400 * 400 })
            .collect(),
    )
    .await;
    env.insert(
        "documentInfo",
        vec![
            viz("p", T, None, &["b"]),
            viz("f", T + 10, Some("p"), &[]),
            viz("q", T + 20, None, &["a", "b"]),
        ],
    )
    .await;
    env
}

fn opts(until: i64) -> RunOptions {
    RunOptions {
        entities: vec!["vizzes".into()],
        until: Some(
            chrono::DateTime::from_timestamp(until, 0)
                .unwrap()
                .to_rfc3339(),
        ),
        ..Default::default()
    }
}

/// Viz p was deleted by the run `r`: the fork lost its reference (`ON DELETE SET NULL`, by
/// the database or by tidemark), p's child rows went with it, and so did its content row,
/// keyed by p's id (which cannot be set to NULL).
async fn p_went_with_its_actions(url: &str, r: &tidemark::commands::run::RunReport) {
    assert_eq!(r.entities[0].counts.deleted, 1, "{r}");
    assert_eq!(scalar_i64(url, "SELECT COUNT(*) FROM vizzes").await, 2);
    assert_eq!(
        scalar_i64(
            url,
            "SELECT COUNT(*) FROM vizzes WHERE id = 'f' AND forked_from IS NULL"
        )
        .await,
        1,
        "the fork lost its deleted parent (ON DELETE SET NULL ran)"
    );
    assert_eq!(
        scalar_i64(url, "SELECT COUNT(*) FROM upvotes WHERE viz_id = 'p'").await
            + scalar_i64(url, "SELECT COUNT(*) FROM permissions WHERE viz_id = 'p'").await,
        0,
        "p's child rows went with it"
    );
    assert_eq!(
        scalar_i64(url, "SELECT COUNT(*) FROM viz_contents WHERE viz_id = 'p'").await
            + scalar_i64(url, "SELECT COUNT(*) FROM files WHERE viz_id = 'p'").await,
        0,
        "p's content row (keyed by p's id, so it cannot be set to NULL) went with it"
    );
}

/// A deleted viz takes its child rows with it and its forks lose the reference
/// (`ON DELETE SET NULL`), as with the database's checks: deletions run with them on. The
/// batch's updates run without them, which an ordinary trigger on the table shows (it does
/// not fire for them, docs/DEPENDENCIES.md). The fork is re-read in the same batch (the
/// overlap) and still names the deleted viz: it must take its policy (NULL), not point at
/// the row the batch deleted.
#[tokio::test]
async fn deletions_keep_their_actions_when_tidemark_checks_references() {
    let env = vizzes_env("fkc_delete").await;
    env.insert("documentContent", vec![content("p")]).await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    s.target.foreign_key_checks = ForeignKeyChecks::Tidemark;
    run(s.clone(), opts(T + 3600), Default::default())
        .await
        .expect("run 1");
    let url = &env.target_url;
    assert_eq!(scalar_i64(url, "SELECT COUNT(*) FROM vizzes").await, 3);
    assert_eq!(
        scalar_i64(url, "SELECT COUNT(*) FROM vizzes WHERE forked_from = 'p'").await,
        1
    );
    exec(
        url,
        "CREATE TABLE fired (id text); \
         CREATE FUNCTION count_fired() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO fired VALUES (NEW.id); RETURN NEW; END $$; \
         CREATE TRIGGER count_fired AFTER INSERT OR UPDATE ON vizzes \
           FOR EACH ROW EXECUTE FUNCTION count_fired();",
    )
    .await;

    // p is deleted (the leftover the legacy store keeps), q changes.
    let coll = env.db.collection::<Document>("documentInfo");
    coll.insert_one(doc! { "_type": bson::Bson::Null, "id": "p", "lastUpdatedTimestamp": T + 100 })
        .await
        .unwrap();
    coll.update_one(
        doc! { "id": "q" },
        doc! { "$set": { "title": "renamed", "lastUpdatedTimestamp": T + 110 } },
    )
    .await
    .unwrap();
    let r = run(s.clone(), opts(T + 3600), Default::default())
        .await
        .expect("run 2");
    p_went_with_its_actions(url, &r).await;
    assert_eq!(
        scalar_i64(url, "SELECT COUNT(*) FROM vizzes WHERE title = 'renamed'").await,
        1
    );
    assert_eq!(
        scalar_i64(url, "SELECT COUNT(*) FROM fired WHERE id = 'q'").await,
        0,
        "q's update ran without the per-row triggers"
    );
    assert_eq!(
        scalar_i64(url, "SELECT COUNT(*) FROM fired WHERE id = 'f'").await,
        1,
        "the deletion ran with them: its SET NULL on the fork fired the trigger"
    );
    assert_eq!(dangling(url).await, Vec::<String>::new());

    // The same change with the database's checks fires the trigger: the test can tell.
    coll.update_one(
        doc! { "id": "q" },
        doc! { "$set": { "title": "again", "lastUpdatedTimestamp": T + 120 } },
    )
    .await
    .unwrap();
    s.target.foreign_key_checks = ForeignKeyChecks::Database;
    run(s, opts(T + 3600), Default::default())
        .await
        .expect("run 3");
    assert!(scalar_i64(url, "SELECT COUNT(*) FROM fired WHERE id = 'q'").await >= 1);
}

/// On SQLite the run's connection has no foreign-key enforcement at all (SQLite cannot
/// switch it inside a transaction), so the `ON DELETE` actions of a deleted viz are
/// tidemark's to run: its child rows go, the fork that named it and the commit that pointed
/// at it keep their rows with the reference set to NULL, and SQLite's own
/// `PRAGMA foreign_key_check` finds nothing dangling. Without that step the fork and the
/// commit would still point at the deleted viz. A rollback of the run (its own connection,
/// with the checks) restores the viz. With the database's checks the same holds (its own
/// actions), and the content row keyed by the viz's id no longer fails the batch.
#[tokio::test]
async fn deletions_keep_their_actions_when_tidemark_checks_references_sqlite() {
    deletions_on_sqlite("fkc_delete_sq", ForeignKeyChecks::Tidemark).await;
}

#[tokio::test]
async fn deletions_keep_their_actions_with_the_database_checks_sqlite() {
    deletions_on_sqlite("fkc_delete_sqdb", ForeignKeyChecks::Database).await;
}

async fn deletions_on_sqlite(name: &str, mode: ForeignKeyChecks) {
    let env = vizzes_env_on(name, Backend::Sqlite).await;
    env.insert(
        "commits",
        vec![doc! { "id": "c1", "vizId": "p", "authorId": "a", "timestamp": (T + 5) * 1000, "message": "m" }],
    )
    .await;
    env.insert("documentContent", vec![content("p")]).await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    s.sync.provenance = true;
    s.target.foreign_key_checks = mode;
    let until = T + 3600;
    run(
        s.clone(),
        RunOptions {
            entities: vec!["vizzes".into(), "commits".into()],
            ..opts(until)
        },
        Default::default(),
    )
    .await
    .expect("run 1");
    let url = &env.target_url;
    assert_eq!(scalar_i64(url, "SELECT COUNT(*) FROM vizzes").await, 3);
    assert_eq!(
        scalar_i64(url, "SELECT COUNT(*) FROM commits WHERE viz_id = 'p'").await,
        1,
        "the commit points at p"
    );
    assert_eq!(
        scalar_i64(url, "SELECT COUNT(*) FROM files WHERE viz_id = 'p'").await,
        1,
        "p's content arrived"
    );
    assert_eq!(
        scalar_i64(url, "SELECT COUNT(*) FROM upvotes WHERE viz_id = 'p'").await,
        1
    );

    let coll = env.db.collection::<Document>("documentInfo");
    coll.insert_one(doc! { "_type": bson::Bson::Null, "id": "p", "lastUpdatedTimestamp": T + 100 })
        .await
        .unwrap();
    let r = run(s.clone(), opts(until), Default::default())
        .await
        .expect("run 2");
    p_went_with_its_actions(url, &r).await;
    assert_eq!(
        scalar_i64(
            url,
            "SELECT COUNT(*) FROM commits WHERE id = 'c1' AND viz_id IS NULL"
        )
        .await,
        1,
        "the commit is kept, its reference set to NULL"
    );
    assert_eq!(dangling_on(url).await, Vec::<String>::new());

    let back = tidemark::commands::rollback::rollback(s.clone(), &r.run_id, false, false)
        .await
        .expect("rollback of run 2");
    assert_eq!(back.tables["vizzes"].restored, 1, "{back:?}");
    assert_eq!(
        scalar_i64(url, "SELECT COUNT(*) FROM vizzes WHERE id = 'p'").await,
        1
    );
    assert_eq!(dangling_on(url).await, Vec::<String>::new());
}

/// A role that may not set `session_replication_role` gets an error naming the key and the
/// grant, before tidemark creates or writes anything; after the grant the run goes through.
#[tokio::test]
async fn a_role_without_the_right_fails_before_any_write() {
    let env = vizzes_env("fkc_role").await;
    let role = format!("{}_role", env.name);
    exec(
        &env.target_url,
        &format!(
            "CREATE ROLE {role} LOGIN NOSUPERUSER; GRANT CREATE, USAGE ON SCHEMA public TO {role};"
        ),
    )
    .await;
    let as_role =
        env.target_url
            .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    assert_ne!(
        as_role,
        env.target_url,
        "admin URL shape: {}",
        pg_admin_url()
    );
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    let s = with(&s, &as_role, ForeignKeyChecks::Tidemark);
    let err = run(s.clone(), opts(T + 3600), Default::default())
        .await
        .expect_err("the role may not turn the checks off");
    let text = format!("{err:#}");
    assert!(
        text.contains("target.foreign_key_checks")
            && text.contains("GRANT SET ON PARAMETER session_replication_role"),
        "{text}"
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'"
        )
        .await,
        0,
        "nothing created"
    );

    exec(
        &env.target_url,
        &format!("GRANT SET ON PARAMETER session_replication_role TO {role}"),
    )
    .await;
    run(s, opts(T + 3600), Default::default())
        .await
        .expect("run after the grant");
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM vizzes").await,
        3
    );
    exec(
        &env.target_url,
        &format!(
            "DROP OWNED BY {role}; REVOKE SET ON PARAMETER session_replication_role FROM {role}; \
             DROP ROLE {role}"
        ),
    )
    .await;
}

/// `tidemark verify` counts rows whose foreign key points at nothing (the check after the
/// fact when PostgreSQL no longer checks tidemark's writes): none after a run, one after a
/// row is slipped in past the checks.
async fn verify_finds_rows_pointing_at_nothing(backend: Backend) {
    let env = vizzes_env_on("fkc_verify", backend).await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    run(s.clone(), opts(T + 3600), Default::default())
        .await
        .expect("run");
    let vopts = || tidemark::commands::verify::VerifyOptions {
        from: chrono::DateTime::from_timestamp(T - 3600, 0)
            .unwrap()
            .to_rfc3339(),
        to: chrono::DateTime::from_timestamp(T + 3600, 0)
            .unwrap()
            .to_rfc3339(),
        entities: vec!["vizzes".into()],
        bucket: std::time::Duration::from_secs(3600),
        limit: 50,
    };
    let clean = tidemark::commands::verify::verify(&s, &vopts())
        .await
        .expect("verify");
    assert!(clean.dangling.is_empty(), "{clean}");
    assert_eq!(clean.differences, 0, "{clean}");

    let slip = "INSERT INTO upvotes (id, viz_id, user_id) VALUES ('nobody-q', 'q', 'nobody')";
    match backend {
        Backend::Postgres => {
            exec(
                &env.target_url,
                &format!("SET session_replication_role = replica; {slip}"),
            )
            .await
        }
        Backend::Sqlite => {
            use sqlx::Connection;
            let mut c = sqlx::SqliteConnection::connect(&env.target_url)
                .await
                .unwrap();
            sqlx::raw_sql(&format!("PRAGMA foreign_keys = OFF; {slip}"))
                .execute(&mut c)
                .await
                .unwrap();
        }
    }
    let found = tidemark::commands::verify::verify(&s, &vopts())
        .await
        .expect("verify");
    assert_eq!(found.dangling.len(), 1, "{found}");
    assert_eq!(
        (found.dangling[0].table.as_str(), found.dangling[0].rows),
        ("upvotes", 1),
        "{found}"
    );
    assert_eq!(
        found.differences, 2,
        "the dangling row, and q differs (its child rows gained one): {found}"
    );
    assert!(found.to_string().contains("point at nothing"), "{found}");
}

#[tokio::test]
async fn verify_finds_rows_pointing_at_nothing_postgres() {
    verify_finds_rows_pointing_at_nothing(Backend::Postgres).await;
}

#[tokio::test]
async fn verify_finds_rows_pointing_at_nothing_sqlite() {
    verify_finds_rows_pointing_at_nothing(Backend::Sqlite).await;
}
