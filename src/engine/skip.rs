//! Skipping what this run already wrote from the same documents ([`crate::engine::pulled`]):
//! documents taken out of a page before it is mapped (a guess, confirmed in the batch's
//! turn), and mapped rows taken out before they are resolved.

use crate::engine::ctx::Ctx;
use crate::engine::page::{map_page_twins, prepare, source_id, MappedPage, PreSkipped};
use crate::mapping::Entity;
use crate::source::Page;
use std::collections::HashMap;

/// Take out of a page, before it is mapped, the documents this run already wrote as they
/// are (pulled by an earlier lane, [`crate::engine::pulled`]): most of what the lanes after the
/// vizzes lane read on the benchmark's full mapping, where mapping them only to drop the
/// rows was most of those lanes' time. A document's key comes from the key columns alone
/// ([`Entity::key_of`]). Only documents whose key appears once in the page qualify (a later
/// version of the same key in the page wins, so skipping one of them is not the same as
/// skipping the row). The mapper looks ahead of the batches being resolved and written, so
/// this is a guess: [`confirm_pre_skipped`] checks it again in the batch's turn. Returns
/// the documents taken out, and the document hashes of those left (for [`skip_pulled`]).
pub(super) fn pre_skip(
    pulled: &std::sync::Mutex<crate::engine::pulled::Pulled>,
    e: &Entity,
    docs: &mut Vec<bson::RawDocumentBuf>,
) -> (Vec<PreSkipped>, Vec<u64>) {
    let hashes: Vec<u64> = docs
        .iter()
        .map(|d| crate::engine::pulled::doc_hash(d))
        .collect();
    let keys: Vec<Option<u64>> = docs
        .iter()
        .map(|d| {
            e.key_of(d)
                .map(|k| crate::engine::pulled::deleted_key_hash(e, &k))
        })
        .collect();
    let mut seen: HashMap<u64, u32> = HashMap::with_capacity(keys.len());
    for k in keys.iter().flatten() {
        *seen.entry(*k).or_default() += 1;
    }
    let hit: Vec<bool> = {
        let mut pulled = pulled.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .zip(&hashes)
            .map(|(k, &h)| k.is_some_and(|k| seen[&k] == 1 && pulled.same(k, h)))
            .collect()
    };
    if !hit.contains(&true) {
        return (Vec::new(), hashes);
    }
    let mut out = Vec::new();
    let mut kept = Vec::with_capacity(docs.len());
    let mut kept_hashes = Vec::with_capacity(docs.len());
    for (at, (((doc, key), hash), hit)) in std::mem::take(docs)
        .into_iter()
        .zip(keys)
        .zip(hashes)
        .zip(hit)
        .enumerate()
    {
        match key.filter(|_| hit) {
            Some(key) => out.push(PreSkipped {
                at,
                id: source_id(&doc),
                doc,
                key,
                hash,
            }),
            None => {
                kept.push(doc);
                kept_hashes.push(hash);
            }
        }
    }
    *docs = kept;
    (out, kept_hashes)
}

/// In the batch's turn (after every earlier batch was resolved), skip the documents
/// [`pre_skip`] took out, as [`skip_pulled`] would have skipped their rows. If one no longer
/// qualifies (an earlier batch wrote its key since), the page is put back together and
/// mapped again whole, as if nothing had been taken out.
/// `hash`: as [`prepare`]'s.
pub(super) fn confirm_pre_skipped(
    pulled: &std::sync::Mutex<crate::engine::pulled::Pulled>,
    e: &Entity,
    page: &mut Page,
    mapped: &mut MappedPage,
    hash: bool,
) {
    if mapped.unmapped.is_empty() {
        return;
    }
    let confirmed = {
        let mut pulled = pulled.lock().unwrap_or_else(|p| p.into_inner());
        // Every key is looked up, as `skip_pulled` would have (a stale one is forgotten).
        mapped
            .unmapped
            .iter()
            .filter(|p| !pulled.take_same(p.key, p.hash))
            .count()
            == 0
    };
    if confirmed {
        mapped.skipped_unmapped = mapped.unmapped.len() as u64;
        mapped
            .resolved
            .extend(mapped.unmapped.drain(..).map(|p| p.id));
        return;
    }
    let mut docs = std::mem::take(&mut page.docs).into_iter();
    let mut unmapped = std::mem::take(&mut mapped.unmapped).into_iter().peekable();
    let total = docs.len() + unmapped.len();
    page.docs = (0..total)
        .filter_map(|at| match unmapped.next_if(|p| p.at == at) {
            Some(p) => Some(p.doc),
            None => docs.next(),
        })
        .collect();
    let mut again = map_page_twins(
        e,
        &page.docs,
        true,
        std::mem::take(&mut mapped.twin_losers),
        std::mem::take(&mut mapped.twin_dead),
    );
    prepare(e, &mut again, hash);
    again.hash_docs(&page.docs);
    again.presume_new = mapped.presume_new;
    again.presume_dependents_new = mapped.presume_dependents_new;
    *mapped = again;
}

