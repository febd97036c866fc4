//! The mapping of arbitrary BSON documents, at scale: any document, through every entity of
//! the VizHub mapping and a mapping with every column type, is a row, a deletion, filtered
//! or a dead letter (never a panic, every document accounted for), and a dead letter's raw
//! document always renders. TIDEMARK_FUZZ_CASES sets the number of cases (default 256;
//! scripts/soak.sh runs many more). A failure prints a minimal document; keep it as a
//! regression case in `regressions()` below.

use bson::{Bson, Document, RawDocumentBuf};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tidemark::mapping::Mapping;

const TYPES: &str = r#"
version = "fuzz"
[entities.items]
collection = "items"
time_field = "t"
time_encoding = "epoch_seconds"
table = "items"
primary_key = ["id"]
[entities.items.deleted]
when = 'has(doc._type) && doc._type == null'
action = "delete"
[entities.items.columns]
id = { path = "_id", type = "text", required = true }
n = { path = "n", type = "integer" }
b = { path = "b", type = "bigint" }
d = { path = "d", type = "double" }
f = { path = "f", type = "boolean" }
ts = { path = "t", type = "timestamptz", from = "epoch_seconds" }
ms = { path = "ms", type = "timestamptz", from = "epoch_millis" }
iso = { path = "iso", type = "timestamptz", from = "iso8601" }
j = { path = "j", type = "json" }
dec = { path = "dec", type = "numeric" }
day = { path = "day", type = "date" }
u = { path = "u", type = "uuid" }
deep = { path = "j.a.0.b", type = "text" }
rest = { remainder = true, type = "json" }
[entities.items.children.parts]
path = "parts"
table = "parts"
primary_key = ["item_id", "pos"]
[entities.items.children.parts.columns]
item_id = { parent = "id", type = "text" }
pos = { ordinal = true, type = "integer" }
label = { path = "label", type = "text" }
"#;

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("_id".to_string()),
        Just("id".to_string()),
        Just("t".to_string()),
        Just("n".to_string()),
        Just("j".to_string()),
        Just("parts".to_string()),
        Just("_type".to_string()),
        Just("owner".to_string()),
        Just("upvotes".to_string()),
        Just("files".to_string()),
        Just("lastUpdatedTimestamp".to_string()),
        Just("createdTimestamp".to_string()),
        Just("timestamp".to_string()),
        "[a-z]{1,4}",
        "\\PC{0,6}",
    ]
}

fn leaf() -> impl Strategy<Value = Bson> {
    prop_oneof![
        Just(Bson::Null),
        Just(Bson::Undefined),
        Just(Bson::MinKey),
        Just(Bson::MaxKey),
        any::<bool>().prop_map(Bson::Boolean),
        any::<i32>().prop_map(Bson::Int32),
        any::<i64>().prop_map(Bson::Int64),
        any::<f64>().prop_map(Bson::Double),
        prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-0.0), Just(1e300)]
            .prop_map(Bson::Double),
        "\\PC{0,16}".prop_map(Bson::String),
        "[\\x00-\\x7f]{0,8}".prop_map(Bson::String),
        any::<i64>().prop_map(|ms| Bson::DateTime(bson::DateTime::from_millis(ms))),
        any::<[u8; 12]>().prop_map(|b| Bson::ObjectId(bson::oid::ObjectId::from_bytes(b))),
        any::<[u8; 16]>().prop_map(|b| Bson::Decimal128(bson::Decimal128::from_bytes(b))),
        prop::collection::vec(any::<u8>(), 0..20).prop_map(|bytes| Bson::Binary(bson::Binary {
            subtype: if bytes.len() == 16 {
                bson::spec::BinarySubtype::Uuid
            } else {
                bson::spec::BinarySubtype::Generic
            },
            bytes
        })),
        (any::<u32>(), any::<u32>())
            .prop_map(|(time, increment)| Bson::Timestamp(bson::Timestamp { time, increment })),
        Just(Bson::RegularExpression(bson::Regex {
            pattern: "a.*".into(),
            options: "i".into()
        })),
        Just(Bson::JavaScriptCode("function(){}".into())),
        Just(Bson::String("2021-02-03T04:05:06Z".into())),
        Just(Bson::String("2021-02-03".into())),
        Just(Bson::String("123e4567-e89b-12d3-a456-426614174000".into())),
    ]
}

fn value() -> impl Strategy<Value = Bson> {
    leaf().prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Bson::Array),
            prop::collection::vec((key(), inner), 0..5)
                .prop_map(|kv| Bson::Document(kv.into_iter().collect())),
        ]
    })
}

fn document() -> impl Strategy<Value = Document> {
    prop::collection::vec((key(), value()), 0..10).prop_map(|kv| kv.into_iter().collect())
}

/// Documents that once broke something, kept as regression cases. The 150-level array
/// overflowed the stack in JSON conversion (found by this fuzzer; now a dead letter).
fn regressions() -> Vec<Document> {
    let deep = (0..150).fold(Bson::Int32(1), |v, _| Bson::Array(vec![v]));
    vec![
        bson::doc! { "_id": Bson::MaxKey, "t": f64::NAN },
        bson::doc! { "_id": 1, "j": deep, "t": i64::MIN },
        bson::doc! { "_id": "x", "parts": [Bson::Null, {"label": Bson::MinKey}] },
    ]
}

fn check(mappings: &[Mapping], docs: &[Document]) -> Result<(), TestCaseError> {
    let raws: Vec<RawDocumentBuf> = docs
        .iter()
        .map(|d| RawDocumentBuf::from_document(d).unwrap())
        .collect();
    for m in mappings {
        for e in &m.entities {
            let page = tidemark::engine::pipeline::map_page(e, &raws, true);
            let accounted = page.rows.len() as u64
                + page.duplicates
                + page.dead.len() as u64
                + page.deleted
                + page.filtered;
            prop_assert_eq!(accounted, raws.len() as u64, "entity {}", e.name);
            for d in &page.dead {
                prop_assert!(!d.document.is_empty() && !d.error.is_empty());
            }
            for row in &page.rows {
                prop_assert_eq!(row.len(), e.columns.len());
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_mapping_of_arbitrary_documents() {
    let vizhub = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/mappings/vizhub.toml"
    ))
    .unwrap();
    let mappings = vec![
        Mapping::parse(&vizhub, "vizhub.toml").unwrap(),
        Mapping::parse(TYPES, "types").unwrap(),
    ];
    check(&mappings, &regressions()).unwrap();
    let cases = std::env::var("TIDEMARK_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(document(), 1..12), |docs| {
            check(&mappings, &docs)
        })
        .unwrap_or_else(|e| panic!("{e}"));
}
