//! Documents whose arrays map to more child rows than [`BIG_DOC_ROWS`] ([`BigDoc`]): the
//! mapper checks every element of their arrays and keeps only their references; their child
//! rows stay out of the page (`MappedPage::big` (engine/page.rs)) and the writer maps
//! and writes them in pieces (`sink/pieces.rs`), so that memory follows the document.

use crate::mapping::{child_key_hash, Entity, MapError, Outcome, Value};
use std::collections::{HashMap, HashSet};

/// A document whose arrays map to more child rows than this is a [`BigDoc`]: its child rows
/// are mapped and written [`crate::sink::PIECE_ROWS`] at a time, inside the batch's
/// transaction, instead of all at once (BENCHMARKS.md, "Child rows in pieces").
pub const BIG_DOC_ROWS: usize = 10_000;

/// A document whose child rows are written in pieces (see `MappedPage::big` (engine/page.rs)). Mapping
/// checked every element (a failure dead-letters the document, as for any other) and that
/// its child keys are distinct, also from the page's other child rows (else it is mapped
/// whole, for the page's last-version-wins de-duplication).
pub struct BigDoc {
    /// Its index in the page's documents.
    pub di: usize,
    /// Per child table and column with a reference (`(child, column, keys)`): the distinct
    /// keys its rows reference, in order of first appearance.
    pub refs: Vec<(usize, usize, Vec<Value>)>,
    /// Set by the missing-reference policies: per child table and column, the key texts
    /// missing from the target, and whether the column's policy nulls them (else the child
    /// row is dropped).
    pub missing: Vec<(usize, usize, HashSet<String>, bool)>,
    /// Child tables and columns whose missing reference is already recorded.
    pub recorded: HashSet<(usize, usize)>,
    /// 128-bit hashes of its child keys, per child table ([`child_key_hash`]); emptied
    /// once the page is mapped.
    pub(crate) keys: Vec<HashSet<u128>>,
}

/// Map the child rows of a big document (`row` is its main row) without keeping them: the
/// first failing element's error, the keys its reference columns use, and its child keys;
/// None when two of its child rows share a key (it is then mapped whole).
pub(crate) fn scan_big(
    e: &Entity,
    doc: &bson::RawDocument,
    row: &[Value],
    di: usize,
) -> Result<Option<BigDoc>, MapError> {
    let mut big = BigDoc {
        di,
        refs: Vec::new(),
        missing: Vec::new(),
        recorded: Default::default(),
        keys: Vec::new(),
    };
    for (ci, c) in e.children.iter().enumerate() {
        let ref_cols: Vec<usize> = (0..c.columns.len())
            .filter(|&i| c.columns[i].references.is_some())
            .collect();
        let mut refs: Vec<(Vec<Value>, HashSet<String>)> = vec![Default::default(); ref_cols.len()];
        let mut keys = HashSet::new();
        let mut distinct = true;
        for r in c.rows(doc, row)? {
            let r = r?;
            distinct &= keys.insert(child_key_hash(&r, &c.pk));
            for (n, &i) in ref_cols.iter().enumerate() {
                if r[i] != Value::Null && refs[n].1.insert(r[i].key_text()) {
                    refs[n].0.push(r[i].clone());
                }
            }
        }
        if !distinct {
            return Ok(None);
        }
        big.refs
            .extend(ref_cols.into_iter().zip(refs).map(|(i, (v, _))| (ci, i, v)));
        big.keys.push(keys);
    }
    Ok(Some(big))
}

/// Map a big document (number `di` of the page): its main row, its child rows checked
/// ([`scan_big`]) and left to the writer (recorded in `big`), unless two of them share a key
/// (then mapped whole, as any other document).
pub(crate) fn map_big(
    e: &Entity,
    doc: &bson::RawDocument,
    di: usize,
    big: &mut HashMap<usize, BigDoc>,
) -> Result<Outcome, MapError> {
    let outcome = e.map_parent(doc)?;
    let Outcome::Row { row, .. } = &outcome else {
        return Ok(outcome);
    };
    match scan_big(e, doc, row, di)? {
        Some(b) => {
            big.insert(di, b);
            Ok(outcome)
        }
        None => e.map(doc),
    }
}

