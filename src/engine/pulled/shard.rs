//! One shard of the in-memory part of the pulled set: sorted tag and document-hash vectors
//! plus a small table of recent keys merged into them (module documentation of `pulled`).

use super::{Prehashed, GONE};
use std::collections::HashMap;
use std::hash::BuildHasherDefault;

/// Recent keys a shard holds in its hash table before they are merged into its vector (or
/// an eighth of the vector's length, if more: each key is then copied about eight times over
/// a run whatever the shard's size, and the table adds about 4 bytes per key).
pub const MERGE_AT: usize = 1024;

/// See the module documentation.
#[derive(Default)]
pub(super) struct Shard {
    /// Tags of the merged keys, sorted; `docs[i]` is the document hash of `tags[i]`, or
    /// [`GONE`] for a forgotten key that keeps its place until the next merge.
    pub(super) tags: Vec<u32>,
    pub(super) docs: Vec<u64>,
    pub(super) recent: HashMap<u32, u64, BuildHasherDefault<Prehashed>>,
}

impl Shard {
    fn slot(&self, tag: u32) -> Option<usize> {
        self.tags
            .binary_search(&tag)
            .ok()
            .filter(|&i| self.docs[i] != GONE)
    }

    pub(super) fn get(&self, tag: u32) -> Option<u64> {
        self.recent
            .get(&tag)
            .copied()
            .or_else(|| self.slot(tag).map(|i| self.docs[i]))
    }

    /// Insert or update; whether the key is new.
    pub(super) fn insert(&mut self, tag: u32, doc: u64) -> bool {
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
    pub(super) fn remove(&mut self, tag: u32) -> bool {
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
    pub(super) fn merge(&mut self) {
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
pub(super) fn merge_sorted<K: Ord + Copy, V, E>(
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
