//! Deterministic, VizHub-V2-shaped demo data: the legacy store the sync chews on
//! in demos, tests and benchmarks.
//!
//! The same seed and size always give byte-identical documents. A small plan
//! (ids, owners, times, which documents carry which dirt) is drawn first from one
//! `ChaCha8Rng::seed_from_u64(seed)`; each document body is then drawn from its own
//! generator derived from `(seed, collection, index)`, so documents can be produced
//! lazily in chunks (and in any order) without changing a byte.
//!
//! The data carries the dirt real legacy data has: leftovers of deleted documents
//! (`_type: null`, no `id`), missing, empty or padded titles, emoji, epoch seconds
//! stored as int32, int64 or double, a few times stored as strings, many documents
//! sharing one second, the same `id` on two documents, dangling `forkedFrom`
//! references and a few oversized contents.
//!
//! Here: the command (`seed`, `generate`) and the collections; `demo/plan.rs` draws the
//! plan, `demo/docs.rs` the documents, `demo/text.rs` their text, `demo/touch.rs` a night
//! of application writes (`demo touch`).

mod docs;
mod plan;
#[cfg(test)]
mod tests;
mod text;
mod touch;

pub use touch::{touch, TouchReport};

use anyhow::{Context, Result};
use bson::RawDocumentBuf;
use futures::{StreamExt, TryStreamExt};
use mongodb::IndexModel;
use plan::Plan;
use std::fmt;
use std::time::{Duration, Instant};

/// 2016-01-01T00:00:00Z, the earliest time in the data set.
pub const START: i64 = 1_451_606_400;
/// 2026-10-01T00:00:00Z, the latest time in the data set.
pub const END: i64 = 1_790_812_800;

/// Collections written by [`seed`], in insertion order.
pub const COLLECTIONS: [&str; 5] = [
    "user",
    "documentInfo",
    "documentContent",
    "commits",
    "eventRecords",
];

/// Documents per `insert_many` call (a chunk also ends early at [`CHUNK_BYTES`]).
const CHUNK_DOCS: usize = 1000;
const CHUNK_BYTES: usize = 8 << 20;
/// `insert_many` calls in flight at once.
const IN_FLIGHT: usize = 4;

/// How much demo data to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedOptions {
    /// Number of `documentInfo` records (vizzes, including deleted leftovers; a handful of
    /// duplicates come on top). Users are `max(vizzes / 10, 5)`.
    pub vizzes: usize,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for SeedOptions {
    fn default() -> Self {
        SeedOptions {
            vizzes: 10_000,
            seed: 1,
        }
    }
}

/// What [`seed`] wrote.
#[derive(Debug, Clone)]
pub struct SeedReport {
    /// Documents inserted per collection, in insertion order.
    pub counts: Vec<(String, u64)>,
    /// Sum of `counts`.
    pub documents: u64,
    /// Wall time of the whole seed (drop, insert, index).
    pub elapsed: Duration,
}

impl SeedReport {
    /// Documents per second over the whole seed.
    pub fn rate(&self) -> f64 {
        self.documents as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for SeedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, n) in &self.counts {
            writeln!(f, "{name:<16} {:>12}", group(*n))?;
        }
        write!(
            f,
            "{:<16} {:>12} documents in {:.2} s ({} docs/s)",
            "total",
            group(self.documents),
            self.elapsed.as_secs_f64(),
            group(self.rate().round() as u64)
        )
    }
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Every demo document, per collection (in [`COLLECTIONS`] order).
#[derive(Debug, Clone)]
pub struct Generated {
    pub collections: Vec<(String, Vec<RawDocumentBuf>)>,
}

impl Generated {
    /// The documents of one collection (empty if unknown).
    pub fn collection(&self, name: &str) -> &[RawDocumentBuf] {
        self.collections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_slice())
            .unwrap_or(&[])
    }

    pub fn documents(&self) -> usize {
        self.collections.iter().map(|(_, d)| d.len()).sum()
    }
}

/// Pure, deterministic generation (same seed + size => byte-identical documents). No I/O.
/// Holds everything in memory; [`seed`] generates the same documents chunk by chunk instead.
pub fn generate(opts: &SeedOptions) -> Generated {
    let plan = Plan::new(opts);
    let collections = Coll::ALL
        .iter()
        .map(|&c| (c.name().to_owned(), plan.chunks(c).flatten().collect()))
        .collect();
    Generated { collections }
}

