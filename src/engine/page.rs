//! One page of source documents mapped to rows ([`map_page`], [`MappedPage`]) and made
//! ready for the writer ([`prepare`]: keys and hashes computed ahead, off the async runtime).

use crate::engine::big::{map_big, materialize_shared, BigDoc, BIG_DOC_ROWS};
use crate::mapping::value::key_text_of;
use crate::mapping::{Entity, Outcome, TableRef, Value};
use crate::sink::DeadLetter;
use bson::Bson;
use chrono::{DateTime, Utc};
use std::collections::HashMap;

/// Source id used for dead letters: relaxed extended JSON of `_id`.
pub fn source_id(doc: &bson::RawDocument) -> String {
    use bson::raw::RawBsonRef as R;
    match doc.get("_id") {
        // The common id types written directly, with the same text as the relaxed extended
        // JSON below gives them (a test checks it): going through `Bson` and a JSON tree
        // was ~4 % of a flat first load's CPU.
        Ok(Some(R::ObjectId(o))) => format!("{{\"$oid\":\"{}\"}}", o.to_hex()),
        Ok(Some(R::String(s))) => serde_json::to_string(s).expect("JSON into memory"),
        Ok(Some(R::Int32(i))) => i.to_string(),
        Ok(Some(R::Int64(i))) => i.to_string(),
        Ok(Some(v)) => Bson::try_from(v)
            .map(|b| b.into_relaxed_extjson().to_string())
            .unwrap_or_else(|_| "<undecodable _id>".into()),
        _ => "<missing _id>".into(),
    }
}

pub fn raw_json(doc: &bson::RawDocument) -> String {
    // Too deep for the recursive converters: keep the exact bytes instead.
    if crate::mapping::value::nested_deeper_than(
        bson::raw::RawBsonRef::Document(doc),
        crate::mapping::value::MAX_NESTING,
    ) {
        return serde_json::json!({ "$nestedTooDeep": true, "$hex": hex::encode(doc.as_bytes()) })
            .to_string();
    }
    match bson::Document::try_from(doc) {
        Ok(d) => Bson::Document(d).into_relaxed_extjson().to_string(),
        Err(e) => serde_json::json!({ "$undecodable": e.to_string(), "$hex": hex::encode(doc.as_bytes()) }).to_string(),
    }
}

/// A mapped page: rows de-duplicated on the primary key (last version wins).
#[derive(Default)]
pub struct MappedPage {
    pub rows: Vec<Vec<Value>>,
    /// Canonical key and hash of each row, when [`prepare`] computed them ahead.
    pub row_meta: Vec<(String, String)>,
    /// The same per child table, for each of `children`' rows; emptied when the children
    /// change after [`prepare`] (the writer then computes them itself).
    pub child_meta: Vec<Vec<(String, String)>>,
    /// [`crate::engine::pulled::doc_hash`] of each of the page's documents (indexed like them), when
    /// computed ahead, off the writer's task; empty: computed where needed.
    pub doc_hashes: Vec<u64>,
    /// Write without reading first (the window's previous batch was all new rows).
    pub presume_new: bool,
    /// Write the dependents without reading first (the previous batch's were all new).
    pub presume_dependents_new: bool,
    /// For each row, the index of its document in the page.
    pub row_docs: Vec<usize>,
    /// Per child table: rows of the kept parents, de-duplicated on the child key.
    pub children: Vec<Vec<Vec<Value>>>,
    pub deletes: Vec<Vec<Value>>,
    pub soft_deletes: Vec<(Vec<Value>, Value)>,
    pub dead: Vec<DeadLetter>,
    pub resolved: Vec<String>,
    /// Documents that lose their key to a twin of another BSON type, by source id, with the
    /// error (`engine/twins.rs`); they are dead letters of the page.
    pub twin_losers: HashMap<String, String>,
    /// Typed twins outside the page that lose their key to a string of the page, with that
    /// key: dead letters written with the batch, not counted among its documents.
    pub twin_dead: Vec<(Vec<Value>, DeadLetter)>,
    /// Keys of `twin_dead` that a row of the page takes: if a missing-reference policy drops
    /// that row, the twin's row (written before the string arrived) must go too.
    pub twin_keys: std::collections::HashSet<String>,
    pub duplicates: u64,
    /// Documents matching the deleted rule (with or without a derivable key).
    pub deleted: u64,
    pub filtered: u64,
    /// A missing-reference policy nulled or dropped child rows: a later mapping of the same
    /// documents could write more, so [`crate::engine::pulled`] does not record the page's rows.
    pub children_cut: bool,
    /// Documents taken out of the page before mapping because this run already wrote them
    /// (see [`pre_skip`]), to be confirmed when the batch's turn comes
    /// ([`confirm_pre_skipped`]).
    pub unmapped: Vec<PreSkipped>,
    /// How many documents [`confirm_pre_skipped`] confirmed: read, skipped, never mapped.
    pub skipped_unmapped: u64,
    /// Documents of the page whose arrays map to more than [`BIG_DOC_ROWS`] child rows: their
    /// child rows are not in `children`; the writer maps and writes them in pieces
    /// ([`crate::sink::BigParent`]). Kept in the page order of their documents.
    pub big: Vec<BigDoc>,
}