/// Take out of `mapped` the rows this run already wrote from the same documents (see
/// [`crate::engine::pulled`]); returns how many.
pub(super) fn skip_pulled(
    ctx: &Ctx,
    e: &Entity,
    docs: &[bson::RawDocumentBuf],
    mapped: &mut MappedPage,
) -> u64 {
    if !e.dependents.is_empty() || mapped.rows.is_empty() {
        return 0;
    }
    let mut pulled = ctx.pulled.lock().unwrap_or_else(|p| p.into_inner());
    if pulled.is_empty() {
        return 0;
    }
    let keep: Vec<bool> = mapped
        .rows
        .iter()
        .zip(&mapped.row_docs)
        .map(|(row, &di)| {
            !pulled.take_same(
                crate::engine::pulled::key_hash(e, row),
                mapped.doc_hash(docs, di),
            )
        })
        .collect();
    drop(pulled);
    mapped.retain_rows(e, &keep).len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::page::map_page;
    use crate::engine::pulled::{deleted_key_hash, doc_hash, Pulled};
    use crate::mapping::Mapping;
    use crate::mapping::Value;
    use crate::source::Position;
    use bson::Bson;
    use std::sync::Mutex;

    const MAPPING: &str = r#"
version = "t1"
[entities.items]
collection = "items"
time_field = "t"
time_encoding = "epoch_seconds"
table = "items"
primary_key = ["id"]
[entities.items.columns]
id = { path = "k", type = "text", required = true }
v = { path = "v", type = "integer" }
"#;

    fn doc(k: &str, v: i32) -> bson::RawDocumentBuf {
        bson::rawdoc! { "_id": format!("{k}-{v}"), "k": k, "t": 1, "v": v }
    }

    fn key(e: &Entity, k: &str) -> u64 {
        deleted_key_hash(e, &[Value::Text(k.into())])
    }

    /// The mapper's look-ahead: what it takes out, what it leaves, and the batch's turn
    /// confirming the guess, or mapping the page again whole when an earlier batch wrote
    /// one of the keys since.
    #[test]
    fn documents_already_written_are_skipped_unmapped_and_a_stale_guess_is_mapped_again() {
        let m = Mapping::parse(MAPPING, "test").unwrap();
        let e = m.entity("items").unwrap();
        let (a, b, c, c2) = (doc("a", 1), doc("b", 1), doc("c", 1), doc("c", 2));
        let pulled = Mutex::new(Pulled::default());
        pulled.lock().unwrap().record(&[
            (key(e, "a"), doc_hash(&a)),
            (key(e, "b"), doc_hash(&doc("b", 0))),
            (key(e, "c"), doc_hash(&c)),
        ]);
        // a: written as it is; b: another version was; c twice in the page: the later wins,
        // so neither is taken out.
        let page = || Page {
            docs: vec![a.clone(), b.clone(), c.clone(), c2.clone()],
            last: Position {
                ts: Bson::Int32(1),
                id: Bson::Null,
            },
        };
        let mut p = page();
        let (unmapped, hashes) = pre_skip(&pulled, e, &mut p.docs);
        assert_eq!(unmapped.len(), 1);
        assert_eq!(p.docs, vec![b.clone(), c.clone(), c2.clone()]);
        assert_eq!(hashes, vec![doc_hash(&b), doc_hash(&c), doc_hash(&c2)]);
        let mapped = |p: &Page, unmapped| {
            let mut m = map_page(e, &p.docs, true);
            m.unmapped = unmapped;
            m
        };

        // The batch's turn, nothing changed: a is skipped, counted, its id resolved.
        let mut m = mapped(&p, unmapped);
        confirm_pre_skipped(&pulled, e, &mut p, &mut m, false);
        assert_eq!(m.skipped_unmapped, 1);
        assert_eq!(m.rows.len(), 2, "b and the later c");
        assert_eq!(p.docs.len(), 3);
        assert!(m.resolved.contains(&source_id(&a)), "{:?}", m.resolved);

        // An earlier batch wrote a (another version) after the guess: the page is whole again.
        let mut p = page();
        let (unmapped, _) = pre_skip(&pulled, e, &mut p.docs);
        let mut m = mapped(&p, unmapped);
        pulled.lock().unwrap().forget(key(e, "a"));
        confirm_pre_skipped(&pulled, e, &mut p, &mut m, false);
        assert_eq!(m.skipped_unmapped, 0);
        assert!(m.unmapped.is_empty());
        assert_eq!(p.docs, page().docs, "in the page's order");
        assert_eq!(m.rows.len(), 3, "a, b and the later c");
        assert_eq!(m.doc_hashes.len(), 4);
        assert_eq!(m.row_docs, vec![0, 1, 3]);
    }

    #[test]
    fn nothing_is_taken_out_when_nothing_matches() {
        let m = Mapping::parse(MAPPING, "test").unwrap();
        let e = m.entity("items").unwrap();
        let pulled = Mutex::new(Pulled::default());
        pulled.lock().unwrap().record(&[(key(e, "zz"), 1)]);
        let mut docs = vec![doc("a", 1), bson::rawdoc! { "_id": 9, "t": 1 }];
        let (unmapped, hashes) = pre_skip(&pulled, e, &mut docs);
        assert!(unmapped.is_empty());
        assert_eq!(docs.len(), 2);
        assert_eq!(hashes.len(), 2);
    }
}
