//! Rows this run already wrote on demand, so a lane that reads the same documents again later
//! in the run does not resolve and write them a second time.
//!
//! A viz pulls its content, commits and events in its own transaction (ARCHITECTURE.md,
//! invariant 6: dependencies on demand). The `viz_contents`, `commits` and `analytics_events` lanes then read those same
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
//! Memory is bounded whatever the window's size. In memory each key costs 12 bytes (a 32-bit
//! tag of the key hash and the 64-bit document hash). The keys are spread over [`SHARDS`]
//! shards by six other bits of the key hash, so a key's slot is named by 38 bits. Each shard
//! keeps its tags and document hashes in two sorted vectors of exactly the size they need,
//! plus a small hash table of recent keys that is merged into them when it fills
//! ([`MERGE_AT`], or an eighth of the vectors). Hash tables alone cost 26–34 bytes per key
//! (load factor between 7/16 and 7/8, and a table doubling holds its old and new buckets at
//! once: one table of a million keys reached 53 MB, the full mapping's peak heap, heaptrack,
//! BENCHMARKS.md). A merge copies one shard (1/64 of the set).
//!
//! Once [`SPILL_AT`] keys are in memory, they are merged into the run's spill file: one
//! sorted array of 16-byte entries (slot, document hash) in an unnamed temporary file under
//! the state directory (removed by the kernel when the run ends, however it ends), read with
//! `pread`, never mapped, so it costs the process no resident memory. An in-memory fence
//! (the first slot of every [`BLOCK`] entries, 0.5 byte per key) names the one block a lookup
//! reads. The full mapping of the benchmark records ~1.1 M keys: in memory they held ~16 MB
//! at the vizzes lane's end, the run's peak; spilled, about 2 MB (BENCHMARKS.md, thirteenth
//! round). Memory holds the newest version of a key: a lookup asks it first, and forgetting
//! a key forgets it in both (a spilled entry is overwritten with [`GONE`] in place). A spill
//! rewrites the file (sequential I/O, 16 bytes per key); if the file cannot be created,
//! written or read, the spilled keys are dropped, which only costs skips. The set stops
//! taking new keys at [`CAPACITY`]; a row that was not recorded is simply written the usual
//! way.
//!
//! Two keys with the same slot (about one pair per million keys recorded) share it: the later
//! one overwrites the earlier one's document hash, and forgetting either forgets both. That
//! can only make a row miss the skip: a wrong skip needs the 64-bit document hash of two
//! different documents recorded under one slot to collide as well. (16-byte slots, the whole
//! key hash, cost the full mapping 4–5 MB more at its peak.)

use crate::mapping::{Entity, Value};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Keys recorded at most (a spill file of 256 MB at the limit). Past it, rows are written as
/// if the set were not there.
pub const CAPACITY: usize = 16 * 1024 * 1024;

/// Keys held in memory (~2 MB with the shards' tables) before they are merged into the spill
/// file. Each spill rewrites the file, so a run of n keys writes about n²/(2·SPILL_AT) · 16
/// bytes in all: ~70 MB for the benchmark's 1.1 M keys, ~6 GB at [`CAPACITY`].
pub const SPILL_AT: usize = 131_072;

/// Entries of the spill file per block: a lookup reads one block (1 KiB).
pub const BLOCK: usize = 64;

/// Bytes per spill-file entry: the slot and the document hash, little-endian.
const ENTRY: usize = 16;

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
        let old = self
            .tags
            .iter()
            .copied()
            .zip(self.docs.iter().copied())
            .filter(|&(_, d)| d != GONE)
            .map(Ok::<_, std::convert::Infallible>);
        let Ok(()) = merge_sorted(old, recent.into_iter(), |t, d| {
            tags.push(t);
            docs.push(d);
            Ok(())
        });
        self.tags = tags;
        self.docs = docs;
        self.recent.shrink_to(MERGE_AT);
    }
}

