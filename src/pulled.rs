//! Rows this run already wrote on demand, so a lane that reads the same documents again later
//! in the run does not resolve and write them a second time.
//!
//! A viz pulls its content, commits and events in its own transaction (DESIGN.md, dependencies
//! on demand). The `viz_contents`, `commits` and `analytics_events` lanes then read those same
//! documents in their own windows: on the benchmark's full mapping, about a million documents
//! that were each mapped, resolved against the target, read back and compared only to find
//! them unchanged (most of the run's time, BENCHMARKS.md).
//!
//! A row may be skipped only when writing it again could not change anything. The rule:
//! a row of entity `E` with key `k`, mapped from document `d`, is skipped when
//! 1. this run committed a row for `(E, k)` mapped from a byte-identical document (the hash of
//!    the whole raw document, not only its time field, so a document changed behind an
//!    unchanged time is written again);
//! 2. with every reference of that row resolved (a row written with a reference nulled or
//!    dropped by a missing-reference policy is not recorded: re-mapping it later might find
//!    the reference and write more);
//! 3. `E` has no dependents of its own (a row pulled as a reference comes without them; its
//!    own lane reads it again and pulls them);
//! 4. and nothing wrote `(E, k)` since: any row, deletion or soft deletion of `(E, k)` that is
//!    not skipped forgets the key first, so the skip can never hide a later version behind an
//!    earlier one (two source documents sharing a target key, read in time order).
//!
//! Memory is bounded: each key costs 12 bytes (a 32-bit tag of the key hash and the 64-bit
//! document hash), and the set stops taking new keys at [`CAPACITY`]; a row that was not
//! recorded is simply written the usual way. The keys are spread over [`SHARDS`] shards by six
//! other bits of the key hash, so a key's slot is named by 38 bits. Each shard keeps its tags
//! and document hashes in two sorted vectors of exactly the size they need, plus a small hash
//! table of recent keys that is merged into them when it fills ([`MERGE_AT`], or an eighth of
//! the vectors). Hash tables alone cost 26–34 bytes per key (load factor between 7/16 and 7/8,
//! and a table doubling holds its old and new buckets at once: one table of a million keys
//! reached 53 MB, the full mapping's peak heap, heaptrack, BENCHMARKS.md). A merge copies one
//! shard (1/64 of the set); each key is copied a few times over a run.
//!
//! Two keys with the same slot (about one pair per million keys recorded) share it: the later
//! one overwrites the earlier one's document hash, and forgetting either forgets both. That
//! can only make a row miss the skip: a wrong skip needs the 64-bit document hash of two
//! different documents recorded under one slot to collide as well. (16-byte slots, the whole
//! key hash, cost the full mapping 4–5 MB more at its peak.)

use crate::mapping::{Entity, Value};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// Keys recorded at most (about 20 MB at the limit). Past it, rows are written as if the set
/// were not there.
pub const CAPACITY: usize = 1_500_000;

/// The keys are already hashes: hashing them again would only cost time.
#[derive(Default)]
pub(crate) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    /// A shard's 32-bit tags: spread over all 64 bits (Fibonacci hashing), because the hash
    /// table takes its control byte from the top seven bits, which a tag alone leaves zero.
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// One row the current batch wrote on demand: `(key hash, document hash)`.
pub type Fresh = (u64, u64);

/// Shards the set is split into (by bits of the key hash that hashbrown uses for neither the
/// bucket index, the low bits, nor the control byte, the top seven).
pub const SHARDS: usize = 64;

/// Recent keys a shard holds in its hash table before they are merged into its vector (or
/// an eighth of the vector's length, if more: each key is then copied about eight times over
/// a run whatever the shard's size, and the table adds about 4 bytes per key).
pub const MERGE_AT: usize = 1024;

/// The document hash of a key forgotten in a shard's vector (removed at the next merge).
/// Real document hashes are stored with this value moved to 1 ([`stored`]).
const GONE: u64 = 0;

fn stored(doc: u64) -> u64 {
    doc.max(1)
}

