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
//! ([`MERGE_AT`](shard::MERGE_AT), or an eighth of the vectors). Hash tables alone cost 26–34 bytes per key
//! (load factor between 7/16 and 7/8, and a table doubling holds its old and new buckets at
//! once: one table of a million keys reached 53 MB, the full mapping's peak heap, heaptrack,
//! BENCHMARKS.md). A merge copies one shard (1/64 of the set).
//!
//! Once [`SPILL_AT`] keys are in memory, they are merged into the run's spill file: one
//! sorted array of 16-byte entries (slot, document hash) in an unnamed temporary file under
//! the state directory (removed by the kernel when the run ends, however it ends), read with
//! `pread`, never mapped, so it costs the process no resident memory. An in-memory fence
//! (the first slot of every [`BLOCK`](spill::BLOCK) entries, 0.5 byte per key) names the one block a lookup
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

mod hash;
mod shard;
mod spill;
#[cfg(test)]
mod tests;

pub(crate) use crate::prehashed::Prehashed;
pub use hash::{deleted_key_hash, doc_hash, key_hash};

use shard::Shard;
use spill::Spill;
use std::path::PathBuf;

/// Keys recorded at most (a spill file of 256 MB at the limit). Past it, rows are written as
/// if the set were not there.
pub const CAPACITY: usize = 16 * 1024 * 1024;

/// Keys held in memory (~2 MB with the shards' tables) before they are merged into the spill
/// file. Each spill rewrites the file, so a run of n keys writes about n²/(2·SPILL_AT) · 16
/// bytes in all: ~70 MB for the benchmark's 1.1 M keys, ~6 GB at [`CAPACITY`].
pub const SPILL_AT: usize = 131_072;

/// One row the current batch wrote on demand: `(key hash, document hash)`.
pub type Fresh = (u64, u64);

/// Shards the set is split into (by bits of the key hash that hashbrown uses for neither the
/// bucket index, the low bits, nor the control byte, the top seven).
pub const SHARDS: usize = 64;

/// The document hash of a key forgotten in a shard's vector (removed at the next merge).
/// Real document hashes are stored with this value moved to 1 ([`stored`]).
const GONE: u64 = 0;

fn stored(doc: u64) -> u64 {
    doc.max(1)
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
                    spill.keep_look(slot, d);
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