/// Merge two runs sorted by key into `put`, in key order; `new` wins a key both hold. `old`
/// may fail as it is read (the spill file).
fn merge_sorted<K: Ord + Copy, V, E>(
    mut old: impl Iterator<Item = Result<(K, V), E>>,
    new: impl Iterator<Item = (K, V)>,
    mut put: impl FnMut(K, V) -> Result<(), E>,
) -> Result<(), E> {
    let mut new = new.peekable();
    let mut next_old = old.next().transpose()?;
    loop {
        let take_old = match (&next_old, new.peek()) {
            (None, None) => return Ok(()),
            (Some(o), Some(n)) => o.0 < n.0,
            (o, _) => o.is_some(),
        };
        let (k, v) = if take_old {
            next_old.take().expect("peeked")
        } else {
            let (k, v) = new.next().expect("peeked");
            if next_old.as_ref().is_some_and(|o| o.0 == k) {
                next_old = None; // replaced by the new version
            }
            (k, v)
        };
        put(k, v)?;
        if next_old.is_none() {
            next_old = old.next().transpose()?;
        }
    }
}

/// A key hash's shard and its tag there (the two together name its slot).
fn place(key: u64) -> (usize, u32) {
    ((key >> 32) as usize % SHARDS, key as u32)
}

/// A slot as one number, ordered like the spill file: the shard, then the tag.
fn slot_of(shard: usize, tag: u32) -> u64 {
    ((shard as u64) << 32) | u64::from(tag)
}

/// A slot spread over all 64 bits, as the key of a [`Prehashed`] table (a bijection).
fn spread(slot: u64) -> u64 {
    slot.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The run's spill file (module documentation).
struct Spill {
    file: std::fs::File,
    /// Entries in the file, forgotten ones included.
    entries: usize,
    /// Entries not forgotten.
    live: usize,
    /// The slot of the first entry of each block.
    fences: Vec<u64>,
    /// What [`Pulled::same`] read from the file ahead of a batch's turn, by [`spread`] slot,
    /// so that [`Pulled::take_same`] confirms it without reading again. Entries leave when
    /// confirmed, when their slot is forgotten, and all at the next spill.
    looked: HashMap<u64, u64, BuildHasherDefault<Prehashed>>,
}

/// Looks ahead kept at most (pages in flight hold a few thousand); past it they start over.
const LOOKED_MAX: usize = 65_536;

impl Spill {
    /// The entry of `slot`: its index in the file and its document hash ([`GONE`] if forgotten).
    fn find(&self, slot: u64) -> std::io::Result<Option<(usize, u64)>> {
        let block = self.fences.partition_point(|&f| f <= slot);
        if block == 0 {
            return Ok(None);
        }
        let start = (block - 1) * BLOCK;
        let n = BLOCK.min(self.entries - start);
        let mut buf = [0u8; BLOCK * ENTRY];
        let buf = &mut buf[..n * ENTRY];
        self.file.read_exact_at(buf, (start * ENTRY) as u64)?;
        let at = |i: usize| u64::from_le_bytes(buf[i * ENTRY..i * ENTRY + 8].try_into().unwrap());
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match at(mid).cmp(&slot) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    let i = mid * ENTRY + 8;
                    let doc = u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
                    return Ok(Some((start + mid, doc)));
                }
            }
        }
        Ok(None)
    }

    /// The live document hash of `slot` in the file, if any.
    fn get(&self, slot: u64) -> std::io::Result<Option<u64>> {
        Ok(self.find(slot)?.map(|(_, d)| d).filter(|&d| d != GONE))
    }

    /// Set the document hash of `slot` where the file holds it live ([`GONE`]: forget it);
    /// whether it did.
    fn set(&mut self, slot: u64, doc: u64) -> std::io::Result<bool> {
        self.looked.remove(&spread(slot));
        match self.find(slot)? {
            Some((i, old)) if old != GONE => {
                self.file
                    .write_all_at(&doc.to_le_bytes(), (i * ENTRY + 8) as u64)?;
                if doc == GONE {
                    self.live -= 1;
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Every live entry of the file, in order, merged with `mem` (sorted, live entries; `mem`
    /// wins a slot both hold), written to a new file under `dir`.
    fn merge(
        old: Option<&Spill>,
        mem: impl Iterator<Item = (u64, u64)>,
        dir: &std::path::Path,
    ) -> std::io::Result<Spill> {
        let file = tempfile::tempfile_in(dir)?;
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, &file);
        let mut fences = Vec::new();
        let mut entries = 0usize;
        let mut put = |slot: u64, doc: u64| -> std::io::Result<()> {
            if entries.is_multiple_of(BLOCK) {
                fences.push(slot);
            }
            entries += 1;
            out.write_all(&slot.to_le_bytes())?;
            out.write_all(&doc.to_le_bytes())
        };
        merge_sorted(OldEntries::new(old), mem, &mut put)?;
        out.flush()?;
        drop(out);
        fences.shrink_to_fit();
        Ok(Spill {
            file,
            entries,
            live: entries,
            fences,
            looked: Default::default(),
        })
    }
}

/// The live entries of a spill file, read in order 4,096 at a time.
struct OldEntries<'a> {
    spill: Option<&'a Spill>,
    buf: Vec<u8>,
    at: usize,
    read: usize,
}

impl<'a> OldEntries<'a> {
    fn new(spill: Option<&'a Spill>) -> Self {
        OldEntries {
            spill,
            buf: Vec::new(),
            at: 0,
            read: 0,
        }
    }

    fn read_next(&mut self) -> std::io::Result<Option<(u64, u64)>> {
        let Some(s) = self.spill else {
            return Ok(None);
        };
        loop {
            if self.at * ENTRY >= self.buf.len() {
                if self.read >= s.entries {
                    return Ok(None);
                }
                let n = 4096.min(s.entries - self.read);
                self.buf.resize(n * ENTRY, 0);
                s.file
                    .read_exact_at(&mut self.buf, (self.read * ENTRY) as u64)?;
                self.read += n;
                self.at = 0;
            }
            let i = self.at * ENTRY;
            self.at += 1;
            let slot = u64::from_le_bytes(self.buf[i..i + 8].try_into().unwrap());
            let doc = u64::from_le_bytes(self.buf[i + 8..i + 16].try_into().unwrap());
            if doc != GONE {
                return Ok(Some((slot, doc)));
            }
        }
    }
}

impl Iterator for OldEntries<'_> {
    type Item = std::io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.read_next().transpose()
    }
}

