//! Hashes of the pulled set: of a row's key, of a whole document, and a hasher for
//! keys that are hashes already.

use crate::mapping::{Entity, Value};
use std::hash::{Hash, Hasher};

#[derive(Default)]
pub(crate) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    /// A shard's 32-bit tags: spread over all 64 bits (Fibonacci hashing), because the hash
    /// table takes its control byte from the top seven bits, which a tag alone leaves zero.
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

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
