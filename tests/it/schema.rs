//! `migrate` creates the mapped tables, applies additive changes without touching data, and
//! reports (never applies) destructive differences — on both backends.

use crate::harness::{items_mapping, scalar_i64, Backend, Env};
use bson::doc;

async fn additive_and_destructive(backend: Backend) {
    let v1 = items_mapping("epoch_millis");
    let env = Env::new("schema", backend, &v1).await;
    let now = chrono::Utc::now().timestamp_millis();
    env.insert(
        "items",
        (0..10i64)
            .map(|i| doc! { "_id": i, "t": now - 600_000, "v": "x", "w": i })
            .collect(),
    )
    .await;
    env.run(env.settings()).await.expect("run with v1");

    // v2: a new column (additive) and `v` changed from text to bigint (destructive).
    let v2 = v1.replace(
        "v = { path = \"v\", type = \"text\" }",
        "v = { path = \"w\", type = \"bigint\" }\nw2 = { path = \"w\", type = \"integer\" }",
    );
    std::fs::write(&env.mapping_path, &v2).unwrap();
    let s = env.settings();
    let printed = tidemark::commands::migrate::migrate(&s, true)
        .await
        .expect("migrate --print");
    assert!(printed.contains("ADD COLUMN \"w2\""), "{printed}");
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        10,
        "--print changes nothing"
    );

    let out = tidemark::commands::migrate::migrate(&s, false)
        .await
        .expect("migrate");
    assert!(
        out.contains("NOT APPLIED") && out.contains("items.v"),
        "destructive change reported: {out}"
    );
    if backend == Backend::Postgres {
        assert!(
            out.contains("ALTER TABLE \"items\" ALTER COLUMN \"v\" TYPE BIGINT"),
            "{out}"
        );
    }
    // Data untouched, new column present and NULL.
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM items WHERE w2 IS NULL"
        )
        .await,
        10
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items WHERE v = 'x'").await,
        10
    );
}

#[tokio::test]
async fn migrate_sqlite() {
    additive_and_destructive(Backend::Sqlite).await;
}

#[tokio::test]
async fn migrate_postgres() {
    additive_and_destructive(Backend::Postgres).await;
}

/// A target named `name` with the VizHub mapping's schema, migrated once.
async fn vizhub_migrated(name: &str, backend: Backend) -> (Env, tidemark::settings::Settings) {
    let mapping = std::fs::read_to_string("config/mappings/vizhub.toml").unwrap();
    let env = Env::new(name, backend, &mapping).await;
    let s = env.settings();
    tidemark::commands::migrate::migrate(&s, false)
        .await
        .expect("migrate");
    (env, s)
}

/// On SQLite every column a foreign key points from is indexed, unless the table's key starts
/// with it: SQLite searches those columns for every row inserted into the referenced table
/// while a deferred violation is open, and would scan the whole table without them.
#[tokio::test]
async fn reference_indexes_sqlite() {
    let (env, s) = vizhub_migrated("schema_ref_ix", Backend::Sqlite).await;
    let url = &env.target_url;
    let index = |name: &str| {
        format!("SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = '{name}'")
    };
    for (name, want) in [
        ("ix_vizzes_ref_forked_from", 1),
        ("ix_vizzes_ref_owner_id", 1),
        ("ix_commits_ref_viz_id", 1),
        ("ix_commits_ref_parent_commit_id", 1),
        ("ix_analytics_events_ref_viz_id", 1),
        ("ix_upvotes_ref_user_id", 1),
        ("ix_permissions_ref_user_id", 1),
        ("ix_upvotes_parent", 1),
        // viz_contents is keyed by the viz it references; files by its parent link.
        ("ix_viz_contents_ref_viz_id", 0),
        ("ix_files_parent", 0),
    ] {
        assert_eq!(scalar_i64(url, &index(name)).await, want, "{name}");
    }
    let again = tidemark::commands::migrate::migrate(&s, false)
        .await
        .expect("migrate again");
    assert!(again.contains("applied 0 statement"), "{again}");

    // With `target.foreign_key_checks = "tidemark"` nothing searches the reference columns
    // during a load: a new target gets the parent links' indexes only.
    let mut tm = s.clone();
    tm.target.foreign_key_checks = tidemark::settings::ForeignKeyChecks::Tidemark;
    let second = env.second_target().await;
    tm.target.url = tidemark::secret::SecretUri::new(second.clone());
    tidemark::commands::migrate::migrate(&tm, false)
        .await
        .expect("migrate with tidemark's checks");
    let refs = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name LIKE 'ix\\_%\\_ref\\_%' ESCAPE '\\'";
    assert_eq!(scalar_i64(&second, refs).await, 0);
    assert_eq!(
        scalar_i64(url, refs).await,
        9,
        "the first target has all nine"
    );
    assert_eq!(scalar_i64(&second, &index("ix_upvotes_parent")).await, 1);
}