/// See the module documentation.
pub struct Pulled {
    shards: Vec<Shard>,
    /// Keys in `shards`.
    mem: usize,
    spill: Option<Spill>,
    /// Where the spill file goes; `None` once it failed (the set then stays in memory).
    dir: Option<PathBuf>,
    spill_at: usize,
    capacity: usize,
}

impl Default for Pulled {
    /// A set that spills under the system's temporary directory.
    fn default() -> Self {
        Pulled::new(std::env::temp_dir())
    }
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
    /// An empty set whose spill file goes under `dir` (the state directory).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Pulled {
            shards: Vec::new(),
            mem: 0,
            spill: None,
            dir: Some(dir.into()),
            spill_at: SPILL_AT,
            capacity: CAPACITY,
        }
    }

    /// Forget every key (a failed batch may have recorded keys it did not commit).
    pub fn clear(&mut self) {
        self.shards = Vec::new();
        self.mem = 0;
        self.spill = None;
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys recorded, counting a key once in memory and once in the spill file when it is
    /// in both (a newer version recorded after the older one was spilled).
    pub fn len(&self) -> usize {
        self.mem + self.spill.as_ref().map_or(0, |s| s.live)
    }

    fn shard(&mut self, key: u64) -> (&mut Shard, u32) {
        // `get` finds a key's shard the same way, without creating the shards.
        if self.shards.is_empty() {
            self.shards.resize_with(SHARDS, Default::default);
        }
        let (i, tag) = place(key);
        (&mut self.shards[i], tag)
    }

    /// Record rows a committed batch wrote on demand.
    pub fn record(&mut self, fresh: &[Fresh]) {
        for &(k, d) in fresh {
            let full =
                self.len() >= self.capacity || (self.dir.is_none() && self.mem >= self.spill_at);
            let (shard, tag) = self.shard(k);
            if !full || shard.get(tag).is_some() {
                if shard.insert(tag, stored(d)) {
                    self.mem += 1;
                }
            } else {
                // Full: only a key the file holds is updated (in place).
                self.set_spilled(k, stored(d));
            }
        }
        if self.mem >= self.spill_at && self.dir.is_some() {
            self.spill_out();
        }
    }

    /// Merge the keys held in memory into the spill file.
    fn spill_out(&mut self) {
        let Some(dir) = self.dir.clone() else {
            return;
        };
        for s in &mut self.shards {
            if !s.recent.is_empty() {
                s.merge();
            }
        }
        let mem = self.shards.iter().enumerate().flat_map(|(i, s)| {
            s.tags
                .iter()
                .zip(&s.docs)
                .filter(|&(_, &d)| d != GONE)
                .map(move |(&t, &d)| (slot_of(i, t), d))
        });
        let started = std::time::Instant::now();
        let (in_memory, in_file) = (self.mem, self.spill.as_ref().map_or(0, |s| s.live));
        let tmp = std::env::temp_dir();
        let mut merged = Spill::merge(self.spill.as_ref(), mem.clone(), &dir);
        if merged.is_err() && dir != tmp {
            // The state directory may be read-only or full: the system's temporary one then.
            merged = Spill::merge(self.spill.as_ref(), mem, &tmp);
            self.dir = Some(tmp);
        }
        match merged {
            Ok(spill) => {
                tracing::debug!(
                    in_memory,
                    in_file,
                    entries = spill.entries,
                    ms = started.elapsed().as_millis() as u64,
                    "skip set spilled"
                );
                self.spill = Some(spill);
                self.shards = Vec::new();
                self.mem = 0;
            }
            Err(err) => self.spill_failed(err),
        }
    }

    /// The document hash recorded for `key`, looking in memory, then the file. A look ahead
    /// ([`Pulled::same`]) keeps what it read from the file for the batch's turn; otherwise
    /// ([`Pulled::take_same`]) that kept answer is used up.
    fn get(&mut self, key: u64, look_ahead: bool) -> Option<u64> {
        let (i, tag) = place(key);
        if let Some(d) = self.shards.get(i).and_then(|s| s.get(tag)) {
            return Some(d);
        }
        let slot = slot_of(i, tag);
        let spill = self.spill.as_mut()?;
        let looked = if look_ahead {
            spill.looked.get(&spread(slot)).copied()
        } else {
            spill.looked.remove(&spread(slot))
        };
        if looked.is_some() {
            return looked;
        }
        match spill.get(slot) {
            Ok(d) => {
                if let (true, Some(d)) = (look_ahead, d) {
                    if spill.looked.len() >= LOOKED_MAX {
                        spill.looked.clear();
                    }
                    spill.looked.insert(spread(slot), d);
                }
                d
            }
            Err(err) => {
                self.spill_failed(err);
                None
            }
        }
    }

    /// The spill file cannot be created, written or read: its keys are dropped (that only
    /// costs skips), and the set goes on in memory, bounded.
    fn spill_failed(&mut self, err: std::io::Error) {
        tracing::warn!(
            dir = ?self.dir,
            "cannot use the skip set's spill file ({err}); rows this run pulled will be \
             compared with the target again instead of skipped"
        );
        self.spill = None;
        self.dir = None;
    }

    /// Set `key`'s document hash where the spill file holds it ([`GONE`]: forget it there).
    fn set_spilled(&mut self, key: u64, doc: u64) {
        let (i, tag) = place(key);
        if let Some(spill) = self.spill.as_mut() {
            if let Err(err) = spill.set(slot_of(i, tag), doc) {
                self.spill_failed(err);
            }
        }
    }

    /// Whether the row for `key` was written this run from the same document; forgets the
    /// key when it was not (the caller is about to write the row, rule 4).
    pub fn take_same(&mut self, key: u64, doc: u64) -> bool {
        if self.is_empty() {
            return false;
        }
        match self.get(key, false) {
            Some(d) if d == stored(doc) => true,
            Some(_) => {
                self.forget(key);
                false
            }
            None => false,
        }
    }

    /// Whether the row for `key` was written this run from the same document, changing
    /// nothing: a look ahead, before the batch's turn (`pipeline::pre_skip`); the batch
    /// confirms it with [`Pulled::take_same`] when its turn comes.
    pub fn same(&mut self, key: u64, doc: u64) -> bool {
        !self.is_empty() && self.get(key, true) == Some(stored(doc))
    }

    /// Forget a key about to be written or deleted by something else than a skipped row.
    pub fn forget(&mut self, key: u64) {
        if self.is_empty() {
            return;
        }
        if !self.shards.is_empty() {
            let (shard, tag) = self.shard(key);
            if shard.remove(tag) {
                self.mem -= 1;
            }
        }
        self.set_spilled(key, GONE);
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

    /// A xorshift64 generator: the same keys every run.
    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// Up to `n` random keys, no two in one slot (so the set answers exactly as a map).
    fn one_per_slot(next: &mut impl FnMut() -> u64, n: usize) -> Vec<u64> {
        let mut slots = std::collections::HashSet::new();
        (0..n)
            .map(|_| next())
            .filter(|&k| slots.insert(place(k)))
            .collect()
    }

    /// A set that spills every `spill_at` keys, under the system's temporary directory.
    fn spilling(spill_at: usize, capacity: usize) -> Pulled {
        Pulled {
            spill_at,
            capacity,
            ..Pulled::default()
        }
    }

    #[test]
    fn the_set_stops_growing_at_capacity_but_updates_known_keys() {
        for spill_at in [usize::MAX, 64] {
            let cap = 1000;
            let mut p = spilling(spill_at, cap);
            let many: Vec<Fresh> = (0..cap as u64 + 10).map(|k| (k << 32 | k, k)).collect();
            p.record(&many);
            assert_eq!(p.len(), cap);
            let (k, d) = many[cap + 5];
            assert!(!p.take_same(k, d));
            p.record(&[(many[7].0, 99)]);
            assert!(p.take_same(many[7].0, 99));
            assert!(!p.take_same(many[7].0, 7));
            assert_eq!(p.len(), cap - 1);
            assert_eq!(p.spill.is_some(), spill_at == 64);
        }
    }

    #[test]
    fn at_capacity_a_spilled_key_recorded_again_is_updated_in_the_file() {
        let mut p = spilling(4, 8);
        let keys: Vec<Fresh> = (1..=8u64).map(|k| (k << 32 | k, k)).collect();
        p.record(&keys);
        assert!(p.spill.is_some() && p.mem == 0, "all spilled");
        assert!(p.same(keys[2].0, 3));
        // Full: a new version of key 3 replaces the older one where it is, in the file.
        p.record(&[(keys[2].0, 333)]);
        assert!(!p.same(keys[2].0, 3));
        assert!(p.same(keys[2].0, 333));
        // A key the set does not hold is not taken.
        p.record(&[(9 << 32 | 9, 9)]);
        assert!(!p.same(9 << 32 | 9, 9));
        assert_eq!(p.len(), 8);
    }

    #[test]
    fn a_spilled_key_recorded_again_is_skipped_only_for_its_newest_document() {
        let k = 0x0000_0003_0000_0042u64;
        let mut p = spilling(1, CAPACITY);
        p.record(&[(k, 10)]);
        assert!(p.spill.is_some(), "spilled at once");
        assert!(p.same(k, 10));
        p.spill_at = 2;
        p.record(&[(k, 20)]);
        assert_eq!(
            p.mem, 1,
            "the newer version is in memory, the older in the file"
        );
        assert!(!p.same(k, 10));
        assert!(p.same(k, 20));
        p.record(&[(k + 1, 30)]);
        assert_eq!(
            p.mem, 0,
            "spilled again, the newer version replacing the older"
        );
        assert_eq!(p.spill.as_ref().unwrap().live, 2);
        assert!(!p.same(k, 10));
        assert!(p.take_same(k, 20));
        p.forget(k);
        assert!(!p.take_same(k, 20));
        assert!(!p.take_same(k + 1, 31), "another document: forgotten");
        assert!(p.is_empty());
    }

    #[test]
    fn a_look_ahead_is_confirmed_from_memory_unless_its_key_was_forgotten() {
        let k = 0x0000_0001_0000_0007u64;
        let mut p = spilling(1, CAPACITY);
        p.record(&[(k, 5)]);
        assert!(p.same(k, 5));
        assert_eq!(p.spill.as_ref().unwrap().looked.len(), 1);
        assert!(p.take_same(k, 5));
        assert!(p.spill.as_ref().unwrap().looked.is_empty(), "consumed");
        assert!(p.same(k, 5));
        p.forget(k);
        assert!(!p.take_same(k, 5), "the look ahead did not outlive the key");
    }

    #[test]
    fn the_set_spills_under_the_temporary_directory_when_the_state_directory_fails() {
        let mut p = Pulled {
            spill_at: 2,
            ..Pulled::new("/nonexistent/tidemark-state")
        };
        p.record(&[(1, 1), (2 << 32, 2)]);
        assert!(p.spill.is_some());
        assert_eq!(p.dir.as_deref(), Some(std::env::temp_dir().as_path()));
        assert!(p.same(1, 1) && p.same(2 << 32, 2));
    }

    /// Many keys through spills, merges, updates, forgets, look-aheads and lookups, against a
    /// plain hash map: the set answers as if it had never left memory.
    #[test]
    fn a_spilling_set_behaves_as_a_map() {
        let mut p = spilling(700, CAPACITY);
        let mut model: std::collections::HashMap<u64, u64> = Default::default();
        let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
        let keys = one_per_slot(&mut next, 5000);
        let mut spills = 0;
        for round in 0..200_000u64 {
            let k = keys[(next() % keys.len() as u64) as usize];
            let d = next() % 3 + 1;
            let entries = p.spill.as_ref().map(|s| s.entries);
            match next() % 5 {
                0 | 1 => {
                    let batch: Vec<Fresh> = (0..next() % 8)
                        .map(|_| (keys[(next() % keys.len() as u64) as usize], next() % 3 + 1))
                        .chain([(k, d)])
                        .collect();
                    p.record(&batch);
                    for (k, d) in batch {
                        model.insert(k, d);
                    }
                }
                2 => {
                    let want = model.get(&k) == Some(&d);
                    assert_eq!(p.take_same(k, d), want, "take_same at round {round}");
                    if !want {
                        model.remove(&k);
                    }
                }
                3 => assert_eq!(p.same(k, d), model.get(&k) == Some(&d), "round {round}"),
                _ => {
                    p.forget(k);
                    model.remove(&k);
                }
            }
            if p.spill.as_ref().map(|s| s.entries) != entries {
                spills += 1;
            }
            assert!(p.mem < 700);
            assert!(p.len() >= model.len());
            assert_eq!(p.is_empty(), model.is_empty());
        }
        assert!(spills > 20, "{spills} spills");
        for &k in &keys {
            for d in 1..=3 {
                assert_eq!(p.same(k, d), model.get(&k) == Some(&d));
            }
        }
        let spill = p.spill.as_ref().unwrap();
        assert_eq!(spill.fences.len(), spill.entries.div_ceil(BLOCK));
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
        let mut p = spilling(usize::MAX, CAPACITY);
        let mut model: std::collections::HashMap<u64, u64> = Default::default();
        // Few distinct keys per shard, so updates, forgets and lookups hit stored keys; one key
        // per slot, so the map is exact (shared slots: the test below).
        let mut next = xorshift(0x2545_F491_4F6C_DD1D);
        let keys = one_per_slot(&mut next, SHARDS * MERGE_AT * 3);
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
