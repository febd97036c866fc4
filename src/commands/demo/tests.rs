//! Unit tests of the demo data: determinism, shapes, references, the intended dirt, and
//! what the mapping makes of it.

use super::plan::{Kind, Plan};
use super::*;
use crate::mapping::{Mapping, Outcome};
use bson::raw::RawBsonRef;
use std::collections::HashMap;
use std::path::Path;

fn opts(vizzes: usize, seed: u64) -> SeedOptions {
    SeedOptions { vizzes, seed }
}

fn bytes(g: &Generated) -> Vec<Vec<u8>> {
    g.collections
        .iter()
        .flat_map(|(_, d)| d.iter().map(|d| d.as_bytes().to_vec()))
        .collect()
}

fn get<'a>(d: &'a RawDocumentBuf, k: &str) -> Option<RawBsonRef<'a>> {
    d.get(k).unwrap()
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let a = generate(&opts(1200, 7));
    let b = generate(&opts(1200, 7));
    let c = generate(&opts(1200, 8));
    assert_eq!(bytes(&a), bytes(&b));
    assert_ne!(bytes(&a), bytes(&c));
    let names: Vec<&str> = a.collections.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, COLLECTIONS);
    // Chunked generation (what `seed` inserts) is the same stream of documents.
    let plan = Plan::new(&opts(1200, 7));
    for (c, (_, docs)) in Coll::ALL.iter().zip(&a.collections) {
        let chunks: Vec<Vec<RawDocumentBuf>> = plan.chunks(*c).collect();
        assert!(chunks
            .iter()
            .all(|ch| !ch.is_empty() && ch.len() < CHUNK_DOCS + 8));
        assert_eq!(&chunks.concat(), docs);
    }
}

#[test]
fn tiny_sizes_do_not_panic() {
    for n in [0, 1, 2, 3, 10, 99, 100] {
        let g = generate(&opts(n, 3));
        assert_eq!(g.collection("user").len(), 5.max(n / 10));
    }
}

#[test]
fn shapes_and_references_hold() {
    let g = generate(&opts(2000, 11));
    let users: std::collections::HashSet<&str> = g
        .collection("user")
        .iter()
        .map(|d| d.get_str("id").unwrap())
        .collect();
    let infos = g.collection("documentInfo");
    let viz_ids: std::collections::HashSet<&str> =
        infos.iter().filter_map(|d| d.get_str("id").ok()).collect();
    let mut oids = std::collections::HashSet::new();
    for (_, docs) in &g.collections {
        for d in docs {
            assert!(
                oids.insert(d.get_object_id("_id").unwrap()),
                "duplicate _id"
            );
            if let Ok(id) = d.get_str("id") {
                assert!(
                    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{id}"
                );
            }
        }
    }
    for d in infos.iter().filter(|d| d.get_str("id").is_ok()) {
        assert!(users.contains(d.get_str("owner").unwrap()));
        assert_eq!(d.get_str("documentType").unwrap(), "viz");
        let num = |k| match get(d, k) {
            Some(RawBsonRef::Int32(i)) => i as i64,
            Some(RawBsonRef::Int64(i)) => i,
            Some(RawBsonRef::Double(f)) => f as i64,
            _ => i64::MIN,
        };
        let (c, u) = (num("createdTimestamp"), num("lastUpdatedTimestamp"));
        assert!((START..=END).contains(&c), "{c}");
        assert!(u == i64::MIN || (c..=END).contains(&u), "{c} {u}");
    }
    assert_eq!(
        g.collection("documentContent")
            .iter()
            .filter(|d| !viz_ids.contains(d.get_str("id").unwrap()))
            .count(),
        0
    );
    // Commits chain within a viz, with times in milliseconds and non-decreasing.
    let mut last: HashMap<&str, (&str, i64)> = HashMap::new();
    for d in g.collection("commits") {
        let viz = d.get_str("vizId").unwrap();
        assert!(viz_ids.contains(viz));
        let t = d.get_i64("timestamp").unwrap();
        assert!((START * 1000..=END * 1000 + 999).contains(&t));
        match last.get(viz) {
            None => assert!(d.get("parentCommitId").unwrap().is_none()),
            Some((p, pt)) => {
                assert_eq!(d.get_str("parentCommitId").unwrap(), *p);
                assert!(t >= *pt);
            }
        }
        last.insert(viz, (d.get_str("id").unwrap(), t));
    }
    assert!(g
        .collection("eventRecords")
        .iter()
        .all(|d| d.get_datetime("timestamp").is_ok()));
    let n = g.collection("eventRecords").len();
    assert!(n > 3000 && n < 7000, "{n}");
}