/// Big documents one of whose child keys another row of the page also has are mapped whole
/// into `parent_children` (indexed like the page's rows; `row_docs`: each row's document) and taken out of `big`: the page's
/// last-version-wins de-duplication then decides, as for any document.
pub(crate) fn materialize_shared(
    e: &Entity,
    docs: &[bson::RawDocumentBuf],
    big: &mut HashMap<usize, BigDoc>,
    row_docs: &[usize],
    parent_children: &mut [Vec<Vec<Vec<Value>>>],
) {
    let mut shared = Vec::new();
    for (ci, c) in e.children.iter().enumerate() {
        for (pc, di) in parent_children.iter().zip(row_docs) {
            for r in &pc[ci] {
                let h = child_key_hash(r, &c.pk);
                shared.extend(
                    big.values()
                        .filter(|b| b.di != *di && b.keys[ci].contains(&h))
                        .map(|b| b.di),
                );
            }
        }
        // Two big documents with a key in common.
        let bigs: Vec<&BigDoc> = big.values().collect();
        for (n, a) in bigs.iter().enumerate() {
            for b in &bigs[n + 1..] {
                if !a.keys[ci].is_disjoint(&b.keys[ci]) {
                    shared.extend([a.di, b.di]);
                }
            }
        }
    }
    for di in shared {
        let Some(at) = row_docs.iter().position(|d| *d == di) else {
            continue;
        };
        // Mapping checked every element of the document already: it maps.
        if let Ok(Outcome::Row { children, .. }) = e.map(&docs[di]) {
            if big.remove(&di).is_some() {
                parent_children[at] = children;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::page::{map_page, map_page_twins};
    use crate::mapping::{Mapping, Value};

    const MAPPING: &str = r#"
version = "t1"
[entities.posts]
collection = "posts"
time_field = "t"
time_encoding = "epoch_seconds"
table = "posts"
primary_key = ["id"]
[entities.posts.columns]
id = { path = "id", type = "text", required = true }
[entities.posts.children.likes]
path = "likes"
table = "likes"
primary_key = ["id"]
[entities.posts.children.likes.columns]
id = { path = "k", type = "text", required = true }
post_id = { parent = "id", type = "text" }
user = { path = "u", type = "text", references = "users", on_missing = "null" }
[entities.users]
collection = "users"
time_field = "t"
time_encoding = "epoch_seconds"
table = "users"
id_field = "id"
primary_key = ["id"]
[entities.users.columns]
id = { path = "id", type = "text", required = true }
"#;

    /// A post whose `likes` have keys `<prefix><n>` for n in 0..len, users u0..u2.
    fn post(id: &str, prefix: &str, len: usize) -> bson::RawDocumentBuf {
        let likes: Vec<bson::Bson> = (0..len)
            .map(|n| bson::bson!({ "k": format!("{prefix}{n}"), "u": format!("u{}", n % 3) }))
            .collect();
        bson::to_raw_document_buf(&bson::doc! { "_id": id, "id": id, "t": 1, "likes": likes })
            .unwrap()
    }

    /// A big document's child rows stay out of the page, its references are collected; a
    /// small one, or any document of a page pulled on demand, has them in the page.
    #[test]
    fn big_documents_leave_their_child_rows_to_the_writer() {
        let m = Mapping::parse(MAPPING, "test").unwrap();
        let e = m.entity("posts").unwrap();
        let docs = vec![post("a", "a", 3), post("big", "b", super::BIG_DOC_ROWS + 1)];

        let page = map_page_twins(e, &docs, true, Default::default(), Vec::new());

        assert_eq!(page.rows.len(), 2);
        assert_eq!(page.children[0].len(), 3, "only a's likes");
        assert_eq!(page.big.len(), 1);
        assert_eq!(page.big[0].di, 1);
        let users: Vec<&Value> = page.big[0].refs.iter().flat_map(|r| &r.2).collect();
        assert_eq!(
            users,
            ["u0", "u1", "u2"]
                .map(|u| Value::Text(u.into()))
                .iter()
                .collect::<Vec<_>>()
        );
        let pulled = map_page(e, &docs, true);
        assert!(pulled.big.is_empty());
        assert_eq!(pulled.children[0].len(), 3 + super::BIG_DOC_ROWS + 1);
    }

    /// A big document sharing a child key with another document of the page, or twice in
    /// itself, is mapped whole: the page's de-duplication (last version wins) decides.
    #[test]
    fn shared_or_repeated_child_keys_map_the_document_whole() {
        let m = Mapping::parse(MAPPING, "test").unwrap();
        let e = m.entity("posts").unwrap();
        let n = super::BIG_DOC_ROWS + 1;
        // "b5" is also a key of the big document's likes.
        let docs = vec![post("a", "b", 6), post("big", "b", n)];
        let page = map_page_twins(e, &docs, true, Default::default(), Vec::new());
        assert!(page.big.is_empty());
        assert_eq!(
            page.children[0].len(),
            n,
            "b0..b5 once each, the big one's last"
        );
        let owner = |k: &str| {
            page.children[0]
                .iter()
                .find(|r| r[0] == Value::Text(k.into()))
                .map(|r| r[1].clone())
        };
        assert_eq!(owner("b5"), Some(Value::Text("big".into())));

        let mut repeated = post("big", "r", n);
        let mut d = bson::Document::try_from(repeated.as_ref()).unwrap();
        let likes = d.get_array_mut("likes").unwrap();
        likes.push(bson::bson!({ "k": "r0", "u": "u9" }));
        repeated = bson::to_raw_document_buf(&d).unwrap();
        let page = map_page_twins(e, &[repeated], true, Default::default(), Vec::new());
        assert!(page.big.is_empty());
        assert_eq!(page.children[0].len(), n, "r0 once, its last version");
        assert_eq!(page.children[0][0][2], Value::Text("u9".into()));
    }
}
