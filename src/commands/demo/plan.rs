//! The demo data's plan: ids, owners, times and which documents carry which dirt, drawn
//! up front from one generator; the document bodies are drawn later (`docs.rs`).

use super::{Coll, SeedOptions, CHUNK_BYTES, CHUNK_DOCS, END, START};
use bson::{oid::ObjectId, RawBson, RawDocumentBuf};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Normal,
    /// `{_id, _type: null, lastUpdatedTimestamp}`: what a deleted viz left behind.
    Leftover,
    /// `lastUpdatedTimestamp` stored as a string.
    MalformedTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fork {
    None,
    Parent(u32),
    Dangling(u128),
}

#[derive(Debug, Clone)]
pub(super) struct UserCore {
    pub(super) id: u128,
    pub(super) created: i64,
}

#[derive(Debug, Clone)]
pub(super) struct VizCore {
    pub(super) id: u128,
    pub(super) owner: u32,
    pub(super) created: i64,
    pub(super) updated: i64,
    pub(super) kind: Kind,
    pub(super) fork: Fork,
    pub(super) oversized: bool,
}

/// Everything that ties documents together, drawn up front; document bodies are drawn later.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) seed: u64,
    pub(super) users: Vec<UserCore>,
    pub(super) vizzes: Vec<VizCore>,
    /// Second documents with an existing viz's `id`: (viz index, their lastUpdatedTimestamp).
    pub(super) dups: Vec<(u32, i64)>,
}

pub(super) fn hex32(rng: &mut ChaCha8Rng) -> String {
    hex(rng.gen())
}

/// A 32-hex-digit legacy id.
pub(super) fn hex(id: u128) -> String {
    format!("{id:032x}")
}

pub(super) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator of one document (or one viz's group of documents) of one collection.
pub(super) fn doc_rng(seed: u64, coll: Coll, unit: usize) -> ChaCha8Rng {
    let salt = splitmix(((coll as u64 + 1) << 48) ^ unit as u64);
    ChaCha8Rng::seed_from_u64(splitmix(seed ^ salt))
}

/// An ObjectId whose embedded time is `secs`, the rest random (deterministic).
pub(super) fn oid(secs: i64, rng: &mut ChaCha8Rng) -> ObjectId {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&(secs.clamp(0, u32::MAX as i64) as u32).to_be_bytes());
    rng.fill(&mut b[4..]);
    ObjectId::from_bytes(b)
}

/// Epoch seconds the way the legacy application wrote them: mostly int64, some int32, some double.
pub(super) fn epoch_secs(rng: &mut ChaCha8Rng, t: i64) -> RawBson {
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
pub(super) fn sample(rng: &mut ChaCha8Rng, len: usize, amount: usize) -> Vec<usize> {
    rand::seq::index::sample(rng, len, amount.min(len)).into_vec()
}

impl Plan {
    pub(super) fn new(opts: &SeedOptions) -> Plan {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let users = draw_users(&mut rng, (opts.vizzes / 10).max(5));
        let mut vizzes = draw_vizzes(&mut rng, opts.vizzes, &users);
        if !vizzes.is_empty() {
            add_bursts(&mut rng, &mut vizzes);
            add_dirt(&mut rng, &mut vizzes);
        }
        let dups = draw_dups(&mut rng, &vizzes);
        Plan {
            seed: opts.seed,
            users,
            vizzes,
            dups,
        }
    }

    /// Number of generation units of a collection: a user, a documentInfo document, or a viz
    /// (whose content, commits or events make up the unit).
    pub(super) fn units(&self, c: Coll) -> usize {
        match c {
            Coll::User => self.users.len(),
            Coll::Info => self.vizzes.len() + self.dups.len(),
            Coll::Content | Coll::Commits | Coll::Events => self.vizzes.len(),
        }
    }

    /// The documents of `c` in chunks of about [`CHUNK_DOCS`] documents or [`CHUNK_BYTES`] bytes.
    pub(super) fn chunks(&self, c: Coll) -> impl Iterator<Item = Vec<RawDocumentBuf>> + Send + '_ {
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

    pub(super) fn unit_docs(&self, c: Coll, unit: usize, out: &mut Vec<RawDocumentBuf>) {
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
}

/// Users: sign-ups spread over the whole range, user 0 from the very start.
fn draw_users(rng: &mut ChaCha8Rng, n_users: usize) -> Vec<UserCore> {
    let span = (END - START) as f64;
    let mut created: Vec<i64> = (0..n_users)
        .map(|_| START + (span * rng.gen::<f64>().powf(0.8)) as i64)
        .collect();
    created.sort_unstable();
    created[0] = START;
    created
        .into_iter()
        .map(|c| UserCore {
            id: rng.gen(),
            created: c,
        })
        .collect()
}

/// Vizzes in creation order; the platform grew, so later years have more.
fn draw_vizzes(rng: &mut ChaCha8Rng, n: usize, users: &[UserCore]) -> Vec<VizCore> {
    let span = (END - START) as f64;
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
    vizzes
}

/// Bursts: bulk edits that stamped many documents with the same second. The small ones
/// first, so the main burst (last) keeps its exact size.
fn add_bursts(rng: &mut ChaCha8Rng, vizzes: &mut [VizCore]) {
    let n = vizzes.len();
    let small = (n / 500).max(2);
    let main = if n >= 5000 {
        (n / 100).max(1000)
    } else {
        (n / 20).max(2)
    };
    for (frac, size) in [(0.3, small), (0.55, small), (0.95, small), (0.8, main)] {
        let anchor = ((n as f64 * frac) as usize).min(n - 1);
        let second = vizzes[anchor].created;
        for j in sample(rng, anchor + 1, size) {
            vizzes[j].updated = second;
        }
    }
}

/// Times stored as strings (~0.1%), oversized contents (~0.05%): at least one each from
/// 1000 vizzes on.
fn add_dirt(rng: &mut ChaCha8Rng, vizzes: &mut [VizCore]) {
    let n = vizzes.len();
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

/// A handful of second documents carrying an existing viz's id (a later, stale copy).
fn draw_dups(rng: &mut ChaCha8Rng, vizzes: &[VizCore]) -> Vec<(u32, i64)> {
    let n = vizzes.len();
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
    dups
}
