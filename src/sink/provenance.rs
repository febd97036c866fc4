//! What a batch changed, row by row: collected by `write_rows` from the rows it read just
//! before writing (or, on a first load, knowing none existed), then stored in
//! `tidemark_provenance` in the batch's transaction as an undo log, so `tidemark rollback`
//! can undo one run exactly, newest batch first. Changed and deleted rows get one record
//! each (before-image, after-hash); the rows a batch inserted share one record per table.
//! Only rows that actually change are recorded, so a re-run over unchanged data stores
//! nothing.

use crate::mapping::canon;
use crate::mapping::{TableRef, Value};
use indexmap::IndexMap;
use std::collections::HashMap;

/// One changed row.
#[derive(Debug, Clone)]
pub struct Change {
    /// The row before this batch (canonical JSON text); None = the batch inserted it.
    pub before: Option<String>,
    /// Hash of the row as the batch left it; None = the batch deleted it.
    pub after_hash: Option<String>,
}

impl Change {
    /// The batch inserted the row (it did not exist before).
    pub fn is_insert(&self) -> bool {
        self.before.is_none() && self.after_hash.is_some()
    }
}

/// What [`Tracker::upserts`] found for a table's rows about to be upserted.
#[derive(Debug, Default)]
pub struct Upserts {
    /// Rows not stored before, and rows stored with other content.
    pub inserted: u64,
    pub updated: u64,
    /// Per row: stored with the same content (the writer leaves those alone).
    pub same: Vec<bool>,
    /// Per row: a row with its key was stored.
    pub stored: Vec<bool>,
}

/// Changes of one batch, keyed by `(table, canonical pk)`; the first before-image and the
/// last after-hash of a row win (a row may be written twice in one batch: pulled and main).
#[derive(Debug, Default)]
pub struct Tracker {
    /// Read rows before writing them (provenance on, or a dry run counting inserts/updates).
    pub on: bool,
    pub changes: IndexMap<(String, String), Change>,
    /// The run's id and the batch's time, when the changes are stored (provenance on, not a
    /// dry run): the writer of a big parent's child rows stores them as it goes
    /// (`sink/pieces.rs`), so that they need not all be held at once.
    pub store: Option<(String, i64)>,
}

/// Rows of one table indexed by canonical primary key.
pub fn index_rows(t: TableRef<'_>, rows: Vec<Vec<Value>>) -> HashMap<String, Vec<Value>> {
    rows.into_iter()
        .map(|r| (canon::key_of_row(t, &r), r))
        .collect()
}

impl Tracker {
    fn record(&mut self, table: &str, key: String, before: Option<String>, after: Option<String>) {
        match self.changes.entry((table.to_owned(), key)) {
            indexmap::map::Entry::Occupied(mut o) => o.get_mut().after_hash = after,
            indexmap::map::Entry::Vacant(v) => {
                v.insert(Change {
                    before,
                    after_hash: after,
                });
            }
        }
    }

    /// The rows this batch inserted, per table in order of first appearance, as the JSON
    /// list `[[canonical key, after-hash], …]` stored in one provenance record per table.
    pub fn inserted_by_table(&self) -> Vec<(&str, String)> {
        let mut by: IndexMap<&str, Vec<(&str, &str)>> = IndexMap::new();
        for ((table, key), c) in &self.changes {
            if let (true, Some(h)) = (c.is_insert(), &c.after_hash) {
                by.entry(table.as_str())
                    .or_default()
                    .push((key.as_str(), h.as_str()));
            }
        }
        by.into_iter()
            .map(|(t, list)| (t, serde_json::to_string(&list).expect("JSON into memory")))
            .collect()
    }

    /// `new` rows about to be upserted, against the `old` rows with the same keys; with
    /// `prepared`, the canonical key and hash of each new row, computed ahead (else here).
    /// Returns what [`Upserts`] says.
    pub fn upserts(
        &mut self,
        t: TableRef<'_>,
        old: &HashMap<String, Vec<Value>>,
        new: &[Vec<Value>],
        prepared: &[(String, String)],
    ) -> Upserts {
        let mut out = Upserts {
            same: vec![false; new.len()],
            stored: vec![true; new.len()],
            ..Default::default()
        };
        for (n, row) in new.iter().enumerate() {
            let (key, after) = match prepared.get(n) {
                Some((k, h)) => (k.clone(), h.clone()),
                None => (canon::key_of_row(t, row), canon::row_hash(t, row)),
            };
            match old.get(&key) {
                None => {
                    out.inserted += 1;
                    out.stored[n] = false;
                    self.record(t.name, key, None, Some(after));
                }
                Some(prev) if canon::row_hash(t, prev) != after => {
                    out.updated += 1;
                    let before = canon::row_json(t, prev).to_string();
                    self.record(t.name, key, Some(before), Some(after));
                }
                Some(_) => out.same[n] = true,
            }
        }
        out
    }

    /// Rows about to be deleted.
    pub fn deletes(&mut self, t: TableRef<'_>, old: &[Vec<Value>]) {
        for prev in old {
            let before = canon::row_json(t, prev).to_string();
            self.record(t.name, canon::key_of_row(t, prev), Some(before), None);
        }
    }

    /// A row about to get column `col` set to `value` (soft delete); false if already so.
    pub fn set_column(
        &mut self,
        t: TableRef<'_>,
        prev: &[Value],
        col: usize,
        value: &Value,
    ) -> bool {
        let mut after = prev.to_vec();
        after[col] = value.clone();
        let h = canon::row_hash(t, &after);
        if canon::row_hash(t, prev) == h {
            return false;
        }
        let before = canon::row_json(t, prev).to_string();
        self.record(t.name, canon::key_of_row(t, prev), Some(before), Some(h));
        true
    }
}
