//! The missing-reference policies of a mapped page: every reference is checked against
//! the run's memo, and a row whose reference is missing gets its column's policy (`null`,
//! `skip`: a dead letter, `defer`: held back for a later run), recorded in the resolution.

use super::Resolution;
use crate::engine::memo::Memo;
use crate::engine::page::{row_meta, source_id, MappedPage};
use crate::mapping::spec::MissingPolicy;
use crate::mapping::{Entity, Value};
use crate::sink::{DeadLetter, MissingRef};
use bson::RawDocumentBuf;
use std::collections::{HashMap, HashSet};

/// Check every reference of `page` against the memo and apply the column's policy.
/// Returns the main rows that were removed.
pub(super) fn apply_policies(
    e: &Entity,
    page: &mut MappedPage,
    docs: &[RawDocumentBuf],
    memo: &mut Memo,
    res: &mut Resolution,
    pulled: bool,
) -> Vec<Vec<Value>> {
    let ref_cols: Vec<usize> = e
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.references.is_some())
        .map(|(i, _)| i)
        .collect();
    let mut keep = vec![true; page.rows.len()];
    // Rows a policy nulled a column of: their keys and hashes computed ahead are redone below.
    let mut touched = Vec::new();
    for (ri, row) in page.rows.iter_mut().enumerate() {
        let doc = &docs[page.row_docs[ri]];
        for &ci in &ref_cols {
            let c = &e.columns[ci];
            let r = c.references.as_deref().unwrap_or_default();
            if row[ci] == Value::Null {
                continue;
            }
            let kt = row[ci].key_text();
            let state = memo.get(r, &kt);
            if state == Some(true) {
                continue;
            }
            let sid = source_id(doc);
            let record = MissingRef {
                entity: e.name.clone(),
                source_id: sid.clone(),
                column: c.name.clone(),
                ref_entity: r.to_owned(),
                ref_key: kt.clone(),
                policy: c.on_missing,
            };
            match (state, c.on_missing) {
                (Some(false), MissingPolicy::Null) => {
                    row[ci] = Value::Null;
                    touched.push(ri);
                    res.missing.push(record);
                }
                (Some(false), MissingPolicy::Skip) => {
                    keep[ri] = false;
                    let reason = format!("column `{}`: referenced {r} `{kt}` does not exist in the source (on_missing = skip)", c.name);
                    if pulled {
                        res.other_dead.push((e.name.clone(), dead(doc, reason)));
                    } else {
                        res.dead.push(dead(doc, reason));
                    }
                    res.missing.push(record);
                }
                (Some(false), MissingPolicy::Defer) | (None, _) => {
                    keep[ri] = false;
                    if !pulled {
                        let why = if state.is_none() {
                            "reference not resolved within limits"
                        } else {
                            "reference missing (on_missing = defer)"
                        };
                        res.deferred
                            .push((sid, format!("column `{}` -> {r} `{kt}`: {why}", c.name)));
                    }
                    res.missing.push(record);
                }
                (Some(true), _) => {}
            }
        }
    }
    // The keys and hashes computed ahead (`pipeline::prepare`) of the rows a policy changed
    // are computed again here, on the resolve stage: clearing them all made the writer hash
    // every row of the page on its own task, whenever one row of the page had a missing
    // reference (most batches of the full mapping: ~4 % of tidemark's CPU, BENCHMARKS.md,
    // tenth round). Rows dropped take their keys and hashes with them.
    let t = e.table_ref();
    if page.row_meta.len() == page.rows.len() {
        for &ri in &touched {
            page.row_meta[ri] = row_meta(t, &page.rows[ri]);
        }
    }
    // Child rows: null the column, or drop the child row (skip/defer cannot hold back one
    // element); either way the occurrence is recorded under its document, with the column
    // named `<child table>.<column>` (one record per document and column).
    let mut recorded: HashSet<(String, String)> = HashSet::new();
    for (ci, child) in e.children.iter().enumerate() {
        let Some(rows) = page.children.get_mut(ci) else {
            continue;
        };
        // A child row's document, by the values of its link to the parent row.
        let link = |row: &[Value], cols: &mut dyn Iterator<Item = usize>| -> String {
            cols.map(|i| row[i].key_text())
                .collect::<Vec<_>>()
                .join("\u{1f}")
        };
        let parent_doc: HashMap<String, usize> =
            if child.columns.iter().any(|c| c.references.is_some()) {
                page.rows
                    .iter()
                    .zip(&page.row_docs)
                    .map(|(row, &di)| (link(row, &mut child.parent_links.iter().map(|l| l.1)), di))
                    .collect()
            } else {
                HashMap::new()
            };
        let mut meta = page
            .child_meta
            .get_mut(ci)
            .filter(|m| m.len() == rows.len());
        let ct = child.table_ref();
        for (i, c) in child.columns.iter().enumerate() {
            let Some(r) = &c.references else { continue };
            let mut old_meta = meta.as_mut().map(|m| std::mem::take(*m).into_iter());
            for mut row in std::mem::take(rows) {
                let m = old_meta.as_mut().and_then(Iterator::next);
                let fine = row[i] == Value::Null || memo.get(r, &row[i].key_text()) == Some(true);
                if !fine {
                    page.children_cut = true;
                    let at = link(&row, &mut child.parent_links.iter().map(|l| l.0));
                    if let Some(&di) = parent_doc.get(&at) {
                        let sid = source_id(&docs[di]);
                        let column = format!("{}.{}", child.table, c.name);
                        if recorded.insert((sid.clone(), column.clone())) {
                            res.missing.push(MissingRef {
                                entity: e.name.clone(),
                                source_id: sid,
                                column,
                                ref_entity: r.to_owned(),
                                ref_key: row[i].key_text(),
                                policy: c.on_missing,
                            });
                        }
                    }
                    if c.on_missing != MissingPolicy::Null {
                        continue;
                    }
                    row[i] = Value::Null;
                }
                if let Some(out) = meta.as_mut() {
                    out.push(match m {
                        Some(m) if fine => m,
                        _ => row_meta(ct, &row),
                    });
                }
                rows.push(row);
            }
        }
    }
    page.retain_rows(e, &keep)
}

fn dead(doc: &RawDocumentBuf, error: String) -> DeadLetter {
    DeadLetter {
        source_id: source_id(doc),
        error,
        document: crate::engine::page::raw_json(doc),
    }
}