#[test]
fn the_dirt_is_there() {
    let g = generate(&opts(2000, 5));
    let infos = g.collection("documentInfo");
    let count = |f: &dyn Fn(&RawDocumentBuf) -> bool| infos.iter().filter(|d| f(d)).count();
    let leftovers = count(&|d| d.get("id").unwrap().is_none());
    assert!((5..=50).contains(&leftovers), "{leftovers}");
    assert!(infos
        .iter()
        .filter(|d| d.get("id").unwrap().is_none())
        .all(|d| get(d, "_type") == Some(RawBsonRef::Null) && d.iter().count() == 3));
    let live = infos.len() - leftovers;
    let missing = count(&|d| d.get("id").unwrap().is_some() && d.get("title").unwrap().is_none());
    assert!(
        missing * 100 > live && missing * 100 < live * 6,
        "{missing}"
    );
    let padded = count(&|d| {
        d.get_str("title")
            .is_ok_and(|t| !t.is_empty() && t.trim() != t)
    });
    assert!(padded * 100 > live && padded * 100 < live * 6, "{padded}");
    assert!(count(&|d| d.get_str("title").is_ok_and(|t| !t.is_ascii())) > 5);
    assert!(count(&|d| d.get_str("title").is_ok_and(|t| t.trim().is_empty())) > 0);
    assert_eq!(count(&|d| d.get_str("lastUpdatedTimestamp").is_ok()), 2);
    for ty in ["i32", "i64", "f64"] {
        let n = count(&|d| match (ty, get(d, "createdTimestamp")) {
            ("i32", Some(RawBsonRef::Int32(_))) | ("i64", Some(RawBsonRef::Int64(_))) => true,
            ("f64", Some(RawBsonRef::Double(f))) => f.fract() == 0.0,
            _ => false,
        });
        assert!(n > 20, "{ty}: {n}");
    }
    // Duplicated ids: same id, different _id.
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    for d in infos {
        if let Ok(id) = d.get_str("id") {
            *by_id.entry(id).or_default() += 1;
        }
    }
    assert_eq!(by_id.values().filter(|n| **n == 2).count(), 2);
    assert!(by_id.values().all(|n| *n <= 2));
    // Dangling forks point at no viz.
    let forks: Vec<&str> = infos
        .iter()
        .filter_map(|d| d.get_str("forkedFrom").ok())
        .collect();
    let dangling = forks.iter().filter(|f| !by_id.contains_key(**f)).count();
    assert!(
        forks.len() > 500 && dangling > 0 && dangling * 10 < forks.len(),
        "{} {dangling}",
        forks.len()
    );
    // Bursts: one second shared by many documents.
    let mut seconds: HashMap<i64, usize> = HashMap::new();
    for d in infos {
        let t = match get(d, "lastUpdatedTimestamp") {
            Some(RawBsonRef::Int32(i)) => i as i64,
            Some(RawBsonRef::Int64(i)) => i,
            Some(RawBsonRef::Double(f)) => f as i64,
            _ => continue,
        };
        *seconds.entry(t).or_default() += 1;
    }
    let mut sizes: Vec<usize> = seconds.into_values().collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    assert!(sizes[0] >= 95 && sizes[3] >= 2, "{:?}", &sizes[..5]);
    // One oversized content.
    let big = g
        .collection("documentContent")
        .iter()
        .filter(|d| d.as_bytes().len() > 1 << 20)
        .count();
    assert_eq!(big, 1);
    let users = g.collection("user");
    assert!(users
        .iter()
        .any(|d| d.get_str("userName").unwrap().starts_with(' ')));
    assert!(users.iter().any(|d| d
        .get_str("userName")
        .unwrap()
        .chars()
        .any(|c| c.is_uppercase())));
}

#[test]
fn big_sizes_have_a_burst_of_a_thousand() {
    let plan = Plan::new(&opts(6000, 1));
    let mut seconds: HashMap<i64, usize> = HashMap::new();
    for v in &plan.vizzes {
        *seconds.entry(v.updated).or_default() += 1;
    }
    assert!(seconds.values().any(|n| *n >= 1000));
    assert_eq!(
        plan.vizzes
            .iter()
            .filter(|v| v.kind == Kind::MalformedTime)
            .count(),
        6
    );
    assert_eq!(plan.vizzes.iter().filter(|v| v.oversized).count(), 3);
    assert!(plan
        .vizzes
        .iter()
        .all(|v| v.created <= v.updated && v.updated <= END));
}

/// Top-level equality filters (all the demo mapping uses).
fn matches(filter: &bson::Document, d: &RawDocumentBuf) -> bool {
    let d = d.to_document().unwrap();
    filter.iter().all(|(k, v)| d.get(k) == Some(v))
}

