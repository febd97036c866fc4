//! Golden test of the VizHub mapping: fixture legacy documents with the dirt real data has
//! (deleted leftovers, padded/missing titles, emoji, NUL bytes, duplicated ids, unknown enum
//! values, dangling forks, other document types) -> expected rows, on both backends.

use crate::harness::{Backend, Env};
use bson::{doc, Bson, Document};
use tidemark::commands::run::{run, RunOptions};

const T: i64 = 1_700_000_000;

fn viz(id: &str, title: Option<&str>, owner: &str, at: i64) -> Document {
    let mut d = doc! { "id": id, "documentType": "viz", "owner": owner, "createdTimestamp": Bson::Int32((at - 50) as i32),
    "lastUpdatedTimestamp": at, "privacy": "public", "upvotes": [], "collaborators": [] };
    if let Some(t) = title {
        d.insert("title", t);
    }
    d
}

async fn golden(backend: Backend) {
    let mapping = std::fs::read_to_string("config/mappings/vizhub.toml").unwrap();
    let env = Env::new("golden", backend, &mapping).await;
    env.insert(
        "user",
        vec![
            doc! { "id": "u1", "userName": "  Alice ", "fullName": "Alice A", "email": " ALICE@X.ORG ", "createdTimestamp": Bson::Int32((T - 999) as i32) },
            doc! { "id": "u2", "userName": "bob", "fullName": "Bob 🎉", "createdTimestamp": Bson::Double((T - 998) as f64) },
            doc! { "id": "u3", "fullName": "No Name", "createdTimestamp": T - 997 },
        ],
    )
    .await;
    let mut v1 = viz("v1", Some("  Padded  "), "u1", T - 9);
    v1.insert("upvotes", vec![doc! { "userId": "u2", "timestamp": T }]);
    v1.insert("collaborators", vec![doc! { "userId": "u2" }]);
    let mut v4 = viz("v4", Some("📈 Growth"), "u2", T - 6);
    v4.insert("privacy", "private");
    let mut v6 = viz("v6", Some("secret one"), "u1", T - 3);
    v6.insert("privacy", "secret");
    let mut v7 = viz("v7", Some("fork"), "u1", T - 2);
    v7.insert("forkedFrom", "nope");
    let mut folder = viz("f1", Some("a folder"), "u1", T - 1);
    folder.insert("documentType", "folder");
    env.insert(
        "documentInfo",
        vec![
            v1,
            viz("v2", None, "u1", T - 8),
            viz("v3", Some("a\0b"), "u2", T - 7),
            v4,
            viz("v5", Some("first"), "u1", T - 5),
            viz("v5", Some("second"), "u1", T - 4),
            v6,
            v7,
            folder,
            doc! { "_type": Bson::Null, "lastUpdatedTimestamp": T },
        ],
    )
    .await;
    let mut s = env.settings();
    s.sync.start = chrono::DateTime::from_timestamp(T - 3600, 0).unwrap();
    s.sync.overlap = std::time::Duration::ZERO;
    let until = chrono::DateTime::from_timestamp(T + 3600, 0)
        .unwrap()
        .to_rfc3339();

    let r = run(
        s,
        RunOptions {
            until: Some(until),
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .expect("run");

    let v = r
        .entities
        .iter()
        .find(|e| e.entity == "vizzes")
        .unwrap()
        .counts;
    assert_eq!(v.read, 10, "{r}");
    assert_eq!(
        (
            v.written,
            v.duplicates,
            v.dead_lettered,
            v.deleted,
            v.filtered
        ),
        (6, 1, 1, 1, 1),
        "{r}"
    );
    assert_eq!(
        v.written
            + v.unchanged
            + v.duplicates
            + v.dead_lettered
            + v.deleted
            + v.filtered
            + v.deferred,
        v.read
    );
    let rows = query(
        &env.target_url,
        "SELECT id || '|' || title || '|' || owner_id || '|' || privacy || '|' || CAST(upvotes_count AS TEXT) || '|' || \
         COALESCE(forked_from, 'NULL') FROM vizzes ORDER BY id",
    )
    .await;
    assert_eq!(
        rows,
        vec![
            "v1|Padded|u1|public|1|NULL",
            "v2|Untitled|u1|public|0|NULL",
            "v3|ab|u2|public|0|NULL",
            "v4|📈 Growth|u2|private|0|NULL",
            "v5|second|u1|public|0|NULL",
            "v7|fork|u1|public|0|NULL",
        ]
    );
    let users = query(
        &env.target_url,
        "SELECT id || '|' || user_name || '|' || COALESCE(full_name, 'NULL') || '|' || COALESCE(email, 'NULL') FROM users ORDER BY id",
    )
    .await;
    assert_eq!(
        users,
        vec!["u1|alice|Alice A|alice@x.org", "u2|bob|Bob 🎉|NULL"]
    );
    assert_eq!(
        query(
            &env.target_url,
            "SELECT id || '|' || viz_id || '|' || user_id FROM upvotes"
        )
        .await,
        vec!["u2-v1|v1|u2"]
    );
    assert_eq!(
        query(
            &env.target_url,
            "SELECT viz_id || '|' || user_id || '|' || role FROM permissions"
        )
        .await,
        vec!["v1|u2|editor"]
    );
    let dead = query(
        &env.target_url,
        "SELECT entity || ':' || error FROM tidemark_dead_letters ORDER BY entity",
    )
    .await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        dead[0].starts_with("users:") && dead[0].contains("user_name"),
        "{dead:?}"
    );
    assert!(
        dead[1].starts_with("vizzes:") && dead[1].contains("secret"),
        "{dead:?}"
    );
    let missing = query(
        &env.target_url,
        "SELECT column_name || '->' || ref_key FROM tidemark_missing_refs",
    )
    .await;
    assert_eq!(missing, vec!["forked_from->nope"]);
}

async fn query(url: &str, sql: &str) -> Vec<String> {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_all(&mut c).await.unwrap()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_all(&mut c).await.unwrap()
    }
}

#[tokio::test]
async fn vizhub_golden_sqlite() {
    golden(Backend::Sqlite).await;
}

#[tokio::test]
async fn vizhub_golden_postgres() {
    golden(Backend::Postgres).await;
}
