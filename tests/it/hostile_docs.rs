//! Hostile documents: each one becomes a row or a dead letter with its raw document and
//! error, never a panic, never a partial write (no row, no child rows for a dead letter),
//! and the rest of the batch is written.

use crate::harness::{scalar_i64, Backend, Env};
use bson::{doc, Bson, Document, RawDocumentBuf};
use chrono::{TimeZone, Utc};

const MAPPING: &str = r#"
version = "test"
[entities.items]
collection = "items"
time_field = "t"
time_encoding = "date"
table = "items"
primary_key = ["id"]
[entities.items.columns]
id = { path = "_id", type = "bigint", required = true }
t = { path = "t", type = "timestamptz", required = true }
n = { path = "n", type = "integer" }
d = { path = "d", type = "double" }
big = { path = "big", type = "bigint" }
dec = { path = "dec", type = "numeric" }
"when" = { path = "when", type = "timestamptz" }
day = { path = "day", type = "date" }
txt = { path = "txt", type = "text" }
nest = { path = "nest", type = "json" }
[entities.items.children.parts]
path = "parts"
table = "parts"
primary_key = ["item_id", "pos"]
[entities.items.children.parts.columns]
item_id = { parent = "id", type = "bigint" }
pos = { ordinal = true, type = "integer" }
label = { path = "label", type = "text" }
"#;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Row,
    Dead,
}

fn nested(levels: usize) -> Bson {
    let mut v = Bson::String("bottom\0with a NUL".into());
    for i in 0..levels {
        v = if i % 2 == 0 {
            Bson::Document(doc! { "k": v })
        } else {
            Bson::Array(vec![v])
        };
    }
    v
}

