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

use anyhow::{Context, Result};
use bson::{oid::ObjectId, RawArrayBuf, RawBson, RawDocumentBuf};
use futures::{StreamExt, TryStreamExt};
use mongodb::IndexModel;
use rand::{seq::SliceRandom, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Normal,
    /// `{_id, _type: null, lastUpdatedTimestamp}`: what a deleted viz left behind.
    Leftover,
    /// `lastUpdatedTimestamp` stored as a string.
    MalformedTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Fork {
    None,
    Parent(u32),
    Dangling(u128),
}

#[derive(Debug, Clone)]
struct UserCore {
    id: u128,
    created: i64,
}

#[derive(Debug, Clone)]
struct VizCore {
    id: u128,
    owner: u32,
    created: i64,
    updated: i64,
    kind: Kind,
    fork: Fork,
    oversized: bool,
}

/// Everything that ties documents together, drawn up front; document bodies are drawn later.
#[derive(Debug, Clone)]
struct Plan {
    seed: u64,
    users: Vec<UserCore>,
    vizzes: Vec<VizCore>,
    /// Second documents with an existing viz's `id`: (viz index, their lastUpdatedTimestamp).
    dups: Vec<(u32, i64)>,
}

fn hex32(rng: &mut ChaCha8Rng) -> String {
    hex(rng.gen())
}

/// A 32-hex-digit legacy id.
fn hex(id: u128) -> String {
    format!("{id:032x}")
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator of one document (or one viz's group of documents) of one collection.
fn doc_rng(seed: u64, coll: Coll, unit: usize) -> ChaCha8Rng {
    let salt = splitmix(((coll as u64 + 1) << 48) ^ unit as u64);
    ChaCha8Rng::seed_from_u64(splitmix(seed ^ salt))
}

/// An ObjectId whose embedded time is `secs`, the rest random (deterministic).
fn oid(secs: i64, rng: &mut ChaCha8Rng) -> ObjectId {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&(secs.clamp(0, u32::MAX as i64) as u32).to_be_bytes());
    rng.fill(&mut b[4..]);
    ObjectId::from_bytes(b)
}

/// Epoch seconds the way the legacy application wrote them: mostly int64, some int32, some double.
fn epoch_secs(rng: &mut ChaCha8Rng, t: i64) -> RawBson {
    let r: f64 = rng.gen();
    if r < 0.85 {
        RawBson::Int64(t)
    } else if r < 0.95 {
        RawBson::Int32(t as i32)
    } else {
        RawBson::Double(t as f64)
    }
}

/// Pick `amount` distinct indices below `len` (at most `len`).
fn sample(rng: &mut ChaCha8Rng, len: usize, amount: usize) -> Vec<usize> {
    rand::seq::index::sample(rng, len, amount.min(len)).into_vec()
}

impl Plan {
    fn new(opts: &SeedOptions) -> Plan {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let n = opts.vizzes;
        let span = (END - START) as f64;

        // Users: sign-ups spread over the whole range, user 0 from the very start.
        let n_users = (n / 10).max(5);
        let mut created: Vec<i64> = (0..n_users)
            .map(|_| START + (span * rng.gen::<f64>().powf(0.8)) as i64)
            .collect();
        created.sort_unstable();
        created[0] = START;
        let users: Vec<UserCore> = created
            .into_iter()
            .map(|c| UserCore {
                id: rng.gen(),
                created: c,
            })
            .collect();

        // Vizzes in creation order; the platform grew, so later years have more.
        let mut created: Vec<i64> = (0..n)
            .map(|_| START + (span * rng.gen::<f64>().sqrt()) as i64)
            .collect();
        created.sort_unstable();
        let mut vizzes: Vec<VizCore> = Vec::with_capacity(n);
        for (i, &c) in created.iter().enumerate() {
            let kind = if rng.gen_bool(0.01) {
                Kind::Leftover
            } else {
                Kind::Normal
            };
            let id = rng.gen();
            // The owner signed up before creating the viz; early users own more.
            let eligible = users.partition_point(|u| u.created <= c).max(1);
            let owner =
                ((eligible as f64 * rng.gen::<f64>().powi(2)) as usize).min(eligible - 1) as u32;
            let updated = if rng.gen_bool(0.3) {
                c
            } else {
                (c + ((END - c) as f64 * rng.gen::<f64>().powi(3)) as i64).min(END)
            };
            let fork = if i > 0 && rng.gen_bool(0.35) {
                if rng.gen_bool(0.02) {
                    Fork::Dangling(rng.gen())
                } else {
                    let mut j = rng.gen_range(0..i);
                    while j > 0 && vizzes[j].kind == Kind::Leftover {
                        j -= 1;
                    }
                    if vizzes[j].kind == Kind::Leftover {
                        Fork::None
                    } else {
                        Fork::Parent(j as u32)
                    }
                }
            } else {
                Fork::None
            };
            vizzes.push(VizCore {
                id,
                owner,
                created: c,
                updated,
                kind,
                fork,
                oversized: false,
            });
        }

        if n > 0 {
            // Bursts: bulk edits that stamped many documents with the same second. The small
            // ones first, so the main burst (last) keeps its exact size.
            let small = (n / 500).max(2);
            let main = if n >= 5000 {
                (n / 100).max(1000)
            } else {
                (n / 20).max(2)
            };
            for (frac, size) in [(0.3, small), (0.55, small), (0.95, small), (0.8, main)] {
                let anchor = ((n as f64 * frac) as usize).min(n - 1);
                let second = vizzes[anchor].created;
                for j in sample(&mut rng, anchor + 1, size) {
                    vizzes[j].updated = second;
                }
            }

            // Times stored as strings (~0.1%), oversized contents (~0.05%): at least one each from 1000 vizzes on.
            let malformed = if n >= 1000 { n / 1000 } else { 0 };
            let oversized = if n >= 1000 { (n / 2000).max(1) } else { 0 };
            let mut placed = 0;
            for _ in 0..malformed * 20 {
                if placed == malformed {
                    break;
                }
                let j = rng.gen_range(0..n);
                if vizzes[j].kind == Kind::Normal {
                    vizzes[j].kind = Kind::MalformedTime;
                    placed += 1;
                }
            }
            let mut placed = 0;
            for _ in 0..oversized * 20 {
                if placed == oversized {
                    break;
                }
                let j = rng.gen_range(0..n);
                if vizzes[j].kind != Kind::Leftover && !vizzes[j].oversized {
                    vizzes[j].oversized = true;
                    placed += 1;
                }
            }
        }

        // A handful of second documents carrying an existing viz's id (a later, stale copy).
        let mut dups = Vec::new();
        let want = if n >= 100 { (n / 2000).clamp(2, 8) } else { 0 };
        for _ in 0..want * 20 {
            if dups.len() == want {
                break;
            }
            let j = rng.gen_range(0..n);
            if vizzes[j].kind == Kind::Normal && !dups.iter().any(|(d, _)| *d as usize == j) {
                let t = (vizzes[j].updated + rng.gen_range(60..30 * 86_400)).min(END);
                dups.push((j as u32, t));
            }
        }

        Plan {
            seed: opts.seed,
            users,
            vizzes,
            dups,
        }
    }

    /// Number of generation units of a collection: a user, a documentInfo document, or a viz
    /// (whose content, commits or events make up the unit).
    fn units(&self, c: Coll) -> usize {
        match c {
            Coll::User => self.users.len(),
            Coll::Info => self.vizzes.len() + self.dups.len(),
            Coll::Content | Coll::Commits | Coll::Events => self.vizzes.len(),
        }
    }

    /// The documents of `c` in chunks of about [`CHUNK_DOCS`] documents or [`CHUNK_BYTES`] bytes.
    fn chunks(&self, c: Coll) -> impl Iterator<Item = Vec<RawDocumentBuf>> + Send + '_ {
        let mut unit = 0;
        let units = self.units(c);
        std::iter::from_fn(move || {
            let mut docs = Vec::with_capacity(CHUNK_DOCS + 8);
            let mut bytes = 0;
            while unit < units && docs.len() < CHUNK_DOCS && bytes < CHUNK_BYTES {
                let before = docs.len();
                self.unit_docs(c, unit, &mut docs);
                bytes += docs[before..]
                    .iter()
                    .map(|d| d.as_bytes().len())
                    .sum::<usize>();
                unit += 1;
            }
            (!docs.is_empty()).then_some(docs)
        })
    }

    fn unit_docs(&self, c: Coll, unit: usize, out: &mut Vec<RawDocumentBuf>) {
        match c {
            Coll::User => out.push(self.user_doc(unit)),
            Coll::Info => {
                if unit < self.vizzes.len() {
                    out.push(self.viz_doc(unit, None));
                } else {
                    let (j, t) = self.dups[unit - self.vizzes.len()];
                    let mut rng = doc_rng(self.seed, c, unit);
                    out.push(self.viz_doc(j as usize, Some((oid(t, &mut rng), t))));
                }
            }
            Coll::Content => {
                if self.vizzes[unit].kind != Kind::Leftover {
                    out.push(self.content_doc(unit));
                }
            }
            Coll::Commits => {
                if self.vizzes[unit].kind != Kind::Leftover {
                    self.commit_docs(unit, out);
                }
            }
            Coll::Events => {
                if self.vizzes[unit].kind != Kind::Leftover {
                    self.event_docs(unit, out);
                }
            }
        }
    }

    fn user_doc(&self, u: usize) -> RawDocumentBuf {
        let user = &self.users[u];
        let mut rng = doc_rng(self.seed, Coll::User, u);
        let first = *FIRST_NAMES.choose(&mut rng).unwrap();
        let last = *LAST_NAMES.choose(&mut rng).unwrap();
        let clean = format!("{}{}{u}", first.to_lowercase(), last.to_lowercase());
        let r: f64 = rng.gen();
        let user_name = if r < 0.03 {
            format!("  {clean} ")
        } else if r < 0.08 {
            format!("{first}{last}{u}")
        } else {
            clean.clone()
        };
        let mut d = RawDocumentBuf::new();
        d.append("_id", oid(user.created, &mut rng));
        d.append("id", hex(user.id));
        d.append("userName", user_name);
        d.append("fullName", format!("{first} {last}"));
        d.append(
            "email",
            format!("{clean}@{}", *MAIL_DOMAINS.choose(&mut rng).unwrap()),
        );
        d.append(
            "avatarUrl",
            format!(
                "https://avatars.githubusercontent.com/u/{}?v=4",
                rng.gen_range(1_000..90_000_000)
            ),
        );
        let created = epoch_secs(&mut rng, user.created);
        d.append("createdTimestamp", created);
        d
    }

    /// A documentInfo document; `dup` gives the `_id` and time of a second copy of viz `i`.
    fn viz_doc(&self, i: usize, dup: Option<(ObjectId, i64)>) -> RawDocumentBuf {
        let v = &self.vizzes[i];
        let mut rng = doc_rng(self.seed, Coll::Info, i);
        let id = oid(v.created, &mut rng);
        let mut d = RawDocumentBuf::new();
        if v.kind == Kind::Leftover {
            d.append("_id", oid(v.updated, &mut rng));
            d.append("_type", RawBson::Null);
            d.append("lastUpdatedTimestamp", RawBson::Int64(v.updated));
            return d;
        }
        d.append("_id", dup.map_or(id, |(o, _)| o));
        d.append("id", hex(v.id));
        d.append("documentType", "viz");
        d.append("owner", hex(self.users[v.owner as usize].id));
        let title = title(&mut rng);
        if let Some(t) = title {
            d.append("title", t);
        }
        d.append("description", description(&mut rng));
        let created = epoch_secs(&mut rng, v.created);
        d.append("createdTimestamp", created);
        let updated_at = dup.map_or(v.updated, |(_, t)| t);
        let updated = if v.kind == Kind::MalformedTime {
            malformed_time(&mut rng, updated_at)
        } else {
            epoch_secs(&mut rng, updated_at)
        };
        d.append("lastUpdatedTimestamp", updated);
        match &v.fork {
            Fork::None => {}
            Fork::Parent(j) => d.append("forkedFrom", hex(self.vizzes[*j as usize].id)),
            Fork::Dangling(s) => d.append("forkedFrom", hex(*s)),
        }
        let n_users = self.users.len();
        let mut upvotes = RawArrayBuf::new();
        let k = if rng.gen_bool(0.55) {
            0
        } else {
            rng.gen_range(1..=12)
        };
        for u in sample(&mut rng, n_users, k) {
            let mut up = RawDocumentBuf::new();
            up.append("userId", hex(self.users[u].id));
            let t = rng.gen_range(v.created..=END);
            up.append("timestamp", epoch_secs(&mut rng, t));
            upvotes.push(up);
        }
        d.append("upvotes", upvotes);
        let mut collaborators = RawArrayBuf::new();
        let k = if rng.gen_bool(0.8) {
            0
        } else {
            rng.gen_range(1..=3)
        };
        for u in sample(&mut rng, n_users, k) {
            let mut co = RawDocumentBuf::new();
            co.append("userId", hex(self.users[u].id));
            collaborators.push(co);
        }
        d.append("collaborators", collaborators);
        d.append(
            "privacy",
            if rng.gen_bool(0.9) {
                "public"
            } else {
                "private"
            },
        );
        let views = (rng.gen::<f64>().powi(6) * 250_000.0) as i32;
        d.append("viewCount", views);
        let age_hours = ((END - v.updated) as f64 / 3600.0).max(0.0);
        d.append(
            "scoreHackerHot",
            f64::from(views) / (age_hours + 2.0).powf(1.8) + rng.gen::<f64>() * 1e-3,
        );
        d
    }

    fn content_doc(&self, i: usize) -> RawDocumentBuf {
        let v = &self.vizzes[i];
        let mut rng = doc_rng(self.seed, Coll::Content, i);
        let mut d = RawDocumentBuf::new();
        d.append("_id", oid(v.created, &mut rng));
        d.append("id", hex(v.id));
        let mut files = RawArrayBuf::new();
        let mut file = |name: &str, text: String| {
            let mut f = RawDocumentBuf::new();
            f.append("name", name);
            f.append("text", text);
            files.push(f);
        };
        file("index.html", html(&mut rng));
        if rng.gen_bool(0.8) {
            file("index.js", javascript(&mut rng, 4..40));
        }
        if rng.gen_bool(0.5) {
            file("README.md", readme(&mut rng));
        }
        if rng.gen_bool(0.2) {
            file("styles.css", css(&mut rng));
        }
        if rng.gen_bool(0.15) {
            file(
                ["data.csv", "data.json", "utils.js"]
                    .choose(&mut rng)
                    .unwrap(),
                javascript(&mut rng, 2..12),
            );
        }
        if v.oversized {
            file("data.csv", big_csv(&mut rng, 1 << 20));
        }
        d.append("files", files);
        let t = epoch_secs(&mut rng, v.updated);
        d.append("lastUpdatedTimestamp", t);
        d
    }

    fn commit_docs(&self, i: usize, out: &mut Vec<RawDocumentBuf>) {
        let v = &self.vizzes[i];
        let mut rng = doc_rng(self.seed, Coll::Commits, i);
        let k = rng.gen_range(1..=4usize);
        let (from, to) = (v.created * 1000, v.updated * 1000 + 999);
        let mut times: Vec<i64> = (0..k).map(|_| rng.gen_range(from..=to)).collect();
        times.sort_unstable();
        times[0] = from + rng.gen_range(0..1000);
        times.sort_unstable();
        let mut parent: Option<String> = None;
        for (n, t) in times.into_iter().enumerate() {
            let id = hex32(&mut rng);
            let mut d = RawDocumentBuf::new();
            d.append("_id", oid(t / 1000, &mut rng));
            d.append("id", id.as_str());
            d.append("vizId", hex(v.id));
            if let Some(p) = &parent {
                d.append("parentCommitId", p.as_str());
            }
            let author = if rng.gen_bool(0.85) {
                v.owner as usize
            } else {
                rng.gen_range(0..self.users.len())
            };
            d.append("authorId", hex(self.users[author].id));
            d.append("timestamp", RawBson::Int64(t));
            let message = match (n, &v.fork) {
                (0, Fork::None) => "Initial commit".to_owned(),
                (0, _) => "Forked".to_owned(),
                _ => format!(
                    "{} {}",
                    COMMIT_VERBS.choose(&mut rng).unwrap(),
                    COMMIT_OBJECTS.choose(&mut rng).unwrap()
                ),
            };
            d.append("message", message);
            out.push(d);
            parent = Some(id);
        }
    }

    fn event_docs(&self, i: usize, out: &mut Vec<RawDocumentBuf>) {
        let v = &self.vizzes[i];
        let mut rng = doc_rng(self.seed, Coll::Events, i);
        for _ in 0..rng.gen_range(0..=5) {
            let t = rng.gen_range(v.created * 1000..=END * 1000);
            let mut d = RawDocumentBuf::new();
            d.append("_id", oid(t / 1000, &mut rng));
            d.append("id", hex32(&mut rng));
            d.append("vizId", hex(v.id));
            let r: f64 = rng.gen();
            let event = if r < 0.8 {
                "view"
            } else if r < 0.92 {
                "upvote"
            } else {
                "fork"
            };
            // Anonymous views carry no user.
            if event != "view" || rng.gen_bool(0.6) {
                d.append(
                    "userId",
                    hex(self.users[rng.gen_range(0..self.users.len())].id),
                );
            }
            d.append("eventType", event);
            d.append("timestamp", bson::DateTime::from_millis(t));
            out.push(d);
        }
    }
}

/// A time the legacy code stored as text: a JavaScript `Date` string or digits.
fn malformed_time(rng: &mut ChaCha8Rng, t: i64) -> RawBson {
    let when = chrono::DateTime::from_timestamp(t, 0).unwrap_or_default();
    RawBson::String(match rng.gen_range(0..3) {
        0 => when
            .format("%a %b %d %Y %H:%M:%S GMT+0000 (Coordinated Universal Time)")
            .to_string(),
        1 => t.to_string(),
        _ => when.format("%d/%m/%Y %H:%M").to_string(),
    })
}

fn title(rng: &mut ChaCha8Rng) -> Option<String> {
    let base = format!(
        "{} {}",
        ADJECTIVES.choose(rng).unwrap(),
        NOUNS.choose(rng).unwrap()
    );
    let r: f64 = rng.gen();
    if r < 0.03 {
        return None;
    }
    Some(if r < 0.06 {
        match rng.gen_range(0..3) {
            0 => format!("  {base}  "),
            1 => format!("{base}\n"),
            _ => format!("\t{base} "),
        }
    } else if r < 0.066 {
        ["", "   "].choose(rng).unwrap().to_string()
    } else if r < 0.09 {
        let e = EMOJI.choose(rng).unwrap();
        if rng.gen_bool(0.5) {
            format!("{e} {base}")
        } else {
            format!("{base} {e}")
        }
    } else if r < 0.12 {
        format!("{base} ({})", 2016 + rng.gen_range(0..11))
    } else {
        base
    })
}

fn description(rng: &mut ChaCha8Rng) -> String {
    if rng.gen_bool(0.25) {
        return String::new();
    }
    let mut s = String::new();
    for _ in 0..rng.gen_range(1..=3) {
        s.push_str(SENTENCES.choose(rng).unwrap());
        s.push(' ');
    }
    s.pop();
    s
}

fn html(rng: &mut ChaCha8Rng) -> String {
    let lib = LIBS.choose(rng).unwrap();
    format!(
        "<!DOCTYPE html>\n<html>\n  <head>\n    <meta charset=\"utf-8\">\n    <title>{}</title>\n    \
         <script src=\"{lib}\"></script>\n    <link rel=\"stylesheet\" href=\"styles.css\">\n  </head>\n  \
         <body>\n    <svg width=\"960\" height=\"{}\"></svg>\n    <script src=\"index.js\"></script>\n  </body>\n</html>\n",
        NOUNS.choose(rng).unwrap(),
        [400, 500, 600].choose(rng).unwrap()
    )
}

fn javascript(rng: &mut ChaCha8Rng, lines: std::ops::Range<usize>) -> String {
    let mut s = String::from("const svg = d3.select('svg');\n");
    for _ in 0..rng.gen_range(lines) {
        s.push_str(JS_LINES.choose(rng).unwrap());
        s.push('\n');
    }
    s
}

fn readme(rng: &mut ChaCha8Rng) -> String {
    format!(
        "# {} {}\n\n{}\n",
        ADJECTIVES.choose(rng).unwrap(),
        NOUNS.choose(rng).unwrap(),
        description(rng)
    )
}

fn css(rng: &mut ChaCha8Rng) -> String {
    format!(
        "body {{ margin: 0; overflow: hidden; }}\n.tick text {{ font-size: {}px; }}\n.line {{ stroke: {}; }}\n",
        rng.gen_range(9..16),
        ["steelblue", "#e41a1c", "tomato", "black"].choose(rng).unwrap()
    )
}

fn big_csv(rng: &mut ChaCha8Rng, bytes: usize) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes + 64);
    s.push_str("date,country,value,population\n");
    while s.len() < bytes {
        let _ = writeln!(
            s,
            "2019-{:02}-{:02},{},{:.3},{}",
            rng.gen_range(1..=12),
            rng.gen_range(1..=28),
            COUNTRIES.choose(rng).unwrap(),
            rng.gen::<f64>() * 1000.0,
            rng.gen_range(10_000..90_000_000)
        );
    }
    s
}