/// See the module documentation.
#[derive(Default)]
struct Shard {
    /// Tags of the merged keys, sorted; `docs[i]` is the document hash of `tags[i]`, or
    /// [`GONE`] for a forgotten key that keeps its place until the next merge.
    tags: Vec<u32>,
    docs: Vec<u64>,
    recent: HashMap<u32, u64, BuildHasherDefault<Prehashed>>,
}

impl Shard {
    fn slot(&self, tag: u32) -> Option<usize> {
        self.tags
            .binary_search(&tag)
            .ok()
            .filter(|&i| self.docs[i] != GONE)
    }

    fn get(&self, tag: u32) -> Option<u64> {
        self.recent
            .get(&tag)
            .copied()
            .or_else(|| self.slot(tag).map(|i| self.docs[i]))
    }

    /// Insert or update; whether the key is new.
    fn insert(&mut self, tag: u32, doc: u64) -> bool {
        if let Some(i) = self.slot(tag) {
            self.docs[i] = doc;
            return false;
        }
        let new = self.recent.insert(tag, doc).is_none();
        if self.recent.len() >= MERGE_AT.max(self.tags.len() / 8) {
            self.merge();
        }
        new
    }

    /// Remove; whether the key was there.
    fn remove(&mut self, tag: u32) -> bool {
        if self.recent.remove(&tag).is_some() {
            return true;
        }
        match self.slot(tag) {
            Some(i) => {
                self.docs[i] = GONE;
                true
            }
            None => false,
        }
    }

    /// Move the recent keys into the vectors, dropping forgotten keys, into vectors of
    /// exactly the size needed. (A tag is never in both: `insert` updates the vectors' copy.)
    fn merge(&mut self) {
        let mut recent: Vec<(u32, u64)> = self.recent.drain().collect();
        recent.sort_unstable_by_key(|&(k, _)| k);
        let live = self.docs.iter().filter(|&&d| d != GONE).count();
        let mut tags = Vec::with_capacity(live + recent.len());
        let mut docs = Vec::with_capacity(live + recent.len());
        let mut old = self
            .tags
            .iter()
            .copied()
            .zip(self.docs.iter().copied())
            .filter(|&(_, d)| d != GONE)
            .peekable();
        let mut new = recent.into_iter().peekable();
        loop {
            let next = match (old.peek(), new.peek()) {
                (Some(a), Some(b)) if a.0 < b.0 => old.next(),
                (Some(_), Some(_)) | (None, Some(_)) => new.next(),
                (Some(_), None) => old.next(),
                (None, None) => break,
            };
            if let Some((t, d)) = next {
                tags.push(t);
                docs.push(d);
            }
        }
        self.tags = tags;
        self.docs = docs;
        self.recent.shrink_to(MERGE_AT);
    }
}

/// A key hash's shard and its tag there (the two together name its slot).
fn place(key: u64) -> (usize, u32) {
    ((key >> 32) as usize % SHARDS, key as u32)
}

/// See the module documentation.
#[derive(Default)]
pub struct Pulled {
    shards: Vec<Shard>,
    len: usize,
}

fn sip() -> std::hash::DefaultHasher {
    std::hash::DefaultHasher::new()
}

/// Hash of `(entity, primary key)` of a mapped row.
pub fn key_hash(e: &Entity, row: &[Value]) -> u64 {
    hash_key(e, e.pk.iter().map(|&i| &row[i]))
}

/// Hash of a key as a deletion names it (the primary key's values, in order).
pub fn deleted_key_hash(e: &Entity, key: &[Value]) -> u64 {
    hash_key(e, key.iter())
}

fn hash_key<'v>(e: &Entity, key: impl Iterator<Item = &'v Value>) -> u64 {
    let mut h = sip();
    e.name.hash(&mut h);
    for v in key {
        v.key_text().hash(&mut h);
    }
    h.finish()
}

