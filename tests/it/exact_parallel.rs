//! `tidemark backfill --parallel N`: chunks in flight at once give exactly what one chunk
//! after another gives, although they pull the same references on demand (a reference
//! one chunk fetched but has not committed yet is not taken as present by another).

use crate::harness::{Backend, Env};
use bson::{doc, Bson, Document};
use chrono::{TimeZone, Utc};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tidemark::commands::backfill::{backfill, BackfillOptions};
use tidemark::settings::ForeignKeyChecks;

const MAPPING: &str = r#"
version = "parallel-1"
[entities.accounts]
collection = "accounts"
id_field = "accountId"
time_field = "updatedAt"
time_encoding = "date"
table = "accounts"
primary_key = ["account_id"]
[entities.accounts.columns]
account_id = { path = "accountId", type = "text", required = true }
name = { path = "name", type = "text" }

[entities.projects]
collection = "projects"
id_field = "projectId"
time_field = "updatedAt"
time_encoding = "date"
table = "projects"
primary_key = ["project_id"]
[entities.projects.columns]
project_id = { path = "projectId", type = "text", required = true }
lead = { path = "lead", type = "text", references = "accounts" }

[entities.studies]
collection = "studies"
id_field = "studyId"
time_field = "updatedAt"
time_encoding = "date"
table = "studies"
primary_key = ["study_id"]
[entities.studies.columns]
study_id = { path = "studyId", type = "text", required = true }
project_id = { path = "projectId", type = "text", references = "projects" }
updated_at = { path = "updatedAt", type = "timestamptz", required = true }
[entities.studies.children.members]
path = "members"
table = "members"
primary_key = ["study_id", "position"]
[entities.studies.children.members.columns]
study_id = { parent = "study_id", type = "text" }
position = { ordinal = true, type = "integer" }
account_id = { path = "account", type = "text", references = "accounts" }
"#;

const TABLES: [&str; 4] = ["accounts", "projects", "studies", "members"];

async fn seed(env: &Env) {
    let old = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    let accounts = (0..40)
        .map(|i| doc! { "accountId": format!("a{i:02}"), "name": format!("acc {i}"), "updatedAt": bson::DateTime::from_chrono(old) })
        .collect();
    env.insert("accounts", accounts).await;
    let projects = (0..12)
        .map(|i| doc! { "projectId": format!("p{i:02}"), "lead": format!("a{:02}", (i * 7) % 40), "updatedAt": bson::DateTime::from_chrono(old) })
        .collect();
    env.insert("projects", projects).await;
    let start = Utc.with_ymd_and_hms(2024, 5, 1, 0, 0, 0).unwrap();
    let studies: Vec<Document> = (0..480i64)
        .map(|i| {
            let members: Vec<Bson> = (0..3)
                .map(|m| {
                    Bson::Document(doc! { "account": format!("a{:02}", (i * 13 + m * 17) % 40) })
                })
                .collect();
            doc! {
                "studyId": format!("s{i:04}"),
                "projectId": format!("p{:02}", (i * 5) % 12),
                "members": members,
                "updatedAt": bson::DateTime::from_chrono(start + chrono::Duration::minutes(i * 6)),
            }
        })
        .collect();
    env.insert("studies", studies).await;
    env.index("studies", doc! { "updatedAt": 1, "_id": 1 })
        .await;
}

async fn run_backfill(env: &Env, url: &str, parallel: usize, fk: ForeignKeyChecks) {
    let mut s = env.settings();
    s.target.url = tidemark::secret::SecretUri::new(url.to_owned());
    s.source.batch_size = 7;
    s.target.foreign_key_checks = fk;
    let opts = BackfillOptions {
        from: Some("2024-05-01T00:00:00Z".into()),
        to: Some("2024-05-03T00:00:00Z".into()),
        entities: vec!["studies".into()],
        chunk: tidemark::engine::window::ChunkBy::Duration(std::time::Duration::from_secs(
            2 * 3600,
        )),
        parallel,
        resume: None,
    };
    let r = backfill(s, opts, Arc::new(AtomicBool::new(false))).await;
    if let Err(e) = &r {
        panic!("backfill --parallel {parallel} into {url} failed: {e:#}");
    }
}

async fn parallel_equals_serial(backend: Backend, fk: ForeignKeyChecks) {
    let env = Env::new("parallel", backend, MAPPING).await;
    seed(&env).await;
    let serial = env.second_target().await;
    run_backfill(&env, &serial, 1, fk).await;
    run_backfill(&env, &env.target_url, 4, fk).await;
    for t in TABLES {
        let want = env.dump(&serial, t).await;
        assert!(!want.is_empty(), "{t} is empty");
        assert_eq!(
            env.dump(&env.target_url, t).await,
            want,
            "table {t} after --parallel 4"
        );
    }
}

#[tokio::test]
async fn parallel_backfill_pulls_references_exactly_postgres() {
    parallel_equals_serial(Backend::Postgres, ForeignKeyChecks::Database).await;
}

#[tokio::test]
async fn parallel_backfill_pulls_references_exactly_sqlite() {
    parallel_equals_serial(Backend::Sqlite, ForeignKeyChecks::Database).await;
}

#[tokio::test]
async fn parallel_backfill_pulls_references_exactly_tidemark_checks_postgres() {
    parallel_equals_serial(Backend::Postgres, ForeignKeyChecks::Tidemark).await;
}
