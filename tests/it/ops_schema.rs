//! `tidemark schema`: the diagrams name every table and reference of a mapping, the SQL is
//! exactly what `migrate` creates (run against fresh targets of both backends), the
//! checked-in VizHub diagram is the current output, and bad arguments are clap errors.

use crate::harness::{Backend, Env};
use std::path::{Path, PathBuf};
use std::process::Command;
use tidemark::mapping::diagram::Schema;
use tidemark::mapping::Mapping;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn vizhub() -> Mapping {
    Mapping::load(&repo("config/mappings/vizhub.toml")).expect("the VizHub mapping compiles")
}

/// `tidemark schema ARGS` (no settings file; the defaults name the VizHub mapping).
fn schema_cmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .arg("schema")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("TIDEMARK_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("tidemark runs")
}

fn stdout_ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every table of `m` and every reference (table, column, referenced table).
fn tables_and_references(m: &Mapping) -> (Vec<String>, Vec<(String, String, String)>) {
    let mut tables = Vec::new();
    let mut refs = Vec::new();
    for e in &m.entities {
        let all = std::iter::once((&e.table, &e.columns))
            .chain(e.children.iter().map(|c| (&c.table, &c.columns)));
        for (t, cols) in all {
            tables.push(t.clone());
            for c in cols {
                if let Some(r) = &c.references {
                    let to = m.entity(r).unwrap().table.clone();
                    refs.push((t.clone(), c.name.clone(), to));
                }
            }
        }
    }
    (tables, refs)
}

#[test]
fn ops_schema_vizhub_diagrams_name_every_table_and_reference() {
    let m = vizhub();
    let (tables, refs) = tables_and_references(&m);
    assert_eq!(tables.len(), 8, "{tables:?}");
    assert!(refs.len() >= 9, "{refs:?}");
    let mermaid = stdout_ok(schema_cmd(&["--mapping", "config/mappings/vizhub.toml"]));
    let dot = stdout_ok(schema_cmd(&["--format", "dot"]));
    for e in &m.entities {
        assert!(
            mermaid.contains(&format!(
                "{}[\"{}: collection {}\"]",
                e.table, e.table, e.collection
            )),
            "mermaid lacks table {} from {}:\n{mermaid}",
            e.table,
            e.collection
        );
        assert!(
            dot.contains(&format!("collection {}", e.collection)),
            "{dot}"
        );
        for c in &e.children {
            assert!(
                mermaid.contains(&format!(
                    "    {} }}o--|| {} : \"child {}",
                    c.table, e.table, c.name
                )),
                "mermaid lacks the parent link of {}:\n{mermaid}",
                c.table
            );
        }
    }
    for t in &tables {
        assert!(dot.contains(&format!("  {t} [label=<")), "dot lacks {t}");
    }
    for (from, col, to) in &refs {
        assert!(
            mermaid
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{from} }}o--"))
                    && l.contains(&format!(" {to} : \"{col} (on_missing"))),
            "mermaid lacks {from}.{col} -> {to}:\n{mermaid}"
        );
        assert!(
            dot.contains(&format!("{from}:{col}_out:e -> {to}:")),
            "dot lacks {from}.{col} -> {to}"
        );
    }
}

/// The checked-in diagram sources are the current output (regenerate with the commands in
/// docs/MAPPING.md, "Schema diagram"), so the doc cannot go stale.
#[test]
fn ops_schema_checked_in_vizhub_diagram_is_current() {
    let s = Schema::of(&vizhub());
    for (file, now) in [
        ("docs/schema-vizhub.mmd", s.mermaid()),
        ("docs/schema-vizhub.dot", s.dot()),
    ] {
        let stored = std::fs::read_to_string(repo(file)).unwrap_or_default();
        assert!(
            stored == now,
            "{file} is stale: regenerate it with `tidemark schema --mapping config/mappings/vizhub.toml --format {}` \
             (and the SVG with `dot -Tsvg`, docs/MAPPING.md)",
            if file.ends_with("mmd") { "mermaid" } else { "dot" }
        );
    }
    let svg =
        std::fs::read_to_string(repo("docs/schema-vizhub.svg")).expect("docs/schema-vizhub.svg");
    for t in tables_and_references(&vizhub()).0 {
        assert!(svg.contains(&format!(">{t}<")), "the SVG lacks table {t}");
    }
}