/// Hash of a whole raw document (its exact bytes), seeded differently from [`key_hash`].
pub fn doc_hash(doc: &bson::RawDocument) -> u64 {
    let mut h = sip();
    0x7469_6465_6d61_726bu64.hash(&mut h);
    doc.as_bytes().hash(&mut h);
    h.finish()
}

impl Pulled {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn shard(&mut self, key: u64) -> (&mut Shard, u32) {
        // `same` finds a key's shard the same way, without creating the shards.
        if self.shards.is_empty() {
            self.shards.resize_with(SHARDS, Default::default);
        }
        let (i, tag) = place(key);
        (&mut self.shards[i], tag)
    }

    /// Record rows a committed batch wrote on demand.
    pub fn record(&mut self, fresh: &[Fresh]) {
        for &(k, d) in fresh {
            let full = self.len >= CAPACITY;
            let (shard, tag) = self.shard(k);
            if (!full || shard.get(tag).is_some()) && shard.insert(tag, stored(d)) {
                self.len += 1;
            }
        }
    }

    /// Whether the row for `key` was written this run from the same document; forgets the
    /// key when it was not (the caller is about to write the row, rule 4).
    pub fn take_same(&mut self, key: u64, doc: u64) -> bool {
        if self.is_empty() {
            return false;
        }
        let (shard, tag) = self.shard(key);
        match shard.get(tag) {
            Some(d) if d == stored(doc) => true,
            Some(_) => {
                shard.remove(tag);
                self.len -= 1;
                false
            }
            None => false,
        }
    }

    /// Whether the row for `key` was written this run from the same document, changing
    /// nothing: a look ahead, before the batch's turn (`pipeline::pre_skip`); the batch
    /// confirms it with [`Pulled::take_same`] when its turn comes.
    pub fn same(&self, key: u64, doc: u64) -> bool {
        let (i, tag) = place(key);
        self.shards.get(i).and_then(|s| s.get(tag)) == Some(stored(doc))
    }

    /// Forget a key about to be written or deleted by something else than a skipped row.
    pub fn forget(&mut self, key: u64) {
        if self.is_empty() {
            return;
        }
        let (shard, tag) = self.shard(key);
        if shard.remove(tag) {
            self.len -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_skipped_only_for_the_same_document_and_forgotten_otherwise() {
        let mut p = Pulled::default();
        p.record(&[(1, 10), (2, 20)]);
        assert!(p.take_same(1, 10));
        // Still there: the same document read twice is still the row in the target.
        assert!(p.take_same(1, 10));
        // Another document for key 2: written, and key 2 is forgotten for the rest of the run.
        assert!(!p.take_same(2, 21));
        assert!(!p.take_same(2, 20));
        assert!(!p.take_same(3, 30));
        p.forget(1);
        assert!(!p.take_same(1, 10));
        assert!(p.is_empty());
    }

    #[test]
    fn the_set_stops_growing_at_capacity_but_updates_known_keys() {
        let mut p = Pulled::default();
        let many: Vec<Fresh> = (0..CAPACITY as u64 + 10).map(|k| (k, k)).collect();
        p.record(&many);
        assert_eq!(p.len(), CAPACITY);
        assert!(!p.take_same(CAPACITY as u64 + 5, CAPACITY as u64 + 5));
        p.record(&[(7, 99)]);
        assert!(p.take_same(7, 99));
        assert_eq!(p.len(), CAPACITY);
    }

    #[test]
    fn keys_spread_over_the_shards_are_counted_once() {
        let mut p = Pulled::default();
        let keys: Vec<Fresh> = (0..1000u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15), i))
            .collect();
        p.record(&keys);
        p.record(&keys[..5]);
        assert_eq!(p.len(), 1000);
        assert!(
            p.shards
                .iter()
                .filter(|s| !s.recent.is_empty() || !s.tags.is_empty())
                .count()
                > SHARDS / 2
        );
        assert!(keys[..10].iter().all(|&(k, d)| p.take_same(k, d)));
        assert!(!p.take_same(keys[10].0, 999_999));
        p.forget(keys[11].0);
        p.forget(keys[11].0);
        assert_eq!(p.len(), 998);
        assert!(!p.take_same(keys[11].0, keys[11].1));
    }

