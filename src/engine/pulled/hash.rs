//! Hashes of the pulled set: of a row's key and of a whole document.

use crate::mapping::{Entity, Value};
use std::hash::{Hash, Hasher};

fn sip() -> std::hash::DefaultHasher {
    std::hash::DefaultHasher::new()
}

/// Hash of `(entity, primary key)` of a mapped row.
pub fn key_hash(e: &Entity, row: &[Value]) -> u64 {
    hash_key(e, e.pk.iter().map(|&i| &row[i]))
}

/// Hash of a key as a deletion names it (the primary key's values, in order).
pub fn deleted_key_hash(e: &Entity, key: &[Value]) -> u64 {
    hash_key(e, key.iter())
}

fn hash_key<'v>(e: &Entity, key: impl Iterator<Item = &'v Value>) -> u64 {
    let mut h = sip();
    e.name.hash(&mut h);
    for v in key {
        v.key_text().hash(&mut h);
    }
    h.finish()
}

/// Hash of a whole raw document (its exact bytes), seeded differently from [`key_hash`].
pub fn doc_hash(doc: &bson::RawDocument) -> u64 {
    let mut h = sip();
    0x7469_6465_6d61_726bu64.hash(&mut h);
    doc.as_bytes().hash(&mut h);
    h.finish()
}