/// A document [`pre_skip`] took out of its page: its position in the page, the document, its
/// source id (computed in the mapper, off the window's task) and its key and document hashes.
pub struct PreSkipped {
    pub(crate) at: usize,
    pub(crate) doc: bson::RawDocumentBuf,
    pub(crate) id: String,
    pub(crate) key: u64,
    pub(crate) hash: u64,
}

impl MappedPage {
    /// Compute [`MappedPage::doc_hashes`] for the page's documents `docs`.
    pub fn hash_docs(&mut self, docs: &[bson::RawDocumentBuf]) {
        self.doc_hashes = docs
            .iter()
            .map(|d| crate::engine::pulled::doc_hash(d))
            .collect();
    }

    /// [`crate::engine::pulled::doc_hash`] of document `di` of `docs` (the page's documents):
    /// computed ahead when it was, else now.
    pub fn doc_hash(&self, docs: &[bson::RawDocumentBuf], di: usize) -> u64 {
        match self.doc_hashes.get(di) {
            Some(&h) => h,
            None => crate::engine::pulled::doc_hash(&docs[di]),
        }
    }

    /// Keep the rows marked in `keep` (with their documents, precomputed keys and hashes, and
    /// child rows); returns the rows removed. A child row goes with its parent, matched on
    /// the child's parent link.
    pub fn retain_rows(&mut self, e: &Entity, keep: &[bool]) -> Vec<Vec<Value>> {
        if keep.iter().all(|k| *k) {
            return Vec::new();
        }
        let meta = std::mem::take(&mut self.row_meta);
        let has_meta = meta.len() == self.rows.len();
        let rows = std::mem::take(&mut self.rows);
        let docs = std::mem::take(&mut self.row_docs);
        let mut removed = Vec::new();
        let mut meta = meta.into_iter();
        for ((row, d), k) in rows.into_iter().zip(docs).zip(keep) {
            let m = if has_meta { meta.next() } else { None };
            if *k {
                self.rows.push(row);
                self.row_docs.push(d);
                self.row_meta.extend(m);
            } else {
                removed.push(row);
            }
        }
        for (ci, child) in e.children.iter().enumerate() {
            let (by, parent_cols): (Vec<usize>, Vec<usize>) =
                child.parent_links.iter().copied().unzip();
            let gone: std::collections::HashSet<String> = removed
                .iter()
                .map(|r| key_text_of(r, &parent_cols))
                .collect();
            let Some(rows) = self.children.get_mut(ci) else {
                continue;
            };
            let kept: Vec<bool> = rows
                .iter()
                .map(|row| !gone.contains(&key_text_of(row, &by)))
                .collect();
            let aligned = self
                .child_meta
                .get(ci)
                .is_some_and(|m| m.len() == rows.len());
            retain_marked(rows, &kept);
            // The child rows' keys and hashes computed ahead go with their rows.
            if let Some(meta) = self.child_meta.get_mut(ci) {
                if aligned {
                    retain_marked(meta, &kept);
                } else {
                    meta.clear();
                }
            }
        }
        removed
    }
}

/// Keep the items of `v` whose mark in `keep` (indexed like them) is true.
fn retain_marked<T>(v: &mut Vec<T>, keep: &[bool]) {
    let mut k = keep.iter();
    v.retain(|_| *k.next().unwrap_or(&false));
}