#[test]
fn every_entity_maps_everything_but_the_intended_dirt() {
    let m = Mapping::load(Path::new("config/mappings/vizhub.toml")).unwrap();
    let names: Vec<&str> = m.entities.iter().map(|e| e.name.as_str()).collect();
    for want in [
        "users",
        "vizzes",
        "viz_contents",
        "commits",
        "analytics_events",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let g = generate(&opts(2000, 9));
    for e in &m.entities {
        let docs = g.collection(&e.collection);
        assert!(
            !docs.is_empty(),
            "{}: no documents in {}",
            e.name,
            e.collection
        );
        let (mut ok, mut dirt, mut filtered) = (0, 0, 0);
        for d in docs {
            let intended = d.get("id").unwrap().is_none() || d.get_str(&e.time_field).is_ok();
            if !matches(&e.filter, d) {
                filtered += 1;
                assert!(intended, "{}: filter drops a good document", e.name);
                continue;
            }
            match e.map(d) {
                Ok(Outcome::Row { row, .. }) => {
                    assert!(!intended, "{}: dirt mapped: {d:?}", e.name);
                    assert_eq!(row.len(), e.columns.len());
                    ok += 1;
                }
                // The dirt either fails to map, or a `deleted` / `skip_when` rule catches it.
                Ok(other) => {
                    assert!(
                        intended,
                        "{}: {other:?} for {:?}",
                        e.name,
                        d.to_document().unwrap()
                    );
                    dirt += 1;
                }
                Err(err) => {
                    assert!(
                        intended,
                        "{}: {err} in {:?}",
                        e.name,
                        d.to_document().unwrap()
                    );
                    dirt += 1;
                }
            }
        }
        assert!(ok > 0, "{}", e.name);
        if e.name == "vizzes" {
            // Leftovers are dropped by the query filter, caught by a `deleted` rule or
            // fail to map; the times stored as strings fail to map.
            assert!(filtered + dirt > 5, "{filtered} + {dirt}");
            let malformed: Vec<_> = docs
                .iter()
                .filter(|d| d.get_str(&e.time_field).is_ok())
                .collect();
            assert_eq!(malformed.len(), 2);
            assert!(malformed.iter().all(|d| e.map(d).is_err()));
        }
    }
}

#[test]
fn vizzes_clean_up_titles() {
    let m = Mapping::load(Path::new("config/mappings/vizhub.toml")).unwrap();
    let e = m.entity("vizzes").unwrap();
    let title = e.column_names().position(|c| c == "title").unwrap();
    let g = generate(&opts(500, 2));
    for d in g
        .collection("documentInfo")
        .iter()
        .filter(|d| d.get_str("title").is_ok())
    {
        if let Ok(row) = e.map_row(d) {
            match &row[title] {
                crate::mapping::Value::Text(t) => {
                    assert!(!t.is_empty() && t.trim() == t, "{t:?}")
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

/// Seeds a real server when TIDEMARK_TEST_MONGO_URI is set; prints docs/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_a_live_server() {
    let Ok(uri) = std::env::var("TIDEMARK_TEST_MONGO_URI") else {
        eprintln!("TIDEMARK_TEST_MONGO_URI not set; skipping");
        return;
    };
    let vizzes = std::env::var("TIDEMARK_TEST_DEMO_VIZZES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let db = client.database(&format!("tm_demo_check_{:08x}", rand::random::<u32>()));
    let opts = SeedOptions { vizzes, seed: 42 };
    let res = seed(&db, &opts).await;
    let check = async {
        let report = res?;
        eprintln!("{report}");
        for (name, n) in &report.counts {
            let stored = db
                .collection::<RawDocumentBuf>(name)
                .count_documents(bson::doc! {})
                .await?;
            anyhow::ensure!(stored == *n, "{name}: {stored} stored, {n} inserted");
            let indexes = db
                .collection::<RawDocumentBuf>(name)
                .list_index_names()
                .await?;
            anyhow::ensure!(indexes.len() >= 3, "{name}: indexes {indexes:?}");
        }
        // Seeding again replaces, not appends.
        let again = seed(
            &db,
            &SeedOptions {
                vizzes: 100,
                seed: 1,
            },
        )
        .await?;
        let n = db
            .collection::<RawDocumentBuf>("documentInfo")
            .count_documents(bson::doc! {})
            .await?;
        anyhow::ensure!(
            n == again.counts[1].1,
            "reseed left {n} documentInfo documents"
        );
        Ok::<_, anyhow::Error>(report)
    }
    .await;
    db.drop().await.unwrap();
    let report = check.unwrap();
    eprintln!(
        "seeded {} documents at {:.0} docs/s",
        report.documents,
        report.rate()
    );
}