/// Child tables get an index on their link to the parent unless their primary key starts
/// with it, once (a second migrate has nothing to apply); and a table tidemark fills is
/// analyzed once the rows it wrote pass 1,000 (its JSON columns left out), so its key lookups are planned on statistics.
#[tokio::test]
async fn parent_link_indexes_and_statistics_postgres() {
    let (env, s) = vizhub_migrated("schema_parent_ix", Backend::Postgres).await;
    let url = &env.target_url;
    let index = |name: &str| format!("SELECT COUNT(*) FROM pg_indexes WHERE indexname = '{name}'");
    assert_eq!(
        scalar_i64(url, &index("ix_upvotes_parent")).await,
        1,
        "upvotes is keyed by its own id"
    );
    assert_eq!(
        scalar_i64(url, &index("ix_files_parent")).await,
        0,
        "files' key starts with viz_id"
    );
    assert_eq!(scalar_i64(url, &index("ix_permissions_parent")).await, 0);
    assert_eq!(
        scalar_i64(url, &index("ix_vizzes_ref_forked_from")).await,
        0,
        "PostgreSQL gets no reference-column indexes"
    );
    let again = tidemark::commands::migrate::migrate(&s, false)
        .await
        .expect("migrate again");
    assert!(again.contains("applied 0 statement"), "{again}");

    // With a JSON column: no lookup reads it, so tidemark's ANALYZE leaves it out.
    let mapping = format!(
        "{}doc = {{ path = \"$\", type = \"json\" }}\n",
        items_mapping("epoch_millis")
    );
    let items = Env::new("schema_analyze", Backend::Postgres, &mapping).await;
    let now = chrono::Utc::now().timestamp_millis();
    items
        .insert(
            "items",
            (0..1500i64)
                .map(|i| doc! { "_id": i, "t": now - 600_000 + i, "v": "x", "w": i })
                .collect(),
        )
        .await;
    let mut s = items.settings();
    s.source.batch_size = 500;
    items.run(s).await.expect("run");
    // ANALYZE sets reltuples (-1 on a table never analyzed or vacuumed): here when the
    // second batch of 500 took the table to 1,000 rows.
    let tuples = scalar_i64(
        &items.target_url,
        "SELECT reltuples::bigint FROM pg_class WHERE relname = 'items'",
    )
    .await;
    assert!((1000..=1500).contains(&tuples), "reltuples {tuples}");
    let stats = |col: &str| {
        format!("SELECT COUNT(*) FROM pg_stats WHERE tablename = 'items' AND attname = '{col}'")
    };
    assert_eq!(
        scalar_i64(&items.target_url, &stats("id")).await,
        1,
        "the key column has statistics"
    );
    // Autovacuum's own ANALYZE (all columns) may come by within its minute; only when it
    // has not is the JSON column's absence tidemark's doing.
    let auto = scalar_i64(
        &items.target_url,
        "SELECT autoanalyze_count FROM pg_stat_user_tables WHERE relname = 'items'",
    )
    .await;
    if auto == 0 {
        assert_eq!(
            scalar_i64(&items.target_url, &stats("doc")).await,
            0,
            "the JSON column is not analyzed"
        );
    } else {
        println!(
            "autovacuum analyzed items meanwhile: the JSON column's statistics are not checked"
        );
    }
}

/// A first load goes into PostgreSQL as binary `COPY` (tidemark's own encoder); an update goes
/// through `INSERT … UNNEST … ON CONFLICT` (the driver's encoders). Both must store the same
/// values for every type the encoder handles: edge values, NULLs, a timestamp before 2000
/// (negative in PostgreSQL's epoch), unicode, nested JSON; and a batch of rows larger than
/// one piece of COPY data.
#[tokio::test]
async fn copy_and_upsert_store_the_same_values_postgres() {
    let mapping = r#"
version = "test"
[entities.items]
collection = "items"
time_field = "t"
time_encoding = "epoch_millis"
table = "items"
primary_key = ["id"]
[entities.items.columns]
id = { path = "_id", type = "bigint", required = true }
updated = { path = "t", type = "timestamptz", from = "epoch_millis", required = true }
at = { path = "at", type = "timestamptz" }
i = { path = "i", type = "integer" }
l = { path = "l", type = "bigint" }
d = { path = "d", type = "double" }
b = { path = "b", type = "boolean" }
s = { path = "s", type = "text" }
doc = { path = "$", type = "json" }
"#;
    let env = Env::new("schema_copy", Backend::Postgres, mapping).await;
    let now = chrono::Utc::now().timestamp_millis() - 600_000;
    let version = |t: i64, s: &str| -> Vec<bson::Document> {
        vec![
            doc! { "_id": 1i64, "t": t, "at": bson::DateTime::from_millis(946_684_799_123), "i": i32::MIN,
            "l": i64::MAX, "d": -0.1, "b": true, "s": s, "nested": { "z": [1, { "y": null }], "a": "é\"\\" } },
            doc! { "_id": 2i64, "t": t, "at": bson::DateTime::from_millis(253_402_300_799_999), "i": 7,
            "l": -1i64, "d": 1e300, "b": false, "s": "" },
            doc! { "_id": 3i64, "t": t },
        ]
        .into_iter()
        // Rows worth ~4 MB, so the COPY data goes out in several pieces.
        .chain((4..44i64).map(|id| {
            let big: String = (0..100_000).map(|k| char::from(b'a' + ((k + id as usize) % 26) as u8)).collect();
            doc! { "_id": id, "t": t, "s": format!("{s} {id} {big}"), "l": id }
        }))
        .collect()
    };
    env.insert("items", version(now, "first")).await;
    env.run(env.settings()).await.expect("first load");
    // The same documents changed: the second run upserts them.
    env.db
        .collection::<bson::Document>("items")
        .drop()
        .await
        .unwrap();
    env.insert("items", version(now + 1000, "😀 second")).await;
    env.run(env.settings()).await.expect("update");

    // A fresh target loads the final versions directly (COPY).
    let mut s = env.settings();
    s.target.url = tidemark::secret::SecretUri::new(env.second_target().await);
    let fresh = s.target.url.expose().to_owned();
    env.run(s).await.expect("first load of the final versions");
    let upserted = env.dump(&env.target_url, "items").await;
    assert_eq!(upserted.len(), 43);
    assert!(upserted[0].contains("😀 second"), "{upserted:?}");
    assert_eq!(env.dump(&fresh, "items").await, upserted);
}