/// Tables and their columns (name and type) of a target, without tidemark's own.
async fn mapped_tables(url: &str) -> Vec<(String, Vec<String>)> {
    use sqlx::{Connection, Row};
    let mut out = Vec::new();
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
             AND name NOT LIKE 'tidemark_%' AND name <> '_sqlx_migrations' ORDER BY name",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        for t in names {
            let cols = sqlx::query(&format!(
                "SELECT name, type, pk FROM pragma_table_info('{t}')"
            ))
            .fetch_all(&mut c)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{} {} pk{}",
                    r.get::<String, _>(0),
                    r.get::<String, _>(1),
                    r.get::<i64, _>(2)
                )
            })
            .collect();
            out.push((t, cols));
        }
        let idx: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name NOT LIKE 'tidemark_%' ORDER BY name",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        out.push(("(indexes)".into(), idx));
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' \
             AND tablename NOT LIKE 'tidemark_%' AND tablename <> '_sqlx_migrations' ORDER BY 1",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        for t in names {
            let cols = sqlx::query(
                "SELECT column_name::text, data_type::text, is_nullable::text FROM information_schema.columns \
                 WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
            )
            .bind(&t)
            .fetch_all(&mut c)
            .await
            .unwrap()
            .iter()
            .map(|r| format!("{} {} {}", r.get::<String, _>(0), r.get::<String, _>(1), r.get::<String, _>(2)))
            .collect();
            out.push((t, cols));
        }
        let cons: Vec<String> = sqlx::query_scalar(
            "SELECT conname::text || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text NOT LIKE 'tidemark_%' \
             AND conrelid::regclass::text <> '_sqlx_migrations' ORDER BY 1",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        out.push(("(constraints)".into(), cons));
        let idx: Vec<String> = sqlx::query_scalar(
            "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public' \
             AND tablename NOT LIKE 'tidemark_%' AND tablename <> '_sqlx_migrations' ORDER BY 1",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        out.push(("(indexes)".into(), idx));
    }
    out
}

async fn run_script(url: &str, script: &str) {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(&format!("{url}?mode=rwc"))
            .await
            .unwrap();
        sqlx::raw_sql(script).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(script).execute(&mut c).await.unwrap();
    }
}

/// `schema --format sql` run on a fresh target creates exactly the tables, columns, keys and
/// indexes `tidemark migrate` creates on another fresh one.
async fn sql_creates_what_migrate_creates(backend: Backend, mapping: &str) {
    let env = Env::new("schema_sql", backend, mapping).await;
    let dialect = if backend == Backend::Sqlite {
        "sqlite"
    } else {
        "postgres"
    };
    let script = stdout_ok(schema_cmd(&[
        "--mapping",
        env.mapping_path.to_str().unwrap(),
        "--format",
        "sql",
        "--dialect",
        dialect,
    ]));
    let fresh = env.second_target().await;
    run_script(&fresh, &script).await;
    tidemark::commands::migrate::migrate(&env.settings(), false)
        .await
        .expect("migrate");
    let (by_script, by_migrate) = (
        mapped_tables(&fresh).await,
        mapped_tables(&env.target_url).await,
    );
    assert!(by_migrate.len() > 2, "{by_migrate:?}");
    assert_eq!(by_script, by_migrate, "script:\n{script}");
}

#[tokio::test]
async fn ops_schema_sql_creates_what_migrate_creates_sqlite() {
    let text = std::fs::read_to_string(repo("config/mappings/vizhub.toml")).unwrap();
    sql_creates_what_migrate_creates(Backend::Sqlite, &text).await;
}

#[tokio::test]
async fn ops_schema_sql_creates_what_migrate_creates_postgres() {
    let text = std::fs::read_to_string(repo("config/mappings/vizhub.toml")).unwrap();
    sql_creates_what_migrate_creates(Backend::Postgres, &text).await;
}