    /// Many keys through merges, updates, forgets and lookups, against a plain hash map.
    #[test]
    fn the_set_behaves_as_a_map_across_merges() {
        let mut p = Pulled::default();
        let mut model: std::collections::HashMap<u64, u64> = Default::default();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Few distinct keys per shard, so updates, forgets and lookups hit stored keys; one key
        // per slot, so the map is exact (shared slots: the test below).
        let mut slots = std::collections::HashSet::new();
        let keys: Vec<u64> = (0..SHARDS as u64 * MERGE_AT as u64 * 3)
            .map(|_| next())
            .filter(|&k| slots.insert(place(k)))
            .collect();
        for round in 0..600_000u64 {
            let k = keys[(next() % keys.len() as u64) as usize];
            let d = next() % 4; // includes 0, stored as 1 (and so equal to 1)
            match next() % 4 {
                0 | 1 => {
                    p.record(&[(k, d)]);
                    model.insert(k, d.max(1));
                }
                2 => {
                    let got = p.take_same(k, d);
                    let want = model.get(&k) == Some(&d.max(1));
                    assert_eq!(got, want, "take_same at round {round}");
                    if !want {
                        model.remove(&k);
                    }
                }
                _ => {
                    p.forget(k);
                    model.remove(&k);
                }
            }
            assert_eq!(p.same(k, d), model.get(&k) == Some(&d.max(1)));
            assert_eq!(p.len(), model.len(), "round {round}");
        }
        assert!(
            p.shards.iter().all(|s| !s.tags.is_empty()),
            "merges happened"
        );
        for (&k, &d) in &model {
            assert!(p.same(k, d));
        }
    }

    /// Two keys whose hashes name one slot (same shard bits, same low 32 bits) share it: each
    /// may lose its skip, neither is skipped for a document it was not recorded with.
    #[test]
    fn keys_sharing_a_slot_only_lose_their_skip() {
        let a = 0x0000_0005_1234_5678u64;
        let b = 0x1000_0005_1234_5678u64;
        assert_eq!(place(a), place(b));
        for merged in [false, true] {
            let mut p = Pulled::default();
            p.record(&[(a, 10)]);
            if merged {
                p.shards[place(a).0].merge();
            }
            p.record(&[(b, 20)]);
            assert_eq!(p.len(), 1, "one slot");
            assert!(!p.same(a, 10), "a lost its skip, merged {merged}");
            assert!(!p.take_same(a, 10), "and is forgotten, merged {merged}");
            assert!(
                !p.take_same(b, 20),
                "forgetting a forgot b, merged {merged}"
            );
            assert!(p.is_empty());
        }
    }

    #[test]
    fn a_merged_shard_holds_exactly_its_live_keys() {
        let mut s = Shard::default();
        for k in 0..(MERGE_AT as u32 * 2 + 10) {
            assert!(s.insert(k * 7, u64::from(k) + 1));
        }
        assert!(s.remove(7));
        assert!(!s.remove(7));
        assert!(!s.insert(14, 99), "an update, not a new key");
        s.merge();
        assert!(s.recent.is_empty());
        assert_eq!(s.tags.len(), MERGE_AT * 2 + 9);
        assert_eq!(s.docs.len(), s.tags.len());
        assert_eq!(s.tags.capacity(), s.tags.len());
        assert_eq!(s.docs.capacity(), s.docs.len());
        assert!(s.tags.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s.get(14), Some(99));
        assert_eq!(s.get(7), None);
    }

    #[test]
    fn document_hash_sees_any_byte() {
        let a = bson::rawdoc! { "_id": 1, "t": 5, "x": "a" };
        let b = bson::rawdoc! { "_id": 1, "t": 5, "x": "b" };
        assert_ne!(doc_hash(&a), doc_hash(&b));
        assert_eq!(doc_hash(&a), doc_hash(&a.clone()));
    }
}