/// A document with a string whose bytes are not UTF-8, written as raw BSON by hand.
fn raw_with_bad_string(id: i64, t_ms: i64, field: &str, bytes: &[u8]) -> RawDocumentBuf {
    let mut body = Vec::new();
    body.push(0x12); // int64
    body.extend_from_slice(b"_id\0");
    body.extend_from_slice(&id.to_le_bytes());
    body.push(0x09); // UTC datetime
    body.extend_from_slice(b"t\0");
    body.extend_from_slice(&t_ms.to_le_bytes());
    body.push(0x02); // string
    body.extend_from_slice(field.as_bytes());
    body.push(0);
    body.extend_from_slice(&((bytes.len() + 1) as i32).to_le_bytes());
    body.extend_from_slice(bytes);
    body.push(0);
    let mut out = ((body.len() + 5) as i32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out.push(0);
    RawDocumentBuf::from_bytes(out).expect("outer structure is valid")
}

/// Invalid UTF-8, and an unpaired surrogate (U+D800 as CESU-8 bytes ED A0 80).
const BAD_STRINGS: [(&str, &[u8]); 2] = [
    ("invalid UTF-8", b"ok \xff\xfe bad"),
    ("unpaired surrogate", b"half \xed\xa0\x80 pair"),
];

async fn hostile(backend: Backend) {
    // Arrange
    let mongo = crate::fault_util::Mongod::start();
    let env = Env::new_at(&mongo.uri(), "hostile", backend, MAPPING).await;
    let t0 = Utc
        .with_ymd_and_hms(2022, 5, 1, 0, 0, 0)
        .unwrap()
        .timestamp_millis();
    let at = |i: i64| bson::DateTime::from_millis(t0 + i);
    let big_text = "x".repeat(15 * 1024 * 1024 + 900 * 1024); // ~15.9 MB, just under 16 MiB
    let mut cases: Vec<(&str, Document, Expect)> = vec![
        (
            "plain",
            doc! { "n": 1, "txt": "ok", "parts": [{"label": "a"}] },
            Expect::Row,
        ),
        ("string _id", doc! { "_id": "not-a-number" }, Expect::Dead),
        ("object _id", doc! { "_id": { "x": 1 } }, Expect::Dead),
        (
            "100-level nesting",
            doc! { "nest": nested(100) },
            Expect::Row,
        ),
        // MongoDB stores at most 100 levels; deeper (SecantusDB accepts it) is refused
        // instead of overflowing the stack.
        (
            "150-level nesting",
            doc! { "nest": nested(150) },
            Expect::Dead,
        ),
        ("~16 MB document", doc! { "txt": big_text }, Expect::Row),
        (
            "NUL bytes",
            doc! { "txt": "a\0b\0", "nest": { "k\u{1}": "v\0" }, "parts": [{"label": "\0"}] },
            Expect::Row,
        ),
        ("int out of range", doc! { "n": 1i64 << 40 }, Expect::Dead),
        (
            "int from fractional double",
            doc! { "n": 1.5 },
            Expect::Dead,
        ),
        ("NaN double", doc! { "d": f64::NAN }, Expect::Dead),
        ("infinite double", doc! { "d": f64::INFINITY }, Expect::Dead),
        (
            "bigint from huge double",
            doc! { "big": 1e300 },
            Expect::Dead,
        ),
        (
            "bigint from huge decimal",
            doc! { "big": Bson::Decimal128("1E+40".parse().unwrap()) },
            Expect::Dead,
        ),
        (
            "numeric from NaN decimal",
            doc! { "dec": Bson::Decimal128("NaN".parse().unwrap()) },
            Expect::Dead,
        ),
        (
            "date 1653 (before 1970)",
            doc! { "when": bson::DateTime::from_millis(-10_000_000_000_000), "day": bson::DateTime::from_millis(-1) },
            Expect::Row,
        ),
        (
            "date year 0",
            doc! { "when": bson::DateTime::from_millis(-62_167_219_200_001) },
            Expect::Dead,
        ),
        (
            "date after 9999",
            doc! { "when": bson::DateTime::from_millis(253_402_300_800_000) },
            Expect::Dead,
        ),
        (
            "date i64::MAX",
            doc! { "when": bson::DateTime::MAX },
            Expect::Dead,
        ),
        (
            "date i64::MIN",
            doc! { "day": bson::DateTime::MIN },
            Expect::Dead,
        ),
        ("array for a scalar", doc! { "txt": [1, 2] }, Expect::Dead),
        (
            "object for a scalar",
            doc! { "n": { "v": 1 } },
            Expect::Dead,
        ),
        ("scalar for an array", doc! { "parts": 5 }, Expect::Dead),
        (
            "document for an array",
            doc! { "parts": { "label": "x" } },
            Expect::Dead,
        ),
        (
            "array of scalars for child documents",
            doc! { "parts": [1, "two"] },
            Expect::Dead,
        ),
        (
            "array inside a child element",
            doc! { "nest": 5, "parts": [{"label": ["deep"]}] },
            Expect::Dead,
        ),
    ];
    // (case, source id as dead letters record it, numeric id if it has one, expectation)
    let mut expected: Vec<(String, String, Option<i64>, Expect)> = Vec::new();
    let mut docs = Vec::new();
    for (i, (name, mut d, exp)) in cases.drain(..).enumerate() {
        let id = 100 + i as i64;
        if !d.contains_key("_id") {
            d.insert("_id", id);
        }
        let sid = d.get("_id").unwrap().clone();
        let num = sid.as_i64();
        d.insert("t", at(i as i64));
        expected.push((
            name.to_owned(),
            sid.into_relaxed_extjson().to_string(),
            num,
            exp,
        ));
        docs.push(d);
    }
    let coll = env.db.collection::<Document>("items");
    for d in docs {
        coll.insert_one(d).await.expect("insert");
    }
    // Invalid UTF-8 and a lone surrogate, written byte by byte. SecantusDB refuses them on
    // insert; a server that stores them gets them read back (see `undecodable_strings_...`).
    let raw = env.db.collection::<RawDocumentBuf>("items");
    for (j, (name, bytes)) in BAD_STRINGS.iter().enumerate() {
        let id = 900 + j as i64;
        let r = raw_with_bad_string(id, t0 + 500 + j as i64, "txt", bytes);
        match raw.insert_one(r).await {
            Ok(_) => expected.push((name.to_string(), id.to_string(), Some(id), Expect::Dead)),
            // A server that validates UTF-8 refuses it; then there is nothing to read.
            Err(e) => eprintln!("server refused {name}: {e}"),
        }
    }
    env.index("items", doc! { "t": 1, "_id": 1 }).await;
    let mut s = env.settings();
    s.source.batch_size = 7;

    // Act
    let report = env.run(s.clone()).await.expect("the run completes");
    let again = env.run(s).await.expect("a rerun completes");

    // Assert
    let c = report.entities[0].counts;
    assert_eq!(c.read as usize, expected.len(), "{report}");
    let mut failures = Vec::new();
    for (name, sid, num, exp) in &expected {
        let row = match num {
            Some(id) => {
                scalar_i64(
                    &env.target_url,
                    &format!("SELECT COUNT(*) FROM items WHERE id = {id}"),
                )
                .await
            }
            None => 0,
        };
        let dead = scalar_i64(
            &env.target_url,
            &format!(
                "SELECT COUNT(*) FROM tidemark_dead_letters WHERE entity = 'items' AND source_id = '{}'",
                sid.replace('\'', "''")
            ),
        )
        .await;
        let got = match (row, dead) {
            (1, 0) => Some(Expect::Row),
            (0, 1) => Some(Expect::Dead),
            _ => None,
        };
        if got != Some(*exp) {
            failures.push(format!(
                "{name}: expected {exp:?}, rows {row}, dead letters {dead}"
            ));
        }
        if let (Expect::Dead, Some(id)) = (exp, num) {
            let parts = scalar_i64(
                &env.target_url,
                &format!("SELECT COUNT(*) FROM parts WHERE item_id = {id}"),
            )
            .await;
            if parts != 0 {
                failures.push(format!(
                    "{name}: dead letter left {parts} child rows (partial write)"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let dead_expected = expected.iter().filter(|e| e.3 == Expect::Dead).count() as i64;
    let rows_expected = expected.len() as i64 - dead_expected;
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        rows_expected
    );
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_dead_letters WHERE entity = 'items'"
        )
        .await,
        dead_expected
    );
    // Dead letters keep the raw document (hex when it does not decode) and a readable error.
    assert_eq!(
        scalar_i64(
            &env.target_url,
            "SELECT COUNT(*) FROM tidemark_dead_letters WHERE document = '' OR error = ''"
        )
        .await,
        0
    );
    // The big and deep documents arrived whole; NUL bytes were stripped, not truncated.
    let len = |id: i64, n: usize| {
        format!("SELECT COUNT(*) FROM items WHERE id = {id} AND LENGTH(txt) = {n}")
    };
    assert_eq!(
        scalar_i64(&env.target_url, &len(105, 15 * 1024 * 1024 + 900 * 1024)).await,
        1
    );
    assert_eq!(scalar_i64(&env.target_url, &len(106, 2)).await, 1);
    // The rerun changes nothing and dead-letters the same documents again.
    assert_eq!(again.entities[0].counts.written, 0, "{again}");
}

#[tokio::test]
async fn hostile_documents_sqlite() {
    hostile(Backend::Sqlite).await;
}

#[tokio::test]
async fn hostile_documents_postgres() {
    hostile(Backend::Postgres).await;
}

/// Strings that are not UTF-8 (which a server may store even if SecantusDB refuses them):
/// mapped and written through the same path as a window's batch, they become dead letters
/// whose raw document is kept as hex, next to a good document that is written.
async fn undecodable_strings(backend: Backend) {
    // Arrange
    let mongo = crate::fault_util::Mongod::start();
    let env = Env::new_at(&mongo.uri(), "badutf8", backend, MAPPING).await;
    let s = env.settings();
    let mapping = tidemark::mapping::Mapping::parse(MAPPING, "test").unwrap();
    let source = tidemark::source::Source::connect(&s.source).await.unwrap();
    let sink = tidemark::commands::setup::open_sink(&s, &mapping)
        .await
        .unwrap();
    let t0 = Utc
        .with_ymd_and_hms(2022, 5, 1, 0, 0, 0)
        .unwrap()
        .timestamp_millis();
    let mut docs: Vec<RawDocumentBuf> = BAD_STRINGS
        .iter()
        .enumerate()
        .map(|(j, (_, bytes))| raw_with_bad_string(900 + j as i64, t0, "txt", bytes))
        .collect();
    docs.push(raw_with_bad_string(950, t0, "txt", b"fine"));
    let ctx = tidemark::engine::pipeline::Ctx::new(
        s,
        mapping.clone(),
        source,
        sink,
        "run-utf8".into(),
        Default::default(),
    );
    let e = mapping.entity("items").unwrap();

    // Act
    let counts = tidemark::engine::pipeline::write_docs(&ctx, e, &docs, None, false)
        .await
        .expect("the batch is written");

    // Assert
    assert_eq!((counts.written, counts.dead_lettered), (1, 2), "{counts:?}");
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items").await,
        1
    );
    assert_eq!(
        scalar_i64(&env.target_url, "SELECT COUNT(*) FROM items WHERE id = 950").await,
        1
    );
    let hex_kept = scalar_i64(
        &env.target_url,
        "SELECT COUNT(*) FROM tidemark_dead_letters WHERE document LIKE '%$hex%' AND error LIKE '%txt%'",
    )
    .await;
    assert_eq!(hex_kept, 2, "raw bytes kept as hex, error names the column");
    ctx.sink.close().await;
}

#[tokio::test]
async fn undecodable_strings_are_dead_letters_sqlite() {
    undecodable_strings(Backend::Sqlite).await;
}

#[tokio::test]
async fn undecodable_strings_are_dead_letters_postgres() {
    undecodable_strings(Backend::Postgres).await;
}
