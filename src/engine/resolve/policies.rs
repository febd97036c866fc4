//! The missing-reference policies of a mapped page: every reference is checked against
//! the run's memo, and a row whose reference is missing gets its column's policy (`null`,
//! `skip`: a dead letter, `defer`: held back for a later run), recorded in the resolution.
//! A row gets exactly one fate: with several unresolved references, the strictest policy
//! among them wins (skip, then defer, then null; docs/DEPENDENCIES.md).

use super::Resolution;
use crate::engine::memo::Memo;
use crate::engine::page::{row_meta, source_id, MappedPage};
use crate::mapping::spec::MissingPolicy;
use crate::mapping::value::key_text_of;
use crate::mapping::{Child, Entity, Value};
use crate::sink::{DeadLetter, MissingRef};
use bson::RawDocumentBuf;
use std::collections::{HashMap, HashSet};

/// What becomes of one main row, from its unresolved references; the order is strictness.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// Written (every unresolved reference had `on_missing = "null"` and was nulled).
    Write,
    /// Held back: `on_missing = "defer"`, or a reference not resolved within the limits.
    Held(String),
    /// Dead-lettered: `on_missing = "skip"`.
    Dead(String),
}

impl Fate {
    fn strictness(&self) -> u8 {
        match self {
            Fate::Write => 0,
            Fate::Held(_) => 1,
            Fate::Dead(_) => 2,
        }
    }
}

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
    let mut keep = vec![true; page.rows.len()];
    // Rows a policy nulled a column of: their keys and hashes computed ahead are redone below.
    let mut touched = Vec::new();
    for (ri, row) in page.rows.iter_mut().enumerate() {
        let doc = &docs[page.row_docs[ri]];
        let (fate, nulled) = main_row_fate(e, row, doc, memo, res);
        if nulled {
            touched.push(ri);
        }
        keep[ri] = fate == Fate::Write;
        match fate {
            Fate::Write => {}
            Fate::Dead(reason) if pulled => {
                res.other_dead.push((e.name.clone(), dead(doc, reason)))
            }
            Fate::Dead(reason) => res.dead.push(dead(doc, reason)),
            // A pulled row held back is simply not written (its key is forgotten by the caller).
            Fate::Held(_) if pulled => {}
            Fate::Held(why) => res.deferred.push((source_id(doc), why)),
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
    child_policies(e, page, docs, memo, res);
    big_child_policies(e, page, docs, memo, res);
    twins_go_too(e, page, &keep);
    page.retain_rows(e, &keep)
}

/// A dropped row that took its key from a typed twin outside the page (`engine/twins.rs`):
/// the twin's row, written before the string arrived, is deleted, since neither document
/// has a row now. (Found by the oracle test: the twin's row stayed.)
fn twins_go_too(e: &Entity, page: &mut MappedPage, keep: &[bool]) {
    if page.twin_keys.is_empty() {
        return;
    }
    for (row, _) in page.rows.iter().zip(keep).filter(|(_, k)| !**k) {
        if page.twin_keys.contains(&key_text_of(row, &e.pk)) {
            page.deletes
                .push(e.pk.iter().map(|&i| row[i].clone()).collect());
        }
    }
}

/// The fate of one main row: every unresolved reference is recorded, `null` columns are
/// nulled, and the strictest policy among them decides (the first such column gives the
/// reason). Also returns whether a column was nulled.
fn main_row_fate(
    e: &Entity,
    row: &mut [Value],
    doc: &RawDocumentBuf,
    memo: &Memo,
    res: &mut Resolution,
) -> (Fate, bool) {
    let mut fate = Fate::Write;
    let mut nulled = false;
    for (ci, c) in e.columns.iter().enumerate() {
        let Some(r) = c.references.as_deref() else {
            continue;
        };
        if row[ci] == Value::Null {
            continue;
        }
        let kt = row[ci].key_text();
        let state = memo.get(r, &kt);
        if state == Some(true) {
            continue;
        }
        let this = match (state, c.on_missing) {
            (Some(false), MissingPolicy::Null) => {
                row[ci] = Value::Null;
                nulled = true;
                Fate::Write
            }
            (Some(false), MissingPolicy::Skip) => Fate::Dead(format!(
                "column `{}`: referenced {r} `{kt}` is not in the target and could not be written from the source \
                 (no such document there, or it is itself dead-lettered or filtered: see its own dead letter) (on_missing = skip)",
                c.name
            )),
            (Some(false), MissingPolicy::Defer) => Fate::Held(format!(
                "column `{}` -> {r} `{kt}`: reference missing (on_missing = defer)",
                c.name
            )),
            _ => Fate::Held(format!(
                "column `{}` -> {r} `{kt}`: reference not resolved within limits",
                c.name
            )),
        };
        // The first column of the strictest kind gives the reason.
        if this.strictness() > fate.strictness() {
            fate = this;
        }
        res.missing.push(MissingRef {
            entity: e.name.clone(),
            source_id: source_id(doc),
            column: c.name.clone(),
            ref_entity: r.to_owned(),
            ref_key: kt,
            policy: c.on_missing,
        });
    }
    (fate, nulled)
}

/// Child rows: null the column, or drop the child row (skip/defer cannot hold back one
/// element); either way the occurrence is recorded under its document, with the column
/// named `<child table>.<column>` (one record per document and column).
fn child_policies(
    e: &Entity,
    page: &mut MappedPage,
    docs: &[RawDocumentBuf],
    memo: &Memo,
    res: &mut Resolution,
) {
    let mut recorded: HashSet<(String, String)> = HashSet::new();
    for (ci, child) in e.children.iter().enumerate() {
        if ci >= page.children.len() || !child.columns.iter().any(|c| c.references.is_some()) {
            continue;
        }
        let parent_doc = parent_docs(child, page);
        for (i, c) in child.columns.iter().enumerate() {
            let Some(r) = &c.references else { continue };
            let rows = std::mem::take(&mut page.children[ci]);
            let mut meta = page
                .child_meta
                .get_mut(ci)
                .filter(|m| m.len() == rows.len());
            let mut old_meta = meta.as_mut().map(|m| std::mem::take(*m).into_iter());
            let ct = child.table_ref();
            for mut row in rows {
                let m = old_meta.as_mut().and_then(Iterator::next);
                let fine = row[i] == Value::Null || memo.get(r, &row[i].key_text()) == Some(true);
                if !fine {
                    page.children_cut = true;
                    let at = link(&row, child.parent_links.iter().map(|l| l.0));
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
                page.children[ci].push(row);
            }
        }
    }
}

/// The child rows of big documents ([`crate::engine::page::BigDoc`]), which the writer maps
/// in pieces: the keys they reference that are missing get their column's policy there
/// (`BigDoc::missing`: null the column or drop the row, as [`child_policies`] does), and
/// the occurrence is recorded here, once per document and column.
fn big_child_policies(
    e: &Entity,
    page: &mut MappedPage,
    docs: &[RawDocumentBuf],
    memo: &Memo,
    res: &mut Resolution,
) {
    for b in &mut page.big {
        b.missing.clear();
        for (ci, i, keys) in &b.refs {
            let child = &e.children[*ci];
            let c = &child.columns[*i];
            let Some(r) = &c.references else { continue };
            let missing: HashSet<String> = keys
                .iter()
                .map(|k| k.key_text())
                .filter(|k| memo.get(r, k) != Some(true))
                .collect();
            let Some(first) = keys.iter().find(|k| missing.contains(&k.key_text())) else {
                continue;
            };
            page.children_cut = true;
            if b.recorded.insert((*ci, *i)) {
                res.missing.push(MissingRef {
                    entity: e.name.clone(),
                    source_id: source_id(&docs[b.di]),
                    column: format!("{}.{}", child.table, c.name),
                    ref_entity: r.to_owned(),
                    ref_key: first.key_text(),
                    policy: c.on_missing,
                });
            }
            b.missing
                .push((*ci, *i, missing, c.on_missing == MissingPolicy::Null));
        }
    }
}

/// The values of a row's link to its parent (child side or parent side), as one text.
fn link(row: &[Value], cols: impl Iterator<Item = usize>) -> String {
    cols.map(|i| row[i].key_text())
        .collect::<Vec<_>>()
        .join("\u{1f}")
}

/// A child row's document, by the values of its link to the parent row.
fn parent_docs(child: &Child, page: &MappedPage) -> HashMap<String, usize> {
    page.rows
        .iter()
        .zip(&page.row_docs)
        .map(|(row, &di)| (link(row, child.parent_links.iter().map(|l| l.1)), di))
        .collect()
}

fn dead(doc: &RawDocumentBuf, error: String) -> DeadLetter {
    DeadLetter {
        source_id: source_id(doc),
        error,
        document: crate::engine::page::raw_json(doc),
    }
}