/// Drops the demo collections in `db`, inserts everything, creates the indexes.
pub async fn seed(db: &mongodb::Database, opts: &SeedOptions) -> Result<SeedReport> {
    let started = Instant::now();
    // The marker first: a seed interrupted after a drop still owns what it dropped.
    db.collection::<bson::Document>(MARKER)
        .replace_one(
            bson::doc! { "_id": "seed" },
            bson::doc! {
                "_id": "seed",
                "created_by": "tidemark demo seed",
                "collections": COLLECTIONS.to_vec(),
                "vizzes": opts.vizzes as i64,
                "seed": opts.seed as i64,
            },
        )
        .upsert(true)
        .await
        .with_context(|| format!("writing the demo marker {}.{MARKER}", db.name()))?;
    for name in COLLECTIONS {
        drop_collection(db, name).await?;
    }
    let plan = Plan::new(opts);
    let mut counts = [0u64; 5];
    // Each collection's indexes are built while the next collection is inserted.
    let mut index_builds = tokio::task::JoinSet::new();
    for c in Coll::ALL {
        let mut inserts = futures::stream::iter(plan.chunks(c))
            .map(|docs| insert_chunk(db, c, docs))
            .buffer_unordered(IN_FLIGHT);
        while let Some(n) = inserts.try_next().await? {
            counts[c as usize] += n;
        }
        let db = db.clone();
        index_builds.spawn(async move {
            db.collection::<RawDocumentBuf>(c.name())
                .create_indexes(c.indexes())
                .await
                .with_context(|| format!("creating indexes on {}.{}", db.name(), c.name()))
        });
    }
    while let Some(res) = index_builds.join_next().await {
        res.context("index build task failed")??;
    }
    let counts: Vec<(String, u64)> = Coll::ALL
        .iter()
        .map(|&c| (c.name().to_owned(), counts[c as usize]))
        .collect();
    Ok(SeedReport {
        documents: counts.iter().map(|(_, n)| n).sum(),
        counts,
        elapsed: started.elapsed(),
    })
}

async fn insert_chunk(db: &mongodb::Database, c: Coll, docs: Vec<RawDocumentBuf>) -> Result<u64> {
    let res = db
        .collection::<RawDocumentBuf>(c.name())
        .insert_many(&docs)
        .ordered(false)
        .await
        .with_context(|| {
            format!(
                "inserting {} demo documents into {}.{}",
                docs.len(),
                db.name(),
                c.name()
            )
        })?;
    anyhow::ensure!(
        res.inserted_ids.len() == docs.len(),
        "{}.{}: the server acknowledged {} of {} inserted documents",
        db.name(),
        c.name(),
        res.inserted_ids.len(),
        docs.len()
    );
    Ok(docs.len() as u64)
}

/// The collection where [`seed`] records which collections it created.
pub const MARKER: &str = "tidemark_demo";

/// Collections of `db` that [`seed`] did not create: every collection except the marker,
/// the ones its marker lists, and the server's own `system.*`.
pub async fn foreign_collections(db: &mongodb::Database) -> Result<Vec<String>> {
    let names = db
        .list_collection_names()
        .await
        .with_context(|| format!("listing the collections of {}", db.name()))?;
    let ours: Vec<String> = match db
        .collection::<bson::Document>(MARKER)
        .find_one(bson::doc! { "_id": "seed" })
        .await
        .with_context(|| format!("reading {}.{MARKER}", db.name()))?
    {
        Some(m) => m
            .get_array("collections")
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let mut foreign: Vec<String> = names
        .into_iter()
        .filter(|n| n != MARKER && !n.starts_with("system.") && !ours.contains(n))
        .collect();
    foreign.sort();
    Ok(foreign)
}

/// Refuse to seed a database holding collections [`seed`] did not create, unless `force`:
/// seeding drops the demo collections' names there, whatever they hold.
pub async fn check_database(db: &mongodb::Database, force: bool) -> Result<()> {
    let foreign = foreign_collections(db).await?;
    if foreign.is_empty() || force {
        return Ok(());
    }
    let shown: Vec<&str> = foreign.iter().take(10).map(String::as_str).collect();
    let more = if foreign.len() > shown.len() {
        format!(" and {} more", foreign.len() - shown.len())
    } else {
        String::new()
    };
    Err(crate::exit::Failure::Config(anyhow::anyhow!(
        "source.database {:?} holds collections `tidemark demo seed` did not create ({}{more}); \
         seeding drops and rewrites {} there. Point source.database at a scratch database \
         (e.g. TIDEMARK__SOURCE__DATABASE=tidemark_demo), or pass --force to seed anyway \
         (collections with other names are left alone)",
        db.name(),
        shown.join(", "),
        COLLECTIONS.join(", ")
    ))
    .into())
}

async fn drop_collection(db: &mongodb::Database, name: &str) -> Result<()> {
    match db.collection::<RawDocumentBuf>(name).drop().await {
        Ok(()) => Ok(()),
        // Older servers answer "ns not found" (code 26) for a collection that does not exist.
        Err(e) if matches!(&*e.kind, mongodb::error::ErrorKind::Command(c) if c.code == 26) => {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("dropping demo collection {}.{name}", db.name())),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coll {
    User = 0,
    Info = 1,
    Content = 2,
    Commits = 3,
    Events = 4,
}

impl Coll {
    const ALL: [Coll; 5] = [
        Coll::User,
        Coll::Info,
        Coll::Content,
        Coll::Commits,
        Coll::Events,
    ];

    fn name(self) -> &'static str {
        COLLECTIONS[self as usize]
    }

    fn time_field(self) -> &'static str {
        match self {
            Coll::User => "createdTimestamp",
            Coll::Info | Coll::Content => "lastUpdatedTimestamp",
            Coll::Commits | Coll::Events => "timestamp",
        }
    }

    fn indexes(self) -> Vec<IndexModel> {
        let model = |keys: bson::Document| IndexModel::builder().keys(keys).build();
        let mut v = vec![
            model(bson::doc! { self.time_field(): 1, "_id": 1 }),
            model(bson::doc! { "id": 1 }),
        ];
        match self {
            Coll::Commits | Coll::Events => v.push(model(bson::doc! { "vizId": 1 })),
            Coll::Info => v.push(model(bson::doc! { "owner": 1 })),
            Coll::User | Coll::Content => {}
        }
        v
    }
}