/// A shape unlike VizHub: a numeric key, a composite child key, a child column referencing a
/// third entity keyed by a UUID, a reference to an entity whose key column is not its whole
/// primary key (no foreign key is declared for it).
const SHOP: &str = r#"
version = "shop-1"
[entities.warehouses]
collection = "depots"
id_field = "uid"
time_field = "t"
time_encoding = "date"
table = "warehouses"
primary_key = ["uid"]
[entities.warehouses.columns]
uid = { path = "uid", type = "uuid", required = true }
city = { path = "city", type = "text" }

[entities.skus]
collection = "catalog"
id_field = "code"
time_field = "t"
time_encoding = "epoch_millis"
table = "skus"
primary_key = ["code", "region"]
[entities.skus.columns]
code = { path = "code", type = "text", required = true }
region = { value = "eu", type = "text" }

[entities.orders]
collection = "orders"
time_field = "placedAt"
time_encoding = "iso8601"
table = "orders"
primary_key = ["order_no"]
[entities.orders.columns]
order_no = { path = "_id", type = "bigint", required = true }
placed_at = { path = "placedAt", type = "timestamptz", from = "iso8601", required = true }
[entities.orders.children.lines]
path = "items"
table = "order_lines"
primary_key = ["order_no", "line"]
[entities.orders.children.lines.columns]
order_no = { parent = "order_no", type = "bigint" }
line = { ordinal = true, type = "integer" }
ships_from = { path = "depot", type = "uuid", required = true, references = "warehouses", on_missing = "skip" }
sku = { path = "sku", type = "text", references = "skus", on_missing = "null" }
qty = { path = "qty", type = "numeric" }
"#;

#[tokio::test]
async fn ops_schema_unfamiliar_mapping_renders_correctly() {
    let env = Env::new("schema_shop", Backend::Sqlite, SHOP).await;
    let path = env.mapping_path.to_str().unwrap().to_owned();
    let mermaid = stdout_ok(schema_cmd(&["--mapping", &path]));
    for line in [
        "    warehouses[\"warehouses: collection depots\"] {",
        "        uuid uid PK",
        "    order_lines[\"order_lines: array orders.items\"] {",
        "        bigint order_no PK, FK \"parent orders.order_no\"",
        "        uuid ships_from FK \"references warehouses.uid, on_missing skip\"",
        "        text sku FK \"references skus.code, on_missing null, no FK\"",
        "        numeric qty",
        "    order_lines }o--|| orders : \"child lines (items)\"",
        "    order_lines }o--|| warehouses : \"ships_from (on_missing skip)\"",
        "    order_lines }o--o| skus : \"sku (on_missing null, no FK)\"",
    ] {
        assert!(
            mermaid.lines().any(|l| l == line),
            "missing `{line}` in:\n{mermaid}"
        );
    }
    let dot = stdout_ok(schema_cmd(&["--mapping", &path, "--format", "dot"]));
    assert!(
        dot.contains("order_lines:sku_out:e -> skus:code_in:w [style=dashed"),
        "{dot}"
    );
    assert!(
        dot.contains("order_lines:ships_from_out:e -> warehouses:uid_in:w [style=solid"),
        "{dot}"
    );
    let pg = stdout_ok(schema_cmd(&[
        "--mapping",
        &path,
        "--format",
        "sql",
        "--dialect",
        "postgres",
    ]));
    assert!(pg.contains("\"uid\" UUID NOT NULL"), "{pg}");
    assert!(
        pg.contains("ALTER TABLE \"order_lines\" ADD CONSTRAINT \"fk_order_lines_ships_from\" FOREIGN KEY (\"ships_from\") REFERENCES \"warehouses\" (\"uid\")"),
        "{pg}"
    );
    assert!(
        !pg.contains("fk_order_lines_sku"),
        "no FK to a partial key: {pg}"
    );
    // And it runs: the SQLite script against a fresh file gives what migrate gives.
    drop(env);
    sql_creates_what_migrate_creates(Backend::Sqlite, SHOP).await;
}

#[test]
fn ops_schema_bad_arguments_are_clear_errors() {
    let out = schema_cmd(&["--format", "png"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("invalid value 'png'") && err.contains("mermaid, dot, sql"),
        "{err}"
    );
    let out = schema_cmd(&["--dialect", "sqlite"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("--dialect applies to --format sql"), "{err}");
    let out = schema_cmd(&["--mapping", "no/such.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("no/such.toml"), "{err}");
}
