//! Test environment: every test gets its own MongoDB database and its own target
//! (a fresh PostgreSQL database or a temporary SQLite file), against real servers.

use bson::Document;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use tidemark::commands::run::{RunOptions, RunReport};
use tidemark::secret::SecretUri;
use tidemark::settings::Settings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn mongo_uri() -> String {
    std::env::var("MONGO_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into())
}

pub fn pg_admin_url() -> String {
    std::env::var("TIDEMARK_TEST_PG_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "tm_{}_{}_{}",
        name,
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst) + rand_suffix()
    )
}

fn rand_suffix() -> u32 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 100_000)
        * 10
}

/// One isolated source database + target.
pub struct Env {
    pub name: String,
    /// The MongoDB server of this environment (the shared one unless `new_at` named another).
    pub mongo: String,
    pub backend: Backend,
    pub db: mongodb::Database,
    pub target_url: String,
    pub dir: tempfile::TempDir,
    pub mapping_path: PathBuf,
}

impl Env {
    pub async fn new(name: &str, backend: Backend, mapping: &str) -> Env {
        Self::new_at(&mongo_uri(), name, backend, mapping).await
    }

    /// Like `new`, on the MongoDB server at `mongo` (a private instance for fault tests).
    pub async fn new_at(mongo: &str, name: &str, backend: Backend, mapping: &str) -> Env {
        let name = unique(name);
        let client = mongodb::Client::with_uri_str(mongo)
            .await
            .expect("mongo client");
        let db = client.database(&name);
        let dir = tempfile::tempdir().unwrap();
        let target_url = match backend {
            Backend::Sqlite => format!("sqlite://{}/target.db", dir.path().display()),
            Backend::Postgres => create_pg_db(&name).await,
        };
        let mapping_path = dir.path().join("mapping.toml");
        std::fs::write(&mapping_path, mapping).unwrap();
        Env {
            name,
            mongo: mongo.to_owned(),
            backend,
            db,
            target_url,
            dir,
            mapping_path,
        }
    }

    /// A fresh, empty target of the same backend (for comparisons).
    pub async fn second_target(&self) -> String {
        match self.backend {
            Backend::Sqlite => format!("sqlite://{}/second.db", self.dir.path().display()),
            Backend::Postgres => create_pg_db(&format!("{}_b", self.name)).await,
        }
    }

    pub fn settings(&self) -> Settings {
        let mut s = Settings::load(None).expect("default settings");
        s.source.uri = SecretUri::new(self.mongo.clone());
        s.source.database = self.name.clone();
        s.source.batch_size = 500;
        s.target.url = SecretUri::new(self.target_url.clone());
        s.sync.mapping = self.mapping_path.clone();
        s.sync.start = "2019-01-01T00:00:00Z".parse().unwrap();
        s.sync.settle = std::time::Duration::ZERO;
        s.sync.overlap = std::time::Duration::from_secs(3600);
        s.state_dir = self.dir.path().to_path_buf();
        s
    }

    /// Environment variables that make the binary use this environment.
    pub fn env_vars(&self, target: &str) -> Vec<(String, String)> {
        vec![
            ("TIDEMARK__SOURCE__URI".into(), self.mongo.clone()),
            ("TIDEMARK__SOURCE__DATABASE".into(), self.name.clone()),
            ("TIDEMARK__SOURCE__BATCH_SIZE".into(), "500".into()),
            ("TIDEMARK__TARGET__URL".into(), target.into()),
            (
                "TIDEMARK__SYNC__MAPPING".into(),
                self.mapping_path.display().to_string(),
            ),
            (
                "TIDEMARK__SYNC__START".into(),
                "2019-01-01T00:00:00Z".into(),
            ),
            ("TIDEMARK__SYNC__SETTLE".into(), "0s".into()),
            (
                "TIDEMARK__STATE_DIR".into(),
                self.dir.path().display().to_string(),
            ),
            ("TIDEMARK__LOG__FORMAT".into(), "json".into()),
        ]
    }

    pub async fn insert(&self, coll: &str, docs: Vec<Document>) {
        for chunk in docs.chunks(5000) {
            self.db
                .collection::<Document>(coll)
                .insert_many(chunk.to_vec())
                .await
                .expect("insert");
        }
    }

    pub async fn index(&self, coll: &str, keys: Document) {
        let model = mongodb::IndexModel::builder().keys(keys).build();
        self.db
            .collection::<Document>(coll)
            .create_index(model)
            .await
            .expect("create index");
    }

