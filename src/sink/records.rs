//! Which documents of an entity have records in the tool's per-document tables
//! (`tidemark_dead_letters`, `tidemark_missing_refs`, `tidemark_pending`), so a batch clears
//! only the records that can exist.
//!
//! A batch that writes a document cleanly deletes that document's old records: its dead
//! letter, its missing references, its pending entry. Most documents never had one, yet every
//! batch sent all of its ids to three `DELETE … = ANY($2)` statements: on the benchmark's
//! full mapping about 9,000 statements and 10 s of PostgreSQL time, most of it in lanes that
//! write nothing (BENCHMARKS.md, sixth round).
//!
//! The run now reads, the first time an entity's records are about to be cleared, the source
//! ids that have any record (one query per entity, at most [`CAP`] ids; beyond that the entity
//! is not tracked and every id is sent, as before). Every record this run writes is added
//! before its insert is sent, so a transaction that rolls back leaves a superset, which costs
//! only a needless delete. Records are never removed from the set: a superset is always safe.
//!
//! Limit: a record written by *another process* after the set was read (a backfill of the
//! same entity running beside the nightly run) is not in it, so a clean write of that
//! document by this run leaves the record in place until a later run writes the document
//! again. The two processes raced before as well (a record written just after this run's
//! batch committed also stayed); nothing is written to the target tables differently.
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// Ids per entity read at most; an entity with more records is not tracked.
pub const CAP: usize = 100_000;

/// The per-entity sets; see the module documentation.
#[derive(Default)]
pub struct Known {
    by_entity: Mutex<HashMap<String, Entry>>,
}

#[derive(Default)]
struct Entry {
    /// The table's ids were read (else every id may have a record).
    read: bool,
    /// More than [`CAP`] ids: not tracked (every id may have a record).
    untracked: bool,
    /// Ids read, and ids this run wrote records for (also before the read: a batch of another
    /// backfill chunk may read while that record is not committed yet).
    ids: HashSet<String>,
}

impl Entry {
    fn extend(&mut self, ids: impl IntoIterator<Item = String>) {
        if self.untracked {
            return;
        }
        self.ids.extend(ids);
        if self.ids.len() > CAP {
            self.untracked = true;
            self.ids = HashSet::new();
        }
    }
}

impl Known {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.by_entity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `entity`'s ids have been read (see [`Known::load`]).
    pub fn is_loaded(&self, entity: &str) -> bool {
        self.lock().get(entity).is_some_and(|e| e.read)
    }

    /// Store what [`crate::sink::Sink::record_ids`] read for `entity` (`None`: too many).
    pub fn load(&self, entity: &str, ids: Option<HashSet<String>>) {
        let mut map = self.lock();
        let entry = map.entry(entity.to_owned()).or_default();
        entry.read = true;
        match ids {
            Some(ids) => entry.extend(ids),
            None => {
                entry.untracked = true;
                entry.ids = HashSet::new();
            }
        }
    }

    /// The ids of `ids` that may have a record of `entity`: all of them unless the entity's
    /// ids were read and are tracked.
    pub fn may_have(&self, entity: &str, ids: &[String]) -> Vec<String> {
        match self.lock().get(entity) {
            Some(e) if e.read && !e.untracked => ids
                .iter()
                .filter(|id| e.ids.contains(*id))
                .cloned()
                .collect(),
            _ => ids.to_vec(),
        }
    }

    /// A record of `(entity, id)` is about to be written.
    pub fn add(&self, entity: &str, id: &str) {
        let mut map = self.lock();
        let entry = map.entry(entity.to_owned()).or_default();
        if !entry.ids.contains(id) {
            entry.extend([id.to_owned()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn unread_or_untracked_entities_keep_every_id() {
        let k = Known::default();
        assert_eq!(k.may_have("a", &ids(&["1", "2"])), ids(&["1", "2"]));
        k.load("a", None);
        k.add("a", "3");
        assert_eq!(k.may_have("a", &ids(&["1", "2"])), ids(&["1", "2"]));
    }

    #[test]
    fn read_and_added_ids_are_kept_others_dropped() {
        let k = Known::default();
        // Added before the read (its insert may not be committed when another batch reads).
        k.add("a", "0");
        assert_eq!(k.may_have("a", &ids(&["0", "5"])), ids(&["0", "5"]));
        k.load("a", Some(["1".to_string()].into_iter().collect()));
        k.add("a", "2");
        assert_eq!(
            k.may_have("a", &ids(&["0", "1", "2", "3"])),
            ids(&["0", "1", "2"])
        );
        assert_eq!(k.may_have("b", &ids(&["1"])), ids(&["1"]));
        // A second read (another batch raced the first) keeps what was added meanwhile.
        k.load("a", Some(["4".to_string()].into_iter().collect()));
        assert_eq!(
            k.may_have("a", &ids(&["1", "2", "4"])),
            ids(&["1", "2", "4"])
        );
    }

    #[test]
    fn past_the_cap_an_entity_is_no_longer_tracked() {
        let k = Known::default();
        k.load("a", Some((0..CAP).map(|n| n.to_string()).collect()));
        assert!(k.may_have("a", &ids(&["x"])).is_empty());
        k.add("a", "y");
        k.add("a", "z");
        assert_eq!(k.may_have("a", &ids(&["x"])), ids(&["x"]));
    }
}
