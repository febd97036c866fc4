//! What the target must hold for a page of source documents: one expected row (or none)
//! per key, the missing-reference policies applied against what the target holds.

use crate::mapping::canon;
use crate::mapping::spec::{DeleteAction, MissingPolicy};
use crate::mapping::{Child, Entity, Outcome, Value};
use crate::sink::Sink;
use anyhow::Result;
use bson::RawDocumentBuf;
use std::collections::{HashMap, HashSet};

/// What the target must hold for one key of a page.
pub(super) enum Expected {
    /// This row and, per child table, these child rows (`soft`: marked deleted).
    Row {
        row: Vec<Value>,
        children: Vec<Vec<Vec<Value>>>,
        soft: bool,
    },
    /// Soft-deleted, but the document no longer maps: only the marker is known.
    Marked { key: Vec<Value>, at: Value },
    /// Deleted by the deleted rule: no row.
    Gone { key: Vec<Value> },
}

/// One key of a page: what is expected, from which document.
pub(super) struct Entry {
    pub(super) key: String,
    pub(super) expected: Expected,
    pub(super) doc: usize,
    /// Why the row must stay out of the target (a `skip` / `defer` reference), if so.
    pub(super) held: Option<String>,
}

/// Child rows of one parent without two of the same key (the last one wins, as in a run).
pub(super) fn dedup_children(c: &Child, rows: Vec<Vec<Value>>) -> Vec<Vec<Value>> {
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<Vec<Value>> = Vec::with_capacity(rows.len());
    for r in rows {
        let k = canon::key_of_row(c.table_ref(), &r);
        match at.get(&k) {
            Some(&i) => out[i] = r,
            None => {
                at.insert(k, out.len());
                out.push(r);
            }
        }
    }
    out
}

/// What the target must hold for a page of documents, one entry per key (the last
/// document of a key wins, as in a run), and the indexes of the documents that cannot be
/// mapped. `plain` is `e` without its deleted rule: a soft-deleted document keeps its row.
pub(super) fn expect_page(
    e: &Entity,
    plain: &Entity,
    docs: &[RawDocumentBuf],
) -> (Vec<Entry>, Vec<usize>) {
    let soft_col = e
        .deleted
        .as_ref()
        .filter(|d| d.action == DeleteAction::SoftDelete)
        .and_then(|d| d.column);
    let mut entries: Vec<Option<Entry>> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut unmappable = Vec::new();
    let t = e.table_ref();
    for (di, doc) in docs.iter().enumerate() {
        let expected = match e.map(doc) {
            Err(_) => {
                unmappable.push(di);
                continue;
            }
            Ok(Outcome::Filtered) => continue,
            // A soft-deleted document maps to its full row with the marker set.
            Ok(Outcome::Row { row, children }) => Expected::Row {
                soft: soft_col.is_some_and(|sc| !matches!(row[sc], Value::Null)),
                row,
                children,
            },
            Ok(Outcome::Deleted { key: None, .. }) => continue,
            Ok(Outcome::Deleted { key: Some(key), at }) => {
                let at = at.map_or(Value::Null, Value::Timestamp);
                match soft_col {
                    None => Expected::Gone { key },
                    Some(sc) => match plain.map(doc) {
                        Ok(Outcome::Row { mut row, children }) => {
                            row[sc] = at;
                            Expected::Row {
                                row,
                                children,
                                soft: true,
                            }
                        }
                        _ => Expected::Marked { key, at },
                    },
                }
            }
        };
        let key = match &expected {
            Expected::Row { row, .. } => canon::key_of_row(t, row),
            Expected::Marked { key, .. } | Expected::Gone { key } => canon::key_text(t, key),
        };
        let entry = Entry {
            key: key.clone(),
            expected,
            doc: di,
            held: None,
        };
        match at.get(&key) {
            Some(&i) => entries[i] = Some(entry),
            None => {
                at.insert(key, entries.len());
                entries.push(Some(entry));
            }
        }
    }
    let mut out: Vec<Entry> = entries.into_iter().flatten().collect();
    for en in &mut out {
        if let Expected::Row { children, .. } = &mut en.expected {
            for (c, rows) in e.children.iter().zip(children.iter_mut()) {
                *rows = dedup_children(c, std::mem::take(rows));
            }
        }
    }
    (out, unmappable)
}

/// Referenced keys (per referenced entity) the target holds, of those `entries` use.
pub(super) async fn present_refs(
    sink: &Sink,
    s: &crate::mapping::Mapping,
    e: &Entity,
    entries: &[Entry],
) -> Result<HashMap<String, HashSet<String>>> {
    let mut wanted: HashMap<String, (HashSet<String>, Vec<Value>)> = HashMap::new();
    let mut add = |r: &str, v: &Value| {
        if *v == Value::Null {
            return;
        }
        let w = wanted.entry(r.to_owned()).or_default();
        if w.0.insert(v.key_text()) {
            w.1.push(v.clone());
        }
    };
    for en in entries {
        let Expected::Row { row, children, .. } = &en.expected else {
            continue;
        };
        for (c, v) in e.columns.iter().zip(row) {
            if let Some(r) = &c.references {
                add(r, v);
            }
        }
        for (ch, rows) in e.children.iter().zip(children) {
            for row in rows {
                for (c, v) in ch.columns.iter().zip(row) {
                    if let Some(r) = &c.references {
                        add(r, v);
                    }
                }
            }
        }
    }
    let mut out = HashMap::new();
    for (r, (texts, keys)) in wanted {
        let re = s.entity(&r)?;
        let found = match re.key_column {
            Some(kc) => sink.existing_keys(re.table_ref(), kc, &keys).await?,
            // Without a key column a reference cannot be looked up (a run defers such rows).
            None => texts,
        };
        out.insert(r, found);
    }
    Ok(out)
}

/// Apply the missing-reference policies to one expected row, as a run does against what
/// the target holds: NULL the column (`null`), drop the child row (`skip` / `defer` in a
/// child column) or keep the row out (`skip` / `defer`: the reason is returned).
pub(super) fn apply_policies(
    e: &Entity,
    present: &HashMap<String, HashSet<String>>,
    row: &mut [Value],
    children: &mut [Vec<Vec<Value>>],
) -> Option<String> {
    let absent = |r: &str, v: &Value| {
        *v != Value::Null && !present.get(r).is_some_and(|p| p.contains(&v.key_text()))
    };
    let mut held = None;
    for (c, v) in e.columns.iter().zip(row.iter_mut()) {
        let Some(r) = &c.references else { continue };
        if !absent(r, v) {
            continue;
        }
        match c.on_missing {
            MissingPolicy::Null => *v = Value::Null,
            p => {
                held.get_or_insert_with(|| {
                    format!(
                        "column `{}` references {r} `{}`, which the target does not hold (on_missing = {})",
                        c.name,
                        v.key_text(),
                        if p == MissingPolicy::Skip { "skip" } else { "defer" }
                    )
                });
            }
        }
    }
    for (ch, rows) in e.children.iter().zip(children.iter_mut()) {
        rows.retain_mut(|row| {
            for (c, v) in ch.columns.iter().zip(row.iter_mut()) {
                let Some(r) = &c.references else { continue };
                if absent(r, v) {
                    if c.on_missing != MissingPolicy::Null {
                        return false;
                    }
                    *v = Value::Null;
                }
            }
            true
        });
    }
    held
}