    pub async fn run(&self, s: Settings) -> anyhow::Result<RunReport> {
        tidemark::commands::run::run(s, RunOptions::default(), Arc::new(AtomicBool::new(false)))
            .await
    }

    /// Every row of `table`, as text, sorted: equal dumps mean identical tables.
    pub async fn dump(&self, url: &str, table: &str) -> Vec<String> {
        dump(url, table).await
    }
}

/// A test that passed leaves nothing behind: its source database on the shared server and
/// its PostgreSQL databases are dropped (services persist between sessions). A failing test
/// keeps them for inspection and says where they are.
impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "kept for inspection: source database {} on {}, target {}",
                self.name, self.mongo, self.target_url
            );
            return;
        }
        let name = self.name.clone();
        let shared_source = self.mongo == mongo_uri();
        let mongo = self.mongo.clone();
        let pg = self.backend == Backend::Postgres;
        // Drop runs inside the test's runtime, which cannot be blocked on: clean up from a
        // thread with its own.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // A client of this runtime: the test's own is served by the runtime this
                // drop is blocking.
                if shared_source {
                    if let Ok(c) = mongodb::Client::with_uri_str(&mongo).await {
                        let _ = c.database(&name).drop().await;
                    }
                }
                if pg {
                    use sqlx::Connection;
                    if let Ok(mut c) = sqlx::PgConnection::connect(&pg_admin_url()).await {
                        for n in [name.clone(), format!("{name}_b")] {
                            let _ = sqlx::query(&format!(
                                "DROP DATABASE IF EXISTS \"{n}\" WITH (FORCE)"
                            ))
                            .execute(&mut c)
                            .await;
                        }
                    }
                }
            });
        })
        .join()
        .ok();
    }
}

async fn create_pg_db(name: &str) -> String {
    use sqlx::Connection;
    let admin = pg_admin_url();
    let mut c = sqlx::PgConnection::connect(&admin)
        .await
        .expect("postgres reachable at TIDEMARK_TEST_PG_URL");
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\""))
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut c)
        .await
        .unwrap();
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_owned())
        .unwrap_or(admin.clone());
    format!("{base}/{name}")
}

pub async fn dump(url: &str, table: &str) -> Vec<String> {
    use sqlx::{Connection, Row};
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        let cols: Vec<String> =
            sqlx::query(&format!("SELECT name FROM pragma_table_info('{table}')"))
                .fetch_all(&mut c)
                .await
                .unwrap()
                .iter()
                .map(|r| format!("quote(\"{}\")", r.get::<String, _>(0)))
                .collect();
        let sql = format!(
            "SELECT {} FROM \"{table}\" ORDER BY 1",
            cols.join(" || '|' || ")
        );
        sqlx::query_scalar(&sql).fetch_all(&mut c).await.unwrap()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(&format!("SELECT t::text FROM \"{table}\" t ORDER BY 1"))
            .fetch_all(&mut c)
            .await
            .unwrap()
    }
}

pub async fn scalar_i64(url: &str, sql: &str) -> i64 {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
    }
}

/// A one-entity mapping over collection `items` with the given time encoding.
pub fn items_mapping(encoding: &str) -> String {
    let from = match encoding {
        "date" => "date",
        "epoch_seconds" => "epoch_seconds",
        "epoch_millis" => "epoch_millis",
        _ => "iso8601",
    };
    format!(
        r#"
version = "test"
[entities.items]
collection = "items"
time_field = "t"
time_encoding = "{encoding}"
table = "items"
primary_key = ["id"]
[entities.items.columns]
id = {{ path = "_id", type = "bigint", required = true }}
t = {{ path = "t", type = "timestamptz", from = "{from}", required = true }}
v = {{ path = "v", type = "text" }}
"#
    )
}

/// Row count of `table`, or None while it does not exist yet / the target is busy.
pub async fn try_count(url: &str, table: &str) -> Option<i64> {
    use sqlx::Connection;
    let sql = format!("SELECT COUNT(*) FROM \"{table}\"");
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.ok()?;
        sqlx::query_scalar(&sql).fetch_one(&mut c).await.ok()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.ok()?;
        sqlx::query_scalar(&sql).fetch_one(&mut c).await.ok()
    }
}

/// Wait (up to 60 s) until a run has committed rows into `table`: kills and cuts then land
/// mid-run however slow the machine is, instead of after a fixed sleep.
pub async fn wait_rows(url: &str, table: &str) -> i64 {
    for _ in 0..1200 {
        if let Some(n) = try_count(url, table).await {
            if n > 0 {
                return n;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    0
}