const FIRST_NAMES: &[&str] = &[
    "Curran", "Ada", "Grace", "Linus", "Mike", "Amelia", "Sofia", "Mateo", "Yuki", "Olu", "Priya",
    "Chen", "Fatima", "Lars", "Ana", "Kwame", "Noor", "Ivan", "Elena", "Diego",
];
const LAST_NAMES: &[&str] = &[
    "Kelleher", "Lovelace", "Hopper", "Bostock", "Nguyen", "Garcia", "Tanaka", "Okafor", "Sharma",
    "Wang", "Haddad", "Larsen", "Silva", "Mensah", "Rahman", "Petrov", "Rossi", "Muller",
];
const MAIL_DOMAINS: &[&str] = &[
    "example.com",
    "example.org",
    "mail.example.net",
    "uni.example.edu",
];
const ADJECTIVES: &[&str] = &[
    "Interactive",
    "Animated",
    "Stacked",
    "Grouped",
    "Responsive",
    "Zoomable",
    "Radial",
    "Hierarchical",
    "Simple",
    "Colorful",
    "Minimal",
    "Reusable",
    "Draggable",
    "Normalized",
    "Sortable",
];
const NOUNS: &[&str] = &[
    "Bar Chart",
    "Line Chart",
    "Scatter Plot",
    "Force Layout",
    "Treemap",
    "Sunburst",
    "Choropleth Map",
    "Sankey Diagram",
    "Pie Chart",
    "Histogram",
    "Chord Diagram",
    "Globe",
    "Heatmap",
    "Box Plot",
    "Streamgraph",
    "Parallel Coordinates",
    "Word Cloud",
    "Network Graph",
];
const EMOJI: &[&str] = &["📊", "📈", "🌍", "🔥", "✨", "🚀", "🎨", "🧪", "👩‍💻", "🇫🇷"];
const SENTENCES: &[&str] = &[
    "A fork of the classic example.",
    "Data from the World Bank open data portal.",
    "Built with D3.js for a data visualization course.",
    "Hover over the marks to see details.",
    "Work in progress — do not use.",
    "Shows population growth by country since 1960.",
    "Uses the general update pattern with transitions.",
    "Données de l'INSEE, mise à jour 2019.",
    "Try dragging the nodes around!",
    "Exercise for week 3 of the course.",
];
const LIBS: &[&str] = &[
    "https://unpkg.com/d3@5.16.0/dist/d3.min.js",
    "https://unpkg.com/d3@7",
    "https://cdnjs.cloudflare.com/ajax/libs/d3/4.13.0/d3.min.js",
    "https://unpkg.com/react@16/umd/react.production.min.js",
];
const JS_LINES: &[&str] = &[
    "const width = +svg.attr('width');",
    "const height = +svg.attr('height');",
    "const margin = { top: 20, right: 30, bottom: 40, left: 50 };",
    "const xScale = d3.scaleLinear().domain(d3.extent(data, xValue)).range([0, innerWidth]).nice();",
    "const yScale = d3.scaleBand().domain(data.map(yValue)).range([0, innerHeight]).padding(0.1);",
    "d3.csv('data.csv').then(data => { data.forEach(d => { d.value = +d.value; }); render(data); });",
    "g.append('g').call(d3.axisLeft(yScale)).selectAll('.domain, .tick line').remove();",
    "g.selectAll('rect').data(data).enter().append('rect').attr('y', d => yScale(yValue(d)));",
    "const colorScale = d3.scaleOrdinal(d3.schemeCategory10);",
    "// TODO: fix the legend position",
    "const simulation = d3.forceSimulation(nodes).force('charge', d3.forceManyBody().strength(-30));",
    "svg.call(d3.zoom().on('zoom', () => g.attr('transform', d3.event.transform)));",
    "console.log(data);",
];
const COMMIT_VERBS: &[&str] = &["Edit", "Update", "Fix", "Refactor", "Tweak", "Add"];
const COMMIT_OBJECTS: &[&str] = &[
    "index.js",
    "index.html",
    "README.md",
    "styles.css",
    "axes",
    "colors",
    "tooltip",
    "data",
];
const COUNTRIES: &[&str] = &[
    "France", "India", "Nigeria", "Brazil", "Japan", "Canada", "Kenya", "Peru", "Norway",
];

#[cfg(test)]
mod tests {
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
        let missing =
            count(&|d| d.get("id").unwrap().is_some() && d.get("title").unwrap().is_none());
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
}