type RowWithChildren = (Vec<Value>, Vec<Vec<Vec<Value>>>, usize);
type Deletion = (Vec<Value>, Option<DateTime<Utc>>);

/// Map every document of a page; failures become dead letters, nothing is dropped.
/// Within a page the last event per key wins: a later version replaces an earlier one,
/// a deletion cancels an earlier row and a row cancels an earlier deletion.
/// Every child row is in the page ([`MappedPage::children`]): pages of documents pulled on
/// demand, which the writer takes whole.
pub fn map_page(e: &Entity, docs: &[bson::RawDocumentBuf], track_resolved: bool) -> MappedPage {
    map_page_with(e, docs, track_resolved, HashMap::new(), Vec::new(), false)
}

/// [`map_page`] for a page of the entity's own documents, where the documents named in
/// `losers` (by source id) lose their key to a twin of another BSON type and are dead letters
/// (`engine/twins.rs`), and big documents' child rows are left to the writer
/// ([`MappedPage::big`]).
pub fn map_page_twins(
    e: &Entity,
    docs: &[bson::RawDocumentBuf],
    track_resolved: bool,
    losers: HashMap<String, String>,
    twin_dead: Vec<(Vec<Value>, DeadLetter)>,
) -> MappedPage {
    map_page_with(e, docs, track_resolved, losers, twin_dead, true)
}

fn map_page_with(
    e: &Entity,
    docs: &[bson::RawDocumentBuf],
    track_resolved: bool,
    losers: HashMap<String, String>,
    twin_dead: Vec<(Vec<Value>, DeadLetter)>,
    pieces: bool,
) -> MappedPage {
    let mut out = MappedPage::default();
    let mut wins = LastWins::with_capacity(docs.len());
    let mut last_ok: HashMap<String, bool> = HashMap::new();
    let mut big = HashMap::new();
    for (di, doc) in docs.iter().enumerate() {
        let track = track_resolved.then_some(&mut last_ok);
        let pieces = pieces
            && !e.children.is_empty()
            && e.children.iter().all(|c| c.links_whole_parent_key(&e.pk))
            && e.child_elements(doc) > BIG_DOC_ROWS;
        let Some(outcome) = map_one(e, doc, di, pieces, &losers, &mut out, track, &mut big) else {
            continue;
        };
        match outcome {
            Outcome::Row { row, children } => {
                let key = key_text_of(&row, &e.pk);
                wins.row(key, (row, children, di), &mut out);
            }
            Outcome::Deleted { key, at } => {
                out.deleted += 1;
                if let Some(k) = key {
                    wins.delete(k, at, &mut out);
                }
            }
            Outcome::Filtered => out.filtered += 1,
        }
    }
    if track_resolved {
        keep_last_versions(&mut out, &last_ok);
    }
    // A typed twin that loses its key to a string of the page may have a row, written before
    // the string arrived: the string's row replaces it; if the string makes none (filtered,
    // unmappable), the twin's row is deleted. (Found by the oracle test: the row stayed.)
    for (k, _) in &twin_dead {
        let kt = crate::mapping::value::key_text(k);
        if wins.index.contains_key(&kt) {
            out.twin_keys.insert(kt);
        } else if !wins.del_index.contains_key(&kt) {
            out.deletes.push(k.clone());
        }
    }
    wins.into_page(e, docs, big, &mut out);
    out.twin_losers = losers;
    out.twin_dead = twin_dead;
    out
}

