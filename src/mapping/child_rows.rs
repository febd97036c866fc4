//! The child rows of one document's exploded array, mapped one element at a time
//! ([`ChildRows`]): [`super::Entity::map`] collects them all; the writer of a document with
//! a very large array takes them a piece at a time, so that memory follows the document,
//! not its array.

use super::expr::{self, Scope};
use super::{lookup, map_columns, Child, Input, MapError, Value};
use bson::raw::{RawArrayIter, RawBsonRef};
use bson::RawDocument;

/// An iterator over a document's rows of one child table (see [`Child::rows`]).
pub struct ChildRows<'a> {
    child: &'a Child,
    doc: &'a RawDocument,
    parent_row: &'a [Value],
    elements: Option<std::iter::Enumerate<RawArrayIter<'a>>>,
    /// The CEL values of the parent document, built once for all its elements.
    cache: expr::DocCache,
}

impl<'a> ChildRows<'a> {
    pub(super) fn new(
        child: &'a Child,
        doc: &'a RawDocument,
        parent_row: &'a [Value],
    ) -> Result<Self, MapError> {
        let elements = match lookup(doc, &child.path).map_err(|m| child.error(m))? {
            None | Some(RawBsonRef::Null) => None,
            Some(RawBsonRef::Array(a)) => Some(a.into_iter().enumerate()),
            Some(_) => return Err(child.error("expected an array".into())),
        };
        Ok(ChildRows {
            child,
            doc,
            parent_row,
            elements,
            cache: expr::DocCache::default(),
        })
    }

    /// The next `n` rows at most (fewer only at the end of the array).
    pub fn take_piece(&mut self, n: usize) -> Result<Vec<Vec<Value>>, MapError> {
        self.by_ref().take(n).collect()
    }
}

impl Iterator for ChildRows<'_> {
    type Item = Result<Vec<Value>, MapError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (i, el) = self.elements.as_mut()?.next()?;
        let c = self.child;
        let el = match el {
            Ok(el) => el,
            Err(e) => return Some(Err(c.error(format!("undecodable element {i}: {e}")))),
        };
        let input = Input {
            base: el,
            top: None,
            parent_row: Some(self.parent_row),
            index: Some(i),
            scope: Scope {
                doc: Some(self.doc),
                element: Some(el),
                parent: Some(self.doc),
                index: Some(i),
                cache: Some(&self.cache),
            },
        };
        Some(map_columns(&c.columns, &input).map_err(|e| MapError {
            column: format!("{}[{i}].{}", c.name, e.column),
            message: e.message,
        }))
    }
}

impl Child {
    /// An error about the child's array as a whole.
    fn error(&self, message: String) -> MapError {
        MapError {
            column: format!("{}.{}", self.name, self.path.join(".")),
            message,
        }
    }
}

/// A 128-bit hash of a row's key (`pk`: its columns), two SipHashes with different salts over
/// its key text: distinct keys collide with a probability of about 2^-128 per pair. The
/// writer of a big parent's child rows keeps these, not the keys, to tell stale rows.
pub fn child_key_hash(row: &[Value], pk: &[usize]) -> u128 {
    use std::hash::{Hash, Hasher};
    let text = super::value::key_text_of(row, pk);
    let half = |salt: u8| {
        let mut h = std::hash::DefaultHasher::new();
        salt.hash(&mut h);
        text.hash(&mut h);
        h.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}
