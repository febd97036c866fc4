//! The run's memo of reference keys: which keys resolution found present or missing,
//! bounded ([`MEMO_CAPACITY`]) except for what a snapshot reader cannot see yet; see
//! src/engine/resolve/mod.rs.

use std::collections::HashMap;

/// What reference resolution knows about keys this run: `true` present, `false` missing from the source.
#[derive(Debug, Default)]
pub struct Memo {
    /// entity → key → (present, batch): present is true for a key in the target or pulled
    /// this batch, false for one absent from the source or deleted; batch is the number of
    /// the batch whose resolution set it ([`Memo::start_batch`]).
    known: HashMap<String, HashMap<String, (bool, u64)>>,
    len: usize,
    /// The batch being resolved.
    batch: u64,
}

/// Keys the memo holds before it starts over (at the start of a batch). It only saves
/// lookups across batches (a forgotten key is looked up again in the target, where earlier
/// batches committed it, in the one bulk lookup the batch makes anyway), so it is bounded: a
/// full-mapping run touches millions of keys, and an unbounded memo was most of its 345 MB
/// peak RSS. About 90 bytes per key (its text, its entry, the table's spare room): 100,000
/// keys were ~9 MB of the full mapping's peak. 40,000 hold the keys of about 20 batches of
/// the VizHub example's vizzes lane (250 vizzes and ~1,750 rows they pull or reference).
const MEMO_CAPACITY: usize = 40_000;

impl Memo {
    /// Number the batch about to be resolved (1, 2, …; batches are resolved in the order
    /// they are written): the keys set from now on are its own.
    pub(crate) fn start_batch(&mut self) -> u64 {
        self.batch += 1;
        self.batch
    }
    pub(crate) fn get(&self, entity: &str, key: &str) -> Option<bool> {
        self.known
            .get(entity)?
            .get(key)
            .map(|&(present, _)| present)
    }
    pub(crate) fn set(&mut self, entity: &str, key: String, present: bool) {
        let keys = match self.known.get_mut(entity) {
            Some(k) => k,
            None => self.known.entry(entity.to_owned()).or_default(),
        };
        if keys.insert(key, (present, self.batch)).is_none() {
            self.len += 1;
        }
    }
    pub(crate) fn forget(&mut self, entity: &str, key: &str) {
        if let Some(keys) = self.known.get_mut(entity) {
            if keys.remove(key).is_some() {
                self.len -= 1;
            }
        }
    }
    /// Start over once over [`MEMO_CAPACITY`]; only called between batches (within a batch
    /// the policies rely on what resolution recorded). With `keep_after`, the keys of the
    /// batches after that one stay: the run's lookups go to a reader that sees only committed
    /// batches ([`crate::sink::GroupCommit`]), and a key those batches wrote or deleted,
    /// forgotten, would be answered as the last commit left it. They are the keys of one
    /// open group and the batches resolved ahead of the writer: a few seconds of the run.
    pub(crate) fn bound(&mut self, keep_after: Option<u64>) {
        if self.len <= MEMO_CAPACITY {
            return;
        }
        match keep_after {
            None => {
                self.known = HashMap::new();
                self.len = 0;
            }
            Some(done) => {
                for keys in self.known.values_mut() {
                    keys.retain(|_, &mut (_, batch)| batch > done);
                }
                self.known.retain(|_, keys| !keys.is_empty());
                self.len = self.known.values().map(HashMap::len).sum();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over capacity, `bound` forgets everything, or with a reader everything but the keys
    /// of batches it has not seen committed.
    #[test]
    fn bound_keeps_what_the_reader_cannot_see_yet() {
        let fill = |m: &mut Memo| {
            for b in 1..=4u64 {
                assert_eq!(m.start_batch(), b);
                for i in 0..MEMO_CAPACITY / 3 {
                    m.set("users", format!("{b}-{i}"), b % 2 == 0);
                }
            }
        };
        let mut m = Memo::default();
        fill(&mut m);
        m.bound(None);
        assert_eq!(m.get("users", "1-0"), None);
        assert_eq!(m.get("users", "4-0"), None);

        let mut m = Memo::default();
        fill(&mut m);
        // Batches 1 and 2 committed: their keys go, 3 (missing) and 4 (present) stay.
        m.bound(Some(2));
        assert_eq!(m.get("users", "1-5"), None);
        assert_eq!(m.get("users", "2-5"), None);
        assert_eq!(m.get("users", "3-5"), Some(false));
        assert_eq!(m.get("users", "4-5"), Some(true));
        assert_eq!(m.len, 2 * (MEMO_CAPACITY / 3));
        // Under capacity now: nothing more goes.
        m.bound(Some(4));
        assert_eq!(m.get("users", "4-5"), Some(true));
        // A key set again is the later batch's.
        m.start_batch();
        m.set("users", "3-5".into(), true);
        assert_eq!(m.known["users"]["3-5"], (true, 5));
    }
}