/// Map one document: its outcome, or `None` when it became a dead letter in `out` (a twin
/// that lost its key to another, or a document that does not map). With `last_ok` (the page
/// tracks what it resolved) the document's id goes to `out.resolved` when it maps, and
/// `last_ok` records whether its latest version did. With `pieces` (a big document, number
/// `di` of the page), its child rows are only checked, and it goes to `big`.
#[allow(clippy::too_many_arguments)]
fn map_one(
    e: &Entity,
    doc: &bson::RawDocument,
    di: usize,
    pieces: bool,
    losers: &HashMap<String, String>,
    out: &mut MappedPage,
    last_ok: Option<&mut HashMap<String, bool>>,
    big: &mut HashMap<usize, BigDoc>,
) -> Option<Outcome> {
    let lost = if losers.is_empty() {
        None
    } else {
        let id = source_id(doc);
        losers.get(&id).map(|error| (id, error.clone()))
    };
    let failed = match lost {
        Some(dead) => Err(dead),
        None if pieces => map_big(e, doc, di, big).map_err(|err| (source_id(doc), err.to_string())),
        None => e.map(doc).map_err(|err| (source_id(doc), err.to_string())),
    };
    match failed {
        Ok(outcome) => {
            if let Some(last_ok) = last_ok {
                let id = source_id(doc);
                last_ok.insert(id.clone(), true);
                out.resolved.push(id);
            }
            Some(outcome)
        }
        Err((id, error)) => {
            if let Some(last_ok) = last_ok {
                last_ok.insert(id.clone(), false);
            }
            out.dead.push(DeadLetter {
                source_id: id,
                error,
                document: raw_json(doc),
            });
            None
        }
    }
}

/// A document that came twice in the page (changed while being read): its last version
/// decides whether it is dead-lettered or resolved; a superseded failure counts as a
/// duplicate.
fn keep_last_versions(out: &mut MappedPage, last_ok: &HashMap<String, bool>) {
    if last_ok.len() >= out.dead.len() + out.resolved.len() {
        return; // every document came once
    }
    let before = out.dead.len();
    out.dead
        .retain(|d| last_ok.get(&d.source_id) != Some(&true));
    out.duplicates += (before - out.dead.len()) as u64;
    let mut seen = std::collections::HashSet::new();
    out.resolved
        .retain(|id| last_ok.get(id) == Some(&true) && seen.insert(id.clone()));
}

/// A page's rows and deletions by key, the last event per key winning: a later version
/// replaces an earlier one, a deletion cancels an earlier row and a row an earlier deletion
/// (each counted in `MappedPage::duplicates`). First-seen order is kept.
struct LastWins {
    rows: Vec<Option<RowWithChildren>>,
    index: HashMap<String, usize>,
    deletes: Vec<Option<Deletion>>,
    del_index: HashMap<String, usize>,
}

impl LastWins {
    fn with_capacity(n: usize) -> Self {
        LastWins {
            rows: Vec::with_capacity(n),
            index: HashMap::with_capacity(n),
            deletes: Vec::new(),
            del_index: HashMap::new(),
        }
    }

    /// The row (with its child rows and document index) of the key `key`.
    fn row(&mut self, key: String, row: RowWithChildren, out: &mut MappedPage) {
        if let Some(at) = self.del_index.remove(&key) {
            self.deletes[at] = None;
            out.duplicates += 1;
            out.deleted -= 1;
        }
        match self.index.get(&key) {
            Some(&at) => {
                self.rows[at] = Some(row);
                out.duplicates += 1;
            }
            None => {
                self.index.insert(key, self.rows.len());
                self.rows.push(Some(row));
            }
        }
    }

    /// The deletion of the row with primary key `k`, deleted at `at` (already counted in
    /// `out.deleted`).
    fn delete(&mut self, k: Vec<Value>, at: Option<DateTime<Utc>>, out: &mut MappedPage) {
        let kt = crate::mapping::value::key_text(&k);
        if let Some(i) = self.index.remove(&kt) {
            self.rows[i] = None;
            out.duplicates += 1;
        }
        match self.del_index.get(&kt) {
            Some(&i) => {
                self.deletes[i] = Some((k, at));
                out.duplicates += 1;
                out.deleted -= 1;
            }
            None => {
                self.del_index.insert(kt, self.deletes.len());
                self.deletes.push(Some((k, at)));
            }
        }
    }

