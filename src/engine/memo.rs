//! The run's memo of reference keys: which keys resolution found present or missing,
//! bounded ([`MEMO_CAPACITY`]); see src/engine/resolve.rs.

use std::collections::HashMap;

/// What reference resolution knows about keys this run: `true` present, `false` missing from the source.
#[derive(Debug, Default)]
pub struct Memo {
    /// entity → key → present (true: in the target or pulled this batch; false: absent in
    /// the source).
    known: HashMap<String, HashMap<String, bool>>,
    len: usize,
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
    pub(crate) fn get(&self, entity: &str, key: &str) -> Option<bool> {
        self.known.get(entity)?.get(key).copied()
    }
    pub(crate) fn set(&mut self, entity: &str, key: String, present: bool) {
        let keys = match self.known.get_mut(entity) {
            Some(k) => k,
            None => self.known.entry(entity.to_owned()).or_default(),
        };
        if keys.insert(key, present).is_none() {
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
    /// the policies rely on what resolution recorded).
    pub(crate) fn bound(&mut self) {
        if self.len > MEMO_CAPACITY {
            self.known = HashMap::new();
            self.len = 0;
        }
    }
}