    /// The winners into `out`: deletions (marks with their time for a soft delete), rows
    /// with the index of their document, and each child table's rows, last per key. Big
    /// documents among the winners go to `out.big`, unless one of their child keys is also
    /// another row's of the page: then they are mapped whole (from `docs`) for the
    /// de-duplication.
    fn into_page(
        self,
        e: &Entity,
        docs: &[bson::RawDocumentBuf],
        mut big: HashMap<usize, BigDoc>,
        out: &mut MappedPage,
    ) {
        let soft = e
            .deleted
            .as_ref()
            .is_some_and(|d| d.action == crate::mapping::spec::DeleteAction::SoftDelete);
        for (k, at) in self.deletes.into_iter().flatten() {
            if soft {
                out.soft_deletes
                    .push((k, at.map_or(Value::Null, Value::Timestamp)));
            } else {
                out.deletes.push(k);
            }
        }
        let mut parent_children = Vec::with_capacity(self.rows.len());
        for (row, children, di) in self.rows.into_iter().flatten() {
            out.rows.push(row);
            out.row_docs.push(di);
            parent_children.push(children);
        }
        if !big.is_empty() {
            big.retain(|di, _| out.row_docs.contains(di));
            materialize_shared(e, docs, &mut big, &out.row_docs, &mut parent_children);
            let mut big: Vec<BigDoc> = big.into_values().collect();
            big.sort_by_key(|b| b.di);
            for b in &mut big {
                b.keys = Vec::new();
            }
            out.big = big;
        }
        out.children = e
            .children
            .iter()
            .enumerate()
            .map(|(ci, c)| {
                let mut rows: Vec<Vec<Value>> = Vec::new();
                let mut seen: HashMap<String, usize> = HashMap::new();
                for r in parent_children
                    .iter_mut()
                    .flat_map(|pc| std::mem::take(&mut pc[ci]))
                {
                    let k = key_text_of(&r, &c.pk);
                    match seen.get(&k) {
                        Some(&at) => rows[at] = r,
                        None => {
                            seen.insert(k, rows.len());
                            rows.push(r);
                        }
                    }
                }
                rows
            })
            .collect();
    }
}

/// A row's canonical key and hash, as the writer records them for provenance.
pub fn row_meta(t: TableRef<'_>, row: &[Value]) -> (String, String) {
    (
        crate::mapping::canon::key_of_row(t, row),
        crate::mapping::canon::row_hash(t, row),
    )
}

/// Get a mapped page ready for the writer, off its critical path: with `hash` (provenance
/// on, or a dry run counting inserts and updates) compute each row's canonical key and
/// hash, then serialize its JSON columns to text. The writer then only compares hashes and
/// binds text while the database works (the window pipeline runs this in its mapper stage).
pub fn prepare(e: &Entity, page: &mut MappedPage, hash: bool) {
    let t = e.table_ref();
    let meta = |t: TableRef<'_>, rows: &[Vec<Value>]| -> Vec<(String, String)> {
        rows.iter().map(|r| row_meta(t, r)).collect()
    };
    if hash {
        page.row_meta = meta(t, &page.rows);
        page.child_meta = e
            .children
            .iter()
            .zip(&page.children)
            .map(|(c, rows)| meta(c.table_ref(), rows))
            .collect();
    }
    for row in page
        .rows
        .iter_mut()
        .chain(page.children.iter_mut().flatten())
    {
        for v in row.iter_mut() {
            match v {
                Value::Json(j) => *v = Value::json_text(j.to_string()),
                // Hashed: the writer needs only the text.
                Value::JsonText { sorted, .. } => *sorted = None,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::source_id;
    use bson::{doc, oid::ObjectId, Bson, RawDocumentBuf};

    /// The direct texts of the common id types are those of the relaxed extended JSON that
    /// every other id type (and every id recorded before) gets.
    #[test]
    fn source_ids_are_the_relaxed_extended_json_of_the_id() {
        let ids = [
            Bson::ObjectId(ObjectId::parse_str("64b7f0c2a1b2c3d4e5f60718").unwrap()),
            Bson::String("viz-\"quoted\" \\ é 😀 \u{1}".into()),
            Bson::String(String::new()),
            Bson::Int32(-7),
            Bson::Int64(i64::MAX),
            Bson::Double(1.5),
            Bson::Boolean(true),
        ];
        for id in ids {
            let raw = RawDocumentBuf::from_document(&doc! { "_id": id.clone(), "x": 1 }).unwrap();
            assert_eq!(
                source_id(&raw),
                id.clone().into_relaxed_extjson().to_string(),
                "{id:?}"
            );
        }
        let none = RawDocumentBuf::from_document(&doc! { "x": 1 }).unwrap();
        assert_eq!(source_id(&none), "<missing _id>");
    }
}
